"""Checkpoint load time: cnnlab's safe load (SHA-256 check + torch.load(weights_only=True)) against
plain torch.load(weights_only=False) of the same file, the way cnnlab loaded before issue #14.

    python scripts/checkpoint_load.py [--model resnet18] [--repeats 5]

Prints the median of --repeats loads of each and their ratio, for a checkpoint of the model with an
SGD momentum state (what a real run's last.pt holds).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cnnlab.core.registry import MODELS, load_components
from cnnlab.runtime.checkpoint import load_checkpoint, save_checkpoint
from cnnlab.train.loop import numpy_rng_state


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

        def unsafe() -> None:
            torch.load(io.BytesIO(Path(path).read_bytes()), map_location="cpu", weights_only=False)

        def safe() -> None:
            load_checkpoint(path)

        times = {}
        for name, load in (("torch.load(weights_only=False)", unsafe), ("cnnlab load_checkpoint (safe)", safe)):
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
    a, b = times.values()
    print(f"  safe / unsafe: {b / a:.2f}x")


if __name__ == "__main__":
    main()
