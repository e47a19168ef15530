#!/usr/bin/env python
"""The recipes of conf/experiment/ on Fashion-MNIST: test accuracy and time of each, as a table.

Runs the real command for each recipe (dataset=fashion_mnist, in a temporary output
directory) and reads its summary.json. A recipe in --full runs as shipped; one in
--throughput runs a few batches only, for its training speed on this machine (the
CIFAR-sized networks take hours per epoch on a CPU). hw4_mlp runs once per learning
rate of its sweep, each scored on the test split.

    python scripts/recipe_results.py --full hw4_mlp lenet5 --throughput resnet18_cifar
    python scripts/recipe_results.py --full lenet5 -- trainer.epochs=2   # extra overrides for every run
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

HW4_LEARNING_RATES = ("0.01", "0.1", "1")
THROUGHPUT_BATCHES = 4  # the first is warm-up; images/s is over all of them


def run(recipe: str, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "cnnlab", "train", f"experiment={recipe}", "dataset=fashion_mnist",
           f"hydra.run.dir={out}", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", nargs="*", default=[], help="recipes to train as shipped")
    parser.add_argument("--throughput", nargs="*", default=[], help="recipes to time over a few batches")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run")
    args = parser.parse_args()

    table = Table(title="recipes on Fashion-MNIST (test split scored once, for the model chosen on validation)")
    for col in ("recipe", "overrides", "epochs", "test acc", "train time", "wall time", "train images/s"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(r, [f"optimizer.lr={lr}"] if r == "hw4_mlp" else [], True)
                for r in args.full for lr in (HW4_LEARNING_RATES if r == "hw4_mlp" else [None])]
        jobs += [(r, ["trainer.epochs=1", f"trainer.limit_train_batches={THROUGHPUT_BATCHES}",
                      "trainer.limit_eval_batches=1", "trainer.eval_train_at_end=false",
                      "trainer.divergence_factor=null"], False)  # speed only; the schedule is squeezed into 4 steps
                 for r in args.throughput]
        for i, (recipe, own, full) in enumerate(jobs):
            s = run(recipe, Path(tmp) / str(i), own + args.overrides)
            epochs = len(s["history"])
            test = s["selected"].get("test")  # none when the run diverged
            row = [recipe, " ".join(own if full else []) or "-", str(epochs) if full else f"{THROUGHPUT_BATCHES} batches",
                   (f"{100 * test['acc']:.2f}%" if test else s["status"]) if full else "-",
                   f"{s['train_time_s']:.0f} s" if full and test else "-",
                   f"{s['wall_time_s']:.0f} s" if full and test else "-",
                   f"{s['train_images_per_s']:,.0f}" if test or not full else "-"]
            table.add_row(*row)
            Console(width=160).print(" | ".join(row), highlight=False)
    console = Console(width=160)
    console.print(table)
    console.print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                  f"python {platform.python_version()}, torch {torch.__version__}, "
                  f"device {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")


if __name__ == "__main__":
    main()
