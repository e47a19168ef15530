"""One training run, from a composed config to summary.json."""

from __future__ import annotations

import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from rich.console import Console

from cnnlab import __version__
from cnnlab.augment import BatchPipeline, build_ops
from cnnlab.augment_per_image import Geometry, per_image_transform, split_pipeline
from cnnlab.config import RunConfig, is_image_fit, parse_run_config, to_container
from cnnlab.data.datasets import ImageData
from cnnlab.data.folder import FolderData
from cnnlab.data.loaders import InMemoryLoader, StreamingLoader
from cnnlab.data.split import stratified_split
from cnnlab.errors import CnnlabError
from cnnlab.registry import DATASETS
from cnnlab.finetune import set_learning_rates, transfer_learning
from cnnlab.evaluation import confusion_figure, confusion_matrix, metrics_from_probs, predict, tta_view_count
from cnnlab.train.checkpoint import load_checkpoint, load_resumable, load_weights, read_json, write_json
from cnnlab.train.console import ConsoleReporter
from cnnlab.train.distributed import Ranks, check_global_batch, init_process_group, launched_ranks
from cnnlab.train.loop import Trainer, selected_weights
from cnnlab.train.resume import check_resumable
from cnnlab.train.signals import StopRequest
from cnnlab.train.tensorboard_log import TensorBoardLogger
from cnnlab.viz import Visualizer, images_of, start_visualizer


def resolve_device(spec: str, ranks: Ranks = Ranks()) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and ranks.enabled:  # torchrun: one GPU per process
        spec = f"cuda:{ranks.local_rank}"
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", spec):
        raise CnnlabError(f"trainer.device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if spec.startswith("cuda"):
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise CnnlabError(f"trainer.device={spec} but this machine has {torch.cuda.device_count()} CUDA devices; use trainer.device=auto or cpu")
    if spec == "mps" and not torch.backends.mps.is_available():
        raise CnnlabError("trainer.device=mps but MPS is not available on this machine")
    return torch.device(spec)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise CnnlabError("trainer.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def set_deterministic(on: bool, device: torch.device) -> None:
    """trainer.deterministic: every op's deterministic algorithm (an op without one is an error)."""
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible matmuls
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = device.type == "cuda" and not on  # autotuning picks algorithms by timing


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def uses_memory_path(run: RunConfig) -> bool:
    """True: the dataset lives on the device as uint8 tensors; False: read per image by DataLoader workers."""
    dataset = run.components["dataset"].name
    reads_files = DATASETS.get(dataset).meta.get("reads_files", False)
    if run.data.in_memory is True and reads_files:
        raise CnnlabError(f"dataset={dataset} is read per image from disk; data.in_memory must be auto or false")
    return not reads_files and run.data.in_memory is not False


class RunReporter:
    """Sends the loop's events to the terminal and to TensorBoard (None: a DDP rank other than 0)."""

    def __init__(self, console: ConsoleReporter, tensorboard: TensorBoardLogger | None, visualizer: Visualizer | None):
        self.console, self.tensorboard, self.visualizer = console, tensorboard, visualizer
        self.epoch_start, self.advance = console.epoch_start, console.advance

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self.console.log_step(step, loss, lr)
        if self.tensorboard is not None:
            self.tensorboard.scalars({"train/step_loss": loss, "train/lr": lr}, step)

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


@dataclass
class Setup:
    """Everything a run builds before its loop: validated config, device, data, model, optimizer."""

    run: RunConfig
    device: torch.device
    autocast_dtype: torch.dtype | None
    data: ImageData | FolderData
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_pipe: BatchPipeline   # on the device: normalisation, and every augmentation on the memory path
    eval_pipe: BatchPipeline
    in_memory: bool
    per_image: dict[bool, Any]  # train? -> the v2 transform DataLoader workers run per image (or None)
    ranks: Ranks
    transfer: str | None  # what model.pretrained and finetune.* did, for the run's header

    def loader(self, split: str, idx: torch.Tensor | None = None, *, train: bool, shuffle: bool | None = None,
               shard: bool = True):
        """Batches of split "train" or "test" (at ``idx``), augmented when ``train``; shuffled when ``train`` by default.
        Under DDP each rank gets its share of every batch (``shard``), or all of it."""
        d, shuffle = self.run.data, train if shuffle is None else shuffle
        batch_size = d.batch_size if train else d.eval_batch_size
        size = len(idx) if idx is not None else len(self.data.train_labels if split == "train" else self.data.test_labels)
        ranks = self.ranks if shard else Ranks()
        common = dict(shuffle=shuffle, drop_last=shuffle and size > batch_size,
                      seed=self.run.seed, device=self.device, transform=self.train_pipe if train else self.eval_pipe,
                      rank=ranks.rank, world_size=ranks.world_size)
        if self.in_memory:
            return InMemoryLoader(*self.data.tensors(split, idx), batch_size, **common)
        return StreamingLoader(self.data.per_image(split, idx, self.per_image[train]), batch_size,
                               num_workers=d.num_workers, prefetch_factor=d.prefetch_factor, **common)


def uses_channels_last(run: RunConfig, device: torch.device) -> bool:
    return run.trainer.channels_last and device.type != "mps"


def build_model(run: RunConfig, data: ImageData, device: torch.device, *, init: bool) -> torch.nn.Module:
    """The configured model for ``data``'s shape, initialised (``init``) and placed on ``device``."""
    model = run.components["model"].build(in_channels=data.channels, num_classes=data.num_classes, input_size=data.input_size)
    if init:
        run.components["init"].build(model=model)
    return model.to(device, memory_format=torch.channels_last if uses_channels_last(run, device) else torch.contiguous_format)


def setup(cfg, ranks: Ranks = Ranks()) -> Setup:
    run = parse_run_config(cfg)  # every name, option, type and range: nothing has been loaded yet
    device = resolve_device(run.trainer.device, ranks)
    autocast_dtype = resolve_precision(run.trainer.precision, device)
    channels_last = uses_channels_last(run, device)
    if run.trainer.devices > 1 and ranks.world_size != run.trainer.devices:
        raise CnnlabError(f"trainer.devices={run.trainer.devices} starts its processes from a single `cnnlab train`"
                          + (f", but {ranks.world_size} were started by torchrun" if ranks.enabled else
                             "; a sweep's trials run one process each (use hydra/launcher to run trials side by side)"))
    if ranks.enabled:
        check_global_batch(run.data.batch_size, ranks)
        if run.trainer.sync_batchnorm and device.type != "cuda":
            raise CnnlabError("trainer.sync_batchnorm=true needs CUDA devices (torch's SyncBatchNorm runs on GPUs only)")
        init_process_group(ranks)
    set_deterministic(run.trainer.deterministic, device)
    seed_everything(run.seed)

    in_memory = uses_memory_path(run)
    batched_ops, per_image_ops = split_pipeline(
        run.augment_ops, per_image=not in_memory,
        where="data.in_memory=false" if run.data.in_memory is False else f"dataset={run.components['dataset'].name}")
    batch_ops = build_ops(batched_ops)  # every op's options are checked before any data is read

    data: ImageData | FolderData = run.components["dataset"].build()
    if data.validation_idx is not None:  # the dataset brings its own validation set
        train_idx, val_idx = data.validation_idx
    else:
        train_idx, val_idx = stratified_split(data.train_labels, run.data.val_fraction, run.data.split_seed)
    geometry = Geometry(data.input_size, data.resize or data.input_size)
    per_image = {train: per_image_transform(per_image_ops, geometry, train=train, resized=data.resize is not None)
                 for train in (True, False)}
    model = build_model(run, data, device, init=True)
    if ranks.enabled:
        if run.trainer.sync_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        seed_everything(run.seed + ranks.rank)  # dropout differs across ranks; DDP copies rank 0's initial weights
    transfer = transfer_learning(run, model)
    optimizer = run.components["optimizer"].build(model=model)
    if transfer.trained:
        set_learning_rates(optimizer, transfer.trained[-1], run.finetune.head_lr, run.finetune.backbone_lr)
    if isinstance(getattr(optimizer, "inner", optimizer), torch.optim.LBFGS):
        if run.trainer.accumulate_steps > 1 or run.trainer.grad_clip is not None:
            raise CnnlabError("optimizer=lbfgs takes whole steps through its closure: "
                              "trainer.accumulate_steps must be 1 and trainer.grad_clip null")
    train_pipe = BatchPipeline(batch_ops, data.mean, data.std, device, run.seed + 1 + 7919 * ranks.rank, channels_last,
                               num_classes=data.num_classes)  # each rank its own augmentation draws
    eval_pipe = BatchPipeline([], data.mean, data.std, device, run.seed, channels_last)
    return Setup(run, device, autocast_dtype, data, train_idx, val_idx, model, optimizer, train_pipe, eval_pipe,
                 in_memory, per_image, ranks, transfer.describe(model))


def load_resume_state(cfg, run_dir: Path, console: ConsoleReporter) -> dict[str, Any] | None:
    """The newest good checkpoint in ``run_dir`` when the config may continue it; None for a fresh run."""
    found = load_resumable(run_dir / "checkpoints")
    if found is None:
        return None
    state, path, damaged = found
    for line in damaged:
        console.warn(f"{line}; falling back to {path}")
    status = (read_json(run_dir / "summary.json") or {}).get("status")
    if status in ("early_stopped", "diverged") and state.get("partial") is None:
        raise CnnlabError(f"{run_dir} ended {status}; nothing to resume (choose a new hydra.run.dir)")
    check_resumable(state, path, to_container(cfg), run_dir)
    state["path"] = str(path)
    return state


def train(cfg, run_dir: Path, console: Console | None = None, *, test: bool = True,
          resume: bool = False, resume_hint: str | None = None) -> dict[str, Any]:
    """One run into ``run_dir``. ``test=False`` (a sweep's trials) leaves the test split unscored;
    ``resume``: continue from ``run_dir``'s newest good checkpoint when there is one (the config
    may differ only in keys a resume allows). Under torchrun, every rank calls this."""
    if is_image_fit(cfg):
        from cnnlab.image_fit import fit_image

        return fit_image(cfg, run_dir, console)
    wall_start = time.perf_counter()
    ranks = launched_ranks()
    console_reporter = ConsoleReporter(console if ranks.is_main else Console(quiet=True))
    resume_state = load_resume_state(cfg, run_dir, console_reporter) if resume else None
    s = setup(cfg, ranks)
    run, device, autocast_dtype, data, model, optimizer = s.run, s.device, s.autocast_dtype, s.data, s.model, s.optimizer
    train_idx, val_idx, train_pipe = s.train_idx, s.val_idx, s.train_pipe

    if run.trainer.overfit_batches:  # babysitting: can the model memorise a few fixed batches?
        fixed = train_idx[:run.trainer.overfit_batches * run.data.batch_size]
        train_loader = s.loader("train", fixed, train=True, shuffle=False)  # fixed batches, augmented as configured
        val_rows = fixed
    else:
        train_loader = s.loader("train", train_idx, train=True)
        val_rows = val_idx
    val_loader = s.loader("train", val_rows, train=False)
    batches = min(len(train_loader), run.trainer.limit_train_batches or len(train_loader))
    updates_per_epoch = math.ceil(batches / run.trainer.accumulate_steps)
    scheduler = run.components["scheduler"].build(optimizer=optimizer, steps_per_epoch=updates_per_epoch, epochs=run.trainer.epochs)

    tensorboard = visualizer = None
    if ranks.is_main:  # one writer: rank 0's
        tensorboard = TensorBoardLogger(run_dir / "tensorboard", run.resolved, OmegaConf.to_yaml(run.resolved),
                                        purge_step=resume_state["step"] + 1 if resume_state else None)
        visualizer = start_visualizer(s, run_dir, tensorboard.writer, fresh=resume_state is None)
    n_params = sum(p.numel() for p in model.parameters())
    console_reporter.start({
        "run": str(run_dir), "dataset": f"{data.name}: {len(train_idx):,} train / {len(val_idx):,} val / "
        f"{len(data.test_labels):,} test, {data.channels}x{data.input_size}x{data.input_size}, {data.num_classes} classes"
        + (f"; {data.layout}" if data.reads_files else ""),
        "data path": "in memory on the device (batched augmentation)" if s.in_memory else
                     f"per image: DataLoader, {run.data.num_workers} workers, torchvision.transforms.v2",
        "model": f"{run.components['model'].name}: {n_params:,} parameters",
        "optimizer": f"{run.components['optimizer'].name} {run.components['optimizer'].options}",
        "scheduler": run.components["scheduler"].name, "augment": run.augment_name,
        "device": f"{device}" + (f" ({autocast_dtype})" if autocast_dtype else " (fp32)")
                  + (f", {ranks.world_size} processes (DDP)" if ranks.enabled else ""),
        **({"transfer": s.transfer} if s.transfer else {}),
        "epochs": f"{run.trainer.epochs} x {batches} batches of {run.data.batch_size}"
                  + (f", an update every {run.trainer.accumulate_steps}" if run.trainer.accumulate_steps > 1 else ""),
    })
    with StopRequest() as stop:
        trainer = Trainer(
            model, optimizer, scheduler, settings=run.trainer, device=device, num_classes=data.num_classes,
            reporter=RunReporter(console_reporter, tensorboard, visualizer), checkpoint_dir=run_dir / "checkpoints",
            autocast_dtype=autocast_dtype,
            generators={"data_order": train_loader.generator, "augment": train_pipe.generator},
            checkpoint_extra={"config": run.resolved, "version": __version__, "classes": data.classes},
            ranks=ranks, stop=stop, resume_hint=resume_hint or f"cnnlab train resume={run_dir}",
        )
        if resume_state is not None:
            trainer.load_state(resume_state)
            where = f"epoch {trainer.epoch}" + (f", batch {trainer.partial['batch']} of epoch {trainer.epoch + 1}"
                                                if trainer.partial else "")
            console_reporter.console.print(f"resumed from {resume_state['path']} after {where} (step {trainer.step})",
                                           highlight=False)
        try:
            history = trainer.fit(train_loader, val_loader)
        except BaseException:
            if tensorboard is not None:
                tensorboard.close(status_ok=False)
            raise
    if not ranks.is_main:  # rank 0 alone selects, tests and writes the summary; the others wait for it
        ranks.barrier()
        return {"status": trainer.status, "best_value": trainer.best.value}

    summary = {
        "status": trainer.status, "name": run.name, "run_dir": str(run_dir), "version": __version__,
        "dataset": data.name, "model": run.components["model"].name, "parameters": n_params,
        "device": str(device), "precision": str(autocast_dtype or torch.float32).replace("torch.", ""),
        "processes": ranks.world_size,
        "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(data.test_labels)},
        "initial_loss": trainer.initial_loss, "expected_initial_loss": math.log(data.num_classes),
        "monitor": trainer.best.monitor, "best_epoch": trainer.best.epoch, "best_value": trainer.best.value,
        "selected_weights": "ema" if trainer.ema is not None else "model",
        "compile_time_s": trainer.compile_time_s,  # with trainer.compile; not in train_time_s
    }
    if trainer.status == "diverged" or trainer.best.epoch is None:
        # A diverged run is recorded, not tested: the test set is for selected models only.
        summary.update({"diverged_at_step": trainer.diverged_at, "selected": {}, "history": history})
        write_json(run_dir / "summary.json", summary)
        tensorboard.close(status_ok=False)
        console_reporter.console.print(f"status: {trainer.status}; summary: {run_dir / 'summary.json'}", highlight=False)
        ranks.barrier()
        return summary
    if ranks.enabled:  # the final scores use whole batches on rank 0
        val_loader = s.loader("train", val_rows, train=False, shard=False)

    # Choose on validation, test once: the test split is batched only now, for the selected weights.
    best = run_dir / "checkpoints" / "best.pt"
    load_weights(model, selected_weights(load_checkpoint(best)), best)
    probabilities = {}

    def score(split: str, loader) -> dict[str, float | None]:
        probabilities[split] = predict([model], loader, autocast_dtype=autocast_dtype, tta_flip=run.trainer.tta_flip,
                                       tta_shift=run.trainer.tta_shift, limit=run.trainer.limit_eval_batches)
        return metrics_from_probs(*probabilities[split]).report()

    selected = {}
    if run.trainer.eval_train_at_end:
        selected["train"] = score("train", s.loader("train", train_idx, train=False, shard=False))
    selected["val"] = score("val", val_loader)
    confusion = None
    if test:
        selected["test"] = score("test", s.loader("test", train=False, shard=False))
        confusion = confusion_matrix(*probabilities["test"], data.num_classes)
        tensorboard.writer.add_figure("test/confusion_matrix", confusion_figure(confusion, data.classes), trainer.step)
        if visualizer is not None and run.viz.misclassified:
            visualizer.misclassified(lambda idx: images_of(s, "test", idx, train=False), *probabilities["test"], trainer.step)

    train_time = sum(r["train_time_s"] for r in history)
    summary.update({
        "selected": selected,
        "train_time_s": train_time, "wall_time_s": time.perf_counter() - wall_start,
        "train_images_per_s": sum(r["images_per_s"] * r["train_time_s"] for r in history) / train_time,
        "tta_views": tta_view_count(run.trainer.tta_flip, run.trainer.tta_shift),
        "confusion_matrix": confusion.tolist() if confusion is not None else None,  # [true][predicted], test split
        "history": history,
    })
    write_json(run_dir / "summary.json", summary)
    final = {f"test/{k}": v for k, v in selected.get("test", {}).items() if k in ("loss", "acc", "top5")}
    final.update({"best/" + trainer.best.monitor.replace("/", "_"): trainer.best.value,
                  "selected/train_loss": selected.get("train", {}).get("loss"),
                  "selected/val_loss": selected["val"]["loss"], "selected/val_acc": selected["val"]["acc"]})
    tensorboard.scalars(final, trainer.step)
    tensorboard.close(status_ok=True)
    console_reporter.finish(selected, trainer.best.epoch, trainer.best.monitor)
    console_reporter.console.print(f"summary: {run_dir / 'summary.json'}", highlight=False)
    ranks.barrier()  # nobody leaves (and tears down the process group) while another rank still works
    return summary
