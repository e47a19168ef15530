"""Checkpoint load time, before and after issue #14, on the same file: cnnlab's load_checkpoint now
(SHA-256 check + torch.load(weights_only=True)) against the same steps with weights_only=False (the
load before #14), and torch.load alone either way.

    python scripts/checkpoint_load.py [--model resnet18] [--repeats 5]

Prints the median of --repeats loads of each and their ratio, for a checkpoint of the model with an
SGD momentum state (what a real run's last.pt holds).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cnnlab.core.plugins import load_components
from cnnlab.core.registry import MODELS
from cnnlab.runtime.checkpoint import TRAILER, TRAILER_LEN, load_checkpoint, save_checkpoint
from cnnlab.training.state import numpy_rng_state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load_components()
    model = MODELS.build(args.model, {}, prefix="model", in_channels=3, num_classes=10, input_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "step": 10,
             "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng_state()}, "history": [{"epoch": 1}]}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "last.pt"
        save_checkpoint(path, state)
        size = path.stat().st_size

        def before() -> None:  # load_checkpoint as it was: verify the trailer, then unpickle anything
            data = path.read_bytes()
            body, tail = data[:-TRAILER_LEN], data[-TRAILER_LEN:]
            assert hashlib.sha256(body).hexdigest().encode() == tail[len(TRAILER):-1]
            torch.load(io.BytesIO(body), map_location="cpu", weights_only=False)

        def plain(weights_only: bool):
            return lambda: torch.load(path, map_location="cpu", weights_only=weights_only)

        times = {}
        for name, load in (("load_checkpoint before #14", before), ("load_checkpoint now (safe)", lambda: load_checkpoint(path)),
                           ("torch.load(weights_only=False)", plain(False)),
                           ("torch.load(weights_only=True)", plain(True))):
            load()  # warm the page cache
            samples = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                load()
                samples.append(time.perf_counter() - start)
            times[name] = statistics.median(samples)
    print(f"{args.model} checkpoint, {size / 2**20:.1f} MiB, median of {args.repeats}:")
    for name, seconds in times.items():
        print(f"  {name:34s} {1000 * seconds:8.1f} ms")
    a, b, c, d = times.values()
    print(f"  load_checkpoint now / before: {b / a:.2f}x;  torch.load weights_only True / False: {d / c:.2f}x")


if __name__ == "__main__":
    main()
