"""Population-based training: two worker commands train one population; the bottom member copies the top one's
checkpoint and explores its values, which reach the member's optimizer, dropout and augmentation;
`cnnlab train replay=<member>` retrains a member bit for bit; bad settings are one line each."""

import json
import math
import signal
import time
from pathlib import Path

import optuna
import pytest
import torch

from tests.conftest import TINY, run_cli, start_worker

EPOCHS, POPULATION = 3, 4
SEARCH = ["optimizer.lr=tag(log, interval(0.01, 0.5))", "optimizer.weight_decay=tag(log, interval(1e-5, 1e-2))",
          "optimizer.momentum=0.8,0.9,0.95", "model.dropout=interval(0.0, 0.5)",
          "augment.ops.random_erasing.p=interval(0.1, 0.9)"]
BASE = [o for o in TINY if not o.startswith("trainer.epochs")] + [
    f"trainer.epochs={EPOCHS}", "trainer.deterministic=true", "scheduler=constant", "augment=erasing",
    "trainer.monitor=val/loss",  # continuous: no two members tie at an interval's end
    "trainer.log_every_n_steps=5", "viz.every_n_epochs=0", "viz.augment_samples=0"]
PBT = ["hydra.sweeper.scheduler=pbt", f"hydra.sweeper.pbt.population={POPULATION}", "hydra/sweeper/sampler=random",
       "hydra.sweeper.pbt.resample_probability=0"]


def trained_by(folder: Path, pid: int) -> bool:
    """Whether the worker ``pid`` has started an interval of some member (its trial.json says so)."""
    return any(json.loads(p.read_text() or "{}").get("pid") == pid for p in folder.glob("*/trial.json"))


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> Path:
    """A population of 4 trained for 3 one-epoch intervals by two worker commands on one sweep directory."""
    cwd = tmp_path_factory.mktemp("pbt")
    folder = cwd / "s"
    first = start_worker(cwd, *BASE, *SEARCH, *PBT, f"hydra.sweep.dir={folder}")
    # A start barrier: the first worker is held (SIGSTOP) in its first interval until the second, whose cold
    # start can outlast this whole tiny population, has started one too.
    deadline = time.monotonic() + 120
    while not trained_by(folder, first.pid):
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()[1][-2000:]
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)
    try:
        second = start_worker(cwd, *BASE, *SEARCH, *PBT, f"hydra.sweep.dir={folder}")
        while not trained_by(folder, second.pid):
            assert time.monotonic() < deadline and second.poll() is None, second.communicate()[1][-2000:]
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGCONT)
    for worker in (first, second):
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
    return folder


def intervals(folder: Path) -> dict[tuple[int, int], optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="synthetic-mlp", storage=f"sqlite:///{folder / 'optuna.db'}")
    return {(t.user_attrs["pbt_member"], t.user_attrs["pbt_generation"]): t for t in study.trials}


def checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_the_bottom_member_copies_the_top_one_and_explores_into_its_optimizer(population):
    units = intervals(population)
    assert sorted(units) == [(m, g) for m in range(POPULATION) for g in range(EPOCHS)]
    assert all(t.state.name == "COMPLETE" for t in units.values())
    assert len({t.user_attrs["pbt"]["worker"] for t in units.values()}) == 2  # both workers claimed intervals
    space = {"optimizer.lr": (0.01, 0.5), "optimizer.weight_decay": (1e-5, 1e-2), "model.dropout": (0.0, 0.5),
             "augment.ops.random_erasing.p": (0.1, 0.9)}
    for g in range(1, EPOCHS):
        copied = [(m, units[(m, g)].user_attrs["pbt_lineage"][-1]["copied_from"]) for m in range(POPULATION)]
        ((member, source),) = [(m, s) for m, s in copied if s is not None]  # quantile 0.25 of 4: one member
        values = {m: units[(m, g - 1)].value for m in range(POPULATION)}  # val/loss: lowest is best
        assert values[member] == max(values.values()) and values[source] == min(values.values())
        before, after = units[(source, g - 1)].params, units[(member, g)].params
        for key, (low, high) in space.items():  # explored: x0.8 or x1.2, kept inside the range
            assert any(math.isclose(after[key], min(max(before[key] * f, low), high)) for f in (0.8, 1.2)), key
        choices = [0.8, 0.9, 0.95]
        assert abs(choices.index(after["optimizer.momentum"]) - choices.index(before["optimizer.momentum"])) <= 1
        # the copy: the member's record at the interval's end is the source's, loss for loss
        history = checkpoint(population / str(member) / "checkpoints" / "last.pt")["history"]
        assert history[g - 1]["val/loss"] == values[source]
    for m in range(POPULATION):  # each member's last interval's values reached its optimizer and its config
        for g, path in ((1, population / str(m) / "pbt" / "1" / "last.pt"), (2, population / str(m) / "checkpoints" / "last.pt")):
            state, params = checkpoint(path), units[(m, g)].params
            group = state["optimizer"]["param_groups"][0]
            assert math.isclose(group["lr"], params["optimizer.lr"], rel_tol=1e-12)
            assert group["weight_decay"] == params["optimizer.weight_decay"]
            assert group["momentum"] == params["optimizer.momentum"]
            assert state["config"]["model"]["dropout"] == params["model.dropout"]
            assert state["config"]["augment"]["ops"]["random_erasing"]["p"] == params["augment.ops.random_erasing.p"]
        assert not (population / str(m) / "pbt" / "0").exists()  # generation g - 2's checkpoints are let go
    schedule = json.loads((population / "0" / "pbt.json").read_text())["schedule"]
    assert [s["epochs"] for s in schedule] == [[0, 1], [1, 2], [2, 3]]


def test_replay_retrains_a_member_bit_identical(population, tmp_path):
    units = intervals(population)
    member = next(m for m in range(POPULATION) if units[(m, EPOCHS - 1)].user_attrs["pbt_lineage"][1:] and any(
        s["copied_from"] is not None for s in units[(m, EPOCHS - 1)].user_attrs["pbt_lineage"]))
    result = run_cli("train", f"replay={population / str(member)}", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "retuned: optimizer.lr" in result.stdout
    mine, theirs = checkpoint(tmp_path / "r" / "checkpoints" / "last.pt"), checkpoint(population / str(member) / "checkpoints" / "last.pt")
    assert mine["epoch"] == theirs["epoch"] == EPOCHS
    assert all(torch.equal(mine["model"][k], theirs["model"][k]) for k in theirs["model"])
    assert [r["val/loss"] for r in mine["history"]] == [r["val/loss"] for r in theirs["history"]]


def test_replay_refuses_what_is_not_a_members_schedule(population, tmp_path):
    member = population / "1"
    result = run_cli("train", f"replay={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "no pbt.json there" in result.stderr
    result = run_cli("train", f"replay={member}", "seed=5", cwd=tmp_path)
    assert result.returncode == 2 and "this run differs from the member's in seed: 0 -> 5" in result.stderr, result.stderr
    result = run_cli("train", "-m", f"replay={member}", cwd=tmp_path)
    assert result.returncode == 2 and "replay= trains one PBT member again; run it without -m" in result.stderr
    forged = tmp_path / "forged"
    (forged / ".hydra").mkdir(parents=True)
    record = json.loads((member / "pbt.json").read_text())
    record["schedule"][0]["params"]["trainer.epochs"] = 100
    (forged / "pbt.json").write_text(json.dumps(record))
    result = run_cli("train", f"replay={forged}", cwd=tmp_path)
    assert result.returncode == 2 and "sets trainer.epochs, which PBT does not change; replay refuses it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()  # nothing written


@pytest.mark.parametrize(("args", "message"), [
    (["hydra.sweeper.scheduler=pbx"], "hydra.sweeper.scheduler must be none or pbt, got 'pbx' (did you mean: pbt?)"),
    ([*PBT, "hydra.sweeper.pbt.population=1"], "hydra.sweeper.pbt.population must be an integer >= 2, got 1"),
    ([*PBT, "hydra.sweeper.pbt.quantile=0.7"], "hydra.sweeper.pbt.quantile must be in (0, 0.5]"),
    ([*PBT, f"hydra.sweeper.pbt.interval_epochs={EPOCHS}"], f"hydra.sweeper.pbt.interval_epochs={EPOCHS} must be below trainer.epochs={EPOCHS}"),
    ([*PBT, "hydra.sweeper.pbt.perturb=[0.8,-1]"], "hydra.sweeper.pbt.perturb must be a list of factors > 0"),
    ([*PBT, "+hydra.sweeper.pbt.populaton=3"], "hydra.sweeper.pbt has no setting 'populaton' (did you mean: population?)"),
    ([*PBT, "hydra.sweeper.pruner=asha"], "leave hydra.sweeper.pruner none (got asha)"),
    ([*PBT, "hydra/sweeper/sampler=tpe"], "choose hydra/sweeper/sampler=random or sobol (got tpe)"),
    ([*PBT, "hydra.sweeper.n_trials=3"], "leave hydra.sweeper.n_trials unset (got 3)"),
    ([*PBT, "data.batch_size=8,16"], "data.batch_size cannot change mid-run (fix it for the whole sweep)"),
])
def test_bad_pbt_settings_are_one_line_and_write_nothing(tmp_path, args, message):
    search = [] if any(a.startswith("data.batch_size") for a in args) else SEARCH[:1]
    result = run_cli("train", "-m", *BASE, *search, *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()
