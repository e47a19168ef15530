"""`cnnlab tune`: every stage on synthetic data inside its budget, the sanity gate's diagnosis, bad settings in
one line, a tune killed mid-stage and rerun, and two workers on one tune."""

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, run_cli, start_cnnlab

E = 4  # trainer.epochs: the final stage's
TUNE = [o for o in TINY if not o.startswith(("trainer.epochs", "dataset.train_size", "trainer.log_every"))] + [
    f"trainer.epochs={E}", "dataset.train_size=320", "trainer.log_every_n_steps=5", "tune.gate_steps=30",
    "tune.lr_find_steps=20", "tune.top_k=2", "tune.seeds=2"]
BUDGET = 36


def tune_dir(cwd: Path) -> Path:
    (found,) = (cwd / "outputs" / "tunes").glob("*/*")
    return found


def trial_folders(folder: Path, stage: str) -> list[Path]:
    return sorted((p for p in (folder / stage).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def trained_epochs(run: Path) -> int:
    """The epochs a trial trained, from its own record (a diverged one: the epoch it stopped in too)."""
    summary = json.loads((run / "summary.json").read_text())
    return len(summary.get("history") or []) + (summary["status"] == "diverged")


def config_of(run: Path) -> dict:
    return yaml.safe_load((run / ".hydra" / "config.yaml").read_text())


def test_a_tiny_tune_runs_every_stage_inside_its_budget(tmp_path):
    result = run_cli("tune", *TUNE, f"tune.budget_epochs={BUDGET}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tune_dir(tmp_path)
    record = json.loads((folder / "tune.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["coarse", "refine1", "final"]
    # the budget: what the trials' own records say they trained, with the gate's steps, never past it
    gate = json.loads((folder / "gate.json").read_text())
    on_disk = gate["epochs"] + sum(trained_epochs(p) for s in ("coarse", "refine1", "final") for p in trial_folders(folder, s))
    assert math.isclose(record["epochs_spent"], on_disk) and on_disk <= BUDGET
    assert BUDGET - on_disk < E  # and it was spent: less than one final trial's epochs left
    # the gate: the initial loss near ln 4, one batch overfit, the LR window from the range test (gate.lr_window)
    assert abs(gate["initial_loss"] - math.log(4)) < 0.5 * math.log(4) and gate["overfit_accuracy"] >= 0.9
    coarse = json.loads((folder / "coarse" / "stage.json").read_text())["shown"]
    low, high = (float(x) for x in coarse["optimizer.lr"].split("(")[-1].rstrip(")").split(","))
    assert math.isclose(low, min(gate["suggested_lr"], gate["lowest_loss_lr"]) / 3, rel_tol=1e-4)
    last = json.loads((folder / "gate" / "lr_find" / "lr_find.json").read_text())["lr"][-1]
    assert math.isclose(high, min(gate["lowest_loss_lr"] * 10, last), rel_tol=1e-4)  # never above what the test tried
    assert set(coarse) == {"optimizer.lr", "optimizer.weight_decay", "optimizer.momentum"}  # conf/tune/space/sgd.yaml
    # each stage trains its trials for its epochs; the final stage: top_k configurations x seeds, at trainer.epochs
    assert {config_of(p)["trainer"]["epochs"] for p in trial_folders(folder, "coarse")} == {1}
    assert {config_of(p)["trainer"]["epochs"] for p in trial_folders(folder, "refine1")} == {2}
    finals = [config_of(p) for p in trial_folders(folder, "final")]
    assert len(finals) == 4 and {f["trainer"]["epochs"] for f in finals} == {E}
    assert sorted(f["seed"] for f in finals) == [0, 0, 1, 1]
    for trial in trial_folders(folder, "final"):  # each trial's log lines in its own train.log, as `cnnlab train`'s
        assert "INFO cnnlab: val: loss" in (trial / "train.log").read_text()  # (the test split: once, at the end)
    assert len({(f["optimizer"]["lr"], f["optimizer"]["weight_decay"]) for f in finals}) == 2
    # refine: inside a narrower box, told of the coarse trials in it (not run again)
    refine = record["stages"][1]
    assert refine["told_of"] >= 1 and refine["trials"] == len(trial_folders(folder, "refine1"))
    refined = json.loads((folder / "refine1" / "stage.json").read_text())["shown"]["optimizer.lr"]
    r_low, r_high = (float(x) for x in refined.split("(")[-1].rstrip(")").split(","))
    assert r_high / r_low < high / low
    # chosen on the mean of its seeds, tested once, and the command to train it again names its values
    chosen = record["chosen"]
    assert chosen["mean"] == max(r["mean"] for r in record["final"])
    assert json.loads((folder / "test.json").read_text())["run"] == chosen["run"] and 0 <= record["test"]["acc"] <= 1
    assert f"optimizer.lr={chosen['config']['optimizer.lr']!r}" in record["command"]
    assert (folder / "tune.png").stat().st_size > 1000
    # TensorBoard: each trial named by its stage and what it varies
    names = [p.name for p in (folder / "tensorboard").iterdir()]
    assert any(n.startswith("coarse lr=") for n in names) and any(n.startswith("final lr=") and "seed=1" in n for n in names)
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"record: {folder / 'tune.json'}" and "train it again: cnnlab train" in result.stdout
    # planned before it ran: the gate's cost from the steps it takes (as gate.json then records it), and HParams
    plan = json.loads((folder / "plan.json").read_text())
    assert math.isclose(plan["gate_epochs"], gate["epochs"]) and plan["train_images"] == gate["train_images"]
    assert f"gate {gate['epochs']:.1f}" in lines[0] and [s["stage"] for s in plan["stages"]] == ["coarse", "refine1", "final"]
    assert any(p.name.startswith("events") for p in (folder / "tensorboard").iterdir())  # the HParams experiment
    # the test score where runs and compare read it: the chosen run's summary, and the tune's own row
    chosen_summary = json.loads((Path(chosen["run"]) / "summary.json").read_text())
    assert chosen_summary["selected"]["test"]["acc"] == record["test"]["acc"]
    rows = json.loads(run_cli("runs", str(folder), "--json", cwd=tmp_path).stdout)
    (tune_row,) = [r for r in rows if r["task"] == "tune"]
    assert tune_row["test/acc"] == record["test"]["acc"] and tune_row["best"] == chosen["mean"]
    assert not any(r["path"].endswith("lr_find") for r in rows)


@pytest.mark.parametrize(("args", "message"), [
    ([], "error: cnnlab tune needs tune.budget_epochs=N"),
    (["tune.budget_epochs=10"], "error: tune.budget_epochs=10 is too small: the final stage takes tune.top_k x tune.seeds x "
                                "trainer.epochs = 2 x 2 x 4 = 16 epochs"),
    (["tune.budget_epochs=100", "tune.top_kk=2"], "error: tune has no setting 'top_kk' (did you mean: top_k?)"),
    (["tune.budget_epochs=100", "tune.top_q=2"], "error: tune.top_q must be"),
    (["tune.budget_epochs=100", "tune.sampler=grid"], "error: tune.sampler must be"),
    (["tune.budget_epochs=100", "tune.coarse_epochs=9"], "error: tune.coarse_epochs=9 is more than trainer.epochs=4"),
    (["tune.budget_epochs=100", "-m"], "error: cnnlab tune runs its own search"),
    (["tune.budget_epochs=100", "optimizer.lr=interval(1, 0.1)"], "error: optimizer.lr=interval(1.0, 0.1): the lower end"),
    (["tune.budget_epochs=100", "modle=mlp"], "error: unknown config key 'modle'"),
    (["tune.budget_epochs=100", "tune.gpus=[1,1]"], "error: tune.gpus lists a GPU twice or an empty id: [1, 1]"),
    (["tune.budget_epochs=100", "tune.n_jobs=0"], "error: tune.n_jobs must be"),
    (["tune.budget_epochs=100", "tune.trials_per_gpu=0"], "error: tune.trials_per_gpu must be"),
    (["tune.budget_epochs=100", "tune.storage=postgresql://cnnlab:pw@127.0.0.1:9/cnnlab"],
     "error: tune.storage=postgresql://cnnlab:***@127.0.0.1:9/cnnlab: cannot open the study there: connection failed"),
])
def test_bad_tune_settings_are_one_line_and_write_nothing(tmp_path, args, message):
    result = run_cli("tune", *TUNE, *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()


def test_the_gate_stops_a_model_that_cannot_learn_before_any_search(tmp_path):
    result = run_cli("tune", *TUNE, "optimizer.lr=1e-7", "optimizer.weight_decay=0.0001,0.001",
                     f"tune.budget_epochs={BUDGET}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: the sanity gate stopped the tune before any search: the model cannot overfit "
                                    "one batch of 16 images") and len(result.stderr.strip().splitlines()) == 1
    folder = tune_dir(tmp_path)
    assert not (folder / "coarse").exists() and json.loads((folder / "gate.json").read_text())["passed"] is False


def start_tune(cwd: Path, folder: Path):
    env = {**os.environ, "CNNLAB_OUTPUT_DIR": str(cwd / "outputs"), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return start_cnnlab(["tune", *TUNE, f"tune.budget_epochs={BUDGET}", f"{folder}"], cwd, env)


def test_a_tune_killed_mid_stage_continues_where_it_stood(tmp_path):
    folder = tmp_path / "t"
    worker = start_tune(tmp_path, folder)
    deadline = time.monotonic() + 120
    while not (len(list((folder / "coarse").glob("*/summary.json"))) >= 3 and running_trial(folder / "coarse")):
        assert time.monotonic() < deadline and worker.poll() is None, worker.communicate()[1][-2000:]
        time.sleep(0.005)
    cut = running_trial(folder / "coarse")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    before = {p: p.stat().st_mtime_ns for p in (folder / "coarse").glob("*/summary.json")}
    again = run_cli("tune", *TUNE, f"tune.budget_epochs={BUDGET}", f"{folder}", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "gate passed" in again.stdout and "gate: initial loss" not in again.stdout  # not run twice
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished trials are not run again
    record = json.loads((folder / "tune.json").read_text())
    gate = json.loads((folder / "gate.json").read_text())
    on_disk = gate["epochs"] + sum(trained_epochs(p) for s in ("coarse", "refine1", "final") for p in trial_folders(folder, s))
    assert on_disk <= BUDGET and math.isclose(record["epochs_spent"], on_disk)
    import optuna

    study = optuna.load_study(study_name="tune-coarse", storage=f"sqlite:///{folder / 'tune.db'}")
    (failed,) = [t for t in study.trials if "cut_off" in t.user_attrs]  # the killed worker's trial, queued again...
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == failed.number]
    assert retry.state.name in ("COMPLETE", "PRUNED", "FAIL") and retry.user_attrs["job"] == int(cut.name)
    assert (cut / "summary.json").is_file()  # ...and run to its end in its own directory


def running_trial(stage: Path) -> Path | None:
    """A trial directory whose trial has started and not ended."""
    return next((p.parent for p in stage.glob("*/trial.json") if not (p.parent / "summary.json").exists()), None)


def trial_of(stage: Path, pid: int) -> Path | None:
    return next((p.parent for p in stage.glob("*/trial.json") if json.loads(p.read_text() or "{}").get("pid") == pid), None)


@pytest.mark.integration
def test_two_workers_share_one_tune(tmp_path):
    folder = tmp_path / "t"
    first = start_tune(tmp_path, folder)
    # A start barrier: the first worker is held (SIGSTOP) once it trains a coarse trial, until the second, whose
    # cold start can outlast this whole tiny tune, has claimed one too.
    deadline = time.monotonic() + 120
    while trial_of(folder / "coarse", first.pid) is None:
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()[1][-2000:]
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)
    try:
        second = start_tune(tmp_path, folder)
        while trial_of(folder / "coarse", second.pid) is None:
            assert time.monotonic() < deadline and second.poll() is None, second.communicate()[1][-2000:]
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGCONT)
    workers = [first, second]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outputs]
    pids = {json.loads((p / "trial.json").read_text())["pid"] for s in ("coarse", "refine1", "final")
            for p in trial_folders(folder, s)}
    assert pids == {w.pid for w in workers}  # both trained trials
    finals = trial_folders(folder, "final")
    assert len(finals) == 4  # the final grid once, not once per worker
    gate = json.loads((folder / "gate.json").read_text())
    on_disk = gate["epochs"] + sum(trained_epochs(p) for s in ("coarse", "refine1", "final") for p in trial_folders(folder, s))
    assert on_disk <= BUDGET
    tests = [out for out, _ in outputs if "test, once:" in out]
    assert len(tests) == 2 and len({line for out in tests for line in out.splitlines() if line.startswith("test, once")}) == 1


def test_the_final_stage_takes_its_own_finished_trials_first_then_those_it_was_told_of():
    from cnnlab.tuning.runner import top_configurations

    trials = [({"lr": 0.1}, 0.80, True), ({"lr": 0.2}, 0.91, False), ({"lr": 0.3}, 0.95, True), ({"lr": 0.2}, 0.90, True)]
    # ASHA left one refine trial finished: it comes first, then the coarse trials by value, no configuration twice
    assert top_configurations(trials, 3, maximize=True) == [{"lr": 0.2}, {"lr": 0.3}, {"lr": 0.1}]
    assert top_configurations(trials, 1, maximize=True) == [{"lr": 0.2}]
    assert top_configurations(trials, 2, maximize=False) == [{"lr": 0.2}, {"lr": 0.1}]  # a loss: lowest first


@pytest.mark.integration
def test_tune_workers_each_see_their_own_gpu_and_pack_the_trials_of_every_stage(tmp_path):
    """tune.gpus names two GPUs (none here: the assignment is what is tested, by the environment each worker
    received, as the trials' trial.json records it): two worker processes run the tune, one per GPU, and this
    process supervises, then reports what they recorded. tune.pack=4: each worker claims up to 4 trials of a
    stage and trains them as one pack (their trial.json says which); the stages, the budget and the final
    choice are as without a pack."""
    result = run_cli("tune", *TUNE, f"tune.budget_epochs={BUDGET}", "tune.pack=4", "tune.gpus=[3,5]",
                     f"{tmp_path / 't'}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"2 workers; GPUs: worker 0: GPU 3, worker 1: GPU 5; their logs: {tmp_path / 't' / 'workers'}" in result.stdout
    trials = [json.loads(p.read_text()) for p in (tmp_path / "t").glob("*/*/trial.json")]
    assert trials and {t["cuda_visible_devices"] for t in trials} <= {"3", "5"}
    by_worker = {}
    for t in trials:
        by_worker.setdefault(t["pid"], set()).add(t["cuda_visible_devices"])
    assert all(len(g) == 1 for g in by_worker.values()) and len(by_worker) <= 2
    assert len(list((tmp_path / "t" / "workers").glob("*.log"))) == 2
    record = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["coarse", "refine1", "final"] and record["epochs_spent"] <= BUDGET
    assert record["test"]["run"]
    packs = {tuple(t.get("pack") or ()) for t in trials}
    assert any(len(pack) > 1 for pack in packs)  # two workers share each stage's claims: packs of up to 4



def test_tune_budget_s_stops_the_search_stages_in_time_for_the_final_one(tmp_path):
    """tune.budget_s beside a large budget_epochs: the search stages stop starting trials once the final stage would
    not fit in the time left (at the speed measured so far), the final stage runs whole, and tune.json says so."""
    result = run_cli("tune", *TUNE, "tune.budget_epochs=400", "tune.budget_s=10", "tune.n_jobs=2",
                     f"{tmp_path / 't'}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # tune.n_jobs=2 without GPUs: this process and one helper share the tune (the helper's output in workers/)
    assert f"2 workers; their logs: {tmp_path / 't' / 'workers'}" in result.stdout
    assert len(list((tmp_path / "t" / "workers").glob("*.log"))) == 1
    record = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert record["budget_s"] == 10 and record["epochs_spent"] < 100  # the clock, not the epochs, ended the search
    assert "tune.budget_s=10 leaves no time for another trial" in result.stdout
    # the final stage whole: each configuration the search finished (top_k=2 at most; one on a loaded machine whose
    # clock ran out after the first coarse trial) with its 2 seeds
    final = [s for s in record["stages"] if s["stage"] == "final"][0]
    assert final["trials"] == 2 * len({tuple(sorted(r["config"].items())) for r in record["final"]})
    assert final["trials"] in (2, 4) and record["test"]["run"]
