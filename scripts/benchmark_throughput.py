#!/usr/bin/env python
"""Training throughput: cnnlab against the textbook loop and a minimal hand-written loop.

Same model (LeNet-5 by default), data (Fashion-MNIST), batch size, optimizer and
number of epochs for all; each loop's last epoch is timed (the first warms up).
The loops take turns for --repeats rounds, so drift in the machine's speed hits
all of them alike; the table shows each loop's median and range.

  (a) textbook:     torchvision.datasets.FashionMNIST + ToTensor/Normalize + DataLoader
  (b) hand-written: the whole set as a uint8 tensor, batches by index, a bare loop
  (c) cnnlab:       cnnlab's own train() with the given overrides (its default
                    channels_last=true, and once with channels_last=false)

    python scripts/benchmark_throughput.py                  # LeNet-5, 2 epochs each
    python scripts/benchmark_throughput.py --model small_resnet --epochs 2
"""

from __future__ import annotations

import argparse
import gzip
import io
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnnlab.data.datasets import find_mnist_files, mnist_candidates  # noqa: E402
from cnnlab.registry import DATASETS, MODELS, load_components  # noqa: E402


def build_model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS.build(name, {}, prefix="model", in_channels=1, num_classes=10, input_size=28)


def textbook(model_name: str, data_dir: Path, batch: int, epochs: int, workers: int, seed: int) -> float:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    ds = datasets.FashionMNIST(str(data_dir), train=True, transform=tf, download=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    model = build_model(model_name, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rate = 0.0
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
        rate = n / (time.perf_counter() - start)
    return rate


def hand_written(model_name: str, images: torch.Tensor, labels: torch.Tensor, batch: int, epochs: int, seed: int) -> float:
    model = build_model(model_name, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rate = 0.0
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        perm = torch.randperm(len(labels))
        for i in range(len(labels) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            x = (images[idx].float() / 255 - 0.2860) / 0.3530
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += batch
        rate = n / (time.perf_counter() - start)
    return rate


def cnnlab_loop(model_name: str, batch: int, epochs: int, seed: int, extra: list[str], run_dir: Path) -> float:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cnnlab.config import CONF_DIR
    from cnnlab.train.run import train

    overrides = [f"model={model_name}", f"data.batch_size={batch}", f"trainer.epochs={epochs}", f"seed={seed}",
                 "optimizer=sgd", "optimizer.lr=0.01", "optimizer.nesterov=false", "optimizer.weight_decay=0",
                 "scheduler=constant", "trainer.eval_train_at_end=false", "trainer.device=cpu", *extra]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    summary = train(cfg, run_dir, console=Console(file=io.StringIO()))
    return summary["history"][-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="per loop; the last one is timed")
    parser.add_argument("--textbook-workers", type=int, default=2, help="DataLoader workers, as in PyTorch's tutorials")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="data", help="where cnnlab looks for Fashion-MNIST first")
    args = parser.parse_args()
    load_components()

    data = DATASETS.build("fashion_mnist", {"root": args.data_root, "download": False}, prefix="dataset")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # torchvision's FashionMNIST reads uncompressed files from <root>/FashionMNIST/raw/
        raw = tmp / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        files = find_mnist_files(mnist_candidates("fashion_mnist", args.data_root, "FashionMNIST"))
        for stem, src in files.items():
            with (gzip.open(src) if src.suffix == ".gz" else open(src, "rb")) as f, open(raw / stem, "wb") as out:
                shutil.copyfileobj(f, out)

        loops = {
            f"(a) textbook: Dataset + ToTensor/Normalize + DataLoader ({args.textbook_workers} workers)":
                lambda: textbook(args.model, tmp, args.batch_size, args.epochs, args.textbook_workers, args.seed),
            "(b) hand-written in-memory loop":
                lambda: hand_written(args.model, data.train_images, data.train_labels, args.batch_size, args.epochs, args.seed),
            "(c) cnnlab, channels_last=false":
                lambda: cnnlab_loop(args.model, args.batch_size, args.epochs, args.seed, ["trainer.channels_last=false"], tmp / "c1"),
            "(c) cnnlab (defaults: channels_last=true)":
                lambda: cnnlab_loop(args.model, args.batch_size, args.epochs, args.seed, [], tmp / "c2"),
        }
        rates: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(args.repeats):
            for name, run in loops.items():
                rates[name].append(run())

    medians = {name: statistics.median(r) for name, r in rates.items()}
    textbook_rate, hand_rate = list(medians.values())[:2]
    table = Table(title=f"{args.model} on Fashion-MNIST, batch {args.batch_size}, last of {args.epochs} epochs, "
                        f"median of {args.repeats} rounds, CPU")
    for col in ("loop", "images/s", "range", "vs textbook", "vs hand-written"):
        table.add_column(col, justify="left" if col == "loop" else "right")
    for name, rate in medians.items():
        spread = f"{min(rates[name]):,.0f}-{max(rates[name]):,.0f}"
        table.add_row(name, f"{rate:,.0f}", spread, f"{rate / textbook_rate:.2f}x", f"{rate / hand_rate:.2f}x")
    console = Console(width=120)
    console.print(table)
    console.print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"{platform.processor() or platform.machine()}, command: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
