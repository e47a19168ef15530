"""`cnnlab compare RUN RUN [RUN ...]`: runs side by side, the first as the reference.

What each run's directory says of it: the config groups it chose and its config (``.hydra/hydra.yaml`` and
``config.yaml``, read as data: no alias, no resolver runs), its environment and metrics (``summary.json``). Shown:
the groups that switched, the values that differ (every equal one hidden unless --all), the environment
that differs, each metric with its change from the first run, and the learning curves as sparklines.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text

from cnnlab.core.config import flatten
from cnnlab.core.errors import CnnlabError
from cnnlab.core.schema import SUMMARY_RECORD
from cnnlab.core.shown import shell_line
from cnnlab.runtime.files import read_json, read_yaml

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


def _yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path, what="cnnlab compare: stored config")
    return data if isinstance(data, dict) else {}


def read_run(folder: Path, label: str) -> RunRecord:
    if not folder.is_dir():
        raise CnnlabError(f"cnnlab compare: {folder} is not a run directory (no such folder)")
    summary_path = folder / "summary.json"
    if not summary_path.is_file() and not (folder / ".hydra" / "config.yaml").is_file():
        raise CnnlabError(f"cnnlab compare: {folder} is not a run directory (no summary.json, no .hydra/config.yaml)")
    summary = read_json(summary_path, SUMMARY_RECORD, "cnnlab compare: run summary") or {}
    hydra = _yaml(folder / ".hydra" / "hydra.yaml").get("hydra")
    runtime = hydra.get("runtime") if isinstance(hydra, dict) else None
    choices = runtime.get("choices") if isinstance(runtime, dict) else None
    choices = {str(k): v for k, v in (choices if isinstance(choices, dict) else {}).items() if not str(k).startswith("hydra/")}
    return RunRecord(folder, label, choices, resolved(_yaml(folder / ".hydra" / "config.yaml")), summary)


INTERPOLATION = re.compile(r"\$\{([\w.\-]+)\}")  # ${paths.data_dir}; a resolver call (${oc.env:X}) has a colon
MAX_SHOWN = 1000  # characters of one resolved value


def resolved(config: dict[str, Any]) -> dict[str, Any]:
    """The config with its plain interpolations resolved (${paths.data_dir} -> data). Resolver calls stay as
    written: the config may be someone else's, and ${oc.env:...} would print this machine's environment. Each key
    is resolved once (a chain of doubling interpolations stays linear) and a value is cut at MAX_SHOWN."""
    flat = flatten(config)
    memo: dict[str, Any] = {}

    def lookup(key: str, seen: frozenset) -> Any:
        if key in memo:
            return memo[key]
        if key in seen or key not in flat:
            return None
        value = flat[key]
        memo[key] = substitute(value, seen | {key}) if isinstance(value, str) else value
        return memo[key]

    def substitute(text: str, seen: frozenset) -> Any:
        whole = INTERPOLATION.fullmatch(text)
        if whole:
            found = lookup(whole.group(1), seen)
            return text if found is None else found
        return INTERPOLATION.sub(lambda m: m.group() if (v := lookup(m.group(1), seen)) is None else str(v),
                                 text[:MAX_SHOWN])[:MAX_SHOWN]

    def walk(node: Any, prefix: str) -> Any:
        if isinstance(node, dict) and node:
            return {k: walk(v, f"{prefix}{k}.") for k, v in node.items()}
        return lookup(prefix[:-1], frozenset()) if isinstance(node, str) else node

    return walk(config, "")


def labels(folders: list[Path]) -> list[str]:
    """Short names: the last path parts that tell the runs apart."""
    for depth in range(1, 6):  # a trial's own folder is its number: with its sweep stage's (coarse/0), never "0"
        names = ["/".join(f.resolve().parts[-(depth + (depth == 1 and f.name.isdigit())):]) for f in folders]
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
        console.print(shell_line(["tensorboard", "--logdir_spec", spec]), highlight=False, soft_wrap=True)
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
