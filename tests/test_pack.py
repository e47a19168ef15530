"""A pack trains N trials as one stacked model: each member ends with the weights, BatchNorm statistics and
losses of the same trial trained alone (with its own seed, optimizer values, schedule and label smoothing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cnnlab.core.plugins import load_components
from cnnlab.core.registry import MODELS, OPTIMIZERS, SCHEDULERS
from cnnlab.training.losses import build_loss
from cnnlab.training.pack import Pack, member_losses, packable

STEPS = 12


def lenet(seed: int) -> nn.Module:
    load_components()
    torch.manual_seed(seed)
    return MODELS.build("lenet5", {}, "model", in_channels=1, num_classes=10, input_size=28)


def bn_mlp(seed: int) -> nn.Module:
    load_components()
    torch.manual_seed(seed)
    return MODELS.build("mlp", {"hidden": [32, 16], "batch_norm": True}, "model", in_channels=1, num_classes=10,
                        input_size=28)


def batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.rand(24, 1, 28, 28, generator=g), torch.randint(0, 10, (24,), generator=g)) for _ in range(STEPS)]


MEMBERS = [  # (seed, optimizer options, label smoothing)
    (0, {"lr": 0.05}, 0.0), (1, {"lr": 0.01, "weight_decay": 1e-3}, 0.1),
    (2, {"lr": 0.1, "momentum": 0.5}, 0.0), (3, {"lr": 0.02}, 0.2),
]


def optimizer_and_schedule(model, optimizer: str, options: dict, scheduler: str):
    if optimizer != "sgd" and "momentum" in options:  # Adam's own momentum: its first beta
        options = {**{k: v for k, v in options.items() if k != "momentum"}, "betas": (options["momentum"], 0.99)}
    opt = OPTIMIZERS.build(optimizer, options, "optimizer", model=model)
    options = {"step_size": 1} if scheduler == "step" else {}
    sched = SCHEDULERS.build(scheduler, options, "scheduler", optimizer=opt, steps_per_epoch=STEPS // 2, epochs=2)
    return opt, sched


def trained_alone(build, optimizer, scheduler, seed, options, smoothing):
    model = build(seed)
    opt, sched = optimizer_and_schedule(model, optimizer, options, scheduler)
    loss_fn, losses = build_loss("cross_entropy", smoothing), []
    model.train()
    for x, y in batches():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.state_dict(), losses


def trained_packed(build, optimizer, scheduler):
    members = [build(seed) for seed, _, _ in MEMBERS]
    pack = Pack(members)
    steppers = [optimizer_and_schedule(m, optimizer, opts, scheduler) for m, (_, opts, _) in zip(members, MEMBERS)]
    smoothing = torch.tensor([s for _, _, s in MEMBERS])
    losses = []
    pack.train()
    for x, y in batches():
        pack.zero_grad()
        loss = member_losses(pack(x), y, smoothing)
        loss.sum().backward()
        pack.share_grads()
        for opt, sched in steppers:
            opt.step()
            sched.step()
        losses.append(loss.tolist())
    return [pack.member_state(i) for i in range(len(members))], [list(column) for column in zip(*losses)]


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-12)).item()
               for k in a)


@pytest.mark.parametrize("build, optimizer, scheduler", [
    (lenet, "sgd", "onecycle"),      # SGD with Nesterov momentum (sgd's default)
    (bn_mlp, "adamw", "cosine"),     # BatchNorm: each member's running statistics are its own
    (bn_mlp, "sgd", "step"),
])
def test_each_member_of_a_pack_of_4_trains_as_its_trial_alone(build, optimizer, scheduler):
    """Weights and BatchNorm statistics within 1e-4 (relative), every step's loss to 4 decimals."""
    packed, packed_losses = trained_packed(build, optimizer, scheduler)
    worst = 0.0
    for i, (seed, options, smoothing) in enumerate(MEMBERS):
        alone, losses = trained_alone(build, optimizer, scheduler, seed, options, smoothing)
        worst = max(worst, relative_difference(alone, packed[i]))
        assert packed_losses[i] == pytest.approx(losses, abs=1e-4)
    assert worst < 1e-4
    # the members trained apart: no two ended alike
    assert relative_difference(packed[0], packed[1]) > 1e-2


def test_a_member_saves_its_own_rows_only_and_loads_into_a_model_alone():
    pack = Pack([bn_mlp(s) for s in range(3)])
    state = pack.member_state(1)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in state.values())
    alone = bn_mlp(9)
    alone.load_state_dict(state)
    x = torch.rand(5, 1, 28, 28)
    alone.eval(), pack.train(False)
    torch.testing.assert_close(alone(x), pack(x)[1])


def test_what_cannot_be_packed_says_why():
    assert packable([lenet(0), lenet(1)], torch.rand(3, 1, 28, 28)) is None
    assert packable([lenet(0), bn_mlp(0)]) == "the members' architectures differ (their parameters' names or shapes)"
    load_components()
    googlenet = [MODELS.build("googlenet", {"aux_classifiers": True}, "model", in_channels=3, num_classes=10, input_size=32)
                 for _ in range(2)]
    for m in googlenet:
        m.train()
    assert packable(googlenet, torch.rand(2, 3, 32, 32)).startswith(("the model returns", "torch.func.vmap cannot"))
    with pytest.raises(ValueError, match="architectures differ"):
        Pack([lenet(0), bn_mlp(0)])


# ---- packed trials through `cnnlab train -m hydra.sweeper.pack=N` --------------------------------------------

SMALL = ["dataset=synthetic", "dataset.channels=1", "dataset.size=28", "dataset.classes=4", "dataset.train_size=256",
         "dataset.test_size=64", "trainer.epochs=2", "data.batch_size=32", "trainer.device=cpu",
         "trainer.deterministic=true"]
RECIPES = {  # what each member varies, over what the pack shares
    "lenet5, SGD Nesterov, one-cycle, crop+flip, EMA, label smoothing": [
        "model=lenet5", "augment=crop_flip", "trainer.ema_decay=0.9", "optimizer.lr=0.02,0.05",
        "trainer.label_smoothing=0,0.1"],
    "BN-MLP, dropout, crop+flip, EMA, cosine; SGD Nesterov or AdamW, seeds": [
        "model=mlp", "model.hidden=[32,16]", "model.batch_norm=true", "model.dropout=0.2", "augment=crop_flip",
        "trainer.ema_decay=0.9", "trainer.label_smoothing=0.1", "scheduler=cosine", "optimizer.lr=0.005",
        "optimizer=sgd,adamw", "seed=1,2"],
}


def sweep(cwd: Path, folder: str, *args: str):
    from tests.conftest import run_cli

    result = run_cli("train", "-m", *SMALL, *args, f"hydra.sweep.dir={cwd / folder}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def whole_model_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over every floating-point tensor of a state_dict, as one vector."""
    keys = [k for k in a if a[k].is_floating_point()]
    flat = [torch.cat([s[k].double().flatten() for k in keys]) for s in (a, b)]
    return ((flat[0] - flat[1]).norm() / flat[0].norm()).item()


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_pack_of_4_trials_trains_each_as_it_trains_alone(tmp_path, recipe):
    """With trainer.deterministic=true, each member of a pack of 4 has the per-epoch metrics (3 decimals) and the
    weights, BatchNorm statistics and EMA (within 1e-4, relative) of the same trial run unpacked."""
    import json

    from cnnlab.runtime.checkpoint import load_checkpoint

    packed = sweep(tmp_path, "packed", *RECIPES[recipe], "hydra.sweeper.pack=4")
    assert "pack of 4: trials 0, 1, 2, 3" in packed.stdout
    sweep(tmp_path, "alone", *RECIPES[recipe])
    for k in "0123":
        alone, member = (json.loads((tmp_path / f / k / "summary.json").read_text()) for f in ("alone", "packed"))
        assert member["status"] == alone["status"] == "completed"
        for a, m in zip(alone["history"], member["history"], strict=True):
            for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
                assert round(a[key], 3) == round(m[key], 3), (k, key, a[key], m[key])
        states = [load_checkpoint(tmp_path / f / k / "checkpoints" / "last.pt") for f in ("alone", "packed")]
        for part in ("model", "ema"):
            if states[0][part] is not None:
                assert whole_model_difference(states[0][part], states[1][part]) < 1e-4, (k, part)
        trial = json.loads((tmp_path / "packed" / k / "trial.json").read_text())
        assert trial["overrides"] == json.loads((tmp_path / "alone" / k / "trial.json").read_text())["overrides"]
        assert trial["pack"] == [str(tmp_path / "packed" / j) for j in "0123"]
        # its train.log holds its own lines only: its start and its epochs, none of the other members'
        log = (tmp_path / "packed" / k / "train.log").read_text()
        starts = [line for line in log.splitlines() if "start: run=" in line]
        assert len(starts) == 1 and f"run={tmp_path / 'packed' / k};" in starts[0]
        assert sum("epoch 2/2" in line for line in log.splitlines()) == 1
    # a member is a run like any: its checkpoint loads as the trial alone's does
    import cnnlab

    x = torch.rand(3, 1, 28, 28)
    model_alone, prepare = cnnlab.load(tmp_path / "alone" / "2")
    model_packed, _ = cnnlab.load(tmp_path / "packed" / "2")
    torch.testing.assert_close(model_packed(prepare(x)), model_alone(prepare(x)), rtol=1e-3, atol=1e-4)


def test_trials_that_differ_in_the_model_run_unpacked_after_one_line(tmp_path):
    from tests.conftest import TINY, run_cli

    result = run_cli("train", "-m", *[o for o in TINY if not o.startswith("model.hidden")],
                     "model.hidden=[8],[16]", "hydra.sweeper.pack=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("hydra.sweeper.pack=2: the trials run one at a time, not packed: the trials differ in model.hidden, and a "
            "pack's members share the model, data, batches and epochs") in result.stderr
    assert "pack of" not in result.stdout and result.stdout.strip().splitlines()[-1].startswith("sweep: 2 trials (2 completed)")


def test_a_config_a_pack_cannot_share_runs_its_trials_one_after_another(tmp_path):
    from tests.conftest import TINY, run_cli

    result = run_cli("train", "-m", *TINY, "trainer.accumulate_steps=2", "optimizer.lr=0.05,0.1",
                     "hydra.sweeper.pack=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trials 0, 1 run one after another, not packed: trainer.accumulate_steps > 1" in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("sweep: 2 trials (2 completed)")


def test_pack_must_be_a_whole_number(tmp_path):
    from tests.conftest import TINY, run_cli

    result = run_cli("train", "-m", *TINY, "optimizer.lr=0.05,0.1", "hydra.sweeper.pack=0", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: hydra.sweeper.pack must be auto or an integer >= 1 (trials trained as one stacked model), got 0")
    assert not (tmp_path / "outputs").exists()  # a refused command writes nothing


def test_pack_auto_fits_the_gpu_memory_share_of_its_worker_and_is_one_trial_at_a_time_on_the_cpu():
    from hydra_plugins.cnnlab_sweeper import CnnlabSweeper

    from cnnlab.service.run import auto_pack
    from cnnlab.training.pack import PACK_MOST, pack_for_memory
    from tests.conftest import TINY

    gib = 2**30
    assert pack_for_memory(10 * gib, 80 * gib, gib) == 8  # 80% of what is free
    assert pack_for_memory(80 * gib, 80 * gib, 2 * gib, workers=4) == 8  # a quarter of the GPU each, 80% of it
    assert pack_for_memory(1 * gib, 80 * gib, gib // 1024) == PACK_MOST  # a tiny member: at most PACK_MOST
    assert pack_for_memory(gib // 2, 80 * gib, gib) == 1  # not even one fits: the trial still runs, alone
    # The sweeper takes auto and leaves it to the worker; off CUDA the worker trains each trial alone, saying nothing.
    assert CnnlabSweeper(pack="auto").pack_size({"optimizer.lr": "0.1,0.2"}, in_process=True) == "auto"
    assert auto_pack([*TINY, "optimizer.lr=0.1"], 1, "hydra.sweeper.pack") == (1, None)


def test_a_stopped_pack_checkpoints_every_member_and_a_rerun_continues_them_exactly(tmp_path):
    """SIGTERM inside a pack's second epoch: every member checkpoints where the pack stood; the same command again
    continues them, and each ends as its trial run alone, unstopped, ends."""
    import json
    import signal
    import time

    from cnnlab.runtime.checkpoint import load_checkpoint
    from tests.conftest import run_cli, start_worker

    args = [*SMALL, "model=lenet5", "dataset.train_size=2000", "trainer.epochs=3", "optimizer.lr=0.02,0.05"]
    folder = tmp_path / "packed"
    worker = start_worker(tmp_path, *args, "hydra.sweeper.pack=2", f"hydra.sweep.dir={folder}")
    deadline = time.monotonic() + 120
    while not (folder / "1" / "checkpoints" / "last.pt").is_file():  # the pack's first epoch is over
        assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()[1][-2000:]
        time.sleep(0.02)
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode != 0 and "stopped by SIGTERM" in err, err[-2000:]
    stopped = [load_checkpoint(folder / k / "checkpoints" / "last.pt") for k in "01"]
    assert not list(folder.glob("*/summary.json")) and all(s["epoch"] < 3 for s in stopped)
    assert len({(s["epoch"], (s.get("partial") or {}).get("batch")) for s in stopped}) == 1  # where the pack stood

    rerun = run_cli("train", "-m", *args, "hydra.sweeper.pack=2", f"hydra.sweep.dir={folder}", cwd=tmp_path)
    assert rerun.returncode == 0 and "pack of 2" in rerun.stdout, rerun.stderr[-2000:]
    sweep(tmp_path, "alone", *args)
    for k in "01":
        alone, member = (json.loads((tmp_path / f / k / "summary.json").read_text()) for f in ("alone", "packed"))
        assert [round(r["val/acc"], 3) for r in member["history"]] == [round(r["val/acc"], 3) for r in alone["history"]]
        assert [round(r["train/loss"], 3) for r in member["history"]] == [round(r["train/loss"], 3) for r in alone["history"]]
        states = [load_checkpoint(tmp_path / f / k / "checkpoints" / "last.pt")["model"] for f in ("alone", "packed")]
        assert whole_model_difference(*states) < 1e-4


def test_a_pbt_population_trains_its_intervals_as_packs_with_the_same_exploits(tmp_path):
    """scheduler=pbt with pack=4: each generation's intervals train as one pack; the exploit copies a member's
    checkpoint into another's between intervals, as unpacked, so the schedules and the members' metrics match."""
    import json

    args = ["model=mlp", "model.hidden=[32]", "trainer.epochs=2", "hydra.sweeper.scheduler=pbt", "hydra/sweeper/sampler=random",
            "optimizer.lr=tag(log, interval(0.001, 0.5))", "hydra.sweeper.pbt.population=4"]
    packed = sweep(tmp_path, "packed", *args, "hydra.sweeper.pack=4")
    assert packed.stdout.count("pack of 4") == 2  # one pack a generation
    sweep(tmp_path, "alone", *args)
    copies = 0
    for k in "0123":
        schedules = [json.loads((tmp_path / f / k / "pbt.json").read_text())["schedule"] for f in ("alone", "packed")]
        assert [(s["epochs"], s["params"], s["copied_from"]) for s in schedules[0]] == \
               [(s["epochs"], s["params"], s["copied_from"]) for s in schedules[1]]
        copies += sum(s["copied_from"] is not None for s in schedules[1])
        alone, member = (json.loads((tmp_path / f / k / "summary.json").read_text()) for f in ("alone", "packed"))
        assert [round(r["val/acc"], 3) for r in member["history"]] == [round(r["val/acc"], 3) for r in alone["history"]]
    assert copies >= 1  # an exploit happened, inside the packed search too


def test_in_a_pack_a_refused_config_fails_its_trial_and_a_diverged_member_leaves_while_the_rest_train_on(tmp_path):
    import json

    from tests.conftest import TINY, run_cli

    result = run_cli("train", "-m", *[o for o in TINY if not o.startswith("trainer.epochs")], "trainer.epochs=3",
                     "optimizer.lr=-1,0.05,50,0.1", "hydra.sweeper.pack=4", f"hydra.sweep.dir={tmp_path / 'sw'}",
                     cwd=tmp_path)
    assert "pack of 4: trials 0, 1, 2, 3" in result.stdout, result.stderr[-2000:]
    assert "trial 0 failed: optimizer.lr must be a number > 0, got -1" in result.stderr
    s = {k: json.loads((tmp_path / "sw" / k / "summary.json").read_text()) for k in "0123"}
    assert [s[k]["status"] for k in "0123"] == ["failed", "completed", "diverged", "completed"]
    assert len(s["2"]["history"]) < 3 and s["2"]["error"].startswith("loss diverged at step")
    assert len(s["1"]["history"]) == len(s["3"]["history"]) == 3  # the pack went on without it
    assert json.loads((tmp_path / "sw" / "1" / "trial.json").read_text())["pack"] == [
        str(tmp_path / "sw" / k) for k in "123"]  # the refused trial never joined
