#!/usr/bin/env python
"""Pruning's worth, measured: the same random search run twice, without pruning and with a pruner.

Both searches run the real `cnnlab train -m` on Fashion-MNIST with the same seed, so trial k draws
the same learning rate and weight decay in both (the sampler is seeded with seed + k). Prints the
best validation accuracy each reached, the epochs each trained, their ratio, and both
best-so-far curves (best validation accuracy against epochs spent, in trial order).

    python scripts/search_efficiency.py                                   # 24 trials x 8 epochs, asha
    python scripts/search_efficiency.py --pruner hyperband --trials 24 --epochs 8
    python scripts/search_efficiency.py -- trainer.limit_train_batches=100   # extra overrides for both
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch


def search(out: Path, pruner: str, trials: int, epochs: int, extra: list[str]) -> tuple[list[optuna.trial.FrozenTrial], float]:
    cmd = [sys.executable, "-m", "cnnlab", "train", "-m", "sweep=random_lr_wd", "dataset=fashion_mnist",
           f"hydra.sweeper.n_trials={trials}", f"trainer.epochs={epochs}", f"hydra.sweeper.pruner={pruner}",
           f"hydra.sweep.dir={out}", *extra]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode not in (0, 3):
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'optuna.db'}")
    return sorted(study.trials, key=lambda t: t.number), time.perf_counter() - start


def curve(trials: list[optuna.trial.FrozenTrial]) -> list[tuple[int, float]]:
    """(epochs spent so far, best validation accuracy so far) after each trial, in trial order."""
    spent, best, points = 0, float("-inf"), []
    for t in trials:
        spent += t.user_attrs.get("epochs", 0)  # epochs the trial trained (its summary's history)
        best = max([best, *t.intermediate_values.values()])
        points.append((spent, best))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pruner", default="asha", choices=["asha", "hyperband", "median", "percentile"])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default="outputs/bench/search_efficiency")
    parser.add_argument("extra", nargs="*", help="overrides for both searches, after --")
    args = parser.parse_args()
    extra = ["model=lenet5", *args.extra]
    out = Path(args.out) / time.strftime("%Y-%m-%d_%H-%M-%S")
    full, full_s = search(out / "none", "none", args.trials, args.epochs, extra)
    pruned, pruned_s = search(out / args.pruner, args.pruner, args.trials, args.epochs, extra)
    (full_epochs, full_best), (pruned_epochs, pruned_best) = curve(full)[-1], curve(pruned)[-1]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"search: {args.trials} trials x up to {args.epochs} epochs, random lr and weight decay (log-uniform), "
          f"seed 0; overrides: {' '.join(extra)}")
    print(f"no pruning:   best val acc {100 * full_best:.2f}%, {full_epochs} epochs, {full_s:.0f} s")
    print(f"{args.pruner + ':':<13} best val acc {100 * pruned_best:.2f}%, {pruned_epochs} epochs, {pruned_s:.0f} s "
          f"({sum(t.state.name == 'PRUNED' for t in pruned)} trials pruned)")
    print(f"ratio: {pruned_epochs / full_epochs:.1%} of the epochs, {pruned_s / full_s:.1%} of the time; "
          f"best val acc {100 * (pruned_best - full_best):+.2f} points")
    print("best-so-far curves (epochs spent: best val acc):")
    for name, points in (("none", curve(full)), (args.pruner, curve(pruned))):
        print(f"  {name}: " + ", ".join(f"{e}: {100 * b:.2f}" for e, b in points))


if __name__ == "__main__":
    main()
