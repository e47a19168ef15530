"""One writer per run directory.

A run (a single run, a resume, a sweep trial) holds ``<run dir>/.cnnlab.lock`` while it writes
there. The file is created with O_CREAT | O_EXCL, which is atomic on local disks and on the
shared file systems clusters use (NFS v3 and later, Lustre, GPFS, BeeGFS), and it names its
holder: pid, host, boot, start time. A heartbeat thread refreshes its mtime.

Why not flock/fcntl: on NFS v3 the locks of a node that died stay held until that node comes
back, and Lustre grants them only when mounted with ``-o flock``. A lock file with a heartbeat
needs nothing from the file system but an exclusive create.

A lock is stale when its holder is known to be dead: on this host (same boot), its pid is gone
or now belongs to a process started later; elsewhere, its heartbeat is older than
``STALE_AFTER_S``. A stale lock is taken over with a warning; a live one refuses the start with
one line naming the holder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.core.errors import CnnlabError
from cnnlab.core.validation import check_component
from cnnlab.core.schema import Fields
from cnnlab.runtime.files import check_inside, confine, read_json

LOCK_NAME = ".cnnlab.lock"
HEARTBEAT_S = 10.0      # how often a holder refreshes its lock's mtime
STALE_AFTER_S = 120.0   # a holder on another host whose heartbeat is older than this is taken as dead


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot), so a reused pid is not taken for the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    except (OverflowError, OSError, ValueError):  # a lock from someone else: a date out of any calendar
        since = "an unknown time"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {since}"


def _in_use(run_dir: Path, path: Path, holder: dict[str, Any]) -> CnnlabError:
    return CnnlabError(f"run directory {run_dir} is in use by {_describe(holder)} (lock {path}); "
                       "wait for it to end, or choose another directory")


@dataclass
class _Held:
    path: Path
    token: str
    count: int = 1


_held: dict[Path, _Held] = {}
_guard = threading.Lock()
_heartbeat: threading.Thread | None = None


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _guard:
            paths = [h.path for h in _held.values()]
        for path in paths:
            try:
                os.utime(path)
            except OSError:
                pass  # the run directory went away; its run will say so


LOCK_RECORD = Fields(optional={"pid": int, "host": str, "boot": str, "start": (int, None), "since": float, "token": str})


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path, LOCK_RECORD, "run lock")
    except CnnlabError:
        return {}  # being written this instant, damaged, or not a lock at all: judged by its age alone


def stale_reason(path: Path, holder: dict[str, Any]) -> str | None:
    """Why the lock at ``path`` no longer protects a live run, or None when its holder may be alive."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it is gone"
    same_host = holder.get("host") == socket.gethostname() and holder.get("boot") == _boot_id()
    pid = holder.get("pid")
    if same_host and isinstance(pid, int):
        if not _alive(pid):
            return f"pid {pid} has exited"
        if holder.get("start") is not None and _process_start(pid) != holder.get("start"):
            return f"pid {pid} is now another process"
        return None
    if holder.get("host") == socket.gethostname() and holder.get("boot") and holder.get("boot") != _boot_id():
        return "its host has rebooted"
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s"
    return None


def _try_create(path: Path, token: str) -> bool:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "boot": _boot_id(),
              "start": _process_start(os.getpid()), "since": time.time(), "token": token}
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as e:
        raise CnnlabError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: no empty lock is left behind for the next run to puzzle over
        path.unlink(missing_ok=True)
        raise CnnlabError(f"cannot write {path}: {e.strerror or e}") from None
    return True


def _take_over(path: Path, judged: dict[str, Any]) -> bool:
    """Move the stale lock aside, unless another process replaced it in the meantime."""
    aside = path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # someone else removed it: try to create ours
    moved = _read(aside)
    if moved != judged:  # a fresh lock was moved, not the stale one: put it back
        try:
            os.link(aside, path)
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def acquire(run_dir: Path, warn=None) -> None:
    """Hold ``run_dir``'s lock (re-entrant within a process); one line naming the holder when busy.
    ``warn(message)`` is told when a stale lock is taken over."""
    global _heartbeat
    check_inside(Path(run_dir) / LOCK_NAME)  # a trial's folder that is a link out of its sweep's folder: refused
    run_dir = Path(run_dir).resolve()
    with _guard:
        if run_dir in _held:
            _held[run_dir].count += 1
            return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CnnlabError(f"cannot write {run_dir}: {e.strerror or e}") from None
    path, token = run_dir / LOCK_NAME, uuid.uuid4().hex
    for _ in range(20):
        if _try_create(path, token):
            break
        holder = _read(path)
        if holder is None:
            continue  # released just now
        reason = stale_reason(path, holder)
        if reason is None:
            raise _in_use(run_dir, path, holder)
        if _take_over(path, holder) and warn is not None:
            warn(f"took over the lock of {run_dir} from {_describe(holder)}: {reason}")
    else:
        raise CnnlabError(f"cannot lock run directory {run_dir}: its lock {path} keeps changing")
    confine(run_dir)
    with _guard:
        _held[run_dir] = _Held(path, token)
        if _heartbeat is None:
            _heartbeat = threading.Thread(target=_beat, name="cnnlab-lock-heartbeat", daemon=True)
            _heartbeat.start()


def release(run_dir: Path) -> None:
    run_dir = Path(run_dir).resolve()
    with _guard:
        held = _held.get(run_dir)
        if held is None:
            return
        held.count -= 1
        if held.count:
            return
        del _held[run_dir]
    if (_read(held.path) or {}).get("token") == held.token:  # never remove a lock another process took over
        held.path.unlink(missing_ok=True)


def held() -> set[Path]:
    """The run directories this process holds."""
    with _guard:
        return set(_held)


def check_free(run_dir: Path) -> None:
    """Raise the 'in use' line when a live process holds ``run_dir`` (this process excepted)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    holder = live_holder(run_dir)
    if holder is not None:
        raise _in_use(run_dir, run_dir / LOCK_NAME, holder)


def live_holder(run_dir: Path) -> dict[str, Any] | None:
    """The live process that holds ``run_dir`` (pid, host, since), or None."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return None
    holder = _read(path)
    return holder if holder and stale_reason(path, holder) is None else None


FRESH: dict[Path, Path] = {}  # a run directory claimed by this process -> the topmost folder its mkdir made


def claim_fresh_dir(path: str, name: str | None = None) -> str:
    """``path``, or ``path-2``, ``path-3``, ... : the first that did not exist, created here. mkdir is
    atomic (NFS too), so two runs started in the same second never share a timestamped directory.
    ``name``: the run's name, appended as ``path-name`` once checked to be one path component."""
    if name is not None:
        path = f"{path}-{check_component('name', name)}"
    candidate, n = Path(path), 1
    while True:
        try:
            top = candidate
            while not top.parent.exists() and top.parent != top:
                top = top.parent
            candidate.mkdir(parents=True)
            FRESH[candidate.resolve()] = top.resolve()
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = Path(f"{path}-{n}")
        except OSError as e:  # e.g. a file where a folder should be (paths.output_dir)
            raise CnnlabError(f"cannot use {e.filename}: {e.strerror or e}") from None


def discard_refused(run_dir: Path) -> None:
    """A run refused before it trained leaves nothing: remove ``run_dir`` if this process claimed it fresh and no
    checkpoint or TensorBoard folder was made in it, with the empty folders its claim made above it."""
    run_dir = Path(run_dir).resolve()
    top = FRESH.pop(run_dir, None)
    if top is None or (run_dir / "checkpoints").exists() or (run_dir / "tensorboard").exists():
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    folder = run_dir.parent
    while folder != top.parent and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


class RunDirLock:
    """``with RunDirLock(run_dir, warn):`` hold the lock for the block."""

    def __init__(self, run_dir: Path, warn=None):
        self.run_dir, self.warn = Path(run_dir), warn

    def __enter__(self) -> RunDirLock:
        acquire(self.run_dir, self.warn)
        return self

    def __exit__(self, *exc) -> None:
        release(self.run_dir)
