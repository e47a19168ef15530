"""Readers (and writers, for tests and benchmarks) of the on-disk formats torchvision uses.

A damaged file is a user problem, not a bug: every reader raises CnnlabError
naming the file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from pathlib import Path

import numpy as np

from cnnlab.core.errors import CnnlabError

# IDX type codes (http://yann.lecun.com/exdb/mnist/): data is big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder(">").str: k for k, v in _IDX_DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CnnlabError(f"cannot read {path}: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise CnnlabError(f"corrupt gzip file {path}: {e}") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST family), plain or gzip-compressed."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise CnnlabError(f"corrupt IDX file {path}: bad magic number {data[:4].hex() or 'empty'}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise CnnlabError(f"corrupt IDX file {path}: truncated header")
    dims = tuple(int(d) for d in np.frombuffer(data, ">i4", ndim, 4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise CnnlabError(
            f"corrupt IDX file {path}: header says shape {dims} ({expected} bytes of data) "
            f"but the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as IDX; gzip-compressed when the name ends in .gz."""
    array = np.asarray(array)
    big = array.astype(array.dtype.newbyteorder(">"))
    code = _IDX_CODES[big.dtype.str]
    payload = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">i4").tobytes() + big.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


class _CifarUnpickler(pickle.Unpickler):
    """Loads CIFAR batches (dicts of lists, bytes and numpy arrays) and nothing else.

    Plain pickle.load would run whatever code a hostile file names.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def read_cifar_batch(path: str | Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch: (uint8 images N×3×32×32, int64 labels)."""
    path = Path(path)
    raw = _read_bytes(path)
    try:
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as e:  # any unpickling failure means a damaged or foreign file
        raise CnnlabError(f"corrupt CIFAR batch {path}: {type(e).__name__}: {e}") from None
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        raise CnnlabError(f"corrupt CIFAR batch {path}: expected a dict with 'data' and '{label_key}'")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise CnnlabError(
            f"corrupt CIFAR batch {path}: data {data.dtype}{list(data.shape)} with {len(labels)} labels, "
            "expected uint8 [N, 3072] and N labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_class_names(path: Path, names_key: str) -> list[str]:
    """Class names from CIFAR's batches.meta / meta file; [] when it is absent or unreadable."""
    try:
        meta = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
        return [str(n) for n in meta[names_key]]
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, EOFError):
        return []


def write_cifar_batch(path: str | Path, images: np.ndarray, labels: np.ndarray, label_key: str) -> None:
    """Write a CIFAR python batch as torchvision's download unpacks it."""
    batch = {"data": np.asarray(images, np.uint8).reshape(len(images), -1), label_key: [int(x) for x in labels]}
    Path(path).write_bytes(pickle.dumps(batch))


def read_svhn_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an SVHN cropped-digits .mat file: (uint8 images N×3×32×32, int64 labels 0..9; the file's 10 is digit 0)."""
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except OSError as e:
        raise CnnlabError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # scipy raises ValueError, MatReadError, TypeError... on damaged files
        raise CnnlabError(f"corrupt SVHN file {path}: {type(e).__name__}: {e}") from None
    images, labels = mat.get("X"), mat.get("y")
    if images is None or labels is None or images.ndim != 4 or images.shape[:3] != (32, 32, 3) \
            or images.dtype != np.uint8 or labels.size != images.shape[3]:
        raise CnnlabError(f"corrupt SVHN file {path}: expected uint8 X [32, 32, 3, N] and N labels y")
    labels = labels.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels


def write_svhn_mat(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images N×3×32×32 and labels 0..9 as SVHN's .mat (X [32, 32, 3, N], y with 10 for 0)."""
    import scipy.io

    y = np.asarray(labels, np.uint8).reshape(-1, 1).copy()
    y[y == 0] = 10
    scipy.io.savemat(str(path), {"X": np.asarray(images, np.uint8).transpose(2, 3, 1, 0), "y": y})


_STL10_IMAGE_BYTES = 3 * 96 * 96


def read_stl10_images(path: str | Path) -> np.ndarray:
    """Read STL-10's X .bin: uint8 N×3×96×96 (the file is column-major per image)."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % _STL10_IMAGE_BYTES:
        raise CnnlabError(f"corrupt STL-10 file {path}: {len(raw)} bytes is not a whole number of 3x96x96 images")
    return np.frombuffer(raw, np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy()


def read_stl10_labels(path: str | Path, count: int) -> np.ndarray:
    """Read STL-10's y .bin (labels 1..10) as int64 0..9; ``count`` is the number of images."""
    path = Path(path)
    labels = np.frombuffer(_read_bytes(path), np.uint8).astype(np.int64) - 1
    if len(labels) != count or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise CnnlabError(f"corrupt STL-10 file {path}: expected {count} labels in 1..10, got {len(labels)}")
    return labels


def write_stl10(images_path: str | Path, labels_path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images N×3×96×96 and labels 0..9 in STL-10's binary layout."""
    Path(images_path).write_bytes(np.asarray(images, np.uint8).transpose(0, 1, 3, 2).tobytes())
    Path(labels_path).write_bytes((np.asarray(labels) + 1).astype(np.uint8).tobytes())
