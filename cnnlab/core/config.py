"""The composed Hydra config, checked as a whole before any work starts.

Group sections (dataset, model, optimizer, scheduler, init) name a registry
entry and its options; the builder's signature validates them. The plain
sections (trainer, data) are validated against the dataclasses below, whose
annotations give each key's type and range.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab.core.errors import CnnlabError, suggestion
from cnnlab.core.plugins import load_components, load_plugins, require_plugins
from cnnlab.core.registry import AUGMENTS, DATASETS, INITS, MODELS, OPTIMIZERS, SCHEDULERS, TASKS, Registry
from cnnlab.core.validation import NonNegativeInt, PositiveFloat, PositiveInt, Range, Seed, check_component, check_value

# The config groups ship inside the package as ``cnnlab.conf`` (the checkout's conf/, mapped by
# pyproject), so a wheel, a git install and an editable checkout all find them the same way.
CONF_DIR = Path(str(importlib.resources.files("cnnlab.conf")))


def default_output_dir() -> Path:
    """paths.output_dir as conf/train.yaml defines it (the one definition: $CNNLAB_OUTPUT_DIR, else outputs), for
    the commands that read runs without composing a config (cnnlab runs)."""
    import yaml

    text = yaml.safe_load((CONF_DIR / "train.yaml").read_text())["paths"]["output_dir"]
    return Path(OmegaConf.create({"dir": text}).dir)

NOT_RUN_GROUPS = ("hydra", "tune")  # conf/tune/ holds `cnnlab tune`'s settings and spaces, not parts of a run


def run_config_groups() -> str:
    """`cnnlab train --help`'s list of config groups and their options (Hydra's $APP_CONFIG_GROUPS, less the
    folders of conf/ that are not parts of a run)."""
    from hydra.core.global_hydra import GlobalHydra

    if not _help_wanted or not GlobalHydra.instance().is_initialized():  # or resolved after its composition
        return ""
    loader = GlobalHydra.instance().config_loader()
    # OmegaConf resolves this node at every merge of a composition (9 times a compose, half its time): one walk a
    # search path.
    key = tuple((p.provider, p.path) for p in loader.get_search_path().get_path())
    if key not in _GROUP_LISTS:
        _GROUP_LISTS[key] = _group_list(loader)
    return _GROUP_LISTS[key]


_GROUP_LISTS: dict[tuple, str] = {}
_help_wanted = False


def want_help_group_list() -> None:
    """This process renders `cnnlab train --help`: its group list is worth the walk over every config group
    (0.26 s of CPU), which every other composition would spend on a node nothing reads."""
    global _help_wanted
    _help_wanted = True


def _group_list(loader) -> str:
    lines: list[str] = []

    def walk(parent: str) -> None:
        for group in sorted(loader.list_groups(parent)):
            full = f"{parent}/{group}" if parent else group
            if full.split("/")[0] in NOT_RUN_GROUPS:
                continue
            options = sorted(loader.get_group_options(full))
            if options:
                lines.append(f"{full}: {', '.join(options)}")
            walk(full)

    walk("")
    return "\n".join(lines)


# conf/hydra/help/cnnlab.yaml lists the groups through this resolver; registered where CONF_DIR is, so that any
# composition of conf/ (the CLI's, the API's, a test's) can resolve the whole config.
if not OmegaConf.has_resolver("cnnlab_config_groups"):
    OmegaConf.register_new_resolver("cnnlab_config_groups", run_config_groups)

# Config group -> registry whose entry it selects (one YAML per entry).
GROUP_REGISTRIES: dict[str, Registry] = {
    "dataset": DATASETS, "model": MODELS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "init": INITS,
    "task": TASKS,
}


@dataclass(frozen=True)
class TrainerSettings:
    epochs: PositiveInt = 4
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True
    compile: bool = False
    cuda_graphs: bool = False  # CUDA: replay the training step's forward and backward as CUDA graphs (compile, reduce-overhead)
    loss: Literal["cross_entropy", "multi_margin"] = "cross_entropy"  # softmax, or the multiclass SVM (hinge) loss
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.0
    monitor: Literal["val/acc", "val/loss"] = "val/acc"  # selects the best checkpoint; never a test metric
    log_every_n_steps: Union[PositiveInt, Literal["auto"]] = "auto"  # auto: at least 20 points a run, at most every 50 steps
    limit_train_batches: Optional[PositiveInt] = None  # debug: cut each epoch short
    limit_eval_batches: Optional[PositiveInt] = None
    eval_train_at_end: bool = True  # the homework's report: the selected model's train loss/error
    accumulate_steps: PositiveInt = 1  # optimizer step every N batches (gradients summed, loss / N)
    grad_clip: Optional[PositiveFloat] = None  # clip gradients before each step...
    grad_clip_mode: Literal["norm", "value"] = "norm"  # ...by their total 2-norm, or each value
    ema_decay: Optional[Annotated[float, Range(gt=0, lt=1)]] = None  # EMA of the weights: evaluated, kept, selected
    early_stopping_patience: Optional[PositiveInt] = None  # stop after N epochs without a better monitor value
    overfit_batches: NonNegativeInt = 0  # babysitting: train (and validate) on N fixed batches
    divergence_factor: Optional[Annotated[float, Range(gt=1)]] = 3.0  # stop when loss > factor x initial, or NaN
    initial_loss_check: bool = True  # warn when the first loss is far from ln(num_classes)
    log_params_every_n_steps: Optional[PositiveInt] = None  # per-layer gradient norms, weight histograms
    log_update_ratio: bool = True  # babysitting: each layer's update/weight ratio every log_every_n_steps; an epoch far from 1e-3 warns
    log_dead_units: bool = True  # babysitting: each ReLU's fraction of units never active on a fixed validation batch
    tta_flip: bool = False  # final evaluation: average over each image and its mirror image...
    tta_shift: NonNegativeInt = 0  # ...and copies shifted by this many pixels (4 more views)
    checkpoint_every_n_steps: Optional[PositiveInt] = None  # also checkpoint inside epochs (last.pt), for long epochs
    deterministic: bool = False  # torch.use_deterministic_algorithms, cuDNN deterministic, a fixed cuBLAS workspace
    sync_batchnorm: bool = False  # under torchrun on GPUs: batch-norm statistics over the global batch
    devices: PositiveInt = 1  # >1: cnnlab starts this many DDP processes on this machine (one per GPU)


@dataclass(frozen=True)
class DataSettings:
    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 1024
    val_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.1
    folds: PositiveInt = 1  # k >= 2: k-fold cross-validation of the training images (val_fraction unused)
    split_seed: Seed = 0
    # auto: tensor datasets live on the device, image folders are read per image;
    # false: per-image Dataset + DataLoader with workers and torchvision.transforms.v2
    in_memory: Literal["auto", True, False] = "auto"
    num_workers: NonNegativeInt = 2
    prefetch_factor: PositiveInt = 2  # batches each worker prepares ahead
    # channel: (x - mean) / std per channel; pixel: minus the mean image; pca_whiten / zca_whiten:
    # decorrelated, unit-variance pixels. Statistics from the training split only, kept in checkpoints.
    preprocess: Literal["channel", "pixel", "pca_whiten", "zca_whiten"] = "channel"
    whiten_eps: PositiveFloat = 1e-4  # added to each eigenvalue before whitening (pixel values in [0, 1])


@dataclass(frozen=True)
class FinetuneSettings:
    mode: Literal["full", "last_k", "linear_probe"] = "full"  # what trains: everything, the last k stages + head, the head
    k: PositiveInt = 1  # last_k: how many stages before the head train
    head_lr: Optional[PositiveFloat] = None  # null: optimizer.lr
    backbone_lr: Optional[PositiveFloat] = None  # null: optimizer.lr


@dataclass(frozen=True)
class VizSettings:
    every_n_epochs: NonNegativeInt = 1  # first-layer filters and feature maps of a fixed image; 0: off
    augment_samples: NonNegativeInt = 32  # a grid of augmented training images at the start; 0: off
    misclassified: NonNegativeInt = 16  # the most confidently misclassified test images at the end; 0: off


@dataclass(frozen=True)
class SweepSettings:
    resume: bool = False       # continue a sweep in the same directory: finished trials are skipped
    test_trials: bool = False  # score every trial on test; the rule is one test, `cnnlab report --test-best`


def check_settings(cls: type, section: Any, prefix: str):
    """Build settings dataclass ``cls`` from a config section, naming any bad key."""
    if not isinstance(section, Mapping):
        raise CnnlabError(f"{prefix} must be a mapping of options, got {section!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls, include_extras=True)
    for key in section:
        if key not in fields:
            raise CnnlabError(f"{prefix} has no option {key!r}{suggestion(key, fields)}; it takes: {', '.join(fields)}")
    return cls(**{k: check_value(f"{prefix}.{k}", v, hints[k]) for k, v in section.items()})


@dataclass
class Component:
    group: str
    name: str
    options: dict[str, Any]  # validated and converted

    def build(self, **context: Any) -> Any:
        return GROUP_REGISTRIES[self.group].build(self.name, self.options, prefix=self.group, **context)


@dataclass
class RunConfig:
    name: str
    seed: int
    trainer: TrainerSettings
    data: DataSettings
    sweep: SweepSettings
    finetune: FinetuneSettings
    viz: VizSettings
    pretrained: Optional[str]  # model.pretrained: weights to start from
    components: dict[str, Component]
    augment_name: str
    augment_ops: dict[str, dict[str, Any]]
    resolved: dict[str, Any]  # the whole config, interpolations resolved
    replay: Optional[str] = None  # a PBT member's directory: train along its hyperparameter schedule

    def with_values(self, values: Mapping[str, Any]) -> RunConfig:
        """This run with ``values`` ({'optimizer.lr': 0.05}) set, checked as any config is."""
        resolved = copy.deepcopy(self.resolved)
        for key, value in values.items():
            *sections, last = key.split(".")
            node = resolved
            for section in sections:
                node = node.setdefault(section, {})
            node[last] = value
        return parse_run_config(resolved)


TOP_LEVEL_KEYS = {*GROUP_REGISTRIES, "augment", "trainer", "data", "sweep", "finetune", "viz", "seed", "name", "paths",
                  "plugins", "replay"}
CNNLAB_MODEL_KEYS = ("name", "pretrained")  # model.* keys cnnlab handles itself; the rest go to the builder


def to_container(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise CnnlabError(f"config: {str(e).splitlines()[0]}") from None


def parse_run_config(cfg: DictConfig | Mapping[str, Any], *, stored: str | None = None) -> RunConfig:
    """Validate every section of the config; raises CnnlabError on the first bad value. ``stored``: the
    config was read from this file (a checkpoint), whose plugins must already be loaded, never imported."""
    load_components()
    resolved = to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    if stored is None:
        load_plugins(resolved.get("plugins"))  # the user's components exist before anything is checked
    else:
        require_plugins(resolved.get("plugins"), stored)
    for key in resolved:
        if key not in TOP_LEVEL_KEYS:
            raise CnnlabError(f"unknown config key {key!r}{suggestion(key, TOP_LEVEL_KEYS)}; top-level keys: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    check_task_model(resolved)
    components = {}
    for group in GROUP_REGISTRIES:
        section = resolved.get(group)
        if not isinstance(section, Mapping) or "name" not in section:
            raise CnnlabError(f"config has no {group} (choose one with {group}=<name>; see: cnnlab list {GROUP_REGISTRIES[group].plural})")
        own = CNNLAB_MODEL_KEYS if group == "model" else ("name",)
        options = {k: v for k, v in section.items() if k not in own}
        name = section["name"]
        components[group] = Component(group, name, GROUP_REGISTRIES[group].check_options(name, options, group))
    if stored is not None and "download" in components["dataset"].options:
        components["dataset"].options["download"] = False  # a stored config may be someone else's: it fetches nothing
    augment = resolved.get("augment") or {}
    if not isinstance(augment, Mapping):
        raise CnnlabError("augment must be a mapping (name and ops)")
    ops = augment.get("ops") or {}
    if not isinstance(ops, Mapping):
        raise CnnlabError("augment.ops must be a mapping of op name to its options")
    checked_ops = {op: AUGMENTS.check_options(op, opts or {}, f"augment.ops.{op}") for op, opts in ops.items()}
    return RunConfig(
        name=check_component("name", check_value("name", resolved.get("name", "run"), str)),
        seed=check_value("seed", resolved.get("seed", 0), Seed),
        trainer=check_settings(TrainerSettings, resolved.get("trainer", {}), "trainer"),
        data=check_settings(DataSettings, resolved.get("data", {}), "data"),
        sweep=check_settings(SweepSettings, resolved.get("sweep") or {}, "sweep"),
        finetune=check_settings(FinetuneSettings, resolved.get("finetune") or {}, "finetune"),
        viz=check_settings(VizSettings, resolved.get("viz") or {}, "viz"),
        pretrained=check_value("model.pretrained", resolved["model"].get("pretrained"), Optional[str]),
        components=components,
        augment_name=str(augment.get("name", "none")),
        augment_ops=checked_ops,
        resolved=resolved,
        replay=check_value("replay", resolved.get("replay"), Optional[str]),
    )


def stored_run_config(config: Any, path: Any, *, data_dir: str | None = None, **sections: dict[str, Any]) -> RunConfig:
    """A checkpoint's stored config, checked as one from someone else (its plugins must be loaded already, it
    downloads nothing), with ``sections``' settings laid over it (``trainer={"device": "cpu"}``) and the dataset's
    root replaced by ``data_dir`` when given."""
    if not isinstance(config, Mapping):
        raise CnnlabError(f"checkpoint {path} has no config; was it written by cnnlab train?")
    config = dict(config)
    for key, settings in sections.items():
        config[key] = {**(config.get(key) if isinstance(config.get(key), Mapping) else {}), **settings}
    if data_dir is not None and isinstance(config.get("dataset"), Mapping) and "root" in config["dataset"]:
        config["dataset"] = {**config["dataset"], "root": data_dir}
    return parse_run_config(config, stored=f"checkpoint {path}")


def check_task_model(resolved: Mapping[str, Any]) -> None:
    """A task that trains only some models (image_fit: a coordinate MLP) says so before any model option is
    judged: a CNN's options make no sense there."""
    task = str((resolved.get("task") or {}).get("name", "classify"))
    limit = TASKS.get(task).meta.get("models") if task in TASKS else None
    model = (resolved.get("model") or {}).get("name") if isinstance(resolved.get("model"), Mapping) else None
    if limit is not None and model not in limit[1]:
        raise CnnlabError(f"task={task} trains {limit[0]}: {' or '.join(f'model={m}' for m in limit[1])}, not model={model}")


SETTINGS = {"trainer": TrainerSettings, "data": DataSettings, "sweep": SweepSettings, "finetune": FinetuneSettings,
            "viz": VizSettings}


def option_annotation(config: Mapping[str, Any], key: str) -> Any | None:
    """The annotation that checks option ``key`` (optimizer.lr, trainer.label_smoothing,
    augment.ops.cutout.size) for the components ``config`` chose; None for an unknown key."""
    section, _, option = key.rpartition(".")
    if section in GROUP_REGISTRIES or section.startswith("augment.ops."):
        registry = GROUP_REGISTRIES.get(section, AUGMENTS)
        name = section.removeprefix("augment.ops.") if registry is AUGMENTS else (config.get(section) or {}).get("name")
        options = registry.get(name).options if name in registry else {}
        return options[option].annotation if option in options else None
    if section in SETTINGS and option in {f.name for f in dataclasses.fields(SETTINGS[section])}:
        return typing.get_type_hints(SETTINGS[section], include_extras=True)[option]
    return None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat
