"""Files a run writes beside its checkpoints: atomically (a temp file, fsync, rename), in one line on failure.
No torch here, so that commands which only read records (cnnlab runs) start fast."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cnnlab.core.errors import CnnlabError

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process's umask: mkstemp makes 0600 files, run files should be like any other


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write(path: Path, write, keep_previous: Path | None = None) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    ``keep_previous``: first make the file ``path`` held reachable under this name, so there is
    always a complete file under ``path`` and, once replaced, its predecessor under the other name.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CnnlabError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            link = keep_previous.with_name(f".{keep_previous.name}.link")
            link.unlink(missing_ok=True)
            try:  # a hard link keeps `path` in place until the final rename
                os.link(path, link)
                os.replace(link, keep_previous)
            except OSError:  # no hard links here: the old file moves, `previous` covers the gap
                os.replace(path, keep_previous)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:  # a full disk, a quota, a folder that went away: one line, and no half-written file
        Path(tmp).unlink(missing_ok=True)
        raise CnnlabError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: Path, what: str) -> None:
    """Refuse, before any work, a file that could not be written at the end: a folder, or a place where no
    file can be made (a probe file is made and removed)."""
    if path.is_dir():
        raise CnnlabError(f"{what} {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise CnnlabError(f"{what} {path}: no folder {path.parent}")
    try:
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CnnlabError(f"{what} {path}: cannot write there: {e.strerror or e}") from None


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object written by write_json; None when it is missing, unreadable, or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text))
