"""The image-classification lecture's baselines: k-nearest neighbours and a linear classifier.

Both train through `cnnlab train` like any model, on the same validation split, with the same
report and sweeps (`cnnlab train -m model=knn model.k=1,3,5,7`). The linear classifier takes
softmax or the SVM loss from `trainer.loss`; k-NN learns by remembering, in one pass over the
training split and no gradient step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import MODELS
from cnnlab.core.validation import PositiveInt

_CHUNK = 8192  # training images compared at once: bounds the distance matrix


class NearestNeighbours(nn.Module):
    """Predicts the majority label of the k training images nearest in L1 or L2 distance (ties: the nearest
    one's label). Its output is the log of each class's share of the k votes."""

    memorises = True  # the trainer hands it the training split once instead of taking gradient steps

    def __init__(self, num_classes: int, k: int, distance: str):
        super().__init__()
        self.num_classes, self.k, self.distance, self.p = num_classes, k, distance, 1.0 if distance == "l1" else 2.0
        self.register_buffer("images", torch.zeros(0, 0))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))
        # uint8 images -> what queries are compared in: the run's evaluation pipeline (its data.preprocess), set by
        # whoever runs the model; the memory stays uint8 (a quarter of float32, in memory and in checkpoints)
        self.prepare: Callable[[torch.Tensor], torch.Tensor] | None = None

    @torch.no_grad()
    def memorise(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Remember a batch: uint8 images as they are (compared after ``prepare``), anything else as floats."""
        kept = x if x.dtype == torch.uint8 else x.flatten(1).float()
        self.images = kept if self.images.numel() == 0 else torch.cat([self.images, kept])
        self.labels = torch.cat([self.labels.to(y.device), y])

    def remembered(self, start: int, stop: int) -> torch.Tensor:
        """Remembered images start..stop as the flat floats queries are compared with."""
        chunk = self.images[start:stop]
        if chunk.dtype == torch.uint8:
            if self.prepare is None:
                raise CnnlabError("model knn: its memory is raw images and nothing prepares them (set .prepare)")
            chunk = self.prepare(chunk)
        return chunk.flatten(1).float()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a fresh model holds no memory yet: take the checkpoint's, whatever its size
        for name in ("images", "labels"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.labels) < self.k:  # e.g. `cnnlab list models`, which counts FLOPs of untrained models
            raise CnnlabError(f"model knn: needs {self.k} remembered images, has {len(self.labels)}")
        flat = x.flatten(1).float()
        best_d = best_i = None
        for start in range(0, len(self.labels), _CHUNK):
            d = torch.cdist(flat, self.remembered(start, start + _CHUNK), p=self.p)
            i = torch.arange(start, start + d.shape[1], device=d.device).expand_as(d)
            if best_d is not None:
                d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
            best_d, order = d.topk(min(self.k, d.shape[1]), dim=1, largest=False)
            best_i = i.gather(1, order)
        votes = F.one_hot(self.labels[best_i], self.num_classes).sum(1).float()
        votes += 1e-3 * F.one_hot(self.labels[best_i[:, 0]], self.num_classes)  # a tie goes to the nearest
        return torch.log((votes + 1e-6) / (self.k + 2e-3))


@MODELS.register(family="baseline", memorises=True)
def knn(
    *, in_channels: int, num_classes: int, input_size: int,
    k: PositiveInt = 1, distance: Literal["l1", "l2"] = "l1",
) -> NearestNeighbours:
    """k-nearest neighbours on the (preprocessed) pixels: L1 or L2 distance, majority vote of k."""
    return NearestNeighbours(num_classes, k, distance)


@MODELS.register(family="baseline")
def linear(*, in_channels: int, num_classes: int, input_size: int) -> nn.Sequential:
    """The linear classifier f(x) = Wx + b on the pixels; softmax or SVM loss with trainer.loss."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size * input_size, num_classes))
