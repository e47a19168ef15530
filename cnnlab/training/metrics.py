"""What a pass over data measures: loss, top-1 and top-5 accuracy, summed on the device and read once;
and ``evaluate``, one pass of a model over a loader without gradients."""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.runtime.distributed import SINGLE, Ranks
from cnnlab.training.losses import LossFn


@dataclass
class Metrics:
    loss: float
    acc: float
    top5: float | None  # only where there are more than 5 classes
    count: int

    def report(self) -> dict[str, float | None]:
        """A row of the homework's report: loss, accuracy, error, top-5 and how many images."""
        return {"loss": self.loss, "acc": self.acc, "error": 1 - self.acc, "top5": self.top5, "count": self.count}

    def named(self, split: str) -> dict[str, float]:
        out = {f"{split}/loss": self.loss, f"{split}/acc": self.acc}
        if self.top5 is not None:
            out[f"{split}/top5"] = self.top5
        return out


class MetricSums:
    """Loss and hit counts summed on the device, read once per epoch (a read syncs with the GPU).

    A step only keeps its detached logits, labels and loss; the hits (argmax, compare, sum) are
    counted for many steps at once when read, or when the kept logits reach ``FOLD_ELEMENTS``, so the
    loop's per-step work stays that of a hand-written loop."""

    FOLD_ELEMENTS = 1 << 20  # logits kept before they are counted: 4 MiB of float32

    def __init__(self, device: torch.device, top5: bool):
        self.sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss * n, top-1 hits, top-5 hits
        self.count, self.top5, self.held = 0, top5, 0
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        """``loss``: the batch's mean loss, without a graph (the trainer detaches it)."""
        if len(labels) == 0:  # a rank's empty share of a last, short batch
            return
        if labels.ndim == 2:  # soft targets (mixup, cutmix): the dominant class
            labels = labels.argmax(1)
        self.pending.append((logits.detach(), labels, loss))
        self.count += len(labels)
        self.held += logits.numel()
        if self.held >= self.FOLD_ELEMENTS:
            self._fold()

    @torch.no_grad()
    def _fold(self) -> None:
        """Add the pending steps into ``sums``."""
        if not self.pending:
            return
        logits, labels, losses = zip(*self.pending)
        n = torch.tensor([len(y) for y in labels], device=self.sums.device, dtype=torch.float64)
        logits, labels = torch.cat(logits), torch.cat(labels)
        if self.top5:
            hits = logits.topk(5, dim=1).indices == labels[:, None]
            top1, top5 = hits[:, 0].sum(), hits.any(1).sum()
        else:
            top1 = top5 = (logits.argmax(1) == labels).sum()
        self.sums += torch.stack([(torch.stack(losses).double() * n).sum(), top1.double(), top5.double()])
        self.pending, self.held = [], 0

    def total(self, ranks: Ranks = SINGLE) -> torch.Tensor:
        """(loss * n, top-1 hits, top-5 hits, n), summed over every rank."""
        self._fold()
        return ranks.sum_(torch.cat([self.sums, self.sums.new_tensor([self.count])]))

    def load(self, total: torch.Tensor) -> None:
        self.sums.copy_(total[:3])
        self.count, self.pending, self.held = int(total[3]), [], 0

    def result(self, ranks: Ranks = SINGLE) -> Metrics:
        loss, top1, top5, count = self.total(ranks).tolist()
        n = max(count, 1)
        return Metrics(loss / n, top1 / n, top5 / n if self.top5 else None, int(count))


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.inference_mode()
def evaluate(model: nn.Module, loader, *, num_classes: int, autocast_dtype: torch.dtype | None = None,
             limit: int | None = None, ranks: Ranks = SINGLE, loss_fn: LossFn = F.cross_entropy,
             on_batch=None) -> Metrics:
    was_training = model.training
    model.eval()
    sums = MetricSums(next(itertools.chain(model.parameters(), model.buffers())).device, top5=num_classes > 5)
    for i, (x, y) in enumerate(loader):
        if limit is not None and i == limit:
            break
        if len(y) == 0:
            continue
        with autocast_for(x.device, autocast_dtype):
            logits = model(x).float()
        sums.add(logits, y, loss_fn(logits, y))
        if on_batch is not None:
            on_batch()
    model.train(was_training)
    return sums.result(ranks)
