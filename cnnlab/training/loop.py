"""The training loop: train an epoch, end it (validate, keep the best checkpoint, ask whether to go
on), and the babysitting the lectures teach (initial loss, divergence guard, early stopping). What it
measures lives in metrics.py, what watches it in watchers.py, its checkpoint state in state.py."""

from __future__ import annotations

import math

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cnnlab.core.errors import Preempted
from cnnlab.core.status import RunStatus
from cnnlab.models.blocks import WithAux
from cnnlab.runtime.checkpoint import LAST, encode_checkpoint, load_weights, save_checkpoint, save_same_checkpoint
from cnnlab.runtime.distributed import SINGLE, Ranks
from cnnlab.training.babysit import UpdateRatio, dead_unit_fractions
from cnnlab.training.losses import build_loss, expected_initial_loss
from cnnlab.training.metrics import Metrics, MetricSums, autocast_for, evaluate
from cnnlab.training.state import capture_rng, restore_rng
from cnnlab.training.watchers import BestTracker, DivergenceGuard, EpochTimer


class Reporter(Protocol):
    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None: ...
    def advance(self, images: int) -> None: ...
    def log_step(self, step: int, loss: float, lr: float) -> None: ...
    def log_parameters(self, model: nn.Module, step: int) -> None: ...
    def log_scalars(self, values: dict[str, float], step: int) -> None: ...
    def warn(self, message: str) -> None: ...
    def epoch_end(self, record: dict[str, Any], improved: bool) -> None: ...
    def flush(self) -> None: ...


AUTO_LOG_POINTS, AUTO_LOG_MOST = 20, 50


def log_interval(setting: int | str, steps: int) -> int:
    """trainer.log_every_n_steps: a number, or auto: at least AUTO_LOG_POINTS points over the run's ``steps``
    (a 48-step run logs every 2), and no sparser than every AUTO_LOG_MOST steps."""
    if setting != "auto":
        return int(setting)
    return max(1, min(AUTO_LOG_MOST, steps // AUTO_LOG_POINTS))


def compiled(module: nn.Module, settings) -> nn.Module:
    """trainer.cuda_graphs: torch.compile's reduce-overhead mode, which records the step's kernels once as CUDA
    graphs and replays them (a small network's step is bound by kernel launches); trainer.compile: the default
    mode; else the module as it is."""
    if settings.cuda_graphs:
        return torch.compile(module, mode="reduce-overhead")
    return torch.compile(module) if settings.compile else module


@dataclass
class EpochProgress:
    """Where an epoch stands: its order's generator state at its start, its first batch, sums and timer."""

    order_state: torch.Tensor
    start: int
    sums: MetricSums
    timer: EpochTimer
    since_checkpoint: int = 0


class Trainer:
    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, settings, device: torch.device,
        num_classes: int, reporter: Reporter, checkpoint_dir: Path, autocast_dtype: torch.dtype | None,
        generators: dict[str, torch.Generator], checkpoint_extra: dict[str, Any], ranks: Ranks = SINGLE,
        stop=None, resume_hint: str = "", on_epoch=None, pause_after: int | None = None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.settings, self.device, self.num_classes, self.reporter = settings, device, num_classes, reporter
        self.checkpoint_dir, self.autocast_dtype = checkpoint_dir, autocast_dtype
        self.generators, self.checkpoint_extra = generators, checkpoint_extra
        self.ranks, self.stop, self.resume_hint = ranks, stop, resume_hint  # stop: a signals.StopRequest
        self.on_epoch = on_epoch  # on_epoch(epoch, record) -> True: a sweep's pruner stops the run here
        self.pause_after = pause_after  # stop after this epoch, to be continued (a PBT member's interval)
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
        # DDP averages gradients over the ranks in backward; the loop otherwise sees one model.
        self.ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
                    if ranks.enabled else None)
        wrapped = self.ddp if self.ddp is not None else model
        self.forward = compiled(wrapped, settings)
        self.loss_fn = build_loss(settings.loss, settings.label_smoothing)
        self.l2 = getattr(optimizer, "l2_weight_decay", 0.0)  # weight_decay_mode=l2, or L-BFGS
        self.l1 = getattr(optimizer, "l1_decay", 0.0)  # L1 (with l2: elastic net)
        self.penalised = getattr(optimizer, "penalised_params", [])
        self.needs_closure = isinstance(getattr(optimizer, "inner", optimizer), torch.optim.LBFGS)
        self.ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True)
                    if settings.ema_decay else None)
        self.guard = DivergenceGuard(settings.divergence_factor, device)
        self.log_every = log_interval(settings.log_every_n_steps, 1000)  # fit() knows the run's length
        self.update_ratio = UpdateRatio(model) if settings.log_update_ratio else None
        self.probe: torch.Tensor | None = None  # the fixed validation batch dead units are counted on
        self.best = BestTracker(settings.monitor)
        self.epoch, self.step, self.history = 0, 0, []
        self.partial: dict[str, Any] | None = None  # where a resumed run picks up inside an epoch
        self.stale_epochs = 0  # epochs since the monitored value last improved (early stopping)
        self.status, self.initial_loss, self.diverged_at = RunStatus.RUNNING, None, None
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
            self.update()
        return logits, loss

    def update(self) -> None:
        """The optimizer's step from the gradients backward left (clipped first), then the schedule and the EMA."""
        s = self.settings
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
        """Epochs until the last, or until the run diverges, stops early, is pruned or pre-empted."""
        if getattr(self.model, "memorises", False):
            return self.fit_by_memory(train_loader, val_loader)
        s = self.settings
        batches = min(len(train_loader), s.limit_train_batches or len(train_loader))
        self.log_every = log_interval(s.log_every_n_steps, s.epochs * math.ceil(batches / s.accumulate_steps))
        self.stale_epochs = self.epoch - (self.best.epoch or self.epoch)  # after a resume, from the best epoch so far
        while self.epoch < s.epochs and self.status == RunStatus.RUNNING:
            self.epoch += 1
            train, train_time = self.train_epoch(train_loader, batches)
            if self.diverged():
                break
            self.end_epoch(train, train_time, val_loader)
        if self.status == RunStatus.RUNNING:
            self.status = RunStatus.COMPLETED
        return self.history

    def diverged(self) -> bool:
        """At an epoch's end: whether the guard tripped in it (then the run stops, status diverged)."""
        if (at := self.guard.tripped_at(self.ranks)) is None:
            return False
        self.status, self.diverged_at = RunStatus.DIVERGED, at
        self.reporter.warn(f"loss diverged at step {at} (NaN/inf, or each of the last {self.guard.WINDOW} "
                           f"losses > {self.settings.divergence_factor}x the first, after {self.guard.WARMUP_STEPS} "
                           "steps); stopping this run")
        return True

    def train_epoch(self, train_loader, batches: int) -> tuple[Metrics, float]:
        """One epoch of updates (the rest of it, when a resume picks up inside); its metrics and seconds."""
        epoch = self.begin_epoch(train_loader, batches)
        for i, (x, y) in enumerate(train_loader.iterate(epoch.start), start=epoch.start):
            if i == batches:
                break
            update = (i + 1) % self.settings.accumulate_steps == 0 or i + 1 == batches
            if self.train_batch(x, y, i, update, epoch.timer, epoch.sums):
                break  # diverged: judged at a log step
            self.between_steps(epoch, i, update, batches)
        return epoch.sums.result(self.ranks), epoch.timer.stop()

    def begin_epoch(self, train_loader, batches: int) -> EpochProgress:
        """The epoch's sums, timer and first batch (past those a resumed checkpoint had done), announced."""
        self.model.train()
        partial, self.partial = self.partial, None
        if partial is not None:  # the interrupted epoch: its order again, from the next batch
            train_loader.generator.set_state(partial["order"])
        sums = MetricSums(self.device, top5=False)  # top-5 is reported for validation and test
        if partial is not None and self.ranks.is_main:  # the saved sums are over all ranks
            sums.load(partial["sums"])
        start = partial["batch"] if partial else 0
        self.reporter.epoch_start(self.epoch, self.settings.epochs, batches, done=start)
        timer = EpochTimer(self.device)
        timer.start(carried=partial["train_time_s"] if partial else 0.0)
        return EpochProgress(train_loader.generator.get_state(), start, sums, timer)

    def between_steps(self, epoch: EpochProgress, i: int, update: bool, batches: int) -> None:
        """After batch ``i``: at a step boundary inside the epoch, a checkpoint when one is due."""
        epoch.since_checkpoint += 1
        if update and i + 1 < batches:
            epoch.since_checkpoint = self.checkpoint_inside(i + 1, epoch.order_state, epoch.sums, epoch.timer,
                                                            epoch.since_checkpoint)

    def train_batch(self, x: torch.Tensor, y: torch.Tensor, i: int, update: bool, timer: EpochTimer,
                    sums: MetricSums) -> bool:
        """Batch ``i`` of the epoch: a step, its sums, the guard and the logs. True: the loss diverged."""
        s = self.settings
        compiling = (s.compile or s.cuda_graphs) and self.step == 0
        if compiling:
            self._sync()
            compile_start = time.perf_counter()
        watching = self.watching(update)
        logits, loss = self.train_step(x, y, first=i % s.accumulate_steps == 0, update=update)
        if watching:
            self.watch_updates()
        if compiling:  # torch.compile compiles on the first call: keep it out of the throughput
            self._sync()
            self.compile_time_s = time.perf_counter() - compile_start
            timer.exclude(self.compile_time_s)
        return self.record_step(logits, y, loss, sums)

    def watching(self, update: bool) -> bool:
        """Whether this update's update/weight ratios are logged: if so, the weights before it are kept."""
        watching = self.update_ratio is not None and update and (self.step + 1) % self.log_every == 0
        if watching:
            self.update_ratio.snapshot(self.optimizer.param_groups[0]["lr"])
        return watching

    def record_step(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor, sums: MetricSums) -> bool:
        """After a batch's step: its sums, the guard, the initial-loss check and the logs. True: diverged."""
        s = self.settings
        loss = loss.detach()  # once, for the sums and the guard below
        sums.add(logits, y, loss)  # only argmax of the logits: their precision does not matter
        self.step += 1
        self.guard.watch(loss, self.step)
        self.reporter.advance(len(y))
        if self.step == 1:
            self.check_initial_loss(self.data_loss.detach().item())
        if s.log_params_every_n_steps and self.step % s.log_params_every_n_steps == 0:
            self.reporter.log_parameters(self.model, self.step)
        if self.step % self.log_every == 0:
            self.reporter.log_step(self.step, loss.item(), self.optimizer.param_groups[0]["lr"])
            return self.guard.tripped_at(self.ranks) is not None
        return False

    def checkpoint_inside(self, batch: int, order_state: torch.Tensor, sums: MetricSums, timer: EpochTimer,
                          since_checkpoint: int) -> int:
        """At a step boundary inside an epoch: a checkpoint when a stop is asked for (then the stop) or
        trainer.checkpoint_every_n_steps have passed. Returns the steps since the last checkpoint."""
        stopping = self.stop_requested()
        every = self.settings.checkpoint_every_n_steps
        if stopping or (every and since_checkpoint >= every):
            saving_start = time.perf_counter()
            self.save({"batch": batch, "order": order_state, "sums": sums.total(self.ranks).cpu(),
                       "train_time_s": timer.stop()})
            timer.exclude(time.perf_counter() - saving_start)
            since_checkpoint = 0
        if stopping:
            self.preempt()
        return since_checkpoint

    def end_epoch(self, train: Metrics, train_time: float, val_loader) -> None:
        """Validate, record and log the epoch, checkpoint it, then ask whether to go on: early stopping,
        a sweep's pruner, a stop request."""
        s = self.settings
        val = evaluate(self.eval_model, val_loader, num_classes=self.num_classes,
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
        self.stale_epochs = 0 if improved else self.stale_epochs + 1
        # A sweep hears of every epoch (its pruner's record), and may stop the run before the last.
        judged = self.on_epoch is not None and self.ranks.any(self.on_epoch(self.epoch, record))
        if s.early_stopping_patience and self.stale_epochs >= s.early_stopping_patience:
            self.status = RunStatus.EARLY_STOPPED
            self.reporter.warn(f"early stopping: no better {s.monitor} for {self.stale_epochs} epochs")
        elif judged and self.epoch < s.epochs:
            self.status = RunStatus.PRUNED  # checkpoints kept: the pruned trial is selected and reported like any
            self.reporter.warn(f"pruned after epoch {self.epoch}: the sweep's pruner judged this trial hopeless")
        elif self.pause_after is not None and self.pause_after <= self.epoch < s.epochs:
            self.status = RunStatus.PAUSED
        elif self.epoch < s.epochs and self.stop_requested():
            self.preempt()

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
            val = evaluate(self.model, val_loader, num_classes=self.num_classes,
                           autocast_dtype=self.autocast_dtype, limit=limit, ranks=self.ranks, on_batch=tick)
        record = {"epoch": 1, "step": 0, "train/loss": None, "train/acc": None, **val.named("val"),
                  "lr": 0.0, "train_time_s": train_time, "images_per_s": count / train_time}
        improved = self.best.update(record, 1)
        self.history.append(record)
        self.reporter.epoch_end(record, improved)
        self.save(None, best=improved)
        self.status = RunStatus.COMPLETED
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
        self.guard.load_state(state.get("guard") or {}, self.initial_loss)
        restore_rng(state["rng"], self.generators)

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
            "guard": self.guard.state(),
            "rng": capture_rng(self.generators),
            **self.checkpoint_extra,
        }
