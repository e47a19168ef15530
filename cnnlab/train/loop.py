"""The training loop: train an epoch, validate, keep the best checkpoint."""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.models.blocks import WithAux
from cnnlab.train.checkpoint import save_checkpoint


@dataclass
class Metrics:
    loss: float
    acc: float
    top5: float | None  # only where there are more than 5 classes
    count: int

    def named(self, split: str) -> dict[str, float]:
        out = {f"{split}/loss": self.loss, f"{split}/acc": self.acc}
        if self.top5 is not None:
            out[f"{split}/top5"] = self.top5
        return out


class MetricSums:
    """Loss and hit counts summed on the device: read once per epoch, since a read syncs with the GPU."""

    def __init__(self, device: torch.device, top5: bool):
        self.sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss * n, top-1 hits, top-5 hits
        self.count, self.top5 = 0, top5

    @torch.no_grad()
    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        k = 5 if self.top5 else 1
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        self.sums += torch.stack([loss.detach().double() * len(labels), hits[:, 0].sum().double(), hits.any(1).sum().double()])
        self.count += len(labels)

    def result(self) -> Metrics:
        loss, top1, top5 = self.sums.tolist()
        n = max(self.count, 1)
        return Metrics(loss / n, top1 / n, top5 / n if self.top5 else None, self.count)


class Reporter(Protocol):
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def advance(self, images: int) -> None: ...
    def log_step(self, step: int, loss: float, lr: float) -> None: ...
    def epoch_end(self, record: dict[str, Any], improved: bool) -> None: ...


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.inference_mode()
def evaluate(model: nn.Module, loader, *, num_classes: int, autocast_dtype: torch.dtype | None = None,
             limit: int | None = None) -> Metrics:
    was_training = model.training
    model.eval()
    sums = MetricSums(next(model.parameters()).device, top5=num_classes > 5)
    for i, (x, y) in enumerate(loader):
        if limit is not None and i == limit:
            break
        with autocast_for(x.device, autocast_dtype):
            logits = model(x).float()
        sums.add(logits, y, F.cross_entropy(logits, y))
    model.train(was_training)
    return sums.result()


class BestTracker:
    """The best value so far of the monitored validation metric."""

    def __init__(self, monitor: str):
        self.monitor, self.maximize = monitor, not monitor.endswith("loss")
        self.value: float | None = None
        self.epoch: int | None = None

    def update(self, metrics: dict[str, float], epoch: int) -> bool:
        v = metrics[self.monitor]
        better = self.value is None or (v > self.value if self.maximize else v < self.value)
        if better:
            self.value, self.epoch = v, epoch
        return better


class Trainer:
    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, settings, device: torch.device,
        num_classes: int, reporter: Reporter, checkpoint_dir: Path, autocast_dtype: torch.dtype | None,
        generators: dict[str, torch.Generator], checkpoint_extra: dict[str, Any],
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.settings, self.device, self.num_classes, self.reporter = settings, device, num_classes, reporter
        self.checkpoint_dir, self.autocast_dtype = checkpoint_dir, autocast_dtype
        self.generators, self.checkpoint_extra = generators, checkpoint_extra
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
        self.forward = torch.compile(model) if settings.compile else model
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
        self.best = BestTracker(settings.monitor)
        self.epoch, self.step, self.history = 0, 0, []

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_for(self.device, self.autocast_dtype):
            out = self.forward(x)
            logits, loss = self.loss(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return logits, loss

    def loss(self, out: torch.Tensor | WithAux, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and loss; auxiliary classifiers (GoogLeNet) add their weighted losses while training."""
        if isinstance(out, WithAux):
            aux = sum(self.loss_fn(a, y) for a in out.aux)
            return out.logits, self.loss_fn(out.logits, y) + out.aux_weight * aux
        return out, self.loss_fn(out, y)

    def fit(self, train_loader, val_loader) -> list[dict[str, Any]]:
        s = self.settings
        steps = min(len(train_loader), s.limit_train_batches or len(train_loader))
        while self.epoch < s.epochs:
            self.epoch += 1
            self.model.train()
            sums = MetricSums(self.device, top5=False)  # top-5 is reported for validation and test
            self.reporter.epoch_start(self.epoch, s.epochs, steps)
            start = time.perf_counter()
            for i, (x, y) in enumerate(train_loader):
                if i == steps:
                    break
                logits, loss = self.train_step(x, y)
                sums.add(logits.float(), y, loss)
                self.step += 1
                self.reporter.advance(len(y))
                if self.step % s.log_every_n_steps == 0:
                    self.reporter.log_step(self.step, loss.item(), self.optimizer.param_groups[0]["lr"])
            train = sums.result()  # waits for the device, so the time below is the epoch's
            train_time = time.perf_counter() - start
            val = evaluate(self.model, val_loader, num_classes=self.num_classes,
                           autocast_dtype=self.autocast_dtype, limit=s.limit_eval_batches)
            record = {"epoch": self.epoch, "step": self.step, **train.named("train"), **val.named("val"),
                      "lr": self.optimizer.param_groups[0]["lr"], "train_time_s": train_time,
                      "images_per_s": train.count / train_time}
            improved = self.best.update(record, self.epoch)
            self.history.append(record)
            save_checkpoint(self.checkpoint_dir / "last.pt", self.state())
            if improved:
                save_checkpoint(self.checkpoint_dir / "best.pt", self.state())
            self.reporter.epoch_end(record, improved)
        return self.history

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "history": self.history,
            "best": {"monitor": self.best.monitor, "value": self.best.value, "epoch": self.best.epoch},
            "rng": {
                "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                **{name: g.get_state() for name, g in self.generators.items()},
            },
            **self.checkpoint_extra,
        }
