"""Packed trials against the same trials one at a time, measured side by side in one run.

    python scripts/pack_benchmark.py --step            # the training step: N members stacked vs N models in turn

--step times the training step of cnnlab's own models (the registry's lenet5, the BN-MLP, small_resnet) on
Fashion-MNIST-shaped batches (1x28x28, batch 128): N models stepped one after another with their own SGD
optimizers, as N trials would, against one Pack of the same N (cnnlab.training.pack). Both do the same
arithmetic; the ratio is how much faster the pack trains N trials' steps. Prints members-steps per second and
the ratio for each model and N. (The sweep-level comparison, 32 trials through `cnnlab train -m`, needs packs
in the sweeper; it is not in this script yet.)
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", action="store_true", help="time the training step (the only measure so far)")
    parser.add_argument("--members", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--models", nargs="+", default=list(MODEL_OPTIONS))
    args = parser.parse_args()
    if not args.step:
        parser.error("give --step (the sweep-level comparison is not in this script yet)")
    load_components()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
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
