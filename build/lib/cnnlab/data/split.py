"""The held-out validation split, carved from the training set."""

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
