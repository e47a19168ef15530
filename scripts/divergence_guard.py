"""Where the divergence guard stops a run: the old rule (any step's loss above 3x the first) against the
smoothed one (NaN/inf at once; after 10 steps, the median of the last 5 losses above 3x the first).

Each case trains with the guard off and every step logged, then both rules are applied to its step losses:

    python scripts/divergence_guard.py [--images /tmp/own_data/images] [--quick]

Cases: the default run, the CPU-sized Fashion-MNIST recipes (fewer batches each with --quick), and the
default run on a folder of 48x48 JPEGs (scripts/own_data.py builds one) at the default SGD and at lr 0.01.
Prints, per case, the steps, the first and the highest loss, where each rule would have stopped it, and the
run's final validation accuracy with no rule (what a stop would have thrown away).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnlab.training.watchers import DivergenceGuard  # noqa: E402


def old_rule(losses: list[float], factor: float = 3.0) -> int | None:
    for step, loss in enumerate(losses, start=1):
        if not loss == loss or loss in (float("inf"), float("-inf")) or loss > factor * losses[0]:
            return step
    return None


def new_rule(losses: list[float], factor: float = 3.0) -> int | None:
    guard = DivergenceGuard(factor, torch.device("cpu"))
    for step, loss in enumerate(losses, start=1):
        guard.watch(torch.tensor(loss), step)
    return guard.tripped_at()


def step_losses(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return [e.value for e in sorted(ea.Scalars("train/step_loss"), key=lambda e: e.step)]


def train(overrides: list[str], out: Path) -> Path:
    args = [*overrides, "trainer.divergence_factor=null", "trainer.log_every_n_steps=1", f"paths.output_dir={out}",
            "viz.every_n_epochs=0", "viz.augment_samples=0", "viz.misclassified=0"]
    done = subprocess.run([sys.executable, "-m", "cnnlab", "train", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"cnnlab train {' '.join(overrides)} failed:\n{done.stderr[-2000:]}")
    return max((out / "runs").glob("*/*"), key=lambda p: p.stat().st_mtime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("/tmp/own_data/images"))
    parser.add_argument("--quick", action="store_true",
                        help="the recipes at most 100 batches an epoch (a shorter warm-up: spikier) and 5 to score")
    ns = parser.parse_args()
    limit = (["trainer.limit_train_batches=100", "trainer.limit_eval_batches=5", "trainer.eval_train_at_end=false"]
             if ns.quick else [])
    cases = {  # the Fashion-MNIST recipes; the CIFAR ones and fmnist_best are GPU recipes (hours on a CPU)
        "default run (small_resnet, sgd 0.1, one-cycle)": [],
        "experiment=fmnist_fast": ["experiment=fmnist_fast", *limit],
        "experiment=hw4_mlp": ["experiment=hw4_mlp", *limit],
        "experiment=hw4_improved": ["experiment=hw4_improved", *limit],
        "experiment=lenet5": ["experiment=lenet5", *limit],
    }
    if ns.images.is_dir():
        folder = ["dataset=imagefolder", f"dataset.root={ns.images}", "trainer.epochs=6"]
        cases["48-px JPEG folder, defaults"] = folder
        cases["48-px JPEG folder, optimizer.lr=0.01"] = [*folder, "optimizer.lr=0.01"]
    print(f"{'case':<46} {'steps':>5} {'first':>6} {'highest (step)':>16} {'old rule':>9} {'smoothed':>9} {'val acc':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(cases.items()):
            run = train(overrides, Path(tmp) / str(i))
            losses = step_losses(run)
            summary = json.loads((run / "summary.json").read_text())
            highest = max(range(len(losses)), key=losses.__getitem__)
            stop = [old_rule(losses), new_rule(losses)]
            val = summary["selected"]["val"]["acc"]
            print(f"{name:<46} {len(losses):>5} {losses[0]:>6.2f} {losses[highest]:>9.2f} ({highest + 1:>3}) "
                  f"{str(stop[0] or '-'):>9} {str(stop[1] or '-'):>9} {100 * val:>7.2f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
