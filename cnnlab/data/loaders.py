"""Batch loaders. Both yield (float images, labels) on the training device, ready
for the model: augmented (training only) and normalised.

- InMemoryLoader: the whole split is a uint8 tensor on the device; a batch is an
  index into it. No per-sample Python, no worker processes, no host-device copies.
- StreamingLoader: a torch DataLoader over a per-sample Dataset, for data that
  does not fit in memory; batches are moved to the device, then treated alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from cnnlab.errors import CnnlabError


class BatchTransform(Protocol):
    """uint8 images (N,C,H,W) and labels -> model-ready float images and targets (soft after mixup/cutmix)."""

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class InMemoryLoader:
    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool,
        drop_last: bool, seed: int, device: torch.device, transform: BatchTransform,
    ):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.transform = transform
        self.generator = torch.Generator().manual_seed(seed)  # the data order, on the CPU

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=self.generator).to(self.images.device)
        for i in range(len(self)):
            if self.shuffle:
                idx = order[i * self.batch_size:(i + 1) * self.batch_size]
                x, y = self.images[idx], self.labels[idx]
            else:  # slices are views: no copy
                x = self.images[i * self.batch_size:(i + 1) * self.batch_size]
                y = self.labels[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.transform.apply(x, y)


class TensorImageDataset(Dataset):
    """Per-sample access to uint8 image tensors, as a DataLoader needs; ``transform`` runs per image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        return (image if self.transform is None else self.transform(image)), self.labels[i]


def _worker_error_line(error: CnnlabError) -> CnnlabError:
    """A DataLoader worker's CnnlabError comes back wrapped with its traceback: keep the one line."""
    last = str(error).rstrip().splitlines()[-1] if str(error).strip() else ""
    prefix = f"{CnnlabError.__module__}.{CnnlabError.__qualname__}: "
    return CnnlabError(last.removeprefix(prefix))


class StreamingLoader:
    def __init__(
        self, dataset: Dataset, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
        device: torch.device, transform: BatchTransform, num_workers: int, prefetch_factor: int = 2,
    ):
        self.device, self.transform = device, transform
        self.generator = torch.Generator().manual_seed(seed)  # the data order, and each worker's seed
        self.loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
            num_workers=num_workers, pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            generator=self.generator,
        )

    @property
    def num_samples(self) -> int:
        return len(self.loader.dataset)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for x, y in self.loader:
                yield self.transform.apply(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
        except CnnlabError as e:
            raise _worker_error_line(e) from None
