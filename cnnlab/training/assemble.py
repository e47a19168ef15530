"""A run's parts, assembled once for every command that needs them (train, eval, lr-find,
image_fit): the validated config, device, precision, seed, data and its split, model,
optimizer and the batch pipelines."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cnnlab.augment.batched import BatchPipeline, build_ops
from cnnlab.augment.per_image import Geometry, per_image_transform, split_pipeline
from cnnlab.core.config import RunConfig
from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import DATASETS
from cnnlab.data.datasets import ImageData
from cnnlab.data.folder import FolderData
from cnnlab.data.images import ImageTransform
from cnnlab.data.loaders import InMemoryLoader, StreamingLoader
from cnnlab.data.split import stratified_split
from cnnlab.data.statistics import Preprocessing, color_pca
from cnnlab.models.measure import check_input_size
from cnnlab.runtime.distributed import Ranks, check_global_batch, init_process_group
from cnnlab.training.console import print_warning
from cnnlab.training.finetune import set_learning_rates, transfer_learning


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


class RawBatches:
    """The batch as it is stored: uint8 images (k-NN remembers them so, and prepares them when comparing)."""

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y


RAW = RawBatches()


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
    preprocessing: Preprocessing  # data.preprocess with its training-split statistics; checkpoints keep it
    transform: ImageTransform  # the evaluation preprocessing, as load, predict and export apply it
    streaming: list = field(default_factory=list)  # the per-image loaders made, closed by close()
    warn: Callable[[str], None] = print_warning  # a file a loader skipped (the run's reporter, once it has one)
    warned: set = field(default_factory=set)  # each file is named once, however many loaders and epochs read it

    def loader(self, split: str, idx: torch.Tensor | None = None, *, train: bool, shuffle: bool | None = None,
               shard: bool = True, raw: bool = False):
        """Batches of split "train" or "test" (at ``idx``), augmented when ``train``; shuffled when ``train`` by default.
        Under DDP each rank gets its share of every batch (``shard``), or all of it. ``raw``: the uint8 images as
        they are (in memory only; a per-image loader's are already transformed)."""
        d, shuffle = self.run.data, train if shuffle is None else shuffle
        batch_size = d.batch_size if train else d.eval_batch_size
        size = len(idx) if idx is not None else len(self.data.train_labels if split == "train" else self.data.test_labels)
        ranks = self.ranks if shard else Ranks()
        transform = RAW if raw else self.train_pipe if train else self.eval_pipe
        common = dict(shuffle=shuffle, drop_last=shuffle and size > batch_size,
                      seed=self.run.seed, device=self.device, transform=transform,
                      rank=ranks.rank, world_size=ranks.world_size)
        if self.in_memory:
            return InMemoryLoader(*self.data.tensors(split, idx), batch_size, **common)
        loader = StreamingLoader(self.data.per_image(split, idx, self.per_image[train]), batch_size,
                                 num_workers=d.num_workers, prefetch_factor=d.prefetch_factor,
                                 warn=self.warn_once, **common)
        self.streaming.append(loader)
        return loader

    def warn_once(self, line: str) -> None:
        if line not in self.warned:
            self.warned.add(line)
            self.warn(line)

    def close(self) -> None:
        """Stop the DataLoader workers of every loader made here (a sweep runs trial after trial)."""
        for loader in self.streaming:
            loader.close()
        self.streaming.clear()


def uses_channels_last(run: RunConfig, device: torch.device) -> bool:
    return run.trainer.channels_last and device.type != "mps"


def build_model(run: RunConfig, data: ImageData, device: torch.device, *, init: bool) -> torch.nn.Module:
    """The configured model for ``data``'s shape, initialised (``init``) and placed on ``device``."""
    chosen = run.components["model"]
    arch = chosen.options.get("arch")
    check_input_size(chosen.name, chosen.options, data.channels, data.input_size, data.num_classes,
                     label=f"model={chosen.name}" + (f" model.arch={arch}" if arch else ""))
    model = run.components["model"].build(in_channels=data.channels, num_classes=data.num_classes, input_size=data.input_size)
    if init:
        run.components["init"].build(model=model)
    return model.to(device, memory_format=torch.channels_last if uses_channels_last(run, device) else torch.contiguous_format)


def fit_statistics(run: RunConfig, data: ImageData | FolderData, train_idx: torch.Tensor, batch_ops: list,
                   recorded: Preprocessing | None) -> Preprocessing:
    """What needs the training split's statistics: data.preprocess (unless a checkpoint recorded it)
    and pca_lighting's colour eigenvectors. Never the validation or test images."""
    fitting = [op for op in batch_ops if hasattr(op, "fit_colours")]
    kind = run.data.preprocess
    if (fitting or (kind != "channel" and recorded is None)) and not isinstance(data, ImageData):
        what = "augment op pca_lighting" if fitting else f"data.preprocess={kind}"
        raise CnnlabError(f"{what} needs the training split's pixels in memory; dataset "
                          f"{run.components['dataset'].name} reads its images per file")
    if fitting:
        values, vectors = color_pca(data.train_images[train_idx])
        for op in fitting:
            op.fit_colours(values, vectors)
    if recorded is not None:
        return recorded
    if kind == "channel":
        return Preprocessing.per_channel(data.mean, data.std)
    return Preprocessing.fit(kind, data.train_images[train_idx], data.mean, data.std, run.data.whiten_eps)


def check_processes(run, ranks: Ranks, device: torch.device) -> None:
    """What DDP over ``ranks.world_size`` processes asks of a run's config: trainer.devices' parent checks
    it before it starts any process, and every rank again (torchrun starts them itself)."""
    check_global_batch(run.data.batch_size, ranks)
    if run.trainer.sync_batchnorm and device.type != "cuda":
        raise CnnlabError("trainer.sync_batchnorm=true needs CUDA devices (torch's SyncBatchNorm runs on GPUs only)")


def setup(run: RunConfig, ranks: Ranks = Ranks(), preprocessing: Preprocessing | None = None,
          split: tuple[torch.Tensor, torch.Tensor] | None = None, data: ImageData | FolderData | None = None) -> Setup:
    """A checked run's parts (``run``: cnnlab.core.config.parse_run_config's, every name, option, type and range
    checked before anything is loaded). ``preprocessing``: what a checkpoint recorded (evaluation repeats it);
    None: fitted on the training split. ``split``: (train, val) indices of the training images to use (a
    cross-validation fold). ``data``: the dataset, already built (the folds share one)."""
    device = resolve_device(run.trainer.device, ranks)
    autocast_dtype = resolve_precision(run.trainer.precision, device)
    if run.trainer.cuda_graphs and device.type != "cuda":
        raise CnnlabError(f"trainer.cuda_graphs=true replays the step on a CUDA device; this run's device is {device}: "
                          "leave it false here")
    channels_last = uses_channels_last(run, device)
    if run.trainer.devices > 1 and ranks.world_size != run.trainer.devices:
        raise CnnlabError(f"trainer.devices={run.trainer.devices} starts its processes from a single `cnnlab train`"
                          + (f", but {ranks.world_size} were started by torchrun" if ranks.enabled else
                             "; a sweep's trials run one process each (use hydra/launcher to run trials side by side)"))
    if ranks.enabled:
        check_processes(run, ranks, device)
        init_process_group(ranks)
    set_deterministic(run.trainer.deterministic, device)
    seed_everything(run.seed)

    in_memory = uses_memory_path(run)
    batched_ops, per_image_ops = split_pipeline(
        run.augment_ops, per_image=not in_memory,
        where="data.in_memory=false" if run.data.in_memory is False else f"dataset={run.components['dataset'].name}")
    batch_ops = build_ops(batched_ops)  # every op's options are checked before any data is read

    data = data if data is not None else run.components["dataset"].build()
    if split is not None:
        if data.validation_idx is not None:
            raise CnnlabError(f"data.folds splits the training images itself; dataset "
                              f"{run.components['dataset'].name} brings a fixed validation set")
        train_idx, val_idx = split
    elif data.validation_idx is not None:  # the dataset brings its own validation set
        train_idx, val_idx = data.validation_idx
    else:
        train_idx, val_idx = stratified_split(data.train_labels, run.data.val_fraction, run.data.split_seed)
    preprocessing = fit_statistics(run, data, train_idx, batch_ops, preprocessing)
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
    normalise = preprocessing.to(device)
    train_pipe = BatchPipeline(batch_ops, data.mean, data.std, device, run.seed + 1 + 7919 * ranks.rank, channels_last,
                               num_classes=data.num_classes, normalise=normalise)  # each rank its own augmentation draws
    eval_pipe = BatchPipeline([], data.mean, data.std, device, run.seed, channels_last, normalise=normalise)
    transform = ImageTransform(data.input_size, data.resize, data.channels, preprocessing, device)
    return Setup(run, device, autocast_dtype, data, train_idx, val_idx, model, optimizer, train_pipe, eval_pipe,
                 in_memory, per_image, ranks, transfer.describe(model), preprocessing, transform)
