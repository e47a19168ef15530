#!/usr/bin/env python
"""Does the default `cnnlab train` reach >= 91% Fashion-MNIST test accuracy within 60 s of training?

Runs the real command once per seed (in a temporary output directory) and reads
each run's summary.json: test accuracy of the selected model, training time
(the sum of the epochs' training time, evaluation excluded) and wall time.
Exit status 1 when any seed misses a target.

    python scripts/default_accuracy.py                 # seeds 0 1 2
    python scripts/default_accuracy.py --seeds 0 -- model=lenet5 trainer.epochs=10
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--min-accuracy", type=float, default=0.91)
    parser.add_argument("--max-train-seconds", type=float, default=60.0)
    parser.add_argument("overrides", nargs="*", help="extra overrides for cnnlab train")
    args = parser.parse_args()

    table = Table(title="cnnlab train " + " ".join(args.overrides) + " (Fashion-MNIST test set)")
    for col in ("seed", "test accuracy", "train time", "wall time", "images/s", "best epoch", "target"):
        table.add_column(col, justify="right")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            out = Path(tmp) / f"seed{seed}"
            cmd = [sys.executable, "-m", "cnnlab", "train", f"seed={seed}", f"paths.output_dir={out}", *args.overrides]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"cnnlab train failed for seed {seed}:\n{result.stderr}")
            (summary_path,) = out.glob("runs/*/*/summary.json")
            s = json.loads(summary_path.read_text())
            acc, train_s = s["selected"]["test"]["acc"], s["train_time_s"]
            met = acc >= args.min_accuracy and train_s <= args.max_train_seconds
            ok &= met
            table.add_row(str(seed), f"{100 * acc:.2f}%", f"{train_s:.1f} s", f"{s['wall_time_s']:.1f} s",
                          f"{s['train_images_per_s']:,.0f}", str(s["best_epoch"]), "met" if met else "MISSED")
    console = Console(width=120)
    console.print(table)
    console.print(f"targets: >= {100 * args.min_accuracy:.0f}% within {args.max_train_seconds:.0f} s of training; "
                  f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
