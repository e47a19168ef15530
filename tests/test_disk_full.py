"""A full disk is one line: `error: cannot write <path>: No space left on device`, wherever the run was when
the space ran out (the run lock, .hydra/, TensorBoard's writer thread, the viz record, a checkpoint, a
sweep's database), with no traceback and no empty or half-written file left behind. The output folder is
a real 3 MiB tmpfs, filled to different levels before each run."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import run_cli

RUN = ["train", "dataset=synthetic", "dataset.train_size=256", "dataset.test_size=64", "trainer.device=cpu",
       "trainer.epochs=2"]
FULL = "No space left on device"


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A 3 MiB file system of its own (tmpfs; needs root, as CI has)."""
    mount = tmp_path_factory.mktemp("small_disk")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        reason = f"cannot mount a small tmpfs here: {made.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path, leave: int | None) -> Path:
    """Empty the disk, then fill it but ``leave`` bytes (None: to the last byte); returns a fresh output folder."""
    for path in disk.iterdir():
        subprocess.run(["rm", "-rf", str(path)], check=True)
    out = disk / f"out-{uuid.uuid4().hex[:6]}"
    out.mkdir()
    total = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        try:
            f.write(b"\0" * (total if leave is None else max(total - leave, 0)))
            f.flush()
        except OSError:
            pass  # full: what was meant
    return out


def assert_one_line_and_nothing_half_written(done, disk: Path) -> str:
    assert done.returncode == 2, done.stdout[-800:] + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write ") and FULL in lines[0], done.stderr
    assert not [p for p in disk.rglob("*") if p.is_file() and p.stat().st_size == 0 and p.name != "filler"]
    assert not list(disk.rglob("*.tmp"))  # atomic writes leave no temp file
    return lines[0]


@pytest.mark.parametrize("leave", [None, 4_000, 60_000, 200_000, 700_000, 1_200_000])
def test_a_run_meets_a_full_disk_in_one_line(small_disk, tmp_path, leave):
    out = fill(small_disk, leave)
    done = run_cli(*RUN, cwd=tmp_path, env={"CNNLAB_OUTPUT_DIR": str(out)})
    line = assert_one_line_and_nothing_half_written(done, small_disk)
    if leave is None:  # not a byte left: the lock or the folder itself, and the refused run leaves nothing
        assert ".cnnlab.lock" in line or ".hydra" in line or "runs" in line
    if "checkpoints" in line:
        assert line.endswith("the previous checkpoint is intact")


def test_the_places_a_run_writes_each_fail_in_one_line(small_disk, tmp_path):
    """Across fill levels, the disk runs out in different places (TensorBoard's events, the viz record, a
    checkpoint): each is one line."""
    places = set()
    for leave in range(30_000, 1_300_000, 160_000):
        out = fill(small_disk, leave)
        done = run_cli(*RUN, cwd=tmp_path, env={"CNNLAB_OUTPUT_DIR": str(out)})
        if done.returncode == 0:
            continue
        line = assert_one_line_and_nothing_half_written(done, small_disk)
        places |= {place for place in ("tensorboard", "record.pt", "last.pt", "best.pt", "summary.json") if place in line}
    # where exactly the space runs out shifts by a few kB from run to run (event timestamps, buffering)
    assert len(places) >= 2 and places & {"last.pt", "best.pt"}, places


def test_a_sweep_on_a_full_disk_leaves_no_empty_database(small_disk, tmp_path):
    out = fill(small_disk, 2_000)
    done = run_cli("train", "-m", *RUN[1:], "optimizer.lr=0.01,0.1", cwd=tmp_path, env={"CNNLAB_OUTPUT_DIR": str(out)})
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot open the study there: database or disk is full" in done.stderr
    assert not list(small_disk.rglob("optuna.db"))
