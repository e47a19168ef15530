"""The data losses of the loss-function lecture: softmax cross-entropy and the multiclass SVM (hinge) loss.

A weight penalty (L2, L1 or both: elastic net) is the optimizer's to say (optimizer.weight_decay,
optimizer.l1_decay); the trainer adds it to whichever data loss is chosen here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from cnnlab.core.errors import CnnlabError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MulticlassSVMLoss(nn.Module):
    """Weston-Watkins hinge loss, as the lecture writes it: L_i = sum_{j != y_i} max(0, s_j - s_{y_i} + margin),
    averaged over the batch (torch's MultiMarginLoss also divides each L_i by the number of classes)."""

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = margin

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim != 1:
            raise CnnlabError("trainer.loss=multi_margin needs one label per image; mixup and cutmix make soft "
                              "targets: use trainer.loss=cross_entropy with them")
        correct = scores.gather(1, labels[:, None])
        margins = (scores - correct + self.margin).clamp_min(0)
        others = torch.ones_like(margins).scatter_(1, labels[:, None], 0.0)  # j != y_i
        return (margins * others).sum(1).mean()


def build_loss(name: str, label_smoothing: float = 0.0) -> nn.Module:
    if name == "cross_entropy":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if label_smoothing:
        raise CnnlabError(f"trainer.label_smoothing={label_smoothing} is for trainer.loss=cross_entropy; "
                          f"trainer.loss={name} takes hard labels")
    return MulticlassSVMLoss()


def expected_initial_loss(name: str, num_classes: int) -> float:
    """The lectures' sanity check at initialisation (scores all about 0): ln(C) for softmax, C - 1 for the SVM."""
    return math.log(num_classes) if name == "cross_entropy" else float(num_classes - 1)
