#!/usr/bin/env python
"""What SLURM costs a cnnlab run, on the local cluster (`bash scripts/local_cluster.sh up` first).

1. Submit to first step: `sbatch` of a one-epoch run, timed from the submission to the first
   training step the job prints (and to the job's start, as squeue reports it).
2. Per trial: the same 8-trial sweep of one-step trials through Hydra's local launcher (this
   process), then through the SLURM launcher one trial per job (n_jobs=1) and in job arrays of 4.

    SLURM_CONF=/tmp/cnnlab-cluster/slurm/slurm.conf python scripts/cluster_overhead.py
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["dataset=synthetic", "dataset.channels=1", "dataset.size=8", "dataset.classes=4", "dataset.train_size=160",
        "dataset.test_size=40", "model=mlp", "model.hidden=[16]", "trainer.device=cpu", "data.batch_size=16",
        "trainer.epochs=1", "trainer.log_every_n_steps=1", "viz.every_n_epochs=0", "viz.augment_samples=0"]
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=cnnlab", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]


def first_step(folder: Path) -> tuple[float, float]:
    folder.mkdir(parents=True)
    out = folder / "job.out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    command = " ".join([sys.executable, "-m", "cnnlab", "train", *TINY, f"hydra.run.dir={folder / 'run'}"])
    start = time.perf_counter()
    job = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", f"--output={out}", "--wrap", command],
                         capture_output=True, text=True, check=True, env=env).stdout.strip()
    started, deadline = None, time.monotonic() + 300
    while time.monotonic() < deadline:
        if started is None:
            state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
            if state == "RUNNING":
                started = time.perf_counter() - start
        if out.is_file() and "step 1/" in out.read_text():
            return started or float("nan"), time.perf_counter() - start
        time.sleep(0.02)
    sys.exit(f"job {job} printed no first step in 300 s; see {out}")


def sweep(folder: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "cnnlab", "train", "-m", "sweep=random_lr_wd", "hydra.sweeper.n_trials=8", *TINY,
           "trainer.limit_train_batches=1", f"hydra.sweep.dir={folder}", *extra]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode not in (0, 3):
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return (time.perf_counter() - start) / 8


def main() -> None:
    if "SLURM_CONF" not in os.environ:
        sys.exit("set SLURM_CONF (bash scripts/local_cluster.sh up prints it)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; one-node SLURM (scripts/local_cluster.sh)")
        runs = [first_step(root / f"first{k}") for k in range(3)]
        print("submit to job start / to first step (3 submissions): "
              + ", ".join(f"{a:.2f} s / {b:.2f} s" for a, b in runs))
        local = sweep(root / "local", [])
        single = sweep(root / "slurm1", [*SLURM, "hydra.sweeper.n_jobs=1"])
        arrays = sweep(root / "slurm4", [*SLURM, "hydra.sweeper.n_jobs=4"])
        print(f"8 one-step trials, wall time per trial: local launcher {local:.2f} s; SLURM launcher, one job a "
              f"trial {single:.2f} s ({single / local:.1f}x); SLURM launcher, arrays of 4 {arrays:.2f} s "
              f"({arrays / local:.1f}x)")


if __name__ == "__main__":
    main()
