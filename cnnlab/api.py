"""cnnlab from Python: for notebooks, scripts and cnnlab's own search.

    import cnnlab
    result = cnnlab.train(["model=lenet5", "trainer.epochs=2"], seed=1)   # as `cnnlab train model=lenet5 ...`
    result.summary["selected"]["test"]["acc"], result.run_dir
    search = cnnlab.tune(["model=lenet5"], tune__budget_epochs=60)       # as `cnnlab tune ...`
    search.trials, search.best, search.record["test"]                     # every trial, the chosen one, test once
    run = cnnlab.compose(["experiment=fmnist_fast"])                       # the checked config, nothing trained
    model, preprocess = cnnlab.load(result.run_dir)                        # what inference needs
    model(preprocess(["cat.jpg", "dog.png"])).argmax(1)                    # any size: resized as eval did
    cnnlab.load(result.run_dir).classes                                    # result.classes too

``train`` and ``compose`` take the overrides `cnnlab train` takes, composed the same way (the same config
groups, plugins, ``resume=``, and ``config_dirs`` as its --config-dir), then keyword settings, which win:
``seed=1``, ``**{"optimizer.lr": 0.1}`` or ``optimizer__lr=0.1``. A mistake raises cnnlab.CnnlabError
with the line the CLI prints. Nothing here calls sys.exit or leaves Hydra's global state behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hydra.core.hydra_config import HydraConfig
from rich.console import Console

from cnnlab.core.schema import SUMMARY_RECORD
from cnnlab.runtime.files import read_json
from cnnlab.core.config import RunConfig
from cnnlab.core.errors import CnnlabError
from cnnlab.service.compose import composed, composed_run, config_errors_in_one_line, prepared_overrides, search_path_restored
from cnnlab.service.run import run_log, start

if TYPE_CHECKING:
    from cnnlab.data.images import ImageTransform


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]  # summary.json: status, best_value, selected scores, history...
    model: torch.nn.Module | None  # the selected weights (checkpoints/best.pt), on the CPU, in eval mode
    preprocess: ImageTransform | None  # images (paths, PIL, tensors; any size) -> the model's input
    classes: list[str] | None = None  # the class names: output i is classes[i]

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
    with search_path_restored(), composed_run(_overrides(overrides, config_dirs, settings)) as (run, _):
        return run


def train(overrides: Iterable[str] | None = None, *, config_dirs: Iterable[str | Path] = (),
          console: Console | None = None, **settings: Any) -> RunResult:
    """Train as `cnnlab train <overrides>` does, in this process; returns the run directory, its summary and the
    selected model. ``console``: where its progress goes (default: this terminal or notebook)."""
    with search_path_restored(), composed(_overrides(overrides, config_dirs, settings)) as cfg:
        hydra_node = HydraConfig.get()
        with config_errors_in_one_line():  # e.g. a name that is not one path component: the CLI's line
            run_dir = Path(hydra_node.run.dir)  # resolved now: a fresh run directory is claimed
        with run_log(run_dir):  # a refusal leaves nothing
            summary = start(cfg, run_dir, list(hydra_node.overrides.task), console=console)
    if summary is None:  # trainer.devices=N: the processes wrote it
        summary = read_json(run_dir / "summary.json", SUMMARY_RECORD, "run summary") or {}
    if (run_dir / "checkpoints" / "best.pt").is_file():
        loaded = load(run_dir)
        return RunResult(run_dir, summary, loaded.model, loaded.preprocess, loaded.classes)
    return RunResult(run_dir, summary, None, None)


@dataclass
class SearchResult:
    """What a search ended with: its folder, every trial as a row (a pandas DataFrame where pandas is installed,
    else a list of dicts: the fields of `cnnlab runs`, with each trial's searched values), the trial chosen
    (its row), and the search's own record (a tune's tune.json)."""

    dir: Path
    trials: Any
    best: dict[str, Any] | None
    record: dict[str, Any]


def search_table(folder: Path, chosen: str | None) -> tuple[Any, dict[str, Any] | None]:
    """The trials under ``folder`` as `cnnlab runs` reads them (the tune's own row and its gate's runs left out), and
    the row of the trial at ``chosen``."""
    from cnnlab.records import runs as run_records

    rows, _ = run_records.collect([folder])
    gate = (folder / "gate").resolve()  # a tune's sanity checks are runs, not trials
    records = [r for r in run_records.as_records(rows) if r.get("task") != "tune"
               and gate not in Path(str(r.get("path"))).resolve().parents]
    best = next((r for r in records if chosen is not None and Path(str(r.get("path"))).resolve() == Path(chosen).resolve()),
                None)
    try:
        import pandas
    except ImportError:
        return records, best
    return pandas.DataFrame(records), best


def tune(overrides: Iterable[str] | None = None, *, config_dirs: Iterable[str | Path] = (),
         console: Console | None = None, **settings: Any) -> SearchResult:
    """Run `cnnlab tune <overrides>` in this process (its workers, with ``tune__n_jobs``, as processes of their own):
    the same composing and checks, the same tune directory. Settings are keywords: ``tune__budget_epochs=60``,
    ``**{"tune.dir": folder}`` to continue one. Returns its trials, the chosen one and tune.json."""
    from cnnlab.service.compose import CONFIG_DIRS, take_config_dirs
    from cnnlab.training.console import make_console
    from cnnlab.tuning.runner import Tune

    if isinstance(overrides, str):
        raise CnnlabError("overrides: give a list of strings, e.g. ['model=lenet5', 'tune.budget_epochs=60']")
    args = [*(a for d in config_dirs for a in ("--config-dir", str(d))), *(overrides or ()), *setting_overrides(settings)]
    with search_path_restored():
        args = take_config_dirs(args)
        record = Tune(args, list(CONFIG_DIRS), console or make_console()).run()
    folder = Path(record["dir"])
    trials, best = search_table(folder, (record.get("chosen") or {}).get("run"))
    return SearchResult(folder, trials, best, record)


class LoadedRun(tuple):
    """``(model, preprocess)``, as ``model, preprocess = cnnlab.load(...)`` unpacks it, with ``.model``,
    ``.preprocess`` and ``.classes`` (the class names, index i for output i)."""

    def __new__(cls, model: torch.nn.Module, preprocess: ImageTransform, classes: list[str]):
        loaded = super().__new__(cls, (model, preprocess))
        loaded.classes = classes
        return loaded

    @property
    def model(self) -> torch.nn.Module:
        return self[0]

    @property
    def preprocess(self) -> ImageTransform:
        return self[1]


def load(run: str | Path, weights: str = "best", device: str | torch.device = "cpu") -> LoadedRun:
    """``(model, preprocess)`` of a run directory (or a checkpoint file, or a `cnnlab export --format safetensors`
    file), with ``.classes``: the model with the
    weights its run selected (``weights="best"``) or its newest (``"last"``), in eval mode on ``device``;
    ``preprocess`` is the run's evaluation preprocessing, as `cnnlab eval`, predict and export apply it
    (resize, centre crop, normalise, whiten): it takes paths, PIL images, numpy arrays, uint8 (0-255) or float
    (0-1) tensors (C, H, W) or (N, C, H, W) of any size, or a list of them, and returns the model's input.
    Plugins the run used must be imported first."""
    from cnnlab.analysis.inference import ExportedModel, load_trained
    from cnnlab.data.images import ImageTransform

    path = Path(run)
    if path.suffix == ".safetensors" and path.is_file():  # cnnlab export --format safetensors, its .json beside it
        exported, where = ExportedModel(path), torch.device(device)
        t = exported.transform
        return LoadedRun(exported.model.to(where), ImageTransform(t.size, t.resize, t.channels, t.preprocessing, where),
                         exported.classes)
    trained = load_trained(run, weights, device)
    return LoadedRun(trained.model, trained.transform, trained.classes)
