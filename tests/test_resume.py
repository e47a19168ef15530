"""Nothing lost (#7): exact resume after SIGKILL, signals, checkpoint integrity and fallback,
disk full, the config a resume may change, and determinism."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnnlab.core.errors import CnnlabError
from cnnlab.runtime.checkpoint import PREVIOUS, load_checkpoint, load_resumable, save_checkpoint
from cnnlab.runtime.signals import StopRequest
from tests.conftest import TINY, run_cli as _run_cli, run_tiny, start_cnnlab

WIDE = {"COLUMNS": "40"}  # a narrow terminal width: output to a pipe is never wrapped to it


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run_cli(*args, cwd=cwd, env=WIDE)

# Long enough (900 steps) for a kill to land mid-run; deterministic, checkpointing inside epochs.
LONG = [o for o in TINY if not o.startswith(("dataset.train_size", "trainer.log_every"))] + [
    "dataset.train_size=8000", "trainer.deterministic=true", "trainer.checkpoint_every_n_steps=10",
    "trainer.log_every_n_steps=5",
]


def start_cli(*args: str, cwd: Path):
    return start_cnnlab(list(args), cwd, {**os.environ, "CNNLAB_OUTPUT_DIR": str(cwd / "outputs"), **WIDE})


def wait_for(path: Path, process, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.005)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def metrics(run_dir: Path) -> list[dict]:
    """summary.json's per-epoch records without the timings."""
    history = json.loads((run_dir / "summary.json").read_text())["history"]
    return [{k: v for k, v in r.items() if k not in ("train_time_s", "images_per_s")} for r in history]


def scalar_series(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must equal."""
    folder = tmp_path_factory.mktemp("reference")
    result = run_cli("train", *LONG, f"hydra.run.dir={folder / 'run'}", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder / "run"


def test_a_run_killed_at_a_random_step_resumes_bit_identical(tmp_path, reference):
    run_dir = tmp_path / "run"
    process = start_cli("train", *LONG, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for(run_dir / "checkpoints" / "last.pt", process)
    time.sleep(random.uniform(0.0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    killed_at = load_resumable(run_dir / "checkpoints")[0]["step"]
    assert not (run_dir / "summary.json").exists() and killed_at < 900  # it was cut off mid-run

    result = run_cli("train", f"{run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    assert same_weights(run_dir, reference), f"weights differ after a kill at step {killed_at}"
    assert metrics(run_dir) == metrics(reference)
    # the LR schedule continues, and TensorBoard holds each step once, as the uninterrupted run does
    assert scalar_series(run_dir, "train/lr") == scalar_series(reference, "train/lr")
    assert scalar_series(run_dir, "train/step_loss") == scalar_series(reference, "train/step_loss")


def test_sigterm_saves_a_resumable_checkpoint_and_exits_75(tmp_path, reference):
    run_dir = tmp_path / "run"
    process = start_cli("train", *LONG, "trainer.checkpoint_every_n_steps=100000", f"hydra.run.dir={run_dir}",
                        cwd=tmp_path)
    wait_for(run_dir / "tensorboard", process)  # training has begun: the handlers are in place
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert f"stopped by SIGTERM at step {state['step']}; checkpoint: {run_dir / 'checkpoints' / 'last.pt'}; " \
           f"resume with: cnnlab train {run_dir}" in stderr and "Traceback" not in stderr

    # the same command again, in the same directory, continues by itself (a requeued job)
    result = run_cli("train", *LONG, "trainer.checkpoint_every_n_steps=100000", f"hydra.run.dir={run_dir}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'}" in result.stdout
    assert same_weights(run_dir, reference) and metrics(run_dir) == metrics(reference)


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one(tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)  # a finished run; its last checkpoint is about to be damaged
    (run_dir / "summary.json").unlink()
    last = run_dir / "checkpoints" / "last.pt"
    previous = run_dir / "checkpoints" / PREVIOUS
    assert load_checkpoint(previous)["step"] < load_checkpoint(last)["step"]
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights: torch.load alone would not notice
    last.write_bytes(bytes(data))
    with pytest.raises(CnnlabError, match=f"checkpoint {last} is corrupt"):
        load_checkpoint(last)

    result = run_cli("train", f"{run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"checkpoint {last} is corrupt" in out and f"falling back to {previous}" in out
    assert same_weights(run_dir, reference) and metrics(run_dir) == metrics(reference)


def test_a_truncated_checkpoint_is_named_and_a_missing_one_is_reported(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(100)}})
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CnnlabError, match=f"checkpoint {path} is unreadable or corrupt"):
        load_checkpoint(path)
    with pytest.raises(CnnlabError, match="no usable checkpoint"):
        load_resumable(tmp_path)
    assert load_resumable(tmp_path / "nothing") is None


def test_saving_keeps_the_replaced_checkpoint_as_previous(tmp_path):
    path = tmp_path / "last.pt"
    for step in (1, 2, 3):
        save_checkpoint(path, {"model": {}, "step": step}, keep_previous=True)
    assert load_checkpoint(path)["step"] == 3 and load_checkpoint(tmp_path / PREVIOUS)["step"] == 2
    assert torch.load(path, weights_only=True)["step"] == 3  # still a plain torch file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]  # no temp files left


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, capsys):
    """The second checkpoint's temp file is /dev/full: the kernel's own ENOSPC."""
    from cnnlab import cli

    real_mkstemp, calls = tempfile.mkstemp, []

    def full_after_first_checkpoint(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if Path(name).name.startswith(".last.pt."):
            calls.append(name)
            if len(calls) > 1:
                os.close(fd)
                return os.open("/dev/full", os.O_WRONLY), name
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", full_after_first_checkpoint)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *TINY, f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    last = run_dir / "checkpoints" / "last.pt"
    assert err == (f"error: cannot write {last}: {os.strerror(errno.ENOSPC)}; "
                   "the previous checkpoint is intact")
    state = load_checkpoint(last)
    assert state["epoch"] == 1 and state["partial"] is None  # epoch 1's, whole
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]


def test_resume_refuses_a_changed_config_and_lists_the_differences(tmp_path, reference):
    record = (reference / ".hydra" / "overrides.yaml").read_text()
    result = run_cli("train", f"{reference}", "optimizer.lr=0.5", "model.hidden=[8]", cwd=tmp_path)
    assert result.returncode == 2
    assert (reference / ".hydra" / "overrides.yaml").read_text() == record  # refused before Hydra rewrote it
    line = result.stderr.strip()
    assert line.startswith(f"error: cannot resume {reference}: the config differs from")
    assert "model.hidden: [16] -> [8]" in line and "optimizer.lr: 0.1 -> 0.5" in line
    assert len(line.splitlines()) == 1


def test_resume_of_a_finished_run_asks_for_more_epochs_and_then_trains_on(tmp_path, reference):
    result = run_cli("train", f"{reference}", cwd=tmp_path)
    assert result.returncode == 2
    assert "has already trained 2 epochs (trainer.epochs=2); raise trainer.epochs" in result.stderr

    run_dir = tmp_path / "run"
    assert run_cli("train", *LONG, "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    result = run_cli("train", f"{run_dir}", "trainer.epochs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["epoch"] for r in metrics(run_dir)] == [1, 2]


def test_resume_of_a_directory_without_checkpoints_is_one_line(tmp_path):
    result = run_cli("train", f"{tmp_path / 'nowhere'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {tmp_path / 'nowhere'}: no checkpoint there to continue "
                                     f"(looked for {tmp_path / 'nowhere' / 'checkpoints' / 'last.pt'})")


def test_stop_request_first_signal_asks_second_sigint_stops_at_once(capsys):
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signal == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # later requests change nothing
        assert stop.signal == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert "received SIGUSR1: saving a checkpoint at the next step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_deterministic_runs_give_identical_weights_and_metrics(tmp_path):
    a = run_tiny(tmp_path / "a", "trainer.deterministic=true", "model.dropout=0.3")
    assert torch.are_deterministic_algorithms_enabled()  # the option reached torch
    b = run_tiny(tmp_path / "b", "trainer.deterministic=true", "model.dropout=0.3")
    assert same_weights(tmp_path / "a", tmp_path / "b")
    strip = lambda s: [{k: v for k, v in r.items() if not k.endswith(("_s", "per_s"))} for r in s["history"]]  # noqa: E731
    assert strip(a) == strip(b) and a["selected"] == b["selected"]
    run_tiny(tmp_path / "c", "trainer.epochs=1")
    assert not torch.are_deterministic_algorithms_enabled()


# --- resuming inside an epoch: the loaders and the whole training state -----------------------

def noisy_transform(image: torch.Tensor) -> torch.Tensor:
    """A per-image transform that draws from torch's RNG, as v2's random transforms do."""
    return image + torch.randint(0, 50, image.shape, dtype=torch.uint8)


def make_loader(kind: str, workers: int = 0, world_size: int = 1, rank: int = 0):
    from cnnlab.data.loaders import InMemoryLoader, StreamingLoader, TensorImageDataset
    from tests.test_data import identity_pipeline

    images, labels = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1), torch.arange(50)
    common = dict(shuffle=True, drop_last=False, seed=3, device=torch.device("cpu"), transform=identity_pipeline(),
                  rank=rank, world_size=world_size)
    if kind == "memory":
        return InMemoryLoader(images, labels, 8, **common)
    return StreamingLoader(TensorImageDataset(images, labels, noisy_transform), 8, num_workers=workers, **common)


@pytest.mark.parametrize("kind", ["memory", "streaming"])
def test_an_epoch_restarted_from_its_saved_order_skips_exactly_the_batches_done(kind):
    loader = make_loader(kind)
    next(iter(loader))  # a first epoch moves the generator on
    order_state = loader.generator.get_state()
    full = list(loader.iterate())
    loader.generator.set_state(order_state)
    tail = list(loader.iterate(start=3))
    assert len(tail) == len(full) - 3
    for (x1, y1), (x2, y2) in zip(full[3:], tail):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(full[0][1], list(loader.iterate())[0][1])  # and the next epoch is a new order


def test_per_image_randomness_does_not_depend_on_the_workers():
    batches = {}
    for workers in (0, 2):
        loader = make_loader("streaming", workers=workers)
        batches[workers] = [b for _ in range(2) for b in loader]
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(y0, y2) and torch.equal(x0, x2)


def test_ranks_share_each_global_batch_between_them():
    whole = [y for _, y in make_loader("memory")]
    halves = [[y for _, y in make_loader("memory", world_size=2, rank=r)] for r in (0, 1)]
    for batch, a, b in zip(whole, *halves):
        assert torch.equal(torch.cat([a, b]), batch)


def test_a_run_stopped_mid_epoch_resumes_to_the_same_weights_with_ema_augmentation_and_dropout(
        tmp_path, monkeypatch):
    """In-process: a stop request at step 13 (inside epoch 2), then a resume, against a run never stopped."""
    import cnnlab.tasks.classify as classify_module
    from tests.conftest import train
    from cnnlab.core.errors import Preempted

    options = ("trainer.deterministic=true", "trainer.ema_decay=0.9", "augment=crop_flip", "model.dropout=0.2",
               "trainer.epochs=3")
    run_tiny(tmp_path / "straight", *options)

    class StoppedAt13(classify_module.Trainer):
        def stop_requested(self) -> bool:
            if self.step == 13 and self.stop is not None:
                self.stop.signal = "SIGTERM"
            return super().stop_requested()

    monkeypatch.setattr(classify_module, "Trainer", StoppedAt13)
    with pytest.raises(Preempted) as stopped:
        run_tiny(tmp_path / "cut", *options)
    assert stopped.value.step == 13
    state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["partial"]["batch"] == 4 and state["ema_updates"] == 13
    monkeypatch.undo()

    from tests.conftest import compose_config, quiet_console, tiny_plus

    train(compose_config(*tiny_plus(*options)), tmp_path / "cut", console=quiet_console(), resume=True)
    a, b = (load_checkpoint(tmp_path / name / "checkpoints" / "last.pt") for name in ("straight", "cut"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert metrics(tmp_path / "straight") == metrics(tmp_path / "cut")


def test_sigterm_stops_a_whole_sweep_which_then_resumes(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["train", "-m", *[o for o in LONG if not o.startswith("trainer.checkpoint")],
            "optimizer.lr=0.05,0.1", f"hydra.sweep.dir={sweep_dir}"]
    process = start_cli(*args, cwd=tmp_path)
    wait_for(sweep_dir / "tensorboard" / "lr=0.05 #0", process)  # the trial's TensorBoard folder
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr
    assert (f"resume with: the same command with hydra.sweep.dir={sweep_dir} sweep.resume=true" in stderr
            and "Traceback" not in stderr)
    assert not (sweep_dir / "1").exists()  # the sweep stopped with its first trial

    result = run_cli(*args, "sweep.resume=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sweep: 2 trials (2 completed), 0 failed" in result.stdout
    assert "resumed from" in result.stdout


def test_checkpoint_every_n_steps_writes_last_pt_inside_epochs(tmp_path, monkeypatch):
    import cnnlab.training.loop as loop

    written = []
    real_encode = loop.encode_checkpoint

    def recording_encode(state):  # once per save: last.pt, and best.pt with the same bytes
        written.append((state["step"], (state["partial"] or {}).get("batch")))
        return real_encode(state)

    monkeypatch.setattr(loop, "encode_checkpoint", recording_encode)
    run_tiny(tmp_path / "run", "trainer.checkpoint_every_n_steps=4")  # 9 batches an epoch
    assert written == [(4, 4), (8, 8), (9, None), (13, 4), (17, 8), (18, None)]


def test_dataloader_workers_ignore_ctrl_c_and_sigusr1_but_not_sigterm():
    from cnnlab.runtime.signals import ignore_stop_signals

    saved = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)}
    try:
        ignore_stop_signals()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == saved[signal.SIGTERM]  # multiprocessing ends workers with it
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
