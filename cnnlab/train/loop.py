"""The training loop: train an epoch, validate, keep the best checkpoint; and the
babysitting the lectures teach (initial loss, divergence guard, early stopping)."""

from __future__ import annotations

import itertools
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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cnnlab.core.errors import Preempted
from cnnlab.models.blocks import WithAux
from cnnlab.runtime.checkpoint import LAST, encode_checkpoint, load_weights, save_checkpoint, save_same_checkpoint
from cnnlab.runtime.distributed import Ranks
from cnnlab.train.babysit import UpdateRatio, dead_unit_fractions
from cnnlab.train.losses import LossFn, build_loss, expected_initial_loss

SINGLE = Ranks()
FAILED = ("diverged", "failed")  # the statuses of a run that ended without a model worth selecting


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


class Reporter(Protocol):
    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None: ...
    def advance(self, images: int) -> None: ...
    def log_step(self, step: int, loss: float, lr: float) -> None: ...
    def log_parameters(self, model: nn.Module, step: int) -> None: ...
    def log_scalars(self, values: dict[str, float], step: int) -> None: ...
    def warn(self, message: str) -> None: ...
    def epoch_end(self, record: dict[str, Any], improved: bool) -> None: ...
    def flush(self) -> None: ...


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


class Trainer:
    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, settings, device: torch.device,
        num_classes: int, reporter: Reporter, checkpoint_dir: Path, autocast_dtype: torch.dtype | None,
        generators: dict[str, torch.Generator], checkpoint_extra: dict[str, Any], ranks: Ranks = SINGLE,
        stop=None, resume_hint: str = "", on_epoch=None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.settings, self.device, self.num_classes, self.reporter = settings, device, num_classes, reporter
        self.checkpoint_dir, self.autocast_dtype = checkpoint_dir, autocast_dtype
        self.generators, self.checkpoint_extra = generators, checkpoint_extra
        self.ranks, self.stop, self.resume_hint = ranks, stop, resume_hint  # stop: a signals.StopRequest
        self.on_epoch = on_epoch  # on_epoch(epoch, record) -> True: a sweep's pruner stops the run here
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
        # DDP averages gradients over the ranks in backward; the loop otherwise sees one model.
        self.ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
                    if ranks.enabled else None)
        wrapped = self.ddp if self.ddp is not None else model
        self.forward = torch.compile(wrapped) if settings.compile else wrapped
        self.loss_fn = build_loss(settings.loss, settings.label_smoothing)
        self.l2 = getattr(optimizer, "l2_weight_decay", 0.0)  # weight_decay_mode=l2, or L-BFGS
        self.l1 = getattr(optimizer, "l1_decay", 0.0)  # L1 (with l2: elastic net)
        self.penalised = getattr(optimizer, "penalised_params", [])
        self.needs_closure = isinstance(getattr(optimizer, "inner", optimizer), torch.optim.LBFGS)
        self.ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True)
                    if settings.ema_decay else None)
        self.guard = DivergenceGuard(settings.divergence_factor, device)
        self.update_ratio = UpdateRatio(model) if settings.log_update_ratio else None
        self.probe: torch.Tensor | None = None  # the fixed validation batch dead units are counted on
        self.best = BestTracker(settings.monitor)
        self.epoch, self.step, self.history = 0, 0, []
        self.partial: dict[str, Any] | None = None  # where a resumed run picks up inside an epoch
        self.status, self.initial_loss, self.diverged_at = "running", None, None
        self.compile_time_s: float | None = None  # with trainer.compile: the first step, timed apart
        self.data_loss: torch.Tensor | None = None  # the last step's loss before weight penalties

    @property
    def eval_model(self) -> nn.Module:
        """What validation and selection see: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def loss(self, out: torch.Tensor | WithAux, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and loss; auxiliary classifiers (GoogLeNet) add their weighted losses while training."""
        if isinstance(out, WithAux):
            aux = sum(self.loss_fn(a, y) for a in out.aux)
            return out.logits, self.loss_fn(out.logits, y) + out.aux_weight * aux
        return out, self.loss_fn(out, y)

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_for(self.device, self.autocast_dtype):
            logits, loss = self.loss(self.forward(x), y)
        self.data_loss = loss  # without the penalties below: what the initial-loss check judges
        if self.l2:  # weight decay as an L2 term of the loss: lambda/2 * ||w||^2
            loss = loss + 0.5 * self.l2 * sum(p.pow(2).sum() for p in self.penalised)
        if self.l1:  # lambda * ||w||_1
            loss = loss + self.l1 * sum(p.abs().sum() for p in self.penalised)
        return logits, loss

    def train_step(self, x: torch.Tensor, y: torch.Tensor, first: bool, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward; an optimizer update when ``update`` (the last batch of an accumulation)."""
        s = self.settings
        if self.needs_closure:  # L-BFGS re-evaluates the loss itself, possibly several times
            last = {}

            def closure():
                self.optimizer.zero_grad(set_to_none=True)
                last["logits"], last["loss"] = self.objective(x, y)
                last["loss"].backward()
                return last["loss"]

            self.optimizer.step(closure)
            self.after_update()
            return last["logits"], last["loss"]
        if first:  # gradients are kept until the next accumulation starts, for log_parameters
            self.optimizer.zero_grad(set_to_none=True)
        # Under DDP, micro-batches before the last of an accumulation keep their gradients local.
        with self.ddp.no_sync() if self.ddp is not None and not update else nullcontext():
            logits, loss = self.objective(x, y)
            self.scaler.scale(loss / s.accumulate_steps if s.accumulate_steps > 1 else loss).backward()
        if update:
            if s.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                if s.grad_clip_mode == "norm":
                    nn.utils.clip_grad_norm_(params, s.grad_clip)
                else:
                    nn.utils.clip_grad_value_(params, s.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.after_update()
        return logits, loss

    def after_update(self) -> None:
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check_initial_loss(self, loss: float) -> None:
        """The lectures' first check: with small random weights the loss is about ln(classes) (softmax)
        or classes - 1 (SVM)."""
        self.initial_loss, expected = loss, expected_initial_loss(self.settings.loss, self.num_classes)
        formula = f"ln({self.num_classes})" if self.settings.loss == "cross_entropy" else f"{self.num_classes} - 1"
        if self.settings.initial_loss_check and not (0.5 * expected <= loss <= 1.5 * expected):
            self.reporter.warn(f"initial loss {loss:.3f} is far from {formula} = {expected:.3f}: "
                               "check the initialisation, the labels and the loss")

    def fit(self, train_loader, val_loader) -> list[dict[str, Any]]:
        if getattr(self.model, "memorises", False):
            return self.fit_by_memory(train_loader, val_loader)
        s = self.settings
        batches = min(len(train_loader), s.limit_train_batches or len(train_loader))
        # after a resume, count from the best epoch so far
        epochs_without_improvement = self.epoch - (self.best.epoch or self.epoch)
        while self.epoch < s.epochs and self.status == "running":
            self.epoch += 1
            self.model.train()
            partial, self.partial = self.partial, None
            if partial is not None:  # the interrupted epoch: its order again, from the next batch
                train_loader.generator.set_state(partial["order"])
            order_state = train_loader.generator.get_state()
            start = partial["batch"] if partial else 0
            sums = MetricSums(self.device, top5=False)  # top-5 is reported for validation and test
            if partial is not None and self.ranks.is_main:  # the saved sums are over all ranks
                sums.load(partial["sums"])
            self.reporter.epoch_start(self.epoch, s.epochs, batches, done=start)
            timer = EpochTimer(self.device)
            timer.start(carried=partial["train_time_s"] if partial else 0.0)
            since_checkpoint = 0
            for i, (x, y) in enumerate(train_loader.iterate(start), start=start):
                if i == batches:
                    break
                update = (i + 1) % s.accumulate_steps == 0 or i + 1 == batches
                compiling = s.compile and self.step == 0
                if compiling:
                    self._sync()
                    compile_start = time.perf_counter()
                watching = self.update_ratio is not None and update and (self.step + 1) % s.log_every_n_steps == 0
                if watching:
                    self.update_ratio.snapshot(self.optimizer.param_groups[0]["lr"])
                logits, loss = self.train_step(x, y, first=i % s.accumulate_steps == 0, update=update)
                if watching:
                    self.watch_updates()
                if compiling:  # torch.compile compiles on the first call: keep it out of the throughput
                    self._sync()
                    self.compile_time_s = time.perf_counter() - compile_start
                    timer.exclude(self.compile_time_s)
                loss = loss.detach()  # once, for the sums and the guard below
                sums.add(logits, y, loss)  # only argmax of the logits: their precision does not matter
                self.step += 1
                since_checkpoint += 1
                self.guard.watch(loss, self.step)
                self.reporter.advance(len(y))
                if self.step == 1:
                    self.check_initial_loss(self.data_loss.detach().item())
                if s.log_params_every_n_steps and self.step % s.log_params_every_n_steps == 0:
                    self.reporter.log_parameters(self.model, self.step)
                if self.step % s.log_every_n_steps == 0:
                    self.reporter.log_step(self.step, loss.item(), self.optimizer.param_groups[0]["lr"])
                    if self.guard.tripped_at(self.ranks) is not None:
                        break
                if update and i + 1 < batches:  # a step boundary inside the epoch
                    stopping = self.stop_requested()
                    if stopping or (s.checkpoint_every_n_steps and since_checkpoint >= s.checkpoint_every_n_steps):
                        saving_start = time.perf_counter()
                        self.save({"batch": i + 1, "order": order_state, "sums": sums.total(self.ranks).cpu(),
                                   "train_time_s": timer.stop()})
                        timer.exclude(time.perf_counter() - saving_start)
                        since_checkpoint = 0
                    if stopping:
                        self.preempt()
            if (at := self.guard.tripped_at(self.ranks)) is not None:
                self.status, self.diverged_at = "diverged", at
                self.reporter.warn(f"loss diverged at step {at} (NaN/inf or > {s.divergence_factor}x the first loss); "
                                   "stopping this run")
                break
            train_time = timer.stop()
            train = sums.result(self.ranks)
            val = evaluate(self.eval_model, val_loader, num_classes=self.num_classes, loss_fn=self.loss_fn,
                           autocast_dtype=self.autocast_dtype, limit=s.limit_eval_batches, ranks=self.ranks)
            record = {"epoch": self.epoch, "step": self.step, **train.named("train"), **val.named("val"),
                      "lr": self.optimizer.param_groups[0]["lr"], "train_time_s": train_time,
                      "images_per_s": train.count / train_time}
            if self.update_ratio is not None and self.ranks.is_main:
                if (warning := self.update_ratio.judge(self.epoch)) is not None:
                    self.reporter.warn(warning)
            if s.log_dead_units and self.ranks.is_main:
                self.count_dead_units(val_loader)
            improved = self.best.update(record, self.epoch)
            self.history.append(record)
            self.reporter.epoch_end(record, improved)  # logged before the checkpoint: a resume purges after it
            if hasattr(self.scheduler, "observe"):  # reduce-on-plateau watches the validation loss
                self.scheduler.observe(record["val/loss"])
            self.save(None, best=improved)
            epochs_without_improvement = 0 if improved else epochs_without_improvement + 1
            # A sweep hears of every epoch (its pruner's record), and may stop the run before the last.
            judged = self.on_epoch is not None and self.ranks.any(self.on_epoch(self.epoch, record))
            if s.early_stopping_patience and epochs_without_improvement >= s.early_stopping_patience:
                self.status = "early_stopped"
                self.reporter.warn(f"early stopping: no better {s.monitor} for {epochs_without_improvement} epochs")
            elif judged and self.epoch < s.epochs:
                self.status = "pruned"  # checkpoints kept: the pruned trial is selected and reported like any
                self.reporter.warn(f"pruned after epoch {self.epoch}: the sweep's pruner judged this trial hopeless")
            elif self.epoch < s.epochs and self.stop_requested():
                self.preempt()
        if self.status == "running":
            self.status = "completed"
        return self.history

    def fit_by_memory(self, train_loader, val_loader) -> list[dict[str, Any]]:
        """A model that learns by remembering (k-NN): one pass over ``train_loader`` (the classify task
        gives it every training image once, unaugmented) and no gradient steps. Its one epoch is validated,
        recorded and checkpointed like any, so selection, testing and sweeps treat it as they treat a network."""
        self.epoch = 1
        self.model.train()
        self.reporter.epoch_start(1, 1, len(train_loader))
        timer = EpochTimer(self.device)
        timer.start()
        count = 0
        for x, y in train_loader.iterate(0):
            self.model.memorise(x, y)
            count += len(y)
            self.reporter.advance(len(y))
        train_time = timer.stop()
        limit = self.settings.limit_eval_batches
        scoring = getattr(self.reporter, "scoring", None)  # comparing with every remembered image takes minutes
        with scoring("val", val_loader, limit) if scoring else nullcontext() as tick:
            val = evaluate(self.model, val_loader, num_classes=self.num_classes, loss_fn=self.loss_fn,
                           autocast_dtype=self.autocast_dtype, limit=limit, ranks=self.ranks, on_batch=tick)
        record = {"epoch": 1, "step": 0, "train/loss": None, "train/acc": None, **val.named("val"),
                  "lr": 0.0, "train_time_s": train_time, "images_per_s": count / train_time}
        improved = self.best.update(record, 1)
        self.history.append(record)
        self.reporter.epoch_end(record, improved)
        self.save(None, best=improved)
        self.status = "completed"
        return self.history

    def watch_updates(self) -> None:
        """Babysitting: each layer's update/weight ratio at this step (judged at the epoch's end)."""
        ratios = self.update_ratio.ratios()
        if self.ranks.is_main:
            self.reporter.log_scalars({f"update_ratio/{k}": v for k, v in ratios.items()}, self.step + 1)

    def count_dead_units(self, val_loader) -> None:
        """Babysitting: per ReLU, the fraction of units never active on the first validation batch."""
        if self.probe is None:
            self.probe = next(iter(val_loader))[0]
        fractions = dead_unit_fractions(self.model, self.probe)
        self.reporter.log_scalars({f"dead_units/{k}": v for k, v in fractions.items()}, self.step)

    def stop_requested(self) -> bool:
        requested = self.stop is not None and self.stop.signal is not None
        return self.ranks.any(requested)

    def preempt(self) -> None:
        self.ranks.barrier()  # rank 0's checkpoint is on disk before any rank leaves
        raise Preempted(self.stop.signal if self.stop is not None and self.stop.signal else "a signal on another rank",
                        self.step, str(self.checkpoint_dir / LAST), self.resume_hint)

    def save(self, partial: dict[str, Any] | None, best: bool = False) -> None:
        """last.pt (the one it replaces kept as previous.pt), and best.pt when ``best``: rank 0 only.
        ``partial``: saved inside an epoch, with what resuming there needs."""
        if not self.ranks.is_main:
            return
        self.reporter.flush()  # what was logged up to here is on disk before the checkpoint says so
        data = encode_checkpoint(self.state(partial))  # serialised once, written once or twice
        save_checkpoint(self.checkpoint_dir / LAST, data, keep_previous=True)
        if best:
            save_same_checkpoint(self.checkpoint_dir / "best.pt", self.checkpoint_dir / LAST, data)

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by ``state()``: at an epoch's end, or inside one."""
        load_weights(self.model, state["model"], state.get("path", "being resumed"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            load_weights(self.ema.module, state["ema"], state.get("path", "being resumed"))
            if state.get("ema_updates") is not None:
                self.ema.n_averaged.fill_(state["ema_updates"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], list(state["history"])
        self.partial = state.get("partial")
        self.best.value, self.best.epoch = state["best"]["value"], state["best"]["epoch"]
        self.initial_loss = state.get("initial_loss")
        guard = state.get("guard") or {}
        reference = guard.get("reference", self.initial_loss)
        if reference is not None and self.guard.factor is not None:
            self.guard.reference = torch.tensor(reference, device=self.device)
        self.guard.first_bad.fill_(guard.get("first_bad", -1))
        rng = state["rng"]
        random.setstate(rng["python"])
        kind, keys, *rest = rng["numpy"]  # a list of plain values (an older checkpoint: numpy's tuple)
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        for name, generator in self.generators.items():
            generator.set_state(rng[name])

    def state(self, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_updates": int(self.ema.n_averaged) if self.ema is not None else None,
            "selected": "ema" if self.ema is not None else "model",  # the weights validation chose
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch - (partial is not None),  # epochs completed
            "step": self.step, "partial": partial, "history": self.history,
            "best": {"monitor": self.best.monitor, "value": self.best.value, "epoch": self.best.epoch},
            "initial_loss": self.initial_loss,
            "guard": {"reference": None if self.guard.reference is None else self.guard.reference.item(),
                      "first_bad": int(self.guard.first_bad)},
            "rng": {
                "python": random.getstate(), "numpy": numpy_rng_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                **{name: g.get_state() for name, g in self.generators.items()},
            },
            **self.checkpoint_extra,
        }


def numpy_rng_state() -> list[Any]:
    """numpy's global RNG state as plain values (its key array as a list), so a checkpoint loads with
    torch.load(weights_only=True) and no allow-listed numpy types."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(position), int(has_gauss), float(cached)]


def selected_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's run selected: the EMA when it was on, else the raw model."""
    return checkpoint["ema"] if checkpoint.get("selected") == "ema" else checkpoint["model"]
