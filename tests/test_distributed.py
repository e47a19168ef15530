"""DistributedDataParallel under torchrun, on the CPU with gloo and 2 processes: the same
training as 1 process with the same global batch, with rank 0 alone writing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnlab.runtime.checkpoint import load_checkpoint
from tests.conftest import TINY, run_cli


def torchrun(*args: str, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "CNNLAB_OUTPUT_DIR": str(cwd / "outputs"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
         "-m", "cnnlab", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ddp")
    # trainer.devices=2: cnnlab starts the two processes itself, with torchrun's environment
    two = run_cli("train", *TINY, "trainer.devices=2", f"hydra.run.dir={folder / 'two'}", cwd=folder)
    assert two.returncode == 0, two.stderr
    one = run_cli("train", *TINY, f"hydra.run.dir={folder / 'one'}", cwd=folder)
    assert one.returncode == 0, one.stderr
    return {"one": folder / "one", "two": folder / "two", "stdout": two.stdout}


@pytest.mark.integration
def test_two_processes_train_as_one_with_the_same_global_batch(runs):
    one, two = (load_checkpoint(runs[k] / "checkpoints" / "last.pt")["model"] for k in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)
    s1, s2 = (json.loads((runs[k] / "summary.json").read_text()) for k in ("one", "two"))
    assert s2["processes"] == 2 and s1["processes"] == 1
    for a, b in zip(s1["history"], s2["history"]):  # metrics are reduced over both ranks' shares
        assert a["step"] == b["step"]
        for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert s2["selected"]["test"]["count"] == 40 and s2["sizes"] == s1["sizes"]


@pytest.mark.integration
def test_only_rank_0_writes_logs_and_checkpoints(runs):
    two = runs["two"]
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["best.pt", "last.pt", "previous.pt"]
    assert runs["stdout"].count("cnnlab train") == 1  # one start panel: rank 1's console is quiet
    assert "2 processes (DDP)" in runs["stdout"]


@pytest.mark.integration
def test_torchrun_runs_the_same_training(runs, tmp_path):
    result = torchrun("train", *TINY, f"hydra.run.dir={tmp_path / 'torchrun'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    a = load_checkpoint(runs["two"] / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "torchrun" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same 2-process computation, launched either way


@pytest.mark.integration
def test_devices_in_a_sweep_or_against_torchrun_is_one_line(tmp_path):
    result = run_cli("train", "-m", *TINY, "trainer.devices=2", "optimizer.lr=0.1", cwd=tmp_path)
    assert "trainer.devices=2 starts its processes from a single `cnnlab train`; a sweep's trials" in result.stderr
    result = torchrun("train", *TINY, "trainer.devices=3", cwd=tmp_path)
    assert result.returncode != 0 and "error: trainer.devices=3 starts its processes from a single " \
        "`cnnlab train`, but 2 were started by torchrun" in result.stderr


def test_a_global_batch_that_does_not_split_and_cpu_sync_batchnorm_are_one_line_before_any_process_starts(tmp_path):
    result = run_cli("train", *TINY, "trainer.devices=2", "data.batch_size=15", "trainer.sync_batchnorm=true",
                     cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: data.batch_size=15 is the global batch and must divide evenly over 2 processes"]
    result = run_cli("train", *TINY, "trainer.devices=2", "trainer.sync_batchnorm=true", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: trainer.sync_batchnorm=true needs CUDA devices (torch's SyncBatchNorm runs on GPUs only)"]
