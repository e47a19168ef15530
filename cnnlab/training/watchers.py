"""What watches a run as it trains: the epoch's timer, the best validation value so far, and the
divergence guard (the lectures' "abort a run whose loss explodes")."""

from __future__ import annotations

import time

import torch

from cnnlab.runtime.distributed import SINGLE, Ranks


class EpochTimer:
    """Seconds of training work: CUDA events on a GPU (read once, at the epoch's end), a host clock elsewhere.

    Events time the device's own queue, so a host running ahead of the GPU does not shorten an epoch.
    """

    def __init__(self, device: torch.device):
        self.cuda, self.mps = device.type == "cuda", device.type == "mps"
        self.excluded = 0.0  # e.g. torch.compile's first call, reported apart

    def start(self, carried: float = 0.0) -> None:
        """``carried``: seconds of this epoch trained before a resume."""
        self.excluded, self.carried = 0.0, carried
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin_s = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def stop(self) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            elapsed = self.begin.elapsed_time(end) / 1000
        else:
            if self.mps:  # MPS queues work like CUDA but has no events here: wait for it
                torch.mps.synchronize()
            elapsed = time.perf_counter() - self.begin_s
        return elapsed - self.excluded + self.carried


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


class DivergenceGuard:
    """Flags the first step whose loss is NaN/inf or above factor x the first loss.

    A step only hands over its loss; the losses are judged together when the flag is read (a
    sync): at log steps and epoch ends."""

    def __init__(self, factor: float | None, device: torch.device):
        self.factor = factor
        self.reference: torch.Tensor | None = None
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.pending: list[tuple[int, torch.Tensor]] = []

    def watch(self, loss: torch.Tensor, step: int) -> None:
        if self.factor is None:
            return
        if self.reference is None:
            self.reference = loss.detach().float().clone()
        self.pending.append((step, loss))  # detached by the trainer

    def _judge(self) -> None:
        if not self.pending:
            return
        steps, losses = zip(*self.pending)
        self.pending = []
        losses = torch.stack(losses).float()
        bad = ~torch.isfinite(losses) | (losses > self.factor * self.reference)
        steps = torch.tensor(steps, device=losses.device)
        first = torch.where(bad, steps, torch.iinfo(torch.long).max).min()
        self.first_bad = torch.where((self.first_bad < 0) & bad.any(), first, self.first_bad)

    def tripped_at(self, ranks: Ranks = SINGLE) -> int | None:
        self._judge()
        step = ranks.min_step(int(self.first_bad), self.first_bad.device)
        return step if step >= 0 else None
