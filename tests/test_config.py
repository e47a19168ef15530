"""Every config group entry composes and builds, and every option reaches its object."""

import dataclasses
import inspect
import math

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from cnnlab.core.config import CONF_DIR, GROUP_REGISTRIES, DataSettings, SweepSettings, TrainerSettings, parse_run_config
from cnnlab.core.errors import CnnlabError
from tests.conftest import TINY, compose_config, lr_values, tiny_with


def group_entries(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", sorted(GROUP_REGISTRIES))
def test_one_yaml_per_registry_entry(group):
    assert group_entries(group) == GROUP_REGISTRIES[group].names()


@pytest.mark.parametrize(
    ("group", "entry"), [(g, e) for g in sorted(GROUP_REGISTRIES) for e in GROUP_REGISTRIES[g].names()]
)
def test_yaml_lists_every_option_with_the_builders_default(group, entry):
    raw = yaml.safe_load((CONF_DIR / group / f"{entry}.yaml").read_text())
    if group == "task":  # a task's YAML is global: it may choose other groups too; its own options sit under task:
        raw = raw["task"]
    assert raw.pop("name") == entry
    options = GROUP_REGISTRIES[group].get(entry).options
    assert set(raw) == set(options)
    for key, value in raw.items():
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation such as ${paths.data_dir}
        default = options[key].default
        assert (list(default) if isinstance(default, tuple) else default) == value, key


@pytest.mark.parametrize(("section", "cls"), [("trainer", TrainerSettings), ("data", DataSettings), ("sweep", SweepSettings)])
def test_settings_yaml_matches_the_settings_dataclass(section, cls):
    cfg = compose_config()
    keys = set(OmegaConf.to_container(cfg[section]))
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    assert keys == set(fields)
    assert OmegaConf.to_container(cfg[section]) == fields


NEEDS_FILES = {"fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "stl10", "imagefolder"}  # built in test_data.py


@pytest.mark.parametrize(
    ("group", "entry"), [(g, e) for g in sorted(GROUP_REGISTRIES) for e in GROUP_REGISTRIES[g].names()]
)
def test_every_entry_composes_and_builds(group, entry):
    run = parse_run_config(compose_config(*tiny_with(group, entry)))
    assert run.components[group].name == entry
    model = run.components["model"].build(in_channels=1, num_classes=4, input_size=28)
    if group == "dataset":
        if entry not in NEEDS_FILES:
            data = run.components["dataset"].build()
            assert data.train_images.dtype == torch.uint8
        return
    if group == "model":
        if getattr(model, "memorises", False):  # k-NN answers from what it remembers
            model.memorise(torch.rand(4, 1, 28, 28), torch.arange(4))
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 4)
    run.components["init"].build(model=model)
    optimizer = run.components["optimizer"].build(model=model)
    scheduler = run.components["scheduler"].build(optimizer=optimizer, steps_per_epoch=10, epochs=3)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)


@pytest.mark.parametrize("augment", group_entries("augment"))
def test_every_augment_pipeline_composes(augment):
    run = parse_run_config(compose_config(*tiny_with("augment", augment)))
    assert run.augment_name == augment


@pytest.mark.parametrize("entry", group_entries("experiment"))
def test_every_experiment_composes_and_validates(entry):
    run = parse_run_config(compose_config(f"experiment={entry}"))
    assert run.name == entry


def test_debug_fast_cuts_the_run_short():
    run = parse_run_config(compose_config("debug=fast", "data.batch_size=64"))
    assert (run.trainer.epochs, run.trainer.limit_train_batches, run.trainer.limit_eval_batches) == (1, 5, 2)
    assert run.data.eval_batch_size == 64 and run.trainer.eval_train_at_end is False


def test_homework_experiment_is_the_lectures_mlp():
    cfg = compose_config("experiment=hw4_mlp")
    run = parse_run_config(cfg)
    assert run.components["model"].options["hidden"] == [64]
    assert run.components["optimizer"].options["momentum"] == 0.0
    assert run.data.batch_size == 256 and run.trainer.epochs == 100


# --- each optimizer option reaches the optimizer ---------------------------------------------------

OPTIMIZER_OPTIONS = [
    ("sgd", "lr", 0.37), ("sgd", "momentum", 0.5), ("sgd", "nesterov", False), ("sgd", "dampening", 0.1),
    ("sgd", "weight_decay", 0.003),
    ("adam", "lr", 0.004), ("adam", "betas", (0.8, 0.9)), ("adam", "eps", 1e-6), ("adam", "weight_decay", 0.02),
    ("adamw", "lr", 0.004), ("adamw", "betas", (0.7, 0.95)), ("adamw", "eps", 1e-7), ("adamw", "weight_decay", 0.05),
]


@pytest.mark.parametrize(("name", "key", "value"), OPTIMIZER_OPTIONS)
def test_optimizer_option_reaches_the_optimizer(name, key, value):
    override = f"[{value[0]},{value[1]}]" if isinstance(value, tuple) else str(value).lower()
    extra = ["optimizer.nesterov=false"] if (name, key) == ("sgd", "dampening") else []
    run = parse_run_config(compose_config(*tiny_with("optimizer", name), f"optimizer.{key}={override}", *extra))
    optimizer = run.components["optimizer"].build(model=torch.nn.Linear(2, 1))
    assert optimizer.param_groups[0][key] == value
    assert type(optimizer).__name__.lower() == name


def test_nesterov_without_momentum_is_a_clear_error():
    run = parse_run_config(compose_config(*TINY, "optimizer=sgd", "optimizer.momentum=0"))
    with pytest.raises(CnnlabError, match="nesterov=true needs optimizer.momentum > 0"):
        run.components["optimizer"].build(model=torch.nn.Linear(2, 1))


# --- the plain sections are validated, naming the key ----------------------------------------------

@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.epochs=0", "trainer.epochs must be an integer >= 1, got 0"),
        ("trainer.epochs=two", "trainer.epochs must be an integer, got 'two'"),
        ("trainer.precision=fp8", "trainer.precision must be one of auto, fp32, bf16, fp16"),
        ("trainer.label_smoothing=1.0", "trainer.label_smoothing must be a number >= 0 and < 1"),
        ("trainer.monitor=test/acc", "trainer.monitor must be one of val/acc, val/loss"),
        ("data.batch_size=0", "data.batch_size must be an integer >= 1"),
        ("data.val_fraction=0", "data.val_fraction must be a number > 0 and < 1"),
        ("data.in_memory=maybe", "data.in_memory must be one of auto, true, false, got 'maybe'"),
        ("optimizer.lr=0", "optimizer.lr must be a number > 0"),
        ("optimizer.lr=nan", "optimizer.lr must be a finite number"),
        ("model.dropout=1.5", "model.dropout must be a number >= 0 and < 1"),
        ("model.hidden=[16,-1]", r"model.hidden\[1\] must be an integer >= 1"),
        ("dataset.size=0", "dataset.size must be an integer >= 1"),
        ("seed=abc", "seed must be an integer"),
        ("+trainer.epocs=3", "trainer has no option 'epocs' .did you mean: epochs"),
        ("+model.widht=3", "model 'mlp' has no option 'widht'"),
        ("+augment.ops.rotate={}", "unknown augmentation 'rotate'"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(CnnlabError, match=message):
        parse_run_config(compose_config(*TINY, override))


def test_paths_data_dir_reaches_every_file_dataset_root(tmp_path):
    for dataset in sorted(NEEDS_FILES - {"imagefolder"}):  # imagefolder's root is the user's own folder
        run = parse_run_config(compose_config(f"dataset={dataset}", f"paths.data_dir={tmp_path}"))
        assert run.components["dataset"].options["root"] == str(tmp_path)


def test_data_dir_defaults_to_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNLAB_DATA_DIR", str(tmp_path))
    run = parse_run_config(compose_config())
    assert run.components["dataset"].options["root"] == str(tmp_path)


def test_registry_signatures_use_keyword_only_options():
    # Options are passed by keyword, never by position, so adding one never shifts another.
    for registry in GROUP_REGISTRIES.values():
        for name in registry.names():
            params = inspect.signature(registry.get(name).fn).parameters.values()
            for p in params:
                if p.name in registry.get(name).options:
                    assert p.kind is p.KEYWORD_ONLY, (name, p.name)


def test_schedules_follow_their_closed_forms_through_the_config():
    def lrs(*overrides, steps_per_epoch=10, epochs=4):
        run = parse_run_config(compose_config(*TINY, "optimizer=sgd", "optimizer.lr=1.0", *overrides))
        opt = run.components["optimizer"].build(model=torch.nn.Linear(1, 1, bias=False))
        sched = run.components["scheduler"].build(optimizer=opt, steps_per_epoch=steps_per_epoch, epochs=epochs)
        return lr_values(opt, sched, steps_per_epoch * epochs)

    T = 40
    cos = lrs("scheduler=cosine", "scheduler.eta_min=0.1")
    for t in (0, 7, 20, 33):
        assert cos[t] == pytest.approx(0.1 + 0.5 * (1.0 - 0.1) * (1 + math.cos(math.pi * t / T)))
    per_epoch = lrs("scheduler=cosine", "scheduler.interval=epoch")
    assert per_epoch[10:20] == [per_epoch[10]] * 10 and per_epoch[10] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    warm = lrs("scheduler=cosine", "scheduler.warmup_epochs=1")
    assert warm[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert warm[10] == pytest.approx(1.0) and warm[25] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))
    step = lrs("scheduler=step", "scheduler.step_size=2", "scheduler.gamma=0.5")
    assert step[0] == step[19] == 1.0 and step[20] == step[39] == 0.5
    const = lrs("scheduler=constant", "scheduler.warmup_epochs=0.5")
    assert const[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and set(const[5:]) == {1.0}
    const_epoch = lrs("scheduler=constant", "scheduler.interval=epoch")
    assert set(const_epoch) == {1.0}
    one = lrs("scheduler=onecycle", "scheduler.pct_start=0.25", "scheduler.div_factor=10", "scheduler.final_div_factor=100")
    assert one[0] == pytest.approx(0.1) and one[10] == pytest.approx(1.0)
    assert one[5] == pytest.approx(0.1 + 0.9 * 0.5)
    assert one[25] == pytest.approx(0.001 + 0.5 * (1 - 0.001) * (1 + math.cos(math.pi * 0.5)))
    one_epoch = lrs("scheduler=onecycle", "scheduler.interval=epoch")
    assert one_epoch[1:10] == [one_epoch[0]] * 9
