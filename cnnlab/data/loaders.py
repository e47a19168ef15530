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
    """Per-sample access to uint8 image tensors, as a DataLoader needs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class StreamingLoader:
    def __init__(
        self, dataset: Dataset, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
        device: torch.device, transform: BatchTransform, num_workers: int,
    ):
        self.device, self.transform = device, transform
        self.generator = torch.Generator().manual_seed(seed)  # the data order
        self.loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
            num_workers=num_workers, pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
            generator=self.generator,
        )

    @property
    def num_samples(self) -> int:
        return len(self.loader.dataset)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield self.transform.apply(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
