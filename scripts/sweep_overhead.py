#!/usr/bin/env python
"""What the sweeper costs, and what n_jobs buys on this machine.

1. Per-trial overhead: a 50-trial random sweep of 1-step trials. The sweep's wall time minus the
   trials' own wall time (summary.json), per trial: claiming (lock, ask, storage), launching the
   Hydra job, telling the study.
2. n_jobs=2 against n_jobs=1: the same 12-trial sweep of short Fashion-MNIST trials, both timed
   from the command's start to its end (the helper process's start-up included).

    python scripts/sweep_overhead.py
    python scripts/sweep_overhead.py --storage journal
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TINY = ["dataset=synthetic", "dataset.channels=1", "dataset.size=8", "dataset.classes=4", "dataset.train_size=160",
        "dataset.test_size=40", "model=mlp", "model.hidden=[16]", "trainer.device=cpu", "data.batch_size=16",
        "trainer.epochs=1", "trainer.limit_train_batches=1", "viz.every_n_epochs=0", "viz.augment_samples=0"]
SHORT = ["dataset=fashion_mnist", "model=lenet5", "trainer.epochs=2", "trainer.limit_train_batches=60"]


def sweep(out: Path, args: list[str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "cnnlab", "train", "-m", "sweep=random_lr_wd", f"hydra.sweep.dir={out}", *args]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode not in (0, 3):
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start, result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", default="sqlite", choices=["sqlite", "journal"])
    parser.add_argument("--out", default="outputs/bench/sweep_overhead")
    args = parser.parse_args()
    out = Path(args.out) / time.strftime("%Y-%m-%d_%H-%M-%S")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")

    wall, log = sweep(out / "overhead", [*TINY, "hydra.sweeper.n_trials=50", f"hydra.sweeper.storage={args.storage}"])
    starts, walls = [], []
    for folder in (out / "overhead").glob("[0-9]*"):
        starts.append(json.loads((folder / "trial.json").read_text())["started"])
        walls.append(json.loads((folder / "summary.json").read_text())["wall_time_s"])
    span = max(s + w for s, w in zip(starts, walls)) - min(starts)  # first trial's start to last trial's end
    costs = [(float(c), float(t)) for c, t in re.findall(r"claim ([0-9.]+) ms, tell ([0-9.]+) ms", log)]
    claim, tell = (statistics.median(x) for x in zip(*costs))
    print(f"50 one-step trials ({args.storage}): command {wall:.1f} s, the trials' own time {sum(walls):.1f} s")
    print(f"  between two trials: {1000 * (span - sum(walls)) / (len(walls) - 1):.0f} ms, of which the study's part "
          f"(median): claim {claim:.1f} ms (claim lock, cut-off check, ask, trial lock), tell {tell:.1f} ms; the rest is "
          "Hydra composing the trial's config and setting up its job, and the trial's own records")

    one, _ = sweep(out / "n_jobs_1", [*SHORT, "hydra.sweeper.n_trials=12", "hydra.sweeper.n_jobs=1"])
    two, _ = sweep(out / "n_jobs_2", [*SHORT, "hydra.sweeper.n_trials=12", "hydra.sweeper.n_jobs=2"])
    print(f"12 trials ({' '.join(SHORT)}): n_jobs=1 {one:.1f} s ({torch.get_num_threads()} torch threads), "
          f"n_jobs=2 {two:.1f} s (2 workers, {max(1, (os.cpu_count() or 1) // 2)} thread each; the helper's start-up "
          f"included); speed-up {one / two:.2f}x")


if __name__ == "__main__":
    main()
