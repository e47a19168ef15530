"""Files a run writes beside its checkpoints: atomically (a temp file, fsync, rename), in one line on failure;
never through a symbolic link inside a run, sweep or tune directory. Records read back are read as someone
else's: size- and depth-limited, plain files only, checked against their schema (cnnlab.core.schema).
No torch here, so that commands which only read records (cnnlab runs) start fast."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from cnnlab.core.errors import CnnlabError
from cnnlab.core.schema import Fields, SchemaMismatch, check, depth

MAX_RECORD_BYTES = 64 << 20  # a summary with a long history and a large confusion matrix is a few MB
MAX_RECORD_DEPTH = 64        # cnnlab's own records nest fewer than 10 levels

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
    check_inside(path)
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


def atomic_write_path(path: Path, write_to) -> None:
    """``write_to(temp_path)`` (a writer that takes only a file name: an exporter), then the temp file renamed over
    ``path``: never written through a link at ``path``, never half-written."""
    check_inside(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
        os.close(fd)
    except OSError as e:
        raise CnnlabError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        write_to(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:
        raise CnnlabError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


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


# ---- writes stay inside the folders cnnlab owns ----

_ROOTS: set[str] = set()  # resolved run, sweep and tune directories this process writes in


def confine(folder: Path) -> None:
    """From now on no write below ``folder`` follows a symbolic link that lies inside it (``folder`` itself may be
    one: the user named it, unless it lies inside a folder confined before, as a tune's gate run lies in its tune)."""
    check_inside(Path(folder) / "-")
    _ROOTS.add(os.path.realpath(folder))


def check_inside(path: Path) -> None:
    """Refuse ``path`` when a folder on its way below the nearest confined folder is a symbolic link: a run
    directory from someone else could point its checkpoints/ or .hydra/ anywhere."""
    if not _ROOTS:
        return
    target = Path(os.path.abspath(path))
    for top in target.parents:
        if os.path.realpath(top) in _ROOTS:
            folder = top
            for part in target.relative_to(top).parts[:-1]:
                folder = folder / part
                if folder.is_symlink():
                    raise CnnlabError(f"cannot write {path}: {folder} is a symbolic link inside {top}; "
                                      "cnnlab writes only inside a run's own folders")
            return


RUN_FOLDERS = ("checkpoints", ".hydra", "tensorboard", "viz")  # what a run writes in, below its directory


def confine_run(run_dir: Path) -> None:
    """Confine a run directory and refuse it at once, before anything is written, when one of the folders a run
    writes in, or its train.log, is a symbolic link (not at its first checkpoint, an epoch later)."""
    confine(run_dir)
    for name in RUN_FOLDERS:
        check_inside(run_dir / name / "-")
    refuse_link(run_dir / "train.log")


def refuse_link(path: Path) -> None:
    """Refuse a file cnnlab appends to (train.log, console.log) when it, or a folder on its way inside a
    confined folder, is a symbolic link: before the run, not when its first line is logged."""
    check_inside(path)
    if path.is_symlink():
        raise CnnlabError(f"cannot write {path}: it is a symbolic link; cnnlab writes only inside a run's own folders")


_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC  # a link at the name: ELOOP


class LogFile(logging.FileHandler):
    """logging's FileHandler that never follows a symbolic link (conf/hydra/job_logging/cnnlab.yaml)."""

    def _open(self):
        return os.fdopen(os.open(self.baseFilename, _APPEND, 0o666), "a", encoding=self.encoding, errors=self.errors)


def open_append(path: Path, fresh: bool = False):
    """``path`` opened for appending text (``fresh``: emptied first), never through a symbolic link (the file's own
    name included); its folder is made once the way to it is checked."""
    check_inside(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, _APPEND | (os.O_TRUNC if fresh else 0), 0o666)
    except OSError as e:
        why = "it is a symbolic link" if e.errno == 40 else e.strerror or e  # ELOOP: O_NOFOLLOW met a link
        raise CnnlabError(f"cannot write {path}: {why}") from None
    return os.fdopen(fd, "a")


# ---- records read back: someone else's data ----

def open_plain(path: Path, what: str, missing_ok: bool = False) -> int | None:
    """A read-only descriptor of ``path`` when it is a plain file (None when missing and ``missing_ok``): a FIFO, a
    device or a folder is refused at once (opened without blocking), never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        if missing_ok:
            return None
        raise CnnlabError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise CnnlabError(f"cannot read {what} {path}: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "something else"
        raise CnnlabError(f"{what} {path} is not a plain file: it is {kind}; cnnlab reads only plain files")
    return fd


def read_limited(path: Path, what: str, limit: int = MAX_RECORD_BYTES) -> bytes | None:
    """The bytes of a plain file (open_plain) of at most ``limit`` bytes; None when it is missing."""
    fd = open_plain(path, what, missing_ok=True)
    if fd is None:
        return None
    try:
        info = os.fstat(fd)
        if info.st_size > limit:
            raise CnnlabError(f"{what} {path} holds {info.st_size:,} bytes, more than the {limit:,} such a record may")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise CnnlabError(f"{what} {path} grew past the {limit:,} bytes such a record may hold")
        return b"".join(chunks)
    except OSError as e:
        raise CnnlabError(f"cannot read {what} {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def checked(data: Any, path: Path, what: str, spec: Any) -> Any:
    """``data`` read from ``path`` when it nests no deeper than records do and fits ``spec``; else one line."""
    if not depth(data, MAX_RECORD_DEPTH):
        raise CnnlabError(f"{what} {path} nests deeper than {MAX_RECORD_DEPTH} levels; it is not a cnnlab record")
    try:
        return check(data, spec)
    except SchemaMismatch as e:
        raise CnnlabError(f"{what} {path} is not a valid record: {e}") from None


def read_json(path: Path, spec: Any = Fields(), what: str = "record") -> Any:
    """A JSON record (by default an object); None when the file is missing. Anything else that is wrong with
    it (not JSON, too large, too deep, a field of the wrong type) is one line naming the file and the field."""
    data = read_limited(path, what)
    return None if data is None else parse_json(data, path, what=what, spec=spec)


def parse_json(data: bytes, path: Path, spec: Any = Fields(), what: str = "record") -> Any:
    """read_json of bytes already read from ``path``."""
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CnnlabError(f"{what} {path} is not valid JSON: {detail[:200]}") from None
    return checked(parsed, path, what, spec)


def read_yaml(path: Path, spec: Any = Any, what: str = "record") -> Any:
    """A YAML record, as data (no tags, no aliases: a few hundred bytes of nested aliases would expand to
    gigabytes); None when the file is missing; one line naming the file when it is wrong."""
    import yaml

    class PlainLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.YAMLError(f"line {event.start_mark.line + 1}: an alias (*{event.anchor}); cnnlab's "
                                     "records hold none")
            return super().compose_node(parent, index)

    data = read_limited(path, what)
    if data is None:
        return None
    try:
        loader = PlainLoader(data.decode("utf-8"))
        try:
            parsed = loader.get_single_data()
        finally:
            loader.dispose()
    except (ValueError, RecursionError, yaml.YAMLError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise CnnlabError(f"{what} {path} is not valid YAML: {detail[:200]}") from None
    return checked(parsed, path, what, spec)


def user_cache_dir(kind: str) -> Path:
    """The user's own cache folder for ``kind`` (runs, models): ``$CNNLAB_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/cnnlab`` or ``~/.cache/cnnlab``; never a folder that could be someone else's."""
    base = os.environ.get("CNNLAB_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnlab"
    return Path(base) / kind


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """A CSV file, written whole or not at all."""
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(table.getvalue().encode()))


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text))
