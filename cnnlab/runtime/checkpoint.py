"""Checkpoints and other run files, written atomically: a crash mid-write
leaves the previous file intact, never a half-written one.

A checkpoint is ``torch.save``'s zip followed by a trailer line holding the
SHA-256 of the zip (``torch.load`` ignores bytes after the archive, so the file
stays loadable by plain torch). torch.load itself checks no checksum: a flipped
byte inside a tensor would load as wrong weights; the trailer catches it.
Before ``last.pt`` is replaced, the checkpoint it held becomes ``previous.pt``,
so a resume can fall back one checkpoint when the newest is damaged.

Nothing loaded can run code: every file cnnlab reads with torch (checkpoints, ``model.pretrained``,
viz records) goes through ``safe_load``, i.e. ``torch.load(weights_only=True)``. Checkpoints hold
only tensors and plain containers. The SHA-256 proves integrity, not origin: anyone can write one.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnlab.core.errors import CnnlabError
from cnnlab.core.schema import Fields, ListOf, MapOf
from cnnlab.runtime.files import atomic_write, checked, open_plain

TRAILER = b"\ncnnlab-sha256:"
TRAILER_LEN = len(TRAILER) + 64 + 1  # marker, hex digest, newline
LAST, PREVIOUS = "last.pt", "previous.pt"  # a resume reads the first of these that is sound
BEST = "best.pt"  # the weights validation chose so far
def encode_checkpoint(state: dict[str, Any]) -> bytes:
    """``state`` as torch.save writes it, followed by the trailer with its SHA-256."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.write(TRAILER + hashlib.sha256(buffer.getbuffer()).hexdigest().encode() + b"\n")
    return buffer.getvalue()


def save_checkpoint(path: Path, state: dict[str, Any] | bytes, keep_previous: bool = False) -> None:
    """Write ``state`` (or its encode_checkpoint bytes) with its checksum; ``keep_previous``: the
    replaced file becomes previous.pt."""
    data = state if isinstance(state, bytes) else encode_checkpoint(state)
    try:
        atomic_write(path, lambda f: f.write(data), keep_previous=path.with_name(PREVIOUS) if keep_previous else None)
    except CnnlabError as e:
        raise CnnlabError(f"{e}; the previous checkpoint is intact") from None


def save_same_checkpoint(path: Path, written: Path, data: bytes) -> None:
    """``path`` holding what ``written`` (just saved from ``data``) holds: a hard link where the file system has
    them (best.pt beside last.pt costs no second copy: k-NN's memory, a large model), else written again."""
    tmp = path.with_name(f".{path.name}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(written, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        save_checkpoint(path, data)


def _open_plain(path: Path, what: str) -> io.BufferedReader:
    return os.fdopen(open_plain(path, what), "rb")


def _trailer_digest(f: io.BufferedReader) -> tuple[int, bytes | None]:
    """The size of the archive in ``f`` and the SHA-256 its trailer holds (None: no trailer)."""
    size = f.seek(0, io.SEEK_END)
    f.seek(max(0, size - TRAILER_LEN))
    tail = f.read()
    if len(tail) == TRAILER_LEN and tail.startswith(TRAILER):
        return size - TRAILER_LEN, tail[len(TRAILER):-1]
    return size, None


def has_digest(path: Path) -> bool:
    """True for a file that ends with save_checkpoint's SHA-256 trailer (a cnnlab checkpoint)."""
    with _open_plain(path, "checkpoint") as f:
        return _trailer_digest(f)[1] is not None


# Checkpoints written before weights_only loading (cnnlab 0.1.0 up to issue #8) hold numpy's RNG state
# as a uint32 array. These exact numpy types rebuild arrays of plain values and nothing else.
_LEGACY_NUMPY = [getattr(np, "_core", np).multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def safe_load(source: Path | bytes, what: str) -> Any:
    """``torch.load(weights_only=True)`` of a file or its bytes: tensors and plain data only. A file
    whose pickle names anything else (code it would run) is one line naming ``what`` and those names."""
    def opened():
        return io.BytesIO(source) if isinstance(source, bytes) else source

    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY):
            if isinstance(source, bytes):
                return torch.load(opened(), map_location="cpu", weights_only=True)
            with _open_plain(source, what.split(" ")[0]):  # a FIFO is refused before torch opens it
                pass
            # Memory-mapped: a 2 GB checkpoint is not read into memory whole (nor twice).
            return torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except CnnlabError:
        raise
    except Exception as e:  # truncated or foreign files fail in many ways inside torch.load
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(opened())
        except Exception:  # noqa: BLE001 - not even a readable archive
            unsafe = []
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in _LEGACY_NUMPY}
        unsafe = [name for name in unsafe if name not in allowed]
        if unsafe:
            raise CnnlabError(f"{what} was refused: loading it would call {', '.join(unsafe[:3])}"
                              f"{' ...' if len(unsafe) > 3 else ''}; cnnlab loads only tensors and plain data") from None
        raise CnnlabError(f"{what} is unreadable or corrupt ({type(e).__name__})") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A verified checkpoint; one line naming the file when it is missing, truncated or corrupt."""
    with _open_plain(Path(path), "checkpoint") as f:
        size, expected = _trailer_digest(f)
        if expected is not None:  # checked in pieces: the file is never held in memory whole
            f.seek(0)
            digest, left = hashlib.sha256(), size
            while left > 0 and (chunk := f.read(min(left, 1 << 22))):
                digest.update(chunk)
                left -= len(chunk)
            if digest.hexdigest().encode() != expected:
                raise CnnlabError(f"checkpoint {path} is corrupt: its SHA-256 does not match the one written with it")
    state = safe_load(Path(path), f"checkpoint {path}")
    if not isinstance(state, dict) or "model" not in state:
        raise CnnlabError(f"checkpoint {path} is not a cnnlab checkpoint (no model state)")
    check_checkpoint(state, Path(path))
    return state


_TENSORS = MapOf(torch.Tensor)
_MAYBE_TENSOR = (torch.Tensor, None)
CHECKPOINT_RECORD = Fields(required={"model": _TENSORS}, optional={
    "ema": (_TENSORS, None), "selected": (str, None), "classes": ListOf((str, int)), "input_shape": ListOf(int),
    "config": Any, "history": ListOf(MapOf(Any)), "epoch": int, "step": int, "resize": (int, None),
    "preprocess": (Fields(required={"kind": str, "mean": torch.Tensor, "std": torch.Tensor,
                                    "matrix": _MAYBE_TENSOR}), None)})


def check_checkpoint(state: dict[str, Any], path: Path) -> None:
    """The parts of a checkpoint that evaluation, export and cnnlab.load use, as they use them: one line naming the
    field when a checkpoint (anyone can write one) holds something else."""
    checked(state, path, "checkpoint", CHECKPOINT_RECORD)
    if state.get("selected") == "ema" and state.get("ema") is None:
        raise CnnlabError(f"checkpoint {path} is not a valid record: it selected the EMA weights but holds none")
    shape = state.get("input_shape")
    if shape is None:
        return
    if len(shape) != 3 or min(shape) < 1 or shape[0] not in (1, 3) or shape[1] != shape[2]:
        raise CnnlabError(f"checkpoint {path} is not a valid record: input_shape should be [channels (1 or 3), "
                          "size, size]")
    if (resize := state.get("resize")) is not None and resize < 1:
        raise CnnlabError(f"checkpoint {path} is not a valid record: resize should be a positive number of pixels")
    prep = state.get("preprocess")
    if prep is not None:
        c, h, w = shape
        for key, allowed in (("mean", {(c, 1, 1), (c, h, w)}), ("std", {(c, 1, 1), (c, h, w)}),
                             ("matrix", {(c * h * w, c * h * w)})):
            tensor = prep[key]
            if tensor is not None and tuple(tensor.shape) not in allowed:
                raise CnnlabError(f"checkpoint {path} is not a valid record: preprocess.{key} has shape "
                                  f"{tuple(tensor.shape)}, not one for images of {c}x{h}x{w}")


def load_resumable(folder: Path) -> tuple[dict[str, Any], Path, list[str]] | None:
    """The newest good checkpoint in ``folder``: last.pt, else previous.pt. Returns the state, its
    path and a line for each damaged one passed over; None when there is no checkpoint at all."""
    damaged = []
    for path in (folder / LAST, folder / PREVIOUS):
        if not path.is_file():
            continue
        try:
            return load_checkpoint(path), path, damaged
        except CnnlabError as e:
            damaged.append(str(e))
    if damaged:
        raise CnnlabError(f"no usable checkpoint in {folder}: {'; '.join(damaged)}")
    return None


def load_weights(module: torch.nn.Module, weights: dict[str, Any], path: Path | str) -> None:
    """``module.load_state_dict``, with a mismatch (other classes, another architecture) as one line."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e).strip()]
        raise CnnlabError(f"checkpoint {path} does not fit the configured model: {details[0][:300]}") from None
