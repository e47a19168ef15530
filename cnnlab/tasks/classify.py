"""The classification task: one run from a composed config to summary.json."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from rich.console import Console

from cnnlab.core.version import __version__
from cnnlab.analysis.evaluation import (check_tta_shift, confusion_figure, confusion_matrix, evaluate_runs,
                                        metrics_from_log_probs, predict, tta_view_count)
from cnnlab.analysis.viz import Visualizer, images_of, start_visualizer
from cnnlab.core.config import RunConfig
from cnnlab.core.errors import CnnlabError, PackRefused
from cnnlab.core.registry import TASKS
from cnnlab.core.status import FINISHED, RunStatus
from cnnlab.runtime.checkpoint import load_checkpoint, load_resumable, load_weights
from cnnlab.core.schema import SUMMARY_RECORD
from cnnlab.core.shown import shell_line
from cnnlab.runtime.files import read_json
from cnnlab.runtime.distributed import launched_ranks
from cnnlab.data.split import stratified_folds
from cnnlab.optim.retune import describe, retune_optimizer
from cnnlab.runtime.signals import StopRequest
from cnnlab.tasks.job import Job
from cnnlab.tasks.summary import run_summary, write_summary
from cnnlab.training.assemble import Setup, setup
from cnnlab.training.console import ConsoleReporter
from cnnlab.training.loop import Trainer
from cnnlab.training.pack import PackedTraining, packable
from cnnlab.training.state import selected_weights
from cnnlab.training.losses import expected_initial_loss
from cnnlab.training.resume import check_resumable
from cnnlab.training.tensorboard_log import TensorBoardLogger, events_dir


class RunReporter:
    """Sends the loop's events to the terminal and to TensorBoard (None: a DDP rank other than 0)."""

    def __init__(self, console: ConsoleReporter, tensorboard: TensorBoardLogger | None, visualizer: Visualizer | None):
        self.console, self.tensorboard, self.visualizer = console, tensorboard, visualizer
        self.epoch_start, self.advance, self.scoring = console.epoch_start, console.advance, console.scoring

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self.console.log_step(step, loss, lr)
        if self.tensorboard is not None:
            self.tensorboard.scalars({"train/step_loss": loss, "train/lr": lr}, step)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.scalars(values, step)

    def log_parameters(self, model, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.parameters(model, step)

    def warn(self, message: str) -> None:
        self.console.warn(message)
        if self.tensorboard is not None:
            self.tensorboard.writer.add_text("warnings", message, 0)

    def epoch_end(self, record: dict[str, Any], improved: bool) -> None:
        self.console.epoch_end(record, improved)
        if self.tensorboard is not None:
            self.tensorboard.scalars({k: v for k, v in record.items() if k not in ("step",)}, record["step"])
        if self.visualizer is not None:
            self.visualizer.epoch_end(record["epoch"], record["step"])

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.writer.flush()


def load_resume_state(run: RunConfig, run_dir: Path, console: ConsoleReporter | None = None,
                      retune: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The newest good checkpoint in ``run_dir`` when ``run`` may continue it (changing the ``retune`` keys
    too); None for a fresh run."""
    found = load_resumable(run_dir / "checkpoints")
    if found is None:
        return None
    state, path, damaged = found
    for line in damaged if console is not None else ():
        console.warn(f"{line}; falling back to {path}")
    status = (read_json(run_dir / "summary.json", SUMMARY_RECORD, "run summary") or {}).get("status")
    if status in (RunStatus.EARLY_STOPPED, RunStatus.DIVERGED) and state.get("partial") is None:
        raise CnnlabError(f"{run_dir} ended {status}; nothing to resume (choose a new hydra.run.dir)")
    check_resumable(state, path, run.resolved, run_dir, retune)
    state["path"] = str(path)
    return state


def pack_refusal(run: RunConfig) -> str | None:
    """Why ``run`` cannot train in a pack, in words (None: it can). What a member does alone and in a pack must be
    the same arithmetic: one loss (cross-entropy), one update a batch, one process, fp32 or bf16."""
    t = run.trainer
    optimizer = run.components["optimizer"]
    reasons = [
        (optimizer.name == "lbfgs", "optimizer=lbfgs re-evaluates the loss through a closure"),
        (optimizer.options.get("weight_decay_mode") == "l2" or optimizer.options.get("l1_decay"),
         "a weight penalty in the loss (weight_decay_mode=l2, l1_decay)"),
        (optimizer.options.get("lookahead_steps"), "optimizer.lookahead_steps"),
        (t.loss != "cross_entropy", f"trainer.loss={t.loss}"),
        (t.accumulate_steps > 1, "trainer.accumulate_steps > 1"),
        (t.precision == "fp16", "trainer.precision=fp16 (each member would need its own loss scale)"),
        (t.compile or t.cuda_graphs, "trainer.compile or trainer.cuda_graphs"),
        (t.devices > 1, "trainer.devices > 1"),
        (t.overfit_batches, "trainer.overfit_batches"),
        (run.data.folds > 1, "data.folds > 1"),
        (run.pretrained is not None, "model.pretrained (fine-tuning)"),
        (run.replay is not None, "replay="),
    ]
    return next((why for refused, why in reasons if refused), None)


def classify_pack(runs: list[RunConfig], jobs: list[Job]) -> list[dict[str, Any]]:
    """``runs`` (trials of a search that differ only in what a pack may vary: seeds, optimizer and schedule
    values, label smoothing, augmentation strength) trained as one pack (cnnlab.training.pack): each member
    its own run in its own directory, with the checkpoints, TensorBoard run and summary it would have alone.
    Raises PackRefused (before anything is written) when they cannot be packed."""
    wall_start = time.perf_counter()
    for run in runs:
        if (reason := pack_refusal(run)) is not None:
            raise PackRefused(reason)
    data = runs[0].components["dataset"].build()  # one dataset for every member
    members: list[Member] = []
    setups: list[Setup] = []
    try:
        with StopRequest() as stop:
            resume_states, rng = [], []
            for run, job in zip(runs, jobs):
                console = ConsoleReporter(job.console, job.log_name)
                resume_states.append((console, load_resume_state(run, job.run_dir, console, job.retune)
                                      if job.resume else None))
                setups.append(setup(run, data=data))
                rng.append(torch.get_rng_state())  # where its run alone stands after its setup
                check_tta_shift(run.trainer.tta_shift, data.input_size, "trainer.tta_shift")
            points = {(state["epoch"], (state.get("partial") or {}).get("batch", 0)) if state else (0, 0)
                      for _, state in resume_states}
            if len(points) > 1:  # a pack steps its members together: they must stand at the same batch
                raise PackRefused("the trials continue from different points of their checkpoints (epoch, batch): "
                                  + ", ".join(f"{e}/{b}" for e, b in sorted(points)))
            first = setups[0]  # two validation images, as the model sees them: the probe's batch
            sample = next(iter(first.loader("train", first.val_idx[:2], train=False)))[0]
            if (reason := packable([s.model for s in setups], sample)) is not None:
                raise PackRefused(reason)
            for k, (s, job, (console, resume_state)) in enumerate(zip(setups, jobs, resume_states)):
                job = dataclasses.replace(job, resume_hint=job.resume_hint
                                          or shell_line(["cnnlab", "train", str(job.run_dir)]))
                torch.set_rng_state(rng[k])  # each member prepared from its own random state, as alone
                members.append(prepare(s, job, console, resume_state, stop, wall_start=wall_start))
                rng[k] = torch.get_rng_state()  # a resumed member's: its checkpoint's
            batches = {m.loaders.batches for m in members}
            if len(batches) != 1:
                raise PackRefused(f"the members train different numbers of batches an epoch ({sorted(batches)})")
            with closed_on_failure(*members):
                PackedTraining([m.trainer for m in members], [(m.loaders.train, m.loaders.val) for m in members],
                               batches.pop(), rng).fit()
        return [conclude(m) for m in members]
    finally:
        for s in setups:
            s.close()


def member_peak_bytes(run: RunConfig) -> int:
    """The CUDA memory one member of a pack takes at its peak: its data on the device, its model, gradients and
    optimizer state, and one training step's activations, measured by building ``run`` and taking one step (in a
    throw-away setup: nothing is written, and the trial's own setup seeds afresh). pack=auto sizes packs by it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    s = setup(run)
    try:
        x, y = next(iter(s.loader("train", s.train_idx, train=True)))
        with torch.autocast("cuda", dtype=s.autocast_dtype or torch.float32, enabled=s.autocast_dtype is not None):
            out = s.model(x)
            logits = out if isinstance(out, torch.Tensor) else out[0]
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        s.optimizer.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    finally:
        s.close()
        del s
        torch.cuda.empty_cache()


@TASKS.register(resume_check=load_resume_state, pack=classify_pack, pack_peak=member_peak_bytes)
def classify(run: RunConfig, job: Job) -> dict[str, Any]:
    """Train an image classifier: choose on validation, test once (the default task).

    ``job.test=False`` (a sweep's trials) leaves the test split unscored; ``job.resume``: continue from
    the run directory's newest good checkpoint when there is one (the config may differ only in keys a
    resume allows). Under torchrun, every rank calls this."""
    wall_start = time.perf_counter()
    ranks = launched_ranks()
    reporter = ConsoleReporter(job.console if ranks.is_main else Console(quiet=True))
    if (folds := run.data.folds) > 1:
        if ranks.enabled:
            raise CnnlabError(f"data.folds={folds} trains its folds one after the other in one process; "
                              "run it without torchrun or trainer.devices")
        return cross_validate(run, job, reporter, folds, wall_start=wall_start)
    resume_state = load_resume_state(run, job.run_dir, reporter, job.retune) if job.resume else None
    s = setup(run, ranks)
    try:
        check_tta_shift(s.run.trainer.tta_shift, s.data.input_size, "trainer.tta_shift")
        job = dataclasses.replace(job, resume_hint=job.resume_hint or shell_line(["cnnlab", "train", str(job.run_dir)]))
        return fit_select_test(s, job, reporter, resume_state, wall_start=wall_start)
    finally:
        s.close()  # DataLoader workers stop now, not whenever the garbage collector gets to them


def cross_validate(run: RunConfig, job: Job, reporter: ConsoleReporter, k: int, *, wall_start: float) -> dict[str, Any]:
    """k-fold cross-validation: fold i trains on the other folds and validates on fold i, in
    <run dir>/fold<i>, with its own TensorBoard run. The folds share one dataset. The run's ``best_value``
    is the folds' mean, so sweeps select on it; the test split is scored once, by the best fold's selected
    model, which becomes the run's checkpoints/best.pt."""
    data = run.components["dataset"].build()
    summaries = []
    for i, (train_idx, val_idx) in enumerate(stratified_folds(data.train_labels, k, run.data.split_seed)):
        fold_dir = job.run_dir / f"fold{i}"
        done = read_json(fold_dir / "summary.json", SUMMARY_RECORD, "run summary") if job.resume else None
        if done is not None and done.get("status") in FINISHED:
            summaries.append(done)
            continue
        reporter.console.print(f"fold {i + 1}/{k}: {len(train_idx):,} train / {len(val_idx):,} val", highlight=False)
        fold = fold_run(run, i)
        fold_job = Job(fold_dir, job.console, test=False, resume=job.resume, resume_hint=shell_line(["cnnlab", "train", str(job.run_dir)]))
        resume_state = load_resume_state(fold, fold_dir, reporter) if job.resume else None
        s = setup(fold, split=(train_idx, val_idx), data=data)
        try:
            summaries.append(fit_select_test(s, fold_job, reporter, resume_state, wall_start=time.perf_counter()))
        finally:
            s.close()
    values = [f.get("best_value") for f in summaries]
    monitor = summaries[0]["monitor"]
    status = RunStatus.COMPLETED if all(v is not None for v in values) else RunStatus.DIVERGED
    summary = run_summary(
        run, job, status, wall_start=wall_start, dataset=summaries[0]["dataset"],
        parameters=summaries[0]["parameters"], monitor=monitor,
        folds=[{"fold": i, "run_dir": f["run_dir"], "status": f["status"], "best_epoch": f.get("best_epoch"),
                "best_value": f.get("best_value"), "val": (f.get("selected") or {}).get("val")}
               for i, f in enumerate(summaries)],
        best_value=None, selected={})
    if status != RunStatus.COMPLETED:
        return write_summary(job.run_dir, summary, reporter.console, prefix="status: diverged in a fold; ")
    spread = statistics.stdev(values) if k > 1 else 0.0
    summary["cv"] = {"k": k, "mean": statistics.fmean(values), "std": spread, "values": values}
    summary["best_value"] = summary["cv"]["mean"]
    summary["selected"]["val"] = {key: statistics.fmean(f["selected"]["val"][key] for f in summaries)
                                  for key in ("loss", "acc", "error")}
    reporter.console.print(f"cross-validation: {monitor} {summary['cv']['mean']:.4f} ± {spread:.4f} over "
                           f"{k} folds ({', '.join(f'{v:.4f}' for v in values)})", highlight=False)
    if job.test:  # the test split, once: the best fold's selected model
        chosen = (max if monitor.endswith("acc") else min)(range(k), key=lambda i: values[i])
        (job.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(summaries[chosen]["run_dir"]) / "checkpoints" / "best.pt",
                        job.run_dir / "checkpoints" / "best.pt")
        report = evaluate_runs([str(job.run_dir)], splits=["test"], tta_flip=run.trainer.tta_flip,
                               tta_shift=run.trainer.tta_shift, device=run.trainer.device, data_dir=None,
                               console=reporter.console)
        summary["chosen_fold"], summary["selected"]["test"] = chosen, report["splits"]["test"]
    return write_summary(job.run_dir, summary, reporter.console)


def fold_run(run: RunConfig, i: int) -> RunConfig:
    """Fold ``i``'s run: the same, but a sweep's trial gives each fold its own TensorBoard run."""
    tensorboard = (run.resolved.get("paths") or {}).get("tensorboard")
    if not tensorboard:
        return run
    return dataclasses.replace(run, resolved={**run.resolved, "paths": {**run.resolved["paths"],
                                                                        "tensorboard": f"{tensorboard}/fold{i}"}})


@dataclass
class Loaders:
    train: Any
    val: Any
    val_rows: torch.Tensor  # the training images validation scores (a few fixed batches with overfit_batches)
    batches: int  # training batches an epoch
    memorises: bool  # k-NN: one pass that remembers, no gradient steps


def build_loaders(s: Setup) -> Loaders:
    run, model = s.run, s.model
    memorises = getattr(model, "memorises", False)
    if run.trainer.overfit_batches:  # babysitting: can the model memorise a few fixed batches?
        fixed = s.train_idx[:run.trainer.overfit_batches * run.data.batch_size]
        train = s.loader("train", fixed, train=True, shuffle=False)  # fixed batches, augmented as configured
        val_rows = fixed
    elif memorises:  # k-NN remembers every training image once, as it is stored (uint8)
        train = s.loader("train", s.train_idx, train=False, shuffle=False, raw=True)
        model.prepare = s.eval_pipe  # compared as the queries are: the run's data.preprocess
        val_rows = s.val_idx
    else:
        train = s.loader("train", s.train_idx, train=True)
        val_rows = s.val_idx
    batches = min(len(train), run.trainer.limit_train_batches or len(train))
    return Loaders(train, s.loader("train", val_rows, train=False), val_rows, batches, memorises)


def run_header(s: Setup, run_dir: Path, loaders: Loaders, n_params: int) -> dict[str, str]:
    """What the run's first lines say: the data, model, optimizer, device and how long it trains."""
    run, data, model, ranks = s.run, s.data, s.model, s.ranks
    n_train, batches = len(s.train_idx), loaders.batches
    return {
        "run": str(run_dir), "dataset": f"{data.name}: {n_train:,} train / {len(s.val_idx):,} val / "
        f"{len(data.test_labels):,} test, {data.channels}x{data.input_size}x{data.input_size}, {data.num_classes} classes"
        + (f"; {data.layout}" if data.reads_files else ""),
        **({"input": f"{data.size_note}; evaluation view: {s.transform.describe()}"} if data.reads_files else {}),
        "data path": "in memory on the device (batched augmentation)" if s.in_memory else
                     f"per image: DataLoader, {run.data.num_workers} workers, torchvision.transforms.v2",
        "model": f"{run.components['model'].name}: {n_params:,} parameters",
        **({"learns": f"by remembering the {n_train:,} training images in one pass (k={model.k}, "
                      f"{model.distance.upper()} distance); no optimizer, schedule, augmentation or gradient step"}
           if loaders.memorises else
           {"optimizer": f"{run.components['optimizer'].name} {run.components['optimizer'].options}",
            "scheduler": run.components["scheduler"].name, "augment": run.augment_name}),
        "device": f"{s.device}" + (f" ({s.autocast_dtype})" if s.autocast_dtype else " (fp32)")
                  + (f", {ranks.world_size} processes (DDP)" if ranks.enabled else ""),
        **({"transfer": s.transfer} if s.transfer else {}),
        **({"dead units": "not counted: the model has no ReLU, and its activation passes a gradient for every "
                          "input (trainer.log_dead_units counts ReLUs that never fire)"}
           if run.trainer.log_dead_units and not any(isinstance(m, torch.nn.ReLU) for m in model.modules()) else {}),
        "epochs": f"one pass of {batches} batches of {run.data.eval_batch_size}; every validation and test image is "
                  f"then compared with all {n_train:,}" if loaders.memorises else
                  f"{run.trainer.epochs} x {batches} batches of {run.data.batch_size}"
                  + (f", an update every {run.trainer.accumulate_steps}" if run.trainer.accumulate_steps > 1 else ""),
    }


@dataclass
class Member:
    """One run's parts around its Trainer: what fit_select_test trains, and what a pack trains N of."""

    s: Setup
    job: Job
    console: ConsoleReporter
    loaders: Loaders
    tensorboard: TensorBoardLogger | None
    visualizer: Visualizer | None
    reporter: RunReporter
    trainer: Trainer
    parameters: int
    wall_start: float


def fit_select_test(s: Setup, job: Job, console: ConsoleReporter, resume_state: dict[str, Any] | None,
                    *, wall_start: float) -> dict[str, Any]:
    """Train, select the best epoch on validation, test it once, and write the summary."""
    with StopRequest() as stop:  # stops (SIGTERM, SIGUSR1) checkpoint
        member = prepare(s, job, console, resume_state, stop, wall_start=wall_start)
        with closed_on_failure(member):
            member.trainer.fit(member.loaders.train, member.loaders.val)
    return conclude(member)


def prepare(s: Setup, job: Job, console: ConsoleReporter, resume_state: dict[str, Any] | None, stop: StopRequest,
            *, wall_start: float) -> Member:
    """The run's loaders, schedule, TensorBoard, header and Trainer, continued from ``resume_state`` when given."""
    run, ranks = s.run, s.ranks
    loaders = build_loaders(s)
    updates_per_epoch = math.ceil(loaders.batches / run.trainer.accumulate_steps)
    scheduler = run.components["scheduler"].build(optimizer=s.optimizer, steps_per_epoch=updates_per_epoch,
                                                  epochs=run.trainer.epochs)
    tensorboard = visualizer = None
    if ranks.is_main:  # one writer: rank 0's
        tensorboard = TensorBoardLogger(events_dir(run.resolved, job.run_dir), run.resolved,
                                        OmegaConf.to_yaml(run.resolved), environment=job.environment,
                                        purge_step=resume_state["step"] + 1 if resume_state else None)
        visualizer = start_visualizer(s, job.run_dir, tensorboard.writer, fresh=resume_state is None)
    n_params = sum(p.numel() for p in s.model.parameters())
    console.start(run_header(s, job.run_dir, loaders, n_params))
    reporter = RunReporter(console, tensorboard, visualizer)
    s.warn = reporter.warn  # files a loader skips
    for line in getattr(s.data, "warnings", ()):
        reporter.warn(line)
    trainer = Trainer(
        s.model, s.optimizer, scheduler, settings=run.trainer, device=s.device, num_classes=s.data.num_classes,
        reporter=reporter, checkpoint_dir=job.run_dir / "checkpoints", autocast_dtype=s.autocast_dtype,
        generators={"data_order": loaders.train.generator, "augment": s.train_pipe.generator},
        checkpoint_extra={"config": run.resolved, "version": __version__, "classes": s.data.classes,
                          "input_shape": [s.data.channels, s.data.input_size, s.data.input_size],
                          "preprocess": s.preprocessing.state_dict(), "resize": s.data.resize},
        ranks=s.ranks, stop=stop, resume_hint=job.resume_hint, on_epoch=job.on_epoch, pause_after=job.pause_after,
    )
    if resume_state is not None:
        trainer.load_state(resume_state)
        where = f"epoch {trainer.epoch}" + (f", batch {trainer.partial['batch']} of epoch {trainer.epoch + 1}"
                                            if trainer.partial else "")
        console.console.print(f"resumed from {resume_state['path']} after {where} (step {trainer.step})",
                              highlight=False)
        if job.retune:  # PBT: the loaded optimizer and schedule take this config's hyperparameters
            changed = retune_optimizer(s.optimizer, scheduler, resume_state["config"]["optimizer"], run.resolved["optimizer"])
            if changed:
                console.console.print(f"retuned: {describe(changed)}", highlight=False)
    return Member(s, job, console, loaders, tensorboard, visualizer, reporter, trainer, n_params, wall_start)


@contextlib.contextmanager
def closed_on_failure(*members: Member):
    """A loop that raised leaves each run's TensorBoard session closed as failed."""
    try:
        yield
    except BaseException:
        for member in members:
            if member.tensorboard is not None:
                with contextlib.suppress(CnnlabError):  # the disk that failed the run may fail this too
                    member.tensorboard.close(RunStatus.FAILED)
        raise


def conclude(member: Member) -> dict[str, Any]:
    """After the loop: select on validation, test once (``job.test``), and write the summary."""
    s, job, trainer, console, ranks, run = member.s, member.job, member.trainer, member.console, member.s.ranks, member.s.run
    if not ranks.is_main:  # rank 0 alone selects, tests and writes the summary; the others wait for it
        ranks.barrier()
        return {"status": trainer.status, "best_value": trainer.best.value}
    summary = run_summary(
        run, job, trainer.status, wall_start=member.wall_start, tensorboard=str(events_dir(run.resolved, job.run_dir)),
        dataset=s.data.name, parameters=member.parameters, device=str(s.device),
        precision=str(s.autocast_dtype or torch.float32).replace("torch.", ""), processes=ranks.world_size,
        sizes={"train": len(s.train_idx), "val": len(s.val_idx), "test": len(s.data.test_labels)},
        initial_loss=trainer.initial_loss,
        expected_initial_loss=expected_initial_loss(run.trainer.loss, s.data.num_classes),
        monitor=trainer.best.monitor, best_epoch=trainer.best.epoch, best_value=trainer.best.value,
        selected_weights="ema" if trainer.ema is not None else "model",
        compile_time_s=trainer.compile_time_s)  # with trainer.compile; not in train_time_s
    if trainer.status in (RunStatus.DIVERGED, RunStatus.PAUSED) or trainer.best.epoch is None:
        summary = end_unselected(trainer, summary, job.run_dir, member.tensorboard, console)
    else:
        summary = select_and_score(s, job, trainer, member.loaders, summary, member.tensorboard, member.visualizer,
                                   console, member.wall_start)
    ranks.barrier()  # nobody leaves (and tears down the process group) while another rank still works
    return summary


def end_unselected(trainer: Trainer, summary: dict[str, Any], run_dir: Path, tensorboard: TensorBoardLogger,
                   console: ConsoleReporter) -> dict[str, Any]:
    """A diverged run is recorded, not tested: the test set is for selected models only. A paused one (a PBT
    interval's end) is recorded so too, and selected when its last interval ends."""
    history = trainer.history
    summary.update({"diverged_at_step": trainer.diverged_at, "selected": {}, "history": history})
    write_summary(run_dir, summary, console.console, prefix=f"status: {trainer.status}; ")
    if trainer.best.epoch is not None:  # the epochs it finished, for the HParams table (validation only)
        best = history[trainer.best.epoch - 1]
        tensorboard.scalars({"best/" + trainer.best.monitor.replace("/", "_"): trainer.best.value,
                             "selected/val_loss": best["val/loss"], "selected/val_acc": best["val/acc"]}, trainer.step)
    tensorboard.close(trainer.status)
    return summary


def select_and_score(s: Setup, job: Job, trainer: Trainer, loaders: Loaders, summary: dict[str, Any],
                     tensorboard: TensorBoardLogger, visualizer: Visualizer | None,
                     console: ConsoleReporter, wall_start: float) -> dict[str, Any]:
    """Choose on validation, test once: the selected weights scored on train, val and (``job.test``) test."""
    run, data, model, history = s.run, s.data, s.model, trainer.history
    val_loader = s.loader("train", loaders.val_rows, train=False, shard=False) if s.ranks.enabled else loaders.val
    best = job.run_dir / "checkpoints" / "best.pt"
    load_weights(model, selected_weights(load_checkpoint(best)), best)
    probabilities = {}

    def score(split: str, loader) -> dict[str, float | None]:
        limit = run.trainer.limit_eval_batches
        # k-NN: minutes, not seconds
        with console.scoring(split, loader, limit) if loaders.memorises else contextlib.nullcontext() as tick:
            probabilities[split] = predict([model], loader, autocast_dtype=s.autocast_dtype,
                                           tta_flip=run.trainer.tta_flip, tta_shift=run.trainer.tta_shift,
                                           limit=limit, on_batch=tick)
        return metrics_from_log_probs(*probabilities[split]).report()

    selected = {}
    # k-NN's own training images find themselves at distance 0: that score says nothing, and costs the most
    if run.trainer.eval_train_at_end and not loaders.memorises:
        selected["train"] = score("train", s.loader("train", s.train_idx, train=False, shard=False))
    selected["val"] = score("val", val_loader)
    confusion = None
    if job.test:  # the test split is batched only now, for the selected weights
        selected["test"] = score("test", s.loader("test", train=False, shard=False))
        confusion = confusion_matrix(*probabilities["test"], data.num_classes)
        tensorboard.writer.add_figure("test/confusion_matrix", confusion_figure(confusion, data.classes), trainer.step)
        if visualizer is not None and run.viz.misclassified:
            log_probs, labels = probabilities["test"]
            visualizer.misclassified(lambda idx: images_of(s, "test", idx, train=False), log_probs.exp(), labels,
                                     trainer.step)
    train_time = sum(r["train_time_s"] for r in history)
    summary.update({
        "selected": selected, "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - wall_start,
        "train_images_per_s": sum(r["images_per_s"] * r["train_time_s"] for r in history) / train_time,
        "tta_views": tta_view_count(run.trainer.tta_flip, run.trainer.tta_shift),
        "confusion_matrix": confusion.tolist() if confusion is not None else None,  # [true][predicted], test split
        "history": history,
    })
    write_summary(job.run_dir, summary)
    final = {f"test/{k}": v for k, v in selected.get("test", {}).items() if k in ("loss", "acc", "top5")}
    final.update({"best/" + trainer.best.monitor.replace("/", "_"): trainer.best.value,
                  "selected/train_loss": selected.get("train", {}).get("loss"),
                  "selected/val_loss": selected["val"]["loss"], "selected/val_acc": selected["val"]["acc"]})
    tensorboard.scalars(final, trainer.step)
    tensorboard.close(trainer.status)
    console.finish(selected, trainer.best.epoch, trainer.best.monitor)
    console.console.print(f"summary: {job.run_dir / 'summary.json'}", highlight=False)
    return summary
