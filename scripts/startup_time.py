"""What a cold `cnnlab` process costs before and around its work, against the floor of importing torch.

Every sweep worker, SLURM array task, DDP rank and CLI call is a fresh Python: what it imports before it
trains is paid again by each. Each command runs --repeats times in a fresh interpreter with one intra-op
thread; the table gives the median CPU time (user + system) and wall time, and the ratio of CPU time to
`python -c "import torch"` measured in the same run.

    python scripts/startup_time.py                      # this checkout
    python scripts/startup_time.py --source /old/tree   # another checkout's cnnlab, same interpreter
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["dataset=synthetic", "dataset.channels=1", "dataset.size=8", "dataset.classes=4", "dataset.train_size=160",
        "dataset.test_size=40", "model=mlp", "model.hidden=[16]", "trainer.epochs=1", "trainer.device=cpu"]


def measure(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of ``command``, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--source", default=None, help="the checkout whose cnnlab to time (default: the installed one)")
    args = parser.parse_args()
    python = sys.executable
    commands = {
        "python -c 'import torch' (the floor)": [python, "-c", "import torch"],
        # what any training process imports: the first optimizer call imports torch._dynamo (so does torchvision)
        "python -c 'import torch, torch._dynamo'": [python, "-c", "import torch, torch._dynamo"],
        "cnnlab --help": [python, "-m", "cnnlab", "--help"],
        "cnnlab train --help": [python, "-m", "cnnlab", "train", "--help"],
        "cnnlab train (synthetic, MLP, 1 epoch)": [python, "-m", "cnnlab", "train", *TINY],
    }
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CNNLAB_OUTPUT_DIR": str(Path(folder, "outputs"))}
        if args.source:
            env["PYTHONPATH"] = str(Path(args.source).resolve())
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.repeats):  # round-robin, so that a busy moment of the machine hits every command
            for name, command in commands.items():
                times[name].append(measure(command, env, Path(folder)))
    floor = statistics.median(cpu for cpu, _ in times["python -c 'import torch' (the floor)"])
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, source {args.source or 'installed'}, "
          f"median of {args.repeats}")
    print("| command | CPU | wall | CPU vs the floor |")
    print("|---|---|---|---|")
    for name, rows in times.items():
        cpu, wall = statistics.median(c for c, _ in rows), statistics.median(w for _, w in rows)
        print(f"| {name} | {cpu:.2f} s | {wall:.2f} s | {cpu / floor:.2f}x |")


if __name__ == "__main__":
    main()
