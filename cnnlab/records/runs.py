"""`cnnlab runs [DIR ...]`: one table of every run and sweep trial under the output directory (or DIR ...).

A run directory is a folder with a summary.json, a trial.json or a .hydra/ record; the folders inside it are
its own (checkpoints, folds), so the walk does not enter it. A finished run's row comes from its summary.json
and .hydra/overrides.yaml, and is cached in the user's own cache folder (``$CNNLAB_CACHE_DIR``, else
``$XDG_CACHE_HOME/cnnlab`` or ``~/.cache/cnnlab``), never in the folder listed (it may be someone else's), keyed
by a hash of those files' contents, so a second listing parses only what changed. A run with no summary yet is running (its
lock is held by a live process), cut off (a sweep trial whose worker is gone) or crashed, and is never cached.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import operator
import os
import re
import time
from pathlib import Path
from typing import Any

from cnnlab.core.errors import CnnlabError, suggestion
from cnnlab.runtime import lock
from cnnlab.core.schema import SUMMARY_RECORD, Fields, MapOf
from cnnlab.core.shown import trial_label
from cnnlab.runtime.files import parse_json, read_json, read_limited, write_json, user_cache_dir

SUMMARY, TRIAL, HYDRA, TUNE = "summary.json", "trial.json", ".hydra", "tune.json"
OVERRIDES = f"{HYDRA}/overrides.yaml"
CACHE_VERSION = 2
# The fields a row is made of, as summary_row uses them (a listing checks no more: 10,000 summaries).
SUMMARY_ROW = Fields(optional={
    **{k: SUMMARY_RECORD.optional[k] for k in ("status", "name", "task", "model", "dataset", "monitor", "best_value",
                                                 "wall_time_s", "selected")}, "history": list})
_NUMBER = (float, None)
TUNE_ROW = Fields(optional={"monitor": str, "epochs_spent": _NUMBER, "chosen": Fields(optional={"mean": _NUMBER}),
                            "test": Fields(optional={"acc": _NUMBER, "loss": _NUMBER})})
CACHE_RECORD = Fields(optional={"version": int, "runs": MapOf(Fields(required={"key": str, "row": MapOf(Any)}))})
NOT_RUNS = {"checkpoints", "tensorboard", "viz", "workers", "pbt", "lr_find"}  # folders of a run, sweep or tune
LR_FIND = "lr_find.json"  # an LR range test's folder: not a run (it trains no model to select)
FIELDS = ("date", "name", "status", "task", "model", "dataset", "monitor", "best", "val/acc", "val/loss", "test/acc",
          "test/loss", "train/acc", "train/loss", "epochs", "wall", "path")
NUMERIC = {"best", "val/acc", "val/loss", "test/acc", "test/loss", "train/acc", "train/loss", "epochs", "wall"}
OPERATORS = {">=": operator.ge, "<=": operator.le, "!=": operator.ne, "=": operator.eq, ">": operator.gt,
             "<": operator.lt}
FILTER = re.compile(r"^\s*([^<>=!\s]+)\s*(>=|<=|!=|=|>|<)\s*(.*?)\s*$")


def find_run_dirs(root: Path) -> list[tuple[Path, dict[str, os.stat_result]]]:
    """Every run directory below ``root`` with the stat of its record files (from the same directory scan)."""
    found, stack = [], [str(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as scan:
                entries = list(scan)
        except OSError:
            continue
        names = {e.name: e for e in entries}
        if LR_FIND in names and SUMMARY not in names:
            continue
        if TUNE in names:  # a tune is a row, and so is each of its trials below it
            try:
                found.append((Path(folder), {TUNE: names[TUNE].stat()}))
            except OSError:
                pass
        if SUMMARY in names or TRIAL in names or HYDRA in names:
            stats = {}
            for name in (SUMMARY, TRIAL):
                if name in names:
                    try:
                        stats[name] = names[name].stat()
                    except OSError:
                        pass
            found.append((Path(folder), stats))
            continue
        stack.extend(e.path for e in entries if e.name not in NOT_RUNS and not e.name.startswith(".")
                     and e.is_dir(follow_symlinks=False))
    return found


def read_overrides(folder: Path, data: bytes | None = None) -> dict[str, str]:
    """The run's own overrides (.hydra/overrides.yaml, a YAML list of key=value), hydra.* and paths.* left out."""
    try:
        text = (data if data is not None else read_limited(folder / OVERRIDES, "overrides file") or b"").decode()
    except (CnnlabError, UnicodeDecodeError):
        return {}
    values = {}
    for line in text.splitlines():
        if not line.startswith("- "):
            continue
        item = line[2:].strip()
        try:
            if item[:1] in "'\"":  # YAML quoted: 'a=b c'
                item = item[1:-1].replace("''", "'") if item[0] == "'" else json.loads(item)
        except ValueError:
            continue
        if not isinstance(item, str):
            continue
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if sep and not key.startswith(("hydra.", "hydra/", "paths.")):
            values[key] = value
    return values


def summary_row(summary: dict[str, Any]) -> dict[str, Any]:
    selected = summary.get("selected") or {}
    row = {"name": summary.get("name"), "status": summary.get("status"), "task": summary.get("task"),
           "model": summary.get("model"), "dataset": summary.get("dataset"), "monitor": summary.get("monitor"),
           "best": summary.get("best_value"), "epochs": len(summary.get("history") or []),
           "wall": summary.get("wall_time_s")}
    for split in ("train", "val", "test"):
        for metric in ("acc", "loss"):
            row[f"{split}/{metric}"] = (selected.get(split) or {}).get(metric)
    return row


def unfinished_status(folder: Path, stats: dict[str, os.stat_result]) -> str:
    if lock.live_holder(folder) is not None:
        return "running"
    return "cut off" if TRIAL in stats else "crashed"


def run_row(folder: Path, stats: dict[str, os.stat_result], notes: list[str],
            contents: dict[str, bytes | None] | None = None) -> dict[str, Any]:
    """``contents``: the records' bytes, where cache_key read them already."""
    contents = contents or {}
    if TUNE in stats:
        return tune_row(folder, stats[TUNE], notes)
    started = stats[TRIAL].st_mtime if TRIAL in stats else None
    row: dict[str, Any] = {"path": str(folder), "values": read_overrides(folder, contents.get(OVERRIDES))}
    if SUMMARY in stats:
        try:
            summary = parse_json(contents[SUMMARY], folder / SUMMARY, SUMMARY_ROW, "run summary") \
                if contents.get(SUMMARY) is not None else read_json(folder / SUMMARY, SUMMARY_ROW, "run summary")
            row.update(summary_row(summary or {}))
        except CnnlabError as e:
            notes.append(f"warning: {e}; listed as unreadable")
            row["status"] = "unreadable"
        finished = stats[SUMMARY].st_mtime
        wall = row.get("wall")
        started = started or (finished - wall if isinstance(wall, (int, float)) else finished)
    else:
        row["status"] = unfinished_status(folder, stats)
    if started is None:
        try:
            started = (folder / HYDRA).stat().st_mtime
        except OSError:
            started = folder.stat().st_mtime
    row["date"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(started))
    row["trial"] = TRIAL in stats  # a sweep's or tune's trial: named by what it varies (trial_names)
    row["name"] = row.get("name") or folder.name
    for group in ("model", "dataset"):
        row[group] = row.get(group) or row["values"].get(group)
    return row


def tune_row(folder: Path, stat: os.stat_result, notes: list[str]) -> dict[str, Any]:
    """A finished tune (tune.json): the chosen configuration's mean validation value over its seeds, and its one
    test score."""
    row: dict[str, Any] = {"path": str(folder), "values": {}, "name": f"tune {folder.name}", "task": "tune",
                           "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(stat.st_mtime))}
    try:
        record = read_json(folder / TUNE, TUNE_ROW, "tune record") or {}
    except CnnlabError as e:
        notes.append(f"warning: {e}; listed as unreadable")
        return {**row, "status": "unreadable"}
    test = record.get("test") or {}
    return {**row, "status": "completed", "monitor": record.get("monitor"),
            "best": (record.get("chosen") or {}).get("mean"), "test/acc": test.get("acc"),
            "test/loss": test.get("loss"), "epochs": record.get("epochs_spent")}


RECORDS = (SUMMARY, TRIAL, OVERRIDES)  # what a row is made of


def cache_key(folder: Path, stats: dict[str, os.stat_result]) -> tuple[str | None, dict[str, bytes | None]]:
    """A hash of the records a row is made of, and their bytes (read once, for the row too); no key for a run
    with no summary (its status can change without a file changing: a live lock) or unreadable records."""
    if SUMMARY not in stats:
        return None, {}
    digest, contents = hashlib.blake2b(digest_size=16), {}
    for name in RECORDS:
        try:
            contents[name] = data = read_limited(folder / name, "run record")
        except CnnlabError:
            return None, {}
        digest.update(b"-" if data is None else b"+%d:" % len(data) + data)
    return digest.hexdigest(), contents


def cache_file(root: Path) -> Path:
    """The user's own cache of ``root``'s rows: a folder being listed may be someone else's, and a cache there could
    show rows of runs that never happened."""
    return user_cache_dir("runs") / f"{hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:24]}.json"


def trial_names(rows: list[dict[str, Any]]) -> None:
    """A sweep's trials share the run's name (imagefolder-small_resnet): each is named instead by what varies
    among its sweep's trials, as its TensorBoard run is (``lr=0.0027 wd=0.00016 #3``)."""
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("trial"):
            sweeps.setdefault(os.path.dirname(row["path"]), []).append(row)
    for trials in sweeps.values():
        keys = varying(trials)
        for row in trials:
            row["name"] = trial_label([f"{k}={v}" for k, v in row["values"].items()], keys,
                                      os.path.basename(row["path"]))


def collect(roots: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every run's row under ``roots`` (a root's cache read, refreshed and written back); notes to print."""
    rows, notes = [], []
    for root in roots:
        if not root.is_dir():
            raise CnnlabError(f"cnnlab runs: {root} is not a folder")
        first = len(rows)
        cache_path = cache_file(root)
        cached = _read_cache(cache_path)
        fresh = {}
        for folder, stats in find_run_dirs(root):
            (key, contents), path = cache_key(folder, stats), str(folder)
            entry = cached.get(path)
            if key is not None and entry is not None and entry.get("key") == key:
                row = entry["row"]
            else:
                row = run_row(folder, stats, notes, contents)
            if key is not None and row.get("status") != "unreadable":
                fresh[path] = {"key": key, "row": row}
            rows.append({**row, "where": os.path.relpath(path, root)})
        trial_names(rows[first:])
        if fresh != cached:
            try:
                write_json(cache_path, {"version": CACHE_VERSION, "runs": fresh})
            except (CnnlabError, OSError):
                pass  # a folder this user cannot write: listed all the same, read in full next time
    return rows, notes


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path, CACHE_RECORD, "runs cache")
    except CnnlabError:
        return {}
    return data.get("runs", {}) if data and data.get("version") == CACHE_VERSION else {}


def field(row: dict[str, Any], name: str) -> Any:
    return row[name] if name in row else row["values"].get(name)


def parse_filter(text: str, known: set[str]) -> tuple[str, str, Any]:
    match = FILTER.match(text)
    if not match:
        raise CnnlabError(f"cnnlab runs: --where {text!r} is not KEY=PATTERN or METRIC>=NUMBER "
                          "(e.g. model=resnet*, val/acc>=0.9, status!=failed)")
    name, op, value = match.groups()
    if name not in known:
        raise CnnlabError(f"cnnlab runs: --where {text!r}: no run has {name!r}{suggestion(name, sorted(known))}; "
                          f"fields: {', '.join(FIELDS)}, and the runs' config keys")
    if op in ("=", "!=") and name not in NUMERIC:
        return name, op, value
    try:
        return name, op, float(value)
    except ValueError:
        raise CnnlabError(f"cnnlab runs: --where {text!r}: {name} {op} needs a number, got {value!r}") from None


def keep(row: dict[str, Any], name: str, op: str, value: Any) -> bool:
    have = field(row, name)
    if isinstance(value, str):
        matched = have is not None and fnmatch.fnmatchcase(str(have), value)
        return matched if op == "=" else not matched
    try:
        number = float(have)
    except (TypeError, ValueError):
        return False
    return not math.isnan(number) and OPERATORS[op](number, value)


def select(rows: list[dict[str, Any]], where: list[str], sort: str, limit: int | None) -> list[dict[str, Any]]:
    """Filter, sort (``-key``: descending), limit."""
    known = {*FIELDS, *(k for row in rows for k in row["values"])}
    for name, op, value in (parse_filter(text, known) for text in where):
        rows = [row for row in rows if keep(row, name, op, value)]
    descending, key = sort.startswith("-"), sort.lstrip("-")
    if key not in known:
        raise CnnlabError(f"cnnlab runs: --sort {sort!r}: no run has {key!r}{suggestion(key, sorted(known))}")
    present = [row for row in rows if field(row, key) is not None]
    missing = [row for row in rows if field(row, key) is None]
    numeric = all(isinstance(field(row, key), (int, float)) for row in present)
    present.sort(key=lambda row: field(row, key) if numeric else str(field(row, key)), reverse=descending)
    rows = present + missing  # what a run does not have goes last either way
    return rows[:limit] if limit is not None else rows


def varying(rows: list[dict[str, Any]]) -> list[str]:
    """The config keys whose values differ among ``rows`` (one that some runs lack counts)."""
    keys = sorted({k for row in rows for k in row["values"]} - {*FIELDS, "where"})  # columns of their own
    return [k for k in keys if len({row["values"].get(k) for row in rows}) > 1]


def columns(rows: list[dict[str, Any]]) -> list[str]:
    return ["date", "name", "status", "task", "model", "dataset", *varying(rows), "best", "test/acc", "epochs", "wall",
            "where"]


def shown(value: Any, name: str, monitor: str | None = None) -> str:
    if value is None:
        return "-"
    if name == "wall":
        return f"{value:.0f} s"
    if isinstance(value, float):
        percent = name.endswith("/acc") or (name == "best" and str(monitor).endswith("acc"))
        return f"{100 * value:.2f}%" if percent else f"{value:.4g}"
    if isinstance(value, str) and name not in FIELDS:  # an override's value: 0.11776396522952592 -> 0.1178
        try:
            return f"{float(value):.4g}" if not value.lstrip("-").isdigit() else value
        except ValueError:
            return value
    return str(value)


def render(rows: list[dict[str, Any]], total: int, console) -> None:
    from rich.table import Table

    names = columns(rows)
    monitors = {row.get("monitor") for row in rows if row.get("monitor")}
    table = Table(title=f"{len(rows)} of {total} runs", title_justify="left")
    for name in names:
        header = (f"best {next(iter(monitors))}" if name == "best" and len(monitors) == 1 else
                  "path" if name == "where" else name)
        table.add_column(header, justify="right" if name in NUMERIC else "left")
    for row in rows:
        table.add_row(*(shown(field(row, name), name, row.get("monitor")) for name in names))
    console.print(table)


def as_records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What --json and --csv write: every field, and the varied config keys by name."""
    keys = varying(rows)
    return [{**{name: field(row, name) for name in (*FIELDS, "where")}, **{k: row["values"].get(k) for k in keys}}
            for row in rows]
