"""What watches a run as it trains: the epoch's timer, the best validation value so far, and the
divergence guard (the lectures' "abort a run whose loss explodes")."""

from __future__ import annotations

import math
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
    """Flags the first step whose loss is NaN/inf, or, once WARMUP_STEPS have passed, the first at which each
    of the last WINDOW losses is above factor x the first loss (the loss stayed up: it is not coming down).

    A fresh network's first steps may spike while its learning rate warms up, and come down again: on 48-px
    JPEGs at lr 0.03 the loss went 1.7, 2.9, 20.7, 40.7, 43.3, 81.3, 37.5, 40.0, 37.9, 7.1, 2.3. That is not
    judged a divergence; a loss that stays up, or goes NaN, is. A step only hands over its loss; the losses are judged together when the flag is
    read (one sync): at log steps and epoch ends."""

    WARMUP_STEPS = 10
    WINDOW = 5

    def __init__(self, factor: float | None, device: torch.device):
        self.factor, self.device = factor, device
        self.reference: float | None = None
        self.recent: list[float] = []  # the last WINDOW losses judged
        self.seen = 0                  # steps judged so far
        self.first_bad = -1
        self.pending: list[tuple[int, torch.Tensor]] = []

    def watch(self, loss: torch.Tensor, step: int) -> None:
        if self.factor is not None:
            self.pending.append((step, loss))  # detached by the trainer

    def _judge(self) -> None:
        if not self.pending:
            return
        steps, losses = zip(*self.pending)
        self.pending = []
        for step, loss in zip(steps, torch.stack(losses).float().tolist()):
            if self.reference is None:
                self.reference = loss
            self.seen += 1
            self.recent = [*self.recent[-(self.WINDOW - 1):], loss]
            if self.first_bad >= 0:
                continue
            if not math.isfinite(loss) or (self.seen > self.WARMUP_STEPS and len(self.recent) == self.WINDOW
                                           and min(self.recent) > self.factor * self.reference):
                self.first_bad = step

    def tripped_at(self, ranks: Ranks = SINGLE) -> int | None:
        self._judge()
        step = ranks.min_step(self.first_bad, self.device)
        return step if step >= 0 else None

    def state(self) -> dict:
        self._judge()
        return {"reference": self.reference, "first_bad": self.first_bad, "recent": self.recent, "seen": self.seen}

    def load_state(self, state: dict, initial_loss: float | None) -> None:
        """What state() saved; a checkpoint from before the smoothing has no window yet: judged as after warm-up."""
        reference = state.get("reference", initial_loss)
        self.reference = None if reference is None else float(reference)
        self.first_bad = int(state.get("first_bad", -1))
        self.recent = [float(v) for v in state.get("recent", [])]
        self.seen = int(state.get("seen", self.WARMUP_STEPS if reference is not None else 0))
