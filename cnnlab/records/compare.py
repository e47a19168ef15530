"""`cnnlab compare RUN RUN [RUN ...]`: runs side by side, the first as the reference.

What each run's directory says of it: the config groups it chose and its config (``.hydra/hydra.yaml`` and
``config.yaml``, read as data with yaml.safe_load), its environment and metrics (``summary.json``). Shown:
the groups that switched, the values that differ (every equal one hidden unless --all), the environment
that differs, each metric with its change from the first run, and the learning curves as sparklines.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.text import Text

from cnnlab.core.config import flatten
from cnnlab.core.errors import CnnlabError

METRICS = [("best", None), ("val/acc", ("val", "acc")), ("val/loss", ("val", "loss")), ("test/acc", ("test", "acc")),
           ("test/loss", ("test", "loss")), ("train/acc", ("train", "acc")), ("train/loss", ("train", "loss"))]
CURVES = ("train/loss", "val/loss", "val/acc")
BARS = "▁▂▃▄▅▆▇█"


@dataclass
class RunRecord:
    folder: Path
    label: str
    choices: dict[str, Any]
    config: dict[str, Any]
    summary: dict[str, Any]


def _yaml(path: Path, run: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CnnlabError(f"cnnlab compare: {path} cannot be read: {str(e).splitlines()[0]}") from None
    return data if isinstance(data, dict) else {}


def read_run(folder: Path, label: str) -> RunRecord:
    if not folder.is_dir():
        raise CnnlabError(f"cnnlab compare: {folder} is not a run directory (no such folder)")
    summary_path = folder / "summary.json"
    if not summary_path.is_file() and not (folder / ".hydra" / "config.yaml").is_file():
        raise CnnlabError(f"cnnlab compare: {folder} is not a run directory (no summary.json, no .hydra/config.yaml)")
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CnnlabError(f"cnnlab compare: {summary_path} cannot be read: {e}") from None
    hydra = _yaml(folder / ".hydra" / "hydra.yaml", folder).get("hydra") or {}
    choices = {k: v for k, v in ((hydra.get("runtime") or {}).get("choices") or {}).items() if not k.startswith("hydra/")}
    return RunRecord(folder, label, choices, resolved(_yaml(folder / ".hydra" / "config.yaml", folder)), summary)


def resolved(config: dict[str, Any]) -> dict[str, Any]:
    """The config with its interpolations resolved (${paths.data_dir} -> data); as written where one cannot be
    (a resolver of Hydra's, such as ${now:...}, exists only while Hydra runs)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    except Exception:  # noqa: BLE001 - OmegaConf raises several kinds; the unresolved config is still the record
        return config


def labels(folders: list[Path]) -> list[str]:
    """Short names: the last path parts that tell the runs apart."""
    for depth in range(1, 6):
        names = ["/".join(f.resolve().parts[-depth:]) for f in folders]
        if len(set(names)) == len(names):
            return names
    return [str(f) for f in folders]


def differing(trees: list[dict[str, Any]], show_all: bool) -> list[tuple[str, list[Any]]]:
    flat = [flatten(t) for t in trees]
    keys = sorted(set().union(*flat))
    rows = [(k, [f.get(k) for f in flat]) for k in keys]
    return rows if show_all else [(k, v) for k, v in rows if any(x != v[0] for x in v[1:])]


def metric(summary: dict[str, Any], path: tuple[str, str] | None) -> float | None:
    if path is None:
        return summary.get("best_value")
    return ((summary.get("selected") or {}).get(path[0]) or {}).get(path[1])


def sparkline(values: list[float | None]) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "-"
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0
    return "".join(" " if v is None or not math.isfinite(v) else BARS[round((v - low) / span * (len(BARS) - 1))]
                   for v in values) + f"  {finite[0]:.3g} → {finite[-1]:.3g}"


def shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def delta(value: float | None, reference: float | None) -> str:
    if value is None or reference is None:
        return shown(value)
    change = value - reference
    return f"{value:.4g} ({'+' if change >= 0 else ''}{change:.3g})" if change else f"{value:.4g}"


def compare(folders: list[Path], *, show_all: bool = False, plot: Path | None = None, tensorboard: bool = False,
            console=None) -> list[RunRecord]:
    """Print the comparison (and write the plot); returns what was read."""
    from rich.table import Table

    if len(folders) < 2:
        raise CnnlabError("cnnlab compare needs two runs or more")
    runs = [read_run(f, name) for f, name in zip(folders, labels(folders))]
    trees = {"config groups": [r.choices for r in runs], "config": [r.config for r in runs],
             "environment": [r.summary.get("environment") or {} for r in runs]}
    for title, tree in trees.items():
        rows = differing(tree, show_all)
        if not rows:
            recorded = any(tree)
            console.print(f"{title}: {'the same' if recorded else 'not recorded'}", highlight=False)
            continue
        table = Table(title=f"{title}: {'every key' if show_all else f'{len(rows)} that differ'}", title_justify="left")
        for name in ("key", *(r.label for r in runs)):
            table.add_column(name, overflow="fold")
        for key, values in rows:
            table.add_row(key, *(shown(v) for v in values))
        console.print(table)
    table = Table(title=f"metrics (change from {runs[0].label})", title_justify="left")
    for name in ("metric", *(r.label for r in runs)):
        table.add_column(name, justify="right")
    for name, path in METRICS:
        values = [metric(r.summary, path) for r in runs]
        if any(v is not None for v in values):
            table.add_row(name, *(delta(v, values[0]) for v in values))
    table.add_row("epochs", *(str(len(r.summary.get("history") or [])) for r in runs))
    table.add_row("wall", *(shown(r.summary.get("wall_time_s")) + " s" for r in runs))
    console.print(table)
    for curve in CURVES:
        console.print(Text(curve, style="bold").append(" by epoch"))
        for r in runs:
            console.print(f"  {r.label}: {sparkline([h.get(curve) for h in r.summary.get('history') or []])}",
                          highlight=False)
    if tensorboard:
        spec = ",".join(f"{r.label}:{r.summary.get('tensorboard') or r.folder / 'tensorboard'}" for r in runs)
        console.print(f"tensorboard --logdir_spec '{spec}'", highlight=False, soft_wrap=True)
    if plot is not None:
        write_plot(runs, plot)
        console.print(f"plot: {plot}", highlight=False)
    return runs


def write_plot(runs: list[RunRecord], path: Path) -> None:
    """One PNG: each run's training and validation loss, and validation accuracy, by epoch."""
    from cnnlab.analysis.plotting import pyplot, save_png

    plt = pyplot()
    fig, (losses, accuracy) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        history = r.summary.get("history") or []
        epochs = [h.get("epoch") for h in history]
        line, = losses.plot(epochs, [h.get("train/loss") for h in history], "--", label=f"{r.label} train")
        losses.plot(epochs, [h.get("val/loss") for h in history], color=line.get_color(), label=f"{r.label} val")
        accuracy.plot(epochs, [h.get("val/acc") for h in history], color=line.get_color(), label=r.label)
    losses.set(xlabel="epoch", ylabel="loss", title="loss (dashed: training)")
    accuracy.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy")
    losses.legend(fontsize=7)
    accuracy.legend(fontsize=7)
    save_png(fig, path)
