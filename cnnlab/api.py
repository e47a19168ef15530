"""cnnlab from Python: for notebooks, scripts and cnnlab's own search.

    import cnnlab
    result = cnnlab.train(["model=lenet5", "trainer.epochs=2"], seed=1)   # as `cnnlab train model=lenet5 ...`
    result.summary["selected"]["test"]["acc"], result.run_dir
    run = cnnlab.compose(["experiment=fmnist_fast"])                       # the checked config, nothing trained
    model, preprocess = cnnlab.load(result.run_dir)                        # what inference needs
    model(preprocess(uint8_images)).argmax(1)

``train`` and ``compose`` take the overrides `cnnlab train` takes, composed the same way (the same config
groups, plugins, ``resume=``, and ``config_dirs`` as its --config-dir), then keyword settings, which win:
``seed=1``, ``**{"optimizer.lr": 0.1}`` or ``optimizer__lr=0.1``. A mistake raises cnnlab.CnnlabError
with the line the CLI prints. Nothing here calls sys.exit or leaves Hydra's global state behind.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from rich.console import Console

from cnnlab.core.schema import SUMMARY_RECORD
from cnnlab.runtime.files import read_json
from cnnlab.core.config import RunConfig, parse_run_config, stored_run_config
from cnnlab.core.errors import CnnlabError

WEIGHTS = {"best": "best.pt", "last": "last.pt"}


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]  # summary.json: status, best_value, selected scores, history...
    model: torch.nn.Module | None  # the selected weights (checkpoints/best.pt), on the CPU, in eval mode
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None  # images -> the model's input

    @property
    def status(self) -> str:
        return str(self.summary.get("status"))

    @property
    def best_value(self) -> float | None:
        return self.summary.get("best_value")


def setting_overrides(settings: dict[str, Any]) -> list[str]:
    """Keyword settings as overrides: ``optimizer__lr=0.1`` or ``**{"optimizer.lr": 0.1}`` -> optimizer.lr=0.1."""
    return [f"{key.replace('__', '.')}={override_text(value)}" for key, value in settings.items()]


def override_text(value: Any) -> str:
    """A Python value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        plain = value and all(c.isalnum() or c in "._-/:" for c in value)
        return value if plain else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, Sequence):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_text(v)}" for k, v in value.items()) + "}"
    raise CnnlabError(f"cannot give {type(value).__name__} {value!r} as a setting; use numbers, strings, lists or dicts")


def _overrides(overrides: Iterable[str] | None, config_dirs: Iterable[str | Path], settings: dict[str, Any]):
    from cnnlab.cli.commands import prepared_overrides

    if isinstance(overrides, str):
        raise CnnlabError("overrides: give a list of strings, e.g. ['model=lenet5', 'trainer.epochs=2']")
    args = [*(a for d in config_dirs for a in ("--config-dir", str(d))), *(overrides or ()),
            *setting_overrides(settings)]
    args, multirun = prepared_overrides(args, training=True)
    if multirun:
        raise CnnlabError("cnnlab.train runs one training; a sweep runs with `cnnlab train -m`")
    return args


def compose(overrides: Iterable[str] | None = None, *, config_dirs: Iterable[str | Path] = (),
            **settings: Any) -> RunConfig:
    """The checked config of the run `cnnlab train <overrides>` would start; nothing is trained or written."""
    from cnnlab.cli.hydra_app import composed, search_path_restored

    with search_path_restored(), composed(_overrides(overrides, config_dirs, settings)) as cfg:
        return parse_run_config(cfg)


def train(overrides: Iterable[str] | None = None, *, config_dirs: Iterable[str | Path] = (),
          console: Console | None = None, **settings: Any) -> RunResult:
    """Train as `cnnlab train <overrides>` does, in this process; returns the run directory, its summary and the
    selected model. ``console``: where its progress goes (default: this terminal or notebook)."""
    from hydra.core.hydra_config import HydraConfig

    from cnnlab.cli.hydra_app import composed, config_errors_in_one_line, run_log, run_one, search_path_restored

    with search_path_restored(), composed(_overrides(overrides, config_dirs, settings)) as cfg:
        hydra_node = HydraConfig.get()
        with config_errors_in_one_line():  # e.g. a name that is not one path component: the CLI's line
            run_dir = Path(hydra_node.run.dir)  # resolved now: a fresh run directory is claimed
        with run_log(run_dir):  # a refusal leaves nothing
            summary = run_one(cfg, run_dir, list(hydra_node.overrides.task), console=console)
    if summary is None:  # trainer.devices=N: the processes wrote it
        summary = read_json(run_dir / "summary.json", SUMMARY_RECORD, "run summary") or {}
    model = preprocess = None
    if (run_dir / "checkpoints" / "best.pt").is_file():
        model, preprocess = load(run_dir)
    return RunResult(run_dir, summary, model, preprocess)


def load(run: str | Path, weights: str = "best", device: str | torch.device = "cpu"
         ) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """``(model, preprocess)`` of a run directory (or a checkpoint file): the model with the weights its run
    selected (``weights="best"``) or its newest (``"last"``), in eval mode on ``device``; ``preprocess`` turns
    images at the model's input size, uint8 (0-255) or float (0-1), (N, C, H, W) or (C, H, W), into its input
    (the run's data.preprocess, statistics and all). Plugins the run used must be imported first."""
    from cnnlab.data.statistics import Preprocessing
    from cnnlab.runtime.checkpoint import load_checkpoint, load_weights
    from cnnlab.training.assemble import build_model, resolve_device
    from cnnlab.training.state import selected_weights

    if weights not in WEIGHTS:
        raise CnnlabError(f"weights={weights!r}: choose best or last")
    path = Path(run)
    if path.is_dir():
        path = path / "checkpoints" / WEIGHTS[weights]
    checkpoint = load_checkpoint(path)
    stored = stored_run_config(checkpoint.get("config"), path)
    device = resolve_device(str(device))
    dataset = functools.cache(stored.components["dataset"].build)  # an older checkpoint's facts: built once at most
    shape = input_shape(checkpoint, dataset)
    model = build_model(stored, shape, device, init=False)
    load_weights(model, selected_weights(checkpoint), path)
    model.eval()
    recorded = checkpoint.get("preprocess")
    preprocessing = (Preprocessing.from_state(recorded) if recorded is not None else
                     Preprocessing.per_channel(dataset().mean, dataset().std)).to(device)
    preprocess = InputPreprocess(preprocessing, shape, device)
    if getattr(model, "memorises", False):  # k-NN compares its raw memory as it compares the queries
        model.prepare = preprocess
    return model, preprocess


def input_shape(checkpoint: dict[str, Any], dataset: Callable[[], Any]) -> SimpleNamespace:
    """The channels, size and classes a run trained on: recorded in its checkpoint since cnnlab 0.1's #25;
    for an older one, from ``dataset()``, the run's dataset."""
    if "input_shape" in checkpoint:
        channels, size, _ = checkpoint["input_shape"]
        return SimpleNamespace(channels=channels, input_size=size, num_classes=len(checkpoint["classes"]))
    data = dataset()
    return SimpleNamespace(channels=data.channels, input_size=data.input_size, num_classes=data.num_classes)


class InputPreprocess:
    """Images -> the model's input, as the run's evaluation prepared them."""

    def __init__(self, preprocessing, shape: SimpleNamespace, device: torch.device):
        self.preprocessing, self.shape, self.device = preprocessing, shape, device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(images)
        x = x[None] if x.ndim == 3 else x
        expected = (self.shape.channels, self.shape.input_size, self.shape.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise CnnlabError(f"preprocess: expected images of shape (N, {', '.join(map(str, expected))}) or "
                              f"({', '.join(map(str, expected))}), got {tuple(x.shape)}")
        x = x.to(self.device)
        return self.preprocessing.from_uint8(x) if x.dtype == torch.uint8 else self.preprocessing(x.float())
