"""`cnnlab report <sweep dir>`: every trial in one table, the best chosen on validation, the
lectures' coarse-to-fine rule, and one test evaluation of the chosen trial on request.

Writes report.csv and report.md into the sweep directory; ``--plot`` writes report.png
(the metric against each searched hyperparameter, log axis where it was log-sampled).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cnnlab.training.console import make_console, titled
from cnnlab.core.shown import printable, shell_line
from cnnlab.core.errors import CnnlabError
from cnnlab.core.validation import Range, range_of
from cnnlab.sweep.storage import STORAGE_FILES, storage_target
from cnnlab.core.status import FAILED, RunStatus
from cnnlab.sweep.trials import SUMMARY_FILE, SWEEP_FILE, SWEEP_RECORD, TRIAL_FILE, TRIAL_RECORD, trial_dirs
from cnnlab.core.schema import Fields, Finite, ListOf
from cnnlab.runtime.files import atomic_write, confine, read_json, read_yaml, write_csv, write_json

EDGE = 0.1  # a best value in the outer 10% of an interval (in log space if log-sampled) is on its edge


@dataclass
class Trial:
    name: str
    folder: Path
    params: dict[str, Any]
    status: str
    epochs: int
    best_val_loss: float | None
    best_val_acc: float | None
    wall_time_s: float | None
    error: str = ""
    value: float | None = None  # the monitored metric's best value, when the trial finished


@dataclass
class Searched:
    """One searched hyperparameter: a list of values (grid) or an interval (random / TPE)."""

    key: str
    values: list[float] = field(default_factory=list)
    low: float | None = None
    high: float | None = None
    log: bool = False
    sweep_syntax: str = ""
    valid: Range | None = None  # the option's own range (from its annotation): a refinement stays inside it


def _number(text: str) -> float | str:
    """An override's value as a number where it is one."""
    try:
        return float(text)
    except ValueError:
        return text


def _params(overrides: list[str]) -> dict[str, Any]:
    out = {}
    for item in overrides:
        key, _, value = item.partition("=")
        out[key.lstrip("+~")] = _number(value)
    return out


_FINITE_OR_NULL = (Finite, None)
# What report reads of each file, and of what type.
RECORD_SPECS = {
    TRIAL_FILE: TRIAL_RECORD,
    SUMMARY_FILE: Fields(optional={
        "status": str, "best_value": (float, None), "wall_time_s": _FINITE_OR_NULL, "error": (str, None),
        "history": ListOf(Fields(optional={"val/loss": _FINITE_OR_NULL, "val/acc": _FINITE_OR_NULL}))}),
    SWEEP_FILE: SWEEP_RECORD,
}
RECORD_NAMES = {TRIAL_FILE: "trial record", SUMMARY_FILE: "run summary", SWEEP_FILE: "sweep record"}


def read_record(path: Path) -> dict[str, Any]:
    """One of a sweep's JSON records ({} when absent), its fields of the types report uses; a file that is
    not JSON, or holds something else, is one line naming it and the field (it may come from anyone)."""
    return read_json(path, RECORD_SPECS[path.name], RECORD_NAMES[path.name]) or {}


def load_trials(sweep_dir: Path) -> list[Trial]:
    trials = []
    for folder in trial_dirs(sweep_dir):
        record = read_record(folder / TRIAL_FILE)
        summary = read_record(folder / SUMMARY_FILE)
        history = summary.get("history") or []
        losses = [r["val/loss"] for r in history if r.get("val/loss") is not None]
        accs = [r["val/acc"] for r in history if r.get("val/acc") is not None]
        status = summary.get("status", RunStatus.UNFINISHED)
        finished = status not in FAILED and status != RunStatus.UNFINISHED and summary.get("best_value") is not None
        trials.append(Trial(
            name=folder.name, folder=folder, params=_params(record.get("overrides", [])), status=status,
            epochs=len(history), best_val_loss=min(losses) if losses else None,
            best_val_acc=max(accs) if accs else None, wall_time_s=summary.get("wall_time_s"),
            error=summary.get("error", ""), value=summary["best_value"] if finished else None,
        ))
    return trials


def searched_parameters(record: dict[str, Any]) -> list[Searched]:
    """What the sweep varied, from its record (command-line sweeps and hydra.sweeper.params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in record.get("sweeper_params", {}).items()]
    lines += [o for o in record.get("task_overrides", []) if not o.startswith("hydra")]
    found: dict[str, Searched] = {}
    for line in lines:
        try:
            override = parser.parse_overrides([line])[0]
        except Exception:  # noqa: BLE001 - not ours to judge here; the sweep ran with it
            continue
        if not override.is_sweep_override():
            continue
        sweep, key = override.value(), override.get_key_element().lstrip("+~")
        item = Searched(key, sweep_syntax=line.partition("=")[2])
        item.log = "log" in (getattr(sweep, "tags", None) or set())
        if isinstance(sweep, IntervalSweep):
            item.low, item.high = float(sweep.start), float(sweep.end)
        elif isinstance(sweep, (ChoiceSweep, RangeSweep)):
            values = list(sweep.list) if isinstance(sweep, ChoiceSweep) else list(override.sweep_iterator())
            numbers = [_number(v) for v in values]
            if not all(isinstance(v, float) for v in numbers):
                continue  # e.g. model=lenet5,mlp: no range to move
            item.values = sorted(numbers)
            positive = item.values[0] > 0
            item.log = item.log or _geometric(item.values) or (
                positive and (item.values[-1] / item.values[0] > 10 or _is_rate(key)))
        found[key] = item
    return list(found.values())


def _trial_config(trials: list[Trial]) -> dict[str, Any]:
    """The composed config of a trial (its .hydra/config.yaml): which components the sweep used."""
    for trial in trials:
        try:
            config = read_yaml(trial.folder / ".hydra" / "config.yaml", what="stored config")
        except CnnlabError:
            continue
        if isinstance(config, dict):
            return config
    return {}


def _geometric(values: list[float]) -> bool:
    if len(values) < 3 or min(values) <= 0:
        return len(values) == 2 and min(values) > 0 and max(values) / min(values) >= 10
    ratios = [b / a for a, b in zip(values, values[1:])]
    return max(ratios) / min(ratios) < 1.05 and ratios[0] > 1.5


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _in(valid: Range | None, x: float) -> bool:
    return valid is None or valid.contains(x)


def _clip_grid(values: list[float], valid: Range | None, n: int) -> list[float]:
    """A proposed grid pulled inside the option's valid range: values past a closed bound become the
    bound, values past an open one are dropped; then the grid is spread again over what is left."""
    if valid is None:
        return values
    kept = []
    for v in values:
        if valid.ge is not None and v < valid.ge:
            v = valid.ge
        if valid.le is not None and v > valid.le:
            v = valid.le
        if _in(valid, v) and v not in kept:
            kept.append(v)
    if 1 < len(kept) < n:
        lo, hi = min(kept), max(kept)
        kept = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    return kept


def clip_interval(lo: float, hi: float, best: float, valid: Range | None) -> tuple[float, float]:
    """[lo, hi] pulled inside an option's valid range, an open bound halfway from ``best``."""
    if valid is None:
        return lo, hi
    if valid.ge is not None:
        lo = max(lo, valid.ge)
    if valid.gt is not None and lo <= valid.gt:
        lo = (valid.gt + best) / 2 if best > valid.gt else best
    if valid.le is not None:
        hi = min(hi, valid.le)
    if valid.lt is not None and hi >= valid.lt:
        hi = best + (valid.lt - best) / 2 if best < valid.lt else best
    return lo, hi


def refine(item: Searched, best: float) -> tuple[str, str] | None:
    """(what, new sweep syntax): shifted when ``best`` is on the edge of the range, narrowed around it
    otherwise; in log space when the search was (or spans more than a decade, or is a rate or a
    decay); never outside the option's valid range (``item.valid``)."""
    if item.values:  # a grid
        n, values = len(item.values), item.values
        on_edge = best in (values[0], values[-1])
        if item.log and values[0] > 0:
            ratio = (values[-1] / values[0]) ** (1 / (n - 1)) if n > 1 else 10.0
            step = ratio if on_edge else math.sqrt(ratio)
            new = [best * step ** (i - n // 2) for i in range(n)]
        else:
            step = (values[-1] - values[0]) / (n - 1) if n > 1 else 1.0
            step = step if on_edge else step / 2
            new = [best + step * (i - n // 2) for i in range(n)]
        new = _clip_grid(new, item.valid, n)
        if len(new) < 2:
            return None
        return ("on the edge" if on_edge else "inside", ",".join(_fmt(v) for v in new))
    if item.low is None or item.high is None:
        return None
    lo, hi = item.low, item.high
    if item.log and lo > 0 and best > 0:
        t = (math.log(best) - math.log(lo)) / (math.log(hi) - math.log(lo))
        half = math.sqrt(hi / lo)
        on_edge = t < EDGE or t > 1 - EDGE
        width = half if on_edge else math.sqrt(half)
        new_lo, new_hi = best / width, best * width
    else:
        t = (best - lo) / (hi - lo)
        on_edge = t < EDGE or t > 1 - EDGE
        half = (hi - lo) / 2 if on_edge else (hi - lo) / 4
        new_lo, new_hi = best - half, best + half
        if lo >= 0:
            new_lo = max(new_lo, 0.0)
    new_lo, new_hi = clip_interval(new_lo, new_hi, best, item.valid)
    if not new_lo < new_hi:
        return None
    syntax = f"interval({_fmt(new_lo)}, {_fmt(new_hi)})"
    return ("on the edge" if on_edge else "inside", f"tag(log, {syntax})" if item.log else syntax)


RATE_WORDS = ("lr", "rate", "decay")  # options searched in log space however their grid was typed


def _is_rate(key: str) -> bool:
    words = key.rpartition(".")[2].split("_")
    return any(w in RATE_WORDS for w in words)


def option_range(config: dict[str, Any], key: str) -> Range | None:
    """The valid range of option ``key`` for the components a trial's config chose, from its annotation."""
    from cnnlab.core.config import option_annotation
    from cnnlab.core.plugins import load_components, require_plugins

    load_components()
    try:  # a trial's config is a file: the plugins it names are used only when the user loaded them (--plugin)
        require_plugins(config.get("plugins"), "trial")
    except CnnlabError:
        return None
    return range_of(option_annotation(config, key))


def lent_overrides(record: dict[str, Any], sweep_dir: Path) -> tuple[list[str], list[str]]:
    """The sweep record's task overrides that a printed command may repeat, and those it may not (a Hydra key, a
    resolver, a plugin: the user types those again, having read them)."""
    from cnnlab.runtime.lent import check_lent_override

    kept, left = [], []
    for override in record.get("task_overrides", []):
        if override.startswith(("hydra.sweep.dir=", "sweep.resume=")):
            continue
        try:
            check_lent_override(override, str(sweep_dir / SWEEP_FILE), printed=True)
            kept.append(override)
        except CnnlabError:
            left.append(override)
    return kept, left


def refined_command(kept: list[str], item: Searched, syntax: str) -> str:
    args = [o for o in kept if o.partition("=")[0].lstrip("+~") != item.key]
    return shell_line(["cnnlab", "train", "-m", *args, f"{item.key}={syntax}"])


def _cell(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.2f}%" if pct else _fmt(value)
    return str(value)


@dataclass
class SweepReport:
    """What `cnnlab report` says of a sweep, computed before anything is printed or written."""

    folder: Path
    record: dict[str, Any]
    monitor: str
    trials: list[Trial]
    ranked: list[Trial]
    best: Trial | None
    searched: list
    header: list[str]
    rows: list[list[str]]
    failed: int
    pruned: int
    spent: int
    planned: Any  # trainer.epochs of the trials, when known
    advice: list[dict[str, Any]] = field(default_factory=list)
    not_repeated: list[str] = field(default_factory=list)  # the record's overrides a printed command leaves out

    @property
    def title(self) -> str:
        return (f"{len(self.trials)} trials, {self.pruned} pruned, {self.failed} failed; "
                f"ranked by best {self.monitor}")

    @property
    def budget(self) -> str:
        line, planned = f"epochs trained: {self.spent}", self.planned
        if isinstance(planned, int) and planned > 0:
            line += (f" of the {planned * len(self.trials)} an unpruned search would have spent "
                     f"({self.spent / (planned * len(self.trials)):.0%})")
        return line


def compute_report(folder: Path) -> SweepReport:
    """Rank the trials on the monitored metric (failures last), tabulate them, and apply the coarse-to-fine
    rule to the best trial's value of each searched hyperparameter."""
    if not folder.is_dir():
        raise CnnlabError(f"{folder} is not a folder; give a sweep directory (outputs/sweeps/<date>/<time>)")
    record = read_record(folder / SWEEP_FILE)
    monitor = record.get("monitor", "val/acc")
    trials = load_trials(folder)
    if not trials:
        raise CnnlabError(f"{folder} holds no trials (no */{TRIAL_FILE}); is it the directory of a `cnnlab train -m` sweep?")
    done = sorted((t for t in trials if t.value is not None), key=lambda t: t.value, reverse=not monitor.endswith("loss"))
    ranked = done + [t for t in trials if t.value is None]
    best = done[0] if done else None
    searched = searched_parameters(record)
    config = _trial_config(trials)
    for item in searched:
        item.valid = option_range(config, item.key)
    varied = [s.key for s in searched]
    for key in sorted({k for t in trials for k in t.params}):
        if key not in varied and len({str(t.params.get(key)) for t in trials}) > 1:
            varied.append(key)
    header = ["", "trial", *varied, "status", "epochs", "best val loss", "best val acc", "wall time (s)", "error"]
    rows = [["*" if t is best else "", t.name, *(_cell(t.params.get(k)) for k in varied), t.status,
             str(t.epochs), _cell(t.best_val_loss), _cell(t.best_val_acc, pct=True),
             f"{t.wall_time_s:.1f}" if t.wall_time_s is not None else "-", t.error] for t in ranked]
    result = SweepReport(folder, record, monitor, trials, ranked, best, searched, header, rows,
                         failed=sum(t.status in FAILED for t in trials),
                         pruned=sum(t.status == RunStatus.PRUNED for t in trials),
                         spent=sum(t.epochs for t in trials), planned=(config.get("trainer") or {}).get("epochs"))
    kept, result.not_repeated = lent_overrides(record, folder)
    for item in searched if best is not None else ():
        value = best.params.get(item.key)
        refined = refine(item, value) if isinstance(value, float) else None
        if refined is not None:
            where, syntax = refined
            result.advice.append({"key": item.key, "best": value, "where": where, "syntax": item.sweep_syntax,
                                  "command": refined_command(kept, item, syntax)})
    return result


def render_report(r: SweepReport, console: Console) -> None:
    """The table, the epochs spent, the study's dashboard command, the best trial and what to search next."""
    table = Table()
    for column in r.header:
        table.add_column(column, overflow="ellipsis" if column == "error" else "fold",
                         max_width=48 if column == "error" else None)
    for row in r.rows:
        table.add_row(*row, style="bold green" if row[0] else None)
    console.print(titled(f"{r.folder}: {r.title}", table))
    console.print(r.budget, highlight=False)
    study = next((r.folder / name for name in (STORAGE_FILES["sqlite"], STORAGE_FILES["journal"])
                  if (r.folder / name).is_file()), None)
    if study is not None:
        target = storage_target("sqlite" if study.suffix == ".db" else "journal", r.folder)
        console.print(f"study: {shell_line(['optuna-dashboard', target])}", highlight=False, soft_wrap=True)
    if r.best is not None:
        console.print(f"best: trial {r.best.name}, {r.monitor} {_fmt(r.best.value)} ({r.best.folder})", highlight=False)
    for a in r.advice:
        line = (f"{a['key']}={_fmt(a['best'])} is on the edge of the searched range {a['syntax']}: move the window"
                if a["where"] == "on the edge" else f"{a['key']}={_fmt(a['best'])} lies inside {a['syntax']}: refine around it")
        console.print(f"{line}\n  {a['command']}", highlight=False, soft_wrap=True)
    if r.advice and r.not_repeated:
        console.print(f"  not repeated from {r.folder / SWEEP_FILE} (add them yourself if you mean them): "
                      f"{shell_line(r.not_repeated)}", highlight=False, soft_wrap=True)


def write_report(r: SweepReport) -> None:
    """report.csv and report.md in the sweep directory."""
    confine(r.folder)  # a link inside someone else's sweep directory is not followed
    write_csv(r.folder / "report.csv", ["best", *r.header[1:]], r.rows)
    md = ["| " + " | ".join(["best", *r.header[1:]]) + " |", "|" + "---|" * len(r.header)]
    md += ["| " + " | ".join(printable(c).replace("|", "\\|") for c in row) + " |" for row in r.rows]
    text = "\n".join([f"# Sweep {printable(r.folder)}", "", f"{r.title}; {r.budget}.", "", *md, ""]
                     + [f"- {a['key']} ({a['where']}): `{a['command']}`" for a in r.advice]) + "\n"
    atomic_write(r.folder / "report.md", lambda f: f.write(text.encode()))


def report(sweep_dir: str, *, plot: bool | Path | None = False, test_best: bool = False, device: str = "auto",
           data_dir: str | None = None, console: Console | None = None) -> dict[str, Any]:
    """`cnnlab report`: compute, print, write; then the plot and the one test of the chosen trial."""
    console = console or make_console()
    r = compute_report(Path(sweep_dir))
    render_report(r, console)
    write_report(r)
    maximize = not r.monitor.endswith("loss")
    result: dict[str, Any] = {
        "trials": len(r.trials), "failed": r.failed, "pruned": r.pruned, "monitor": r.monitor, "epochs": r.spent,
        "unpruned_epochs": r.planned * len(r.trials) if isinstance(r.planned, int) else None,
        "best_so_far": best_so_far(r.trials, maximize), "best": r.best.name if r.best else None,
        "ranking": [t.name for t in r.ranked],
        "advice": [{k: v for k, v in a.items() if k != "syntax"} for a in r.advice]}
    if plot:
        result["plot"] = str(_plot(r.folder, r.trials, r.searched, r.monitor,
                                   plot if isinstance(plot, Path) else r.folder / "report.png"))
        console.print(f"plot: {result['plot']}", highlight=False)
    if test_best:
        result["test"] = score_best_on_test(r, device, data_dir, console)
    console.print(f"written: {r.folder / 'report.csv'}, {r.folder / 'report.md'}", highlight=False)
    return result


def score_best_on_test(r: SweepReport, device: str, data_dir: str | None, console: Console) -> dict[str, Any]:
    """--test-best: the chosen trial's selected checkpoint on the test split, once (test_best.json)."""
    if r.best is None:
        raise CnnlabError(f"{r.folder}: no trial finished, so there is none to test")
    from cnnlab.analysis.evaluation import evaluate_runs

    scores = evaluate_runs([str(r.best.folder)], splits=["test"], tta_flip=False, tta_shift=0, device=device,
                           data_dir=data_dir, console=console)
    test = {"trial": r.best.name, **scores["splits"]["test"]}
    write_json(r.folder / "test_best.json", test)
    console.print(f"test split scored once, for trial {r.best.name}: {r.folder / 'test_best.json'}", highlight=False)
    return test


def best_so_far(trials: list[Trial], maximize: bool) -> list[tuple[int, float | None]]:
    """(epochs spent, the best value so far) after each trial, in trial order: what the search bought."""
    return best_curve(((t.epochs, t.value) for t in trials), maximize)


def best_curve(points: Iterable[tuple[float, float | None]], maximize: bool, start: float = 0) -> list[tuple[float, float | None]]:
    """(epochs spent, the best value so far) after each (epochs, value), spending from ``start``."""
    spent, best, curve = start, None, []
    for epochs, value in points:
        spent += epochs
        if value is not None and (best is None or (value > best if maximize else value < best)):
            best = value
        curve.append((spent, best))
    return curve


def _plot(folder: Path, trials: list[Trial], searched: list[Searched], monitor: str, path: Path) -> Path:
    from cnnlab.analysis.plotting import pyplot, save_png

    plt = pyplot()
    panels = len(searched) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6), squeeze=False)
    curve = [(e, b) for e, b in best_so_far(trials, not monitor.endswith("loss")) if b is not None]
    ax = axes[0][-1]
    ax.step([e for e, _ in curve], [b for _, b in curve], where="post", color="tab:green")
    ax.set_xlabel("epochs spent (all trials)")
    ax.set_ylabel(f"best {monitor} so far")
    for ax, item in zip(axes[0], searched):
        xs = [t.params.get(item.key) for t in trials if t.value is not None]
        ys = [t.value for t in trials if t.value is not None]
        ax.scatter(xs, ys, color="tab:blue", label="finished")
        failed_x = [t.params.get(item.key) for t in trials if t.value is None and isinstance(t.params.get(item.key), float)]
        if failed_x and ys:
            ax.scatter(failed_x, [min(ys)] * len(failed_x), marker="x", color="tab:red", label="failed")
        if item.log:
            ax.set_xscale("log")
        ax.set_xlabel(item.key + (" (log)" if item.log else ""))
        ax.set_ylabel(f"best {monitor}")
        ax.legend(fontsize=7)
    save_png(fig, path)
    return path
