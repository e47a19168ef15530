"""Registered datasets. Each builder returns an ImageData held in memory as uint8.

File lookup order for the MNIST family and CIFAR: the configured root (in
torchvision's layout, or the files directly in it), then system folders
(Debian's `dataset-fashion-mnist` package), then torchvision's download when
``download=true``; otherwise one message saying exactly what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from cnnlab.data.formats import (
    read_cifar_batch, read_cifar_class_names, read_idx, read_stl10_images, read_stl10_labels, read_svhn_mat,
)
from cnnlab.data.loaders import TensorImageDataset
from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import DATASETS
from cnnlab.core.validation import NonNegativeFloat, PositiveInt, Range, Seed


@dataclass
class ImageData:
    """A small image-classification dataset: uint8 images (N, C, H, W), int64 labels."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]  # per channel, of images scaled to [0, 1]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def input_size(self) -> int:
        return self.train_images.shape[2]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    reads_files = False  # the whole dataset is in these tensors
    resize = None        # images already share one size: no resize before the per-image transforms
    validation_idx = None  # no fixed validation set: it is split from train

    def tensors(self, split: str, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, labels) of "train" or "test", optionally only at ``idx``."""
        images, labels = (self.train_images, self.train_labels) if split == "train" else (self.test_images, self.test_labels)
        return (images, labels) if idx is None else (images[idx], labels[idx])

    def per_image(self, split: str, idx: torch.Tensor | None, transform) -> TensorImageDataset:
        """The same images one by one, for a DataLoader (data.in_memory=false)."""
        return TensorImageDataset(*self.tensors(split, idx), transform=transform)


# Debian's dataset-fashion-mnist installs the four IDX .gz files here.
SYSTEM_DIRS = {"fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")], "mnist": []}

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def mnist_candidates(key: str, root: str | Path, tv_class: str) -> list[Path]:
    """Where the MNIST family's IDX files may be, in lookup order."""
    base = Path(root).expanduser()
    return [base / tv_class / "raw", base, *SYSTEM_DIRS.get(key, [])]


def find_mnist_files(candidates: list[Path]) -> dict[str, Path] | None:
    """The four IDX files (plain or .gz) from the first folder that has all of them."""
    stems = [s for pair in _MNIST_FILES.values() for s in pair]
    for folder in candidates:
        found = {s: _find_file(folder, s) for s in stems}
        if all(found.values()):
            return found
    return None


def _download(pretty: str, fetch: Callable[[], object], root: Path, hint: str) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        fetch()
    except Exception as e:  # torchvision raises URLError, RuntimeError, OSError...
        raise CnnlabError(
            f"{pretty} is not in {root} and could not be downloaded ({type(e).__name__}: {e}); {hint}"
        ) from None


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CnnlabError(f"{path} has labels outside 0..{num_classes - 1}")


def _load_mnist_family(
    key: str, pretty: str, tv_class: str, root: str, download: bool,
    classes: list[str], mean: float, std: float,
) -> ImageData:
    base = Path(root).expanduser()
    candidates = mnist_candidates(key, root, tv_class)
    tv_raw = candidates[0]  # where torchvision's download puts the files
    files = find_mnist_files(candidates)
    hint = (
        f"put the four IDX files in {tv_raw}, set dataset.root to their folder"
        + (", install Debian's package dataset-fashion-mnist" if key == "fashion_mnist" else "")
        + ", or run with dataset.download=true on a machine with internet"
    )
    if files is None and download:
        import torchvision.datasets

        _download(pretty, lambda: getattr(torchvision.datasets, tv_class)(str(base), download=True), base, hint)
        files = find_mnist_files([tv_raw])
    if files is None:
        looked = ", ".join(str(c) for c in candidates)
        raise CnnlabError(f"{pretty} not found (looked in {looked}); {hint}")

    def split(which: str) -> tuple[torch.Tensor, torch.Tensor]:
        image_file, label_file = (files[s] for s in _MNIST_FILES[which])
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise CnnlabError(
                f"{image_file} and {label_file} do not match: images {list(images.shape)}, labels {list(labels.shape)}"
            )
        _check_labels(labels, len(classes), label_file)
        return torch.from_numpy(images.astype(np.uint8)).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))

    train_x, train_y = split("train")
    test_x, test_y = split("test")
    return ImageData(key, train_x, train_y, test_x, test_y, classes, (mean,), (std,))


@DATASETS.register(family="mnist", input_shape=(1, 28, 28), num_classes=10)
def fashion_mnist(*, root: str = "data", download: bool = True) -> ImageData:
    """Fashion-MNIST: 28×28 grayscale clothing, 10 classes, 60k train / 10k test."""
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return _load_mnist_family("fashion_mnist", "Fashion-MNIST", "FashionMNIST", root, download,
                              classes, mean=0.2860, std=0.3530)


@DATASETS.register(family="mnist", input_shape=(1, 28, 28), num_classes=10)
def mnist(*, root: str = "data", download: bool = True) -> ImageData:
    """MNIST: 28×28 grayscale handwritten digits, 10 classes, 60k train / 10k test."""
    return _load_mnist_family("mnist", "MNIST", "MNIST", root, download,
                              [str(d) for d in range(10)], mean=0.1307, std=0.3081)


def _load_cifar(
    pretty: str, tv_class: str, folder_name: str, train_files: list[str], test_file: str,
    label_key: str, meta_file: str, names_key: str, root: str, download: bool,
    mean: tuple[float, ...], std: tuple[float, ...], key: str,
) -> ImageData:
    base = Path(root).expanduser()
    folder = base / folder_name
    needed = [folder / f for f in [*train_files, test_file]]
    hint = (f"put torchvision's {folder_name}/ folder in {base}, set dataset.root to its parent, "
            "or run with dataset.download=true on a machine with internet")
    if not all(p.is_file() for p in needed) and download:
        import torchvision.datasets

        _download(pretty, lambda: getattr(torchvision.datasets, tv_class)(str(base), download=True), base, hint)
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise CnnlabError(f"{pretty} not found ({missing[0]} is missing); {hint}")
    parts = [read_cifar_batch(p, label_key) for p in needed[:-1]]
    test_x, test_y = read_cifar_batch(needed[-1], label_key)
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    classes = read_cifar_class_names(folder / meta_file, names_key)
    num_classes = 10 if key == "cifar10" else 100
    if len(classes) != num_classes:
        classes = [str(i) for i in range(num_classes)]
    for labels, path in ((train_y, needed[0]), (test_y, needed[-1])):
        _check_labels(labels, num_classes, path)
    return ImageData(key, torch.from_numpy(train_x), torch.from_numpy(train_y),
                     torch.from_numpy(test_x), torch.from_numpy(test_y), classes, mean, std)


@DATASETS.register(family="cifar", input_shape=(3, 32, 32), num_classes=10)
def cifar10(*, root: str = "data", download: bool = True) -> ImageData:
    """CIFAR-10: 32×32 colour images, 10 classes, 50k train / 10k test."""
    return _load_cifar("CIFAR-10", "CIFAR10", "cifar-10-batches-py",
                       [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels",
                       "batches.meta", "label_names", root, download,
                       (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar10")


@DATASETS.register(family="cifar", input_shape=(3, 32, 32), num_classes=100)
def cifar100(*, root: str = "data", download: bool = True) -> ImageData:
    """CIFAR-100: 32×32 colour images, 100 fine classes, 50k train / 10k test."""
    return _load_cifar("CIFAR-100", "CIFAR100", "cifar-100-python", ["train"], "test", "fine_labels",
                       "meta", "fine_label_names", root, download,
                       (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar100")


@DATASETS.register(family="svhn", input_shape=(3, 32, 32), num_classes=10)
def svhn(*, root: str = "data", download: bool = True, extra: bool = False) -> ImageData:
    """SVHN cropped digits: 32×32 colour house numbers, 10 classes, 73,257 train (+531,131 extra) / 26,032 test."""
    base = Path(root).expanduser()
    names = ["train_32x32.mat", "test_32x32.mat"] + (["extra_32x32.mat"] if extra else [])
    hint = (f"put torchvision's SVHN files ({', '.join(names)}) in {base}, set dataset.root to their folder, "
            "or run with dataset.download=true on a machine with internet")
    missing = [n for n in names if not (base / n).is_file()]
    if missing and download:
        import torchvision.datasets

        splits = {"train_32x32.mat": "train", "test_32x32.mat": "test", "extra_32x32.mat": "extra"}
        _download("SVHN", lambda: [torchvision.datasets.SVHN(str(base), split=splits[n], download=True) for n in missing],
                  base, hint)
        missing = [n for n in names if not (base / n).is_file()]
    if missing:
        raise CnnlabError(f"SVHN not found ({base / missing[0]} is missing); {hint}")
    parts = {n: read_svhn_mat(base / n) for n in names}
    for n, (_, labels) in parts.items():
        _check_labels(labels, 10, base / n)
    train = [parts["train_32x32.mat"]] + ([parts["extra_32x32.mat"]] if extra else [])
    test_x, test_y = parts["test_32x32.mat"]
    return ImageData("svhn", torch.from_numpy(np.concatenate([p[0] for p in train])),
                     torch.from_numpy(np.concatenate([p[1] for p in train])),
                     torch.from_numpy(test_x), torch.from_numpy(test_y), [str(d) for d in range(10)],
                     (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))


@DATASETS.register(family="stl10", input_shape=(3, 96, 96), num_classes=10)
def stl10(*, root: str = "data", download: bool = True) -> ImageData:
    """STL-10: 96×96 colour images of 10 ImageNet classes, 5,000 train / 8,000 test (the labelled splits)."""
    base = Path(root).expanduser()
    folder = base / "stl10_binary"
    needed = [folder / n for n in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")]
    hint = (f"put torchvision's stl10_binary/ folder in {base}, set dataset.root to its parent, "
            "or run with dataset.download=true on a machine with internet (2.6 GB)")
    if not all(p.is_file() for p in needed) and download:
        import torchvision.datasets

        _download("STL-10", lambda: torchvision.datasets.STL10(str(base), split="train", download=True), base, hint)
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise CnnlabError(f"STL-10 not found ({missing[0]} is missing); {hint}")
    train_x, test_x = read_stl10_images(needed[0]), read_stl10_images(needed[2])
    train_y, test_y = read_stl10_labels(needed[1], len(train_x)), read_stl10_labels(needed[3], len(test_x))
    names_file = folder / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else []
    if len(classes) != 10:
        classes = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    return ImageData("stl10", torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x),
                     torch.from_numpy(test_y), classes, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))


@DATASETS.register(family="synthetic", input_shape=(3, 32, 32), num_classes=10)  # with its defaults
def synthetic(
    *,
    channels: PositiveInt = 3,
    size: PositiveInt = 32,
    classes: Annotated[int, Range(ge=2)] = 10,
    train_size: PositiveInt = 2000,
    test_size: PositiveInt = 500,
    noise: NonNegativeFloat = 0.25,
    seed: Seed = 0,
) -> ImageData:
    """Generated in memory: each class is a smooth random pattern plus per-image noise. For tests and benchmarks."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(classes, channels, 4, 4, generator=g)
    prototypes = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % classes  # balanced
        labels = labels[torch.randperm(n, generator=g)]
        x = prototypes[labels] + noise * torch.randn(n, channels, size, size, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels

    train_x, train_y = sample(train_size)
    test_x, test_y = sample(test_size)
    scaled = train_x.float() / 255
    mean = tuple(scaled.mean(dim=(0, 2, 3)).tolist())
    std = tuple(scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return ImageData("synthetic", train_x, train_y, test_x, test_y,
                     [f"class{i}" for i in range(classes)], mean, std)
