"""`cnnlab tune`'s settings (conf/tune/default.yaml, ``tune.<key>=<value>`` on the command line) and its
default search spaces (conf/tune/space/<optimizer>.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from cnnlab.core.config import CONF_DIR, check_settings
from cnnlab.core.errors import CnnlabError, suggestion
from cnnlab.core.validation import NonNegativeInt, PositiveFloat, PositiveInt, Range

Share = Annotated[float, Range(gt=0, lt=1)]
Fraction = Annotated[float, Range(gt=0, le=1)]


@dataclass
class TuneSettings:
    budget_epochs: PositiveInt | None = None
    budget_s: PositiveFloat | None = None  # wall-clock, beside budget_epochs: see Tune.in_time
    coarse_epochs: PositiveInt | None = None
    refine_epochs: PositiveInt | None = None
    refine_stages: NonNegativeInt = 1
    coarse_share: Share = 0.5
    top_q: Fraction = 0.25
    top_k: PositiveInt = 3
    seeds: PositiveInt = 3
    sampler: Literal["random", "sobol"] = "random"
    reduction_factor: Annotated[int, Range(ge=2)] = 3
    gate: bool = True
    gate_steps: Annotated[int, Range(ge=3)] = 60
    lr_find_steps: Annotated[int, Range(ge=3)] = 60
    storage: str = "sqlite"
    dir: str | None = None
    n_jobs: PositiveInt | Literal["auto"] = "auto"
    gpus: Any = "auto"  # checked by cnnlab.runtime.gpus.visible_gpus
    trials_per_gpu: PositiveInt = 1
    pack: PositiveInt | Literal["auto"] = "auto"


def split_arguments(args: list[str]) -> tuple[list[str], list[str]]:
    """(the tune's own settings, the run's overrides): ``tune.<key>=<value>`` are the tune's."""
    mine = [a for a in args if a.partition("=")[0].startswith("tune.")]
    return mine, [a for a in args if a not in mine]


def load_settings(args: list[str]) -> TuneSettings:
    """conf/tune/default.yaml with ``tune.<key>=<value>`` over it, each value checked by its annotation."""
    import dataclasses

    values = yaml.safe_load((CONF_DIR / "tune" / "default.yaml").read_text())
    fields = {f.name for f in dataclasses.fields(TuneSettings)}
    for arg in args:
        key, sep, text = arg.partition("=")
        name = key[len("tune."):]
        if not sep:
            raise CnnlabError(f"{arg}: give the tune's settings as tune.<key>=<value>")
        if name not in fields:
            raise CnnlabError(f"tune has no setting {name!r}{suggestion(name, fields)}; settings: {', '.join(sorted(fields))}")
        values[name] = yaml.safe_load(text) if text.strip() else None
    settings = check_settings(TuneSettings, values, "tune")
    if settings.budget_epochs is None:
        raise CnnlabError("cnnlab tune needs tune.budget_epochs=N: the epochs every trial of every stage may spend together")
    return settings


def default_space(optimizer: str, config_dirs: list[str]) -> list[str]:
    """The sweep overrides of conf/tune/space/<optimizer>.yaml (a --config-dir folder's first)."""
    for folder in [*map(Path, config_dirs), CONF_DIR]:
        path = folder / "tune" / "space" / f"{optimizer}.yaml"
        if path.is_file():
            try:
                space = yaml.safe_load(path.read_text())
            except yaml.YAMLError as e:
                raise CnnlabError(f"{path}: not YAML ({' '.join(str(e).split())[:120]})") from None
            if not isinstance(space, dict) or not space:
                raise CnnlabError(f"{path}: a search space is a mapping of keys to sweeps, e.g. "
                                  "optimizer.lr: tag(log, interval(0.001, 1.0))")
            return [f"{key}={value}" for key, value in space.items()]
    known = sorted(p.stem for p in (CONF_DIR / "tune" / "space").glob("*.yaml"))
    raise CnnlabError(f"cnnlab tune has no default space for optimizer {optimizer!r} (conf/tune/space/ has "
                      f"{', '.join(known)}); give the space as sweep overrides, e.g. "
                      "optimizer.lr='tag(log, interval(1e-4, 1))'")
