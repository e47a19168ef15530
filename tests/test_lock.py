"""One run directory, one writer: a second start on a live run is refused before it writes anything;
a holder that died (SIGKILL, a lost node, a reboot) leaves a stale lock that the next start takes over."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from cnnlab.core.errors import CnnlabError
from cnnlab.runtime import lock
from cnnlab.runtime.checkpoint import load_checkpoint
from tests.conftest import TINY, run_cnnlab, start_cnnlab

# Long enough to be caught alive: many steps of the tiny run, a checkpoint every 5 steps.
LONG = [*[o for o in TINY if not o.startswith(("trainer.epochs", "dataset.train_size"))], "dataset.train_size=2000",
        "trainer.checkpoint_every_n_steps=5", "trainer.log_every_n_steps=1000"]


def command(run_dir: Path, epochs: int) -> list[str]:
    """`cnnlab`'s arguments for the long run in ``run_dir``."""
    return ["train", *LONG, f"trainer.epochs={epochs}", f"hydra.run.dir={run_dir}"]


def env(cwd: Path) -> dict[str, str]:
    return {**os.environ, "CNNLAB_OUTPUT_DIR": str(cwd / "outputs"), "OMP_NUM_THREADS": "1"}


def wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_second_start_is_refused_and_a_start_after_kill_9_resumes(tmp_path):
    run_dir = tmp_path / "run"
    first = start_cnnlab(command(run_dir, 1000), tmp_path, env(tmp_path))
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "last.pt").is_file() or first.poll() is not None)
        assert first.poll() is None, first.communicate()[1]
        holder = json.loads((run_dir / lock.LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        before = {p: p.stat().st_mtime_ns for p in (run_dir / ".hydra").iterdir()}
        events = sorted((run_dir / "tensorboard").iterdir())

        second = run_cnnlab(command(run_dir, 1000), tmp_path, env(tmp_path), timeout=120)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert lines[0].startswith(f"error: run directory {run_dir} is in use by pid {first.pid} on host "
                                   f"{socket.gethostname()} since ")
        # The first run goes on, untouched: its .hydra record, one event file, still training.
        assert {p: p.stat().st_mtime_ns for p in (run_dir / ".hydra").iterdir()} == before
        assert sorted((run_dir / "tensorboard").iterdir()) == events
        assert first.poll() is None and json.loads((run_dir / lock.LOCK_NAME).read_text())["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    assert (run_dir / lock.LOCK_NAME).exists()  # a SIGKILLed holder cannot clean up: its lock is stale
    # Cut short to the epoch it was killed in: on a loaded machine the first run may have finished an epoch or more
    # before the refusal and the kill (an epoch is 125 steps), so that epoch is read from its newest checkpoint.
    killed_in = load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] + 1
    third = run_cnnlab(command(run_dir, killed_in), tmp_path, env(tmp_path), timeout=300)
    assert third.returncode == 0, third.stderr
    assert f"took over the lock of {run_dir} from pid {first.pid}" in third.stderr
    assert f"pid {first.pid} has exited" in third.stderr
    assert "resumed from" in third.stdout
    assert not (run_dir / lock.LOCK_NAME).exists()  # released at the end


def write_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"pid": 1, "host": "elsewhere", "boot": "b", "start": 1, "since": time.time(), "token": "t", **fields}
    path = run_dir / lock.LOCK_NAME
    path.write_text(json.dumps(holder))
    return path


def test_a_holder_on_another_host_counts_as_alive_while_its_heartbeat_is_fresh(tmp_path):
    path = write_lock(tmp_path / "run", host="node7", pid=4242)
    with pytest.raises(CnnlabError, match=r"in use by pid 4242 on host node7 since"):
        lock.acquire(tmp_path / "run")
    old = time.time() - lock.STALE_AFTER_S - 5  # the node was lost: no heartbeat for longer than the limit
    os.utime(path, (old, old))
    told = []
    lock.acquire(tmp_path / "run", warn=told.append)
    try:
        assert told and "from pid 4242 on host node7" in told[0] and "no heartbeat for" in told[0]
        assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        lock.release(tmp_path / "run")
    assert not path.exists()


def test_a_reused_pid_and_a_reboot_make_a_lock_stale(tmp_path):
    here = {"host": socket.gethostname(), "boot": lock._boot_id()}
    # This very process's pid, but a different start time: the holder died and the pid was reused.
    path = write_lock(tmp_path / "a", pid=os.getpid(), start=-1, **here)
    assert lock.stale_reason(path, json.loads(path.read_text())) == f"pid {os.getpid()} is now another process"
    path = write_lock(tmp_path / "b", pid=os.getpid(), start=lock._process_start(os.getpid()), **here)
    assert lock.stale_reason(path, json.loads(path.read_text())) is None  # alive
    path = write_lock(tmp_path / "c", pid=os.getpid(), host=socket.gethostname(), boot="an-earlier-boot")
    assert lock.stale_reason(path, json.loads(path.read_text())) == "its host has rebooted"


def test_the_lock_is_reentrant_in_a_process_and_never_removes_another_holders(tmp_path):
    run_dir = tmp_path / "run"
    with lock.RunDirLock(run_dir):
        with lock.RunDirLock(run_dir):  # a sweep trial inside the task that already holds it
            pass
        assert (run_dir / lock.LOCK_NAME).exists()
        lock.check_free(run_dir)  # this process's own lock does not block it
        (run_dir / lock.LOCK_NAME).write_text(json.dumps({"pid": 1, "token": "someone else"}))
    assert (run_dir / lock.LOCK_NAME).exists()  # taken over meanwhile: left to its new holder
