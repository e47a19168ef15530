"""Packed trials against the same trials one at a time, measured side by side in one run.

    python scripts/pack_benchmark.py --sweep            # 32-trial random searches: unpacked, K processes, packed 8, 16
    python scripts/pack_benchmark.py --step             # the training step: N members stacked vs N models in turn

--sweep runs `cnnlab train -m` for each way of running the same random search (32 trials of lr and weight decay,
Fashion-MNIST, 2 epochs, LeNet-5 with crop+flip, the BN-MLP and small_resnet): one trial at a time, K worker
processes (hydra.sweeper.n_jobs=K), and packs of 8 and 16 (hydra.sweeper.pack). It prints each search's wall time,
its trials per minute and the ratio to one at a time. ``--limit-train-batches`` shortens every epoch alike
(a CPU cannot run the full search of every model in an afternoon); the table says so when it is set.

--step times the training step of cnnlab's own models (the registry's lenet5, the BN-MLP, small_resnet) on
Fashion-MNIST-shaped batches (1x28x28, batch 128): N models stepped one after another with their own SGD
optimizers, as N trials would, against one Pack of the same N (cnnlab.training.pack). Both do the same
arithmetic; the ratio is how much faster the pack trains N trials' steps. Prints members-steps per second and
the ratio for each model and N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnlab.core.plugins import load_components  # noqa: E402
from cnnlab.core.registry import MODELS, OPTIMIZERS  # noqa: E402
from cnnlab.training.pack import Pack, member_losses  # noqa: E402

RECIPES = {  # the searched model, as `cnnlab train` overrides
    "lenet5 crop+flip": ["model=lenet5", "augment=crop_flip"],
    "BN-MLP": ["model=mlp", "model.hidden=[256,128]", "model.batch_norm=true"],
    "small_resnet": ["model=small_resnet"],
    "fmnist_fast": ["experiment=fmnist_fast"],  # its network, schedule and augmentation; 2 epochs like the rest
}
SPACE = ["hydra/sweeper/sampler=random", "optimizer.lr=tag(log, interval(0.003, 0.3))",
         "optimizer.weight_decay=tag(log, interval(1e-5, 1e-3))"]

MODEL_OPTIONS = {"lenet5": {}, "mlp": {"hidden": [256, 128], "batch_norm": True}, "small_resnet": {}}


def build(name: str, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS.build(name, MODEL_OPTIONS[name], "model", in_channels=1, num_classes=10, input_size=28).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, steps: int, device: torch.device) -> float:
    for _ in range(3):  # warm-up: allocator, cuDNN's algorithm choice
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - start


def measure(name: str, n: int, steps: int, batch: int, device: torch.device) -> tuple[float, float]:
    """(seconds for ``steps`` steps of n models in turn, seconds for ``steps`` steps of their pack)."""
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    alone = [build(name, s, device) for s in range(n)]
    optimizers = [OPTIMIZERS.build("sgd", {"lr": 0.01 * (s + 1)}, "optimizer", model=m) for s, m in enumerate(alone)]
    loss_fn = nn.CrossEntropyLoss()

    def separate():
        for model, opt in zip(alone, optimizers):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

    members = [build(name, s, device) for s in range(n)]
    pack = Pack(members).train()
    packed_opts = [OPTIMIZERS.build("sgd", {"lr": 0.01 * (s + 1)}, "optimizer", model=m) for s, m in enumerate(members)]
    smoothing = torch.zeros(n, device=device)

    def packed():
        pack.zero_grad()
        member_losses(pack(x), y, smoothing).sum().backward()
        pack.share_grads()
        for opt in packed_opts:
            opt.step()

    for m in alone:
        m.train()
    return time_steps(separate, steps, device), time_steps(packed, steps, device)


def run_sweep(recipe: list[str], ways: list[str], trials: int, epochs: int, limit: int | None,
              workdir: Path, device: str, eval_limit: int | None = None) -> float:
    """Seconds one `cnnlab train -m` search takes; its trials must all complete."""
    import shutil
    import subprocess

    from cnnlab.runtime.distributed import cnnlab_command

    folder = workdir / "sweep"
    shutil.rmtree(folder, ignore_errors=True)
    args = ["train", "-m", "dataset=fashion_mnist", *recipe, *SPACE, f"hydra.sweeper.n_trials={trials}",
            f"trainer.epochs={epochs}", f"trainer.device={device}", f"hydra.sweep.dir={folder}", "seed=0",
            *([f"trainer.limit_train_batches={limit}"] if limit else []),
            *([f"trainer.limit_eval_batches={eval_limit}"] if eval_limit else []), *ways]
    start = time.perf_counter()
    done = subprocess.run(cnnlab_command(*args), cwd=workdir, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    last = (done.stdout.strip().splitlines() or [""])[-1]
    counts = last.partition("(")[2].partition(")")[0]  # "13 completed, 3 diverged": every trial ran to its end
    if done.returncode not in (0, 3) or not last.startswith(f"sweep: {trials} trials") or "failed" in counts:
        raise SystemExit(f"{' '.join(args)}: exit {done.returncode}; {last or done.stderr.strip()[-600:]}")
    return seconds


def sweeps(args) -> None:
    import tempfile

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ways = {"one at a time": [],
            **({f"{args.processes} processes": [f"hydra.sweeper.n_jobs={args.processes}"]} if args.processes > 1 else {}),
            **{f"packed {n}": [f"hydra.sweeper.pack={n}"] for n in args.members}}
    rows = []
    print(f"{args.trials}-trial random search of lr and weight decay, Fashion-MNIST, {args.epochs} epochs, {device}"
          + (f", every epoch cut to {args.limit_train_batches} batches" if args.limit_train_batches else "")
          + (f", every evaluation to {args.limit_eval_batches} batches" if args.limit_eval_batches else "") + "\n")
    print(f"{'model':<18}{'way':<16}{'wall s':>9}{'trials/min':>12}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            base = None
            for way, overrides in ways.items():
                seconds = run_sweep(RECIPES[name], overrides, args.trials, args.epochs, args.limit_train_batches,
                                    Path(scratch), device, args.limit_eval_batches)
                rate = 60 * args.trials / seconds
                base = base or rate
                print(f"{name:<18}{way:<16}{seconds:>9.1f}{rate:>12.2f}{rate / base:>7.2f}x", flush=True)
                rows.append({"model": name, "way": way, "seconds": seconds, "trials_per_min": rate,
                             "ratio": rate / base})
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "trials": args.trials, "epochs": args.epochs,
                                               "rows": rows}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", action="store_true", help="time the training step")
    parser.add_argument("--sweep", action="store_true", help="time whole searches through `cnnlab train -m`")
    parser.add_argument("--members", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2, help="the K of K worker processes (1: none)")
    parser.add_argument("--json", default=None, help="also write the sweep rows to this file")
    parser.add_argument("--limit-train-batches", type=int, default=None)
    parser.add_argument("--limit-eval-batches", type=int, default=None)
    args = parser.parse_args()
    if args.step == args.sweep:
        parser.error("give --step or --sweep")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    if args.sweep:
        args.models = args.models or list(RECIPES)
        return sweeps(args)
    args.models = args.models or list(MODEL_OPTIONS)
    load_components()
    print(f"batch {args.batch}, {args.steps} timed steps after 3 warm-up steps, SGD (Nesterov) per member\n")
    print(f"{'model':<14}{'N':>4}{'in turn, member-steps/s':>26}{'packed, member-steps/s':>25}{'ratio':>8}")
    for name in args.models:
        for n in args.members:
            separate, packed = measure(name, n, args.steps, args.batch, device)
            rate_separate, rate_packed = n * args.steps / separate, n * args.steps / packed
            print(f"{name:<14}{n:>4}{rate_separate:>26.1f}{rate_packed:>25.1f}{rate_packed / rate_separate:>7.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
