"""Where a run came from: what summary.json, trial.json and TensorBoard's ``environment`` text record, so
that a run can be compared with another and rerun a year from now.

No network, and no warning when something is missing (no git, no repository, no GPU): that field is
null. A run records it when it starts (its own files may land in the repository while it trains).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from cnnlab.core.version import __version__
from cnnlab.core.shown import masked


def environment(plugins: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The record: versions, hardware, host, command line, the working directory's git state now, and each
    plugin's origin. About 10 ms (the git state; the rest is read once a process)."""
    return {**_process(), "git": git_state(Path.cwd()), "plugins": {name: plugin_origin(name) for name in plugins}}


@functools.cache
def _process() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "cnnlab": __version__,
        "command": [masked(a) for a in ([Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else [])],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _torchvision(),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
    }


def _torchvision() -> str | None:
    try:
        import torchvision  # its build's own version (0.29.1+cu130), where the distribution's says 0.29.1
    except ImportError:
        return None
    return torchvision.__version__


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# A repository's own config can name programs that git runs while it reads the tree: an fsmonitor, hooks, clean
# filters, textconv and external diffs. The working directory may be someone else's (an unpacked download), so
# none of them runs: they are switched off on git's command line, which outranks every config file.
GIT_SAFE = ("-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null", "-c", "core.untrackedCache=false",
            "-c", "diff.external=", "--no-optional-locks")


def repository_top(folder: Path) -> Path | None:
    """The folder holding the ``.git`` that ``folder`` lies in, when it is the user's own; None otherwise."""
    for top in (folder, *folder.parents):
        marker = top / ".git"
        try:
            info = marker.lstat()
        except OSError:
            continue
        uid = os.getuid() if hasattr(os, "getuid") else None
        if uid is not None and (info.st_uid != uid or top.stat().st_uid != uid):
            return None  # another user's repository: its config is not ours to run
        return top
    return None


def git_state(folder: Path) -> dict[str, Any] | None:
    """The commit of ``folder``'s repository, whether the tree is dirty, and a hash of the diff against the
    commit (untracked files listed, not read); None outside a repository of the user's own or without git.
    No program the repository's config names runs (GIT_SAFE, and every clean filter it defines emptied)."""
    top = repository_top(folder)
    if top is None:
        return None

    def git(*args: str, safe: tuple[str, ...] = GIT_SAFE) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(top), *safe, *args], capture_output=True, timeout=5,
                                  stdin=subprocess.DEVNULL,
                                  env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"})
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.decode(errors="replace") if done.returncode == 0 else None

    filters = git("config", "--includes", "--name-only", "--get-regexp", r"^filter\.") or ""  # reading config runs nothing
    drivers = {line.rsplit(".", 1)[0] for line in filters.split()}
    safe = (*GIT_SAFE, *(item for name in sorted(drivers) for key in ("clean", "process")
                         for item in ("-c", f"{name}.{key}=")))
    status = git("status", "--porcelain=v2", "--branch", "--untracked-files=normal", safe=safe)
    if status is None:
        return None
    lines = status.splitlines()
    commit = next((line.split()[2] for line in lines if line.startswith("# branch.oid ")), None)
    changes = [line for line in lines if not line.startswith("#")]
    digest = None
    if changes:  # the diff against the commit, and the names of the files git does not track
        untracked = sorted(line[2:] for line in changes if line.startswith("? "))
        diff = git("diff", "HEAD", "--no-ext-diff", "--no-textconv", "--binary", safe=safe) or ""
        digest = hashlib.sha256(diff.encode() + "\0".join(untracked).encode()).hexdigest()[:16]
    return {"commit": None if commit == "(initial)" else commit, "dirty": bool(changes), "diff_sha256": digest}


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # every installed package's metadata: read once


def plugin_origin(module: str) -> str:
    """A plugin module's distribution and version (``my-models 1.2``), else the file it was imported from."""
    top = module.split(".")[0]
    for distribution in _distributions().get(top, []):
        version = _version(distribution)
        if version is not None:
            return f"{distribution} {version}"
    loaded = sys.modules.get(module) or sys.modules.get(top)
    return str(getattr(loaded, "__file__", None) or "unknown")
