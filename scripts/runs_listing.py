#!/usr/bin/env python
"""How fast `cnnlab runs` lists many run directories (the goal: 10,000 in at most 2 s, warm, on 2 cores).

Trains one tiny real run, then copies its record (summary.json, .hydra/) into N run directories with varied
learning rates and values, and times, each as the whole `cnnlab` command (start-up included):
- the baseline: `find` over the same tree (every file, nothing read);
- `cnnlab runs DIR --csv` cold (no cache), then warm (the cache written by the cold one), then warm with the
  table (--limit 20), then after 100 runs changed (their summaries rewritten).

    python scripts/runs_listing.py                  # 10,000 runs
    python scripts/runs_listing.py --runs 2000 --workdir /tmp/listing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

TINY = ["dataset=synthetic", "dataset.channels=1", "dataset.size=8", "dataset.classes=4", "dataset.train_size=160",
        "dataset.test_size=40", "model=mlp", "model.hidden=[16]", "trainer.device=cpu", "trainer.epochs=1"]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def make_tree(root: Path, n: int) -> None:
    template = root.parent / "template"
    subprocess.run([sys.executable, "-m", "cnnlab", "train", *TINY, f"hydra.run.dir={template}"], check=True,
                   capture_output=True)
    summary = json.loads((template / "summary.json").read_text())
    overrides = (template / ".hydra" / "overrides.yaml").read_text()
    for i in range(n):
        folder = root / f"{i // 100:03d}" / f"run-{i}"
        (folder / ".hydra").mkdir(parents=True)
        lr = 0.001 * (1 + i % 10)
        (folder / ".hydra" / "overrides.yaml").write_text(overrides + f"- optimizer.lr={lr}\n")
        (folder / "summary.json").write_text(json.dumps({**summary, "best_value": (i % 97) / 97, "run_dir": str(folder)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--workdir", default="outputs/runs_listing")
    a = parser.parse_args()
    work = Path(a.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    root = work / "outputs"
    make_tree(root, a.runs)
    cnnlab = [sys.executable, "-m", "cnnlab", "runs", str(root)]
    find = timed(["find", str(root), "-type", "f"])
    cold = timed([*cnnlab, "--csv"])
    warm = min(timed([*cnnlab, "--csv"]) for _ in range(3))
    table = min(timed([*cnnlab, "--limit", "20"]) for _ in range(3))
    for i in range(0, a.runs, max(1, a.runs // 100)):  # 100 runs change
        path = root / f"{i // 100:03d}" / f"run-{i}" / "summary.json"
        summary = json.loads(path.read_text())
        path.write_text(json.dumps({**summary, "best_value": 0.5}))
    changed = timed([*cnnlab, "--csv"])
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{a.runs:,} run directories under {root}")
    print("| listing | wall | vs find |")
    print("|---|---|---|")
    for name, seconds in (("find -type f (baseline)", find), ("cnnlab runs --csv, cold (no cache)", cold),
                          ("cnnlab runs --csv, warm", warm), ("cnnlab runs --limit 20 (table), warm", table),
                          ("cnnlab runs --csv, after 100 runs changed", changed)):
        print(f"| {name} | {seconds:.2f} s | {seconds / find:.1f}x |")


if __name__ == "__main__":
    main()
