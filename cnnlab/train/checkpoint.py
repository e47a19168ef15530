"""Checkpoints and other run files, written atomically: a crash mid-write
leaves the previous file intact, never a half-written one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from cnnlab.errors import CnnlabError


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise CnnlabError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous checkpoint is intact") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CnnlabError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # truncated or foreign files fail in many ways inside torch.load
        raise CnnlabError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CnnlabError(f"checkpoint {path} is not a cnnlab checkpoint (no model state)")
    return state


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text))
