"""Peak memory of loading a large checkpoint (issue #35): cnnlab's load_checkpoint now (the SHA-256 checked in
pieces, the archive memory-mapped) against the load before #35 (the whole file read into memory, its checksum
taken over a copy, torch.load from the bytes), on the same file.

    python scripts/checkpoint_memory.py [--gb 1.0] [--workdir /tmp]

Each load runs in a fresh process; its peak resident memory (VmHWM: ru_maxrss would carry over the parent's
through exec) is printed with the file's size and the
ratio of the two. "then every tensor read" sums each tensor after the load, as copying the weights into a model
does: with a memory-mapped file those pages come from the page cache once.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from cnnlab.runtime.checkpoint import TRAILER, TRAILER_LEN, load_checkpoint, save_checkpoint

LOADERS = {
    "before #35: read whole, torch.load(bytes)": "old",
    "load_checkpoint now": "new",
    "load_checkpoint now, then every tensor read": "new-touch",
}


def old_load(path: Path) -> dict:
    """load_checkpoint as it was before #35."""
    data = path.read_bytes()
    tail = data[-TRAILER_LEN:]
    if tail.startswith(TRAILER):
        data = data[:-TRAILER_LEN]
        assert hashlib.sha256(data).hexdigest().encode() == tail[len(TRAILER):-1]
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux: /proc/self/status VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(kind: str, path: Path) -> None:
    state = old_load(path) if kind == "old" else load_checkpoint(path) if kind != "none" else {"model": {}}
    if kind == "new-touch":
        total = sum(float(t.float().sum()) for t in state["model"].values())
        assert total == total
    print(peak_rss())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    path = Path(args.workdir) / "checkpoint_memory.pt"
    n = int(args.gb * 2**30 / 4 / 16)
    save_checkpoint(path, {"model": {f"layer{k}.weight": torch.randn(n) for k in range(16)}, "epoch": 1})
    size = path.stat().st_size
    baseline = int(subprocess.run([sys.executable, __file__, "--child", "none", str(path)], capture_output=True,
                                  text=True, check=True).stdout)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}; "
          f"a checkpoint of {size / 2**30:.2f} GiB; a process that imports torch: {baseline / 2**30:.2f} GiB")
    print("| load | peak resident memory | less the import | / file size |")
    print("|---|---|---|---|")
    for label, kind in LOADERS.items():
        peak = int(subprocess.run([sys.executable, __file__, "--child", kind, str(path)], capture_output=True, text=True,
                                  check=True).stdout)
        print(f"| {label} | {peak / 2**30:.2f} GiB | {(peak - baseline) / 2**30:.2f} GiB | {(peak - baseline) / size:.2f}x |")
    path.unlink()


if __name__ == "__main__":
    main()
