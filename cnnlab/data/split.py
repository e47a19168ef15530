"""The held-out validation split, carved from the training set, and the folds of cross-validation."""

from __future__ import annotations

import torch

from cnnlab.core.errors import CnnlabError


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int,
                     what: str = "data.val_fraction") -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): ``val_fraction`` of each class goes to validation.

    Stratified so that a small validation set still has every class in its
    training proportion; the seed fixes the split independently of the run's
    seed, so runs of a sweep are compared on the same validation images.
    """
    g = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = int(round(len(idx) * val_fraction))
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    train_idx, val_idx = torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise CnnlabError(
            f"{what}={val_fraction} leaves {len(train_idx)} and {len(val_idx)} images "
            f"on the two sides of the split, out of {len(labels)}"
        )
    return train_idx, val_idx


def stratified_folds(labels: torch.Tensor, k: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """k (train, val) index pairs: each image is in exactly one fold's validation part, and each
    class is spread over the folds in its training proportion (the seed fixes them, as above)."""
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in range(k)]
    offset = 0
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        # rotate which fold gets a class's remainder, so fold sizes differ by one at most
        for i, chunk in enumerate(torch.tensor_split(idx, k)):
            parts[(i + offset) % k].append(chunk)
        offset += len(idx) % k
    everything = torch.arange(len(labels))
    folds = []
    for chunks in parts:
        val_idx = torch.cat(chunks).sort().values
        if len(val_idx) == 0:
            raise CnnlabError(f"data.folds={k} leaves a fold without images: only {len(labels)} training images")
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[val_idx] = False
        folds.append((everything[keep], val_idx))
    return folds
