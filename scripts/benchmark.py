#!/usr/bin/env python
"""Training throughput, side by side: cnnlab against the textbook loop and a minimal hand-written loop,
with and without augmentation.

Same model (LeNet-5 by default), data (Fashion-MNIST), batch size, optimizer and number of epochs for
every loop; each loop's last epoch is timed (the first warms up). The loops take turns for --repeats
rounds, so drift in the machine's speed hits all of them alike; the table shows medians and ranges.

  (a) textbook:     torchvision.datasets.FashionMNIST + transforms (+ RandomCrop/RandomHorizontalFlip
                    for crop_flip) + ToTensor/Normalize + DataLoader
  (b) hand-written: the whole set as a uint8 tensor, batches by index, a bare loop (no augmentation)
  (c) cnnlab:       cnnlab's own train() with augment=none / augment=<--augment>, and once with
                    channels_last=false to show the loop's own overhead

On CUDA (--device auto finds it) all loops run on the GPU with bf16 autocast; cnnlab uses its defaults.

    python scripts/benchmark.py                          # LeNet-5, crop_flip, 2 epochs, 3 rounds
    python scripts/benchmark.py --model small_resnet --repeats 1

--overhead compares cnnlab, with every feature that is on by default left on, against the leanest
loop there is: the whole training set as pre-normalised float tensors on the device, randperm
batches, Adam at batch 128, the training part only. Two models: LeNet-5 (cnnlab with crop_flip)
and the lightning-hydra-template's 784-64-128-64 batch-norm MLP (cnnlab with augment=none), where
the per-step work of the loop itself shows most.

    python scripts/benchmark.py --overhead --epochs 4 --repeats 7

On a shared VM the machine's speed drifts between rounds by more than the difference measured.
--side-by-side runs each round's two loops at the same time instead, each in its own process on one
CPU core with one thread (cores swapped every round), so the drift hits both alike. Each table row
also counts the aten ops each loop dispatches per training step (torch.profiler), which do not drift.

    python scripts/benchmark.py --overhead --side-by-side --epochs 8 --repeats 8
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
import logging
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

if importlib.util.find_spec("cnnlab") is None:  # not installed: this checkout's (installed: the installed one, as
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/gpu_acceptance.sh runs a bundle's)

from cnnlab.data.datasets import find_mnist_files, mnist_candidates  # noqa: E402
from cnnlab.core.plugins import load_components  # noqa: E402
from cnnlab.core.registry import DATASETS, MODELS  # noqa: E402

MEAN, STD = 0.2860, 0.3530


def load_fashion_mnist(args):
    return DATASETS.build("fashion_mnist", {"root": args.data_root, "download": False}, prefix="dataset")


def build_model(name: str, seed: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS.build(name, {}, prefix="model", in_channels=1, num_classes=10, input_size=28).to(device)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def textbook(model_name: str, data_dir: Path, batch: int, epochs: int, workers: int, seed: int,
             augment: str, device: torch.device) -> float:
    from torchvision import datasets, transforms

    steps = []
    if augment == "crop_flip":  # cnnlab's crop_flip: 4-pixel zero padding, then a mirror half the time
        steps += [transforms.RandomCrop(28, padding=4), transforms.RandomHorizontalFlip()]
    tf = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    ds = datasets.FashionMNIST(str(data_dir), train=True, transform=tf, download=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         pin_memory=device.type == "cuda")
    model = build_model(model_name, seed, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rate = 0.0
    for _ in range(epochs):
        sync(device)
        start, n = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
        sync(device)
        rate = n / (time.perf_counter() - start)
    return rate


def hand_written(model_name: str, images: torch.Tensor, labels: torch.Tensor, batch: int, epochs: int, seed: int,
                 device: torch.device) -> float:
    """SGD, each batch normalised from uint8 as it is drawn: the last epoch's images/s."""
    return hand_loop(build_model(model_name, seed, device), images, labels, batch, epochs, device,
                     adam=False, prenormalised=False)[0]


def hand_loop(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int, epochs: int,
              device: torch.device, *, adam: bool, prenormalised: bool, warmed=None) -> tuple[float, float]:
    """A bare loop over in-memory tensors with randperm batches: SGD (lr 0.01, momentum 0.9) or Adam (lr 1e-3);
    images normalised per batch, or all at once beforehand (``prenormalised``, float tensors on the device).
    ``warmed()`` is called after the first epoch. Returns (the last epoch's images/s, images/s over every
    epoch after the first)."""
    y_all = labels.to(device)
    x_all = ((images.float() / 255 - MEAN) / STD).to(device) if prenormalised else images.to(device)
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if adam
           else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    last, timed_n, timed_s = 0.0, 0, 0.0
    for epoch in range(epochs):
        sync(device)
        start, n = time.perf_counter(), 0
        perm = torch.randperm(len(y_all), device=device)
        for i in range(len(y_all) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            x = x_all[idx] if prenormalised else (x_all[idx].float() / 255 - MEAN) / STD
            with autocast(device):
                loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += batch
        sync(device)
        seconds = time.perf_counter() - start
        last = n / seconds
        if epoch > 0:  # the first epoch warms up
            timed_n, timed_s = timed_n + n, timed_s + seconds
        elif warmed is not None:
            warmed()
    return last, timed_n / timed_s if timed_s else last


# The two models of --overhead: (cnnlab model options, augmentation cnnlab runs with)
OVERHEAD_MODELS = {
    "lenet5": ({}, "crop_flip"),
    "mlp 784-64-128-64 BN": ({"hidden": [64, 128, 64], "batch_norm": True}, "none"),
}


def overhead_loop(key: str, label: str, args, data, device: torch.device, run_dir: Path,
                  steps: int | None = None, warmed=None) -> float:
    """One run of --overhead: ``key`` "hand" (the leanest hand_loop: Adam, pre-normalised) or "cnnlab"
    (every default on), for the model labelled ``label``; images/s over every epoch after the first.
    ``steps``: one epoch of that many steps instead (for counting ops), returning 0. ``warmed()`` is
    called after the first epoch, before the timed ones."""
    options, aug = OVERHEAD_MODELS[label]
    name = label.split()[0]
    if key == "hand":
        torch.manual_seed(args.seed)
        model = MODELS.build(name, options, prefix="model", in_channels=1, num_classes=10, input_size=28).to(device)
        n = steps * args.batch_size if steps else len(data.train_labels)
        rate = hand_loop(model, data.train_images[:n], data.train_labels[:n], args.batch_size,
                         1 if steps else args.epochs, device, adam=True, prenormalised=True, warmed=warmed)[1]
        return 0.0 if steps else rate
    extra = [f"augment={aug}", "optimizer=adam"] + [f"model.{k}={v}".replace(" ", "") for k, v in options.items()]
    if steps:
        extra.append(f"trainer.limit_train_batches={steps}")

    def on_epoch(epoch: int, record: dict) -> bool:
        if epoch == 1 and warmed is not None:
            warmed()
        return False  # never stop the run

    history = cnnlab_loop(name, args.batch_size, 1 if steps else args.epochs, args.seed, device, extra, run_dir,
                          defaults=True, on_epoch=on_epoch)
    timed = history[1:]  # every epoch after the first, as hand_loop times them
    return sum(r["images_per_s"] * r["train_time_s"] for r in timed) / sum(r["train_time_s"] for r in timed) if timed else 0.0


def ops_per_step(run) -> float:
    """aten ops dispatched per training step by ``run(steps)``: torch.profiler's count at 120 steps minus
    that at 60, over 60 (what runs once per run cancels). Counted: ops called by the loop itself, not
    those inside another aten op, the optimizer's step or backward (the same for both loops)."""
    counts = []
    for steps in (60, 120):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run(steps)
        counts.append(sum(1 for e in prof.events() if e.name.startswith("aten::") and loop_level(e)))
    return (counts[1] - counts[0]) / 60


def loop_level(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(("aten::", "Optimizer.", "autograd::")):
            return False
        parent = parent.cpu_parent
    return True


def pinned_loop(key: str, label: str, core: int, args, barrier, results, run_dir: Path) -> None:
    """--side-by-side: one loop in its own process on one core with one thread. It starts with its rival,
    and their timed epochs start together too (``barrier`` again after the first epoch)."""
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    load_components()
    data = load_fashion_mnist(args)
    barrier.wait()
    results.put((key, overhead_loop(key, label, args, data, torch.device("cpu"), run_dir, warmed=barrier.wait)))


def overhead_round(label: str, round_: int, args, data, device: torch.device, tmp: Path) -> dict[str, float]:
    """One round of --overhead for one model: {"hand": images/s, "cnnlab": images/s}."""
    run_dir = tmp / f"{label.split()[0]}{round_}"
    if not args.side_by_side:  # one after the other, who goes first alternating by round
        order = ("hand", "cnnlab") if round_ % 2 == 0 else ("cnnlab", "hand")
        return {key: overhead_loop(key, label, args, data, device, run_dir) for key in order}
    # Both at once, one core each (swapped every round): a change in the machine's speed hits both alike.
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    cores = sorted(os.sched_getaffinity(0))[:2]
    if round_ % 2:
        cores.reverse()
    workers = [ctx.Process(target=pinned_loop, args=(key, label, core, args, barrier, results, run_dir))
               for key, core in zip(("hand", "cnnlab"), cores)]
    for worker in workers:
        worker.start()
    rates = dict(results.get() for _ in workers)
    for worker in workers:
        worker.join()
    return rates


def compare_overhead(args, data, device: torch.device) -> None:
    """cnnlab with its defaults against the leanest hand loop, per model, for --repeats rounds."""
    if args.side_by_side and (device.type != "cpu" or len(os.sched_getaffinity(0)) < 2):
        raise SystemExit("--side-by-side runs the two loops on two CPU cores at once: it needs the CPU and 2 cores")
    rates: dict[tuple[str, str], list[float]] = {}
    models = [label for label in OVERHEAD_MODELS if args.only in (None, label.split()[0])]
    with tempfile.TemporaryDirectory() as tmp:
        ops = {(label, key): ops_per_step(lambda steps, label=label, key=key: overhead_loop(
                   key, label, args, data, device, Path(tmp) / f"ops-{key}-{steps}", steps=steps))
               for label in models for key in ("hand", "cnnlab")}
        for round_ in range(args.repeats):
            for label in models:
                for key, rate in overhead_round(label, round_, args, data, device, Path(tmp)).items():
                    rates.setdefault((label, key), []).append(rate)
    how = ("side by side, one core and one thread each, cores swapped every round" if args.side_by_side
           else f"one after the other, {torch.get_num_threads()} threads")
    table = Table(title=f"cnnlab (defaults on) against a pre-normalised float loop with Adam, batch {args.batch_size}, "
                        f"{device.type}, {how}; epochs 2-{args.epochs} timed, {args.repeats} rounds")
    # On a shared machine the speed drifts between rounds; the best round of each loop is what it can do.
    for col in ("model", "cnnlab aug.", "ops/step hand", "ops/step cnnlab", "hand loop images/s", "cnnlab images/s",
                "median of round ratios", "ratio range", "best / best"):
        table.add_column(col, justify="left" if col in ("model", "cnnlab aug.") else "right")
    for label in models:
        aug = OVERHEAD_MODELS[label][1]
        hand, ours = rates[(label, "hand")], rates[(label, "cnnlab")]
        ratios = [o / h for o, h in zip(ours, hand)]
        table.add_row(label, aug, f"{ops[(label, 'hand')]:.1f}", f"{ops[(label, 'cnnlab')]:.1f}",
                      f"{statistics.median(hand):,.0f}", f"{statistics.median(ours):,.0f}",
                      f"{statistics.median(ratios):.3f}x", f"{min(ratios):.3f}-{max(ratios):.3f}",
                      f"{max(ours) / max(hand):.3f}x")
    console = Console(width=170)
    console.print(table)
    console.print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}; "
                  f"command: {' '.join(sys.argv)}")


def cnnlab_loop(model_name: str, batch: int, epochs: int, seed: int, device: torch.device, extra: list[str],
                run_dir: Path, defaults: bool = False, on_epoch=None):
    """cnnlab's train(): the last epoch's images/s; ``defaults``: only the model, batch, epochs and ``extra``
    set, everything else as shipped, and every epoch's record returned."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cnnlab.core.config import CONF_DIR, parse_run_config
    from cnnlab.tasks import Job, train

    overrides = [f"model={model_name}", f"data.batch_size={batch}", f"trainer.epochs={epochs}", f"seed={seed}",
                 f"trainer.device={device}"]
    if not defaults:
        overrides += ["optimizer=sgd", "optimizer.lr=0.01", "optimizer.nesterov=false", "optimizer.weight_decay=0",
                      "scheduler=constant", "trainer.eval_train_at_end=false"]
    overrides += extra
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    logging.getLogger("cnnlab").setLevel(logging.ERROR)  # its warnings (babysitting) would break up the table
    history = train(parse_run_config(cfg), Job(run_dir, console=Console(file=io.StringIO()), on_epoch=on_epoch))["history"]
    return history if defaults else history[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="per loop; the last one is timed")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--augment", default="crop_flip", choices=["crop_flip"],
                        help="the augmentation compared (the textbook loop needs an equivalent)")
    parser.add_argument("--textbook-workers", type=int, default=2, help="DataLoader workers, as in PyTorch's tutorials")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="data", help="where cnnlab looks for Fashion-MNIST first")
    parser.add_argument("--overhead", action="store_true", help="cnnlab (defaults on) against the leanest hand loop, "
                                                                "LeNet-5 and an MLP")
    parser.add_argument("--only", choices=[label.split()[0] for label in OVERHEAD_MODELS],
                        help="--overhead: this model alone")
    parser.add_argument("--side-by-side", action="store_true", help="--overhead: run the two loops at once, one "
                                                                    "CPU core and one thread each")
    parser.add_argument("--json", help="also write the table's rows to this file (scripts/gpu_acceptance.py reads it)")
    args = parser.parse_args()
    load_components()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))

    data = load_fashion_mnist(args)
    if args.overhead:
        return compare_overhead(args, data, device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = tmp / "FashionMNIST" / "raw"  # torchvision's FashionMNIST reads uncompressed files from here
        raw.mkdir(parents=True)
        files = find_mnist_files(mnist_candidates("fashion_mnist", args.data_root, "FashionMNIST"))
        for stem, src in files.items():
            with (gzip.open(src) if src.suffix == ".gz" else open(src, "rb")) as f, open(raw / stem, "wb") as out:
                shutil.copyfileobj(f, out)

        aug = args.augment
        b, e, s, w = args.batch_size, args.epochs, args.seed, args.textbook_workers
        loops = {
            ("(a) textbook", "none"): lambda: textbook(args.model, tmp, b, e, w, s, "none", device),
            ("(a) textbook", aug): lambda: textbook(args.model, tmp, b, e, w, s, aug, device),
            ("(b) hand-written in-memory", "none"):
                lambda: hand_written(args.model, data.train_images, data.train_labels, b, e, s, device),
            ("(c) cnnlab", "none"): lambda: cnnlab_loop(args.model, b, e, s, device, ["augment=none"], tmp / "c0"),
            ("(c) cnnlab", aug): lambda: cnnlab_loop(args.model, b, e, s, device, [f"augment={aug}"], tmp / "c1"),
            ("(c) cnnlab, channels_last=false", "none"):
                lambda: cnnlab_loop(args.model, b, e, s, device, ["augment=none", "trainer.channels_last=false"], tmp / "c2"),
        }
        if device.type == "cuda":  # the step recorded as CUDA graphs and replayed (refused on the CPU)
            loops[("(c) cnnlab, cuda_graphs=true", "none")] = lambda: cnnlab_loop(
                args.model, b, e, s, device, ["augment=none", "trainer.cuda_graphs=true"], tmp / "c3")
        rates: dict[tuple[str, str], list[float]] = {key: [] for key in loops}
        for _ in range(args.repeats):
            for key, run in loops.items():
                rates[key].append(run())

    med = {key: statistics.median(r) for key, r in rates.items()}
    hand = med[("(b) hand-written in-memory", "none")]
    table = Table(title=f"{args.model} on Fashion-MNIST, batch {b}, {device.type}, last of {e} epochs, "
                        f"median of {args.repeats} rounds")
    for col in ("loop", "augmentation", "images/s", "range", "vs textbook (same aug.)", "vs hand-written"):
        table.add_column(col, justify="left" if col in ("loop", "augmentation") else "right")
    rows = []
    for (name, augmentation), rate in med.items():
        textbook_rate = med[("(a) textbook", augmentation)]
        low, high = min(rates[(name, augmentation)]), max(rates[(name, augmentation)])
        table.add_row(name, augmentation, f"{rate:,.0f}", f"{low:,.0f}-{high:,.0f}", f"{rate / textbook_rate:.2f}x",
                      f"{rate / hand:.2f}x")
        rows.append({"loop": name, "augmentation": augmentation, "images_per_s": rate, "range": [low, high],
                     "vs_textbook": rate / textbook_rate, "vs_hand_written": rate / hand})
    console = Console(width=130)
    console.print(table)
    overhead = med[("(c) cnnlab", "none")] / med[("(c) cnnlab", aug)] - 1
    console.print(f"cnnlab: {aug} adds {100 * overhead:.1f}% to the step time "
                  f"({med[('(c) cnnlab', 'none')]:,.0f} -> {med[('(c) cnnlab', aug)]:,.0f} images/s)")
    gpu = f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    console.print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"{platform.machine()}{gpu}; command: {' '.join(sys.argv)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "model": args.model, "batch_size": b,
                                               "epochs": e, "repeats": args.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
