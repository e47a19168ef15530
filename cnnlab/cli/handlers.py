"""What each `cnnlab` command does with its parsed arguments (cnnlab.cli.table declares them). Imported only to
run a command, so that `cnnlab --help` never loads torch or Hydra."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cnnlab.analysis.evaluation import evaluate_runs
from cnnlab.analysis.inference import image_files, open_predictor, predictions, write_predictions
from cnnlab.analysis.viz import write_pngs
from cnnlab.cli.arguments import renamed
from cnnlab.cli.listing import list_command
from cnnlab.cli.table import Command
from cnnlab.core.config import default_output_dir
from cnnlab.core.errors import CnnlabError
from cnnlab.core.plugins import load_components, load_plugins
from cnnlab.records import runs as run_records
from cnnlab.records.compare import compare
from cnnlab.records.export import export
from cnnlab.runtime.files import atomic_write, check_writable
from cnnlab.sweep.report import report
from cnnlab.training.console import make_console, print_warning


def run_paths(paths: list[str], *, checkpoints: bool) -> list[Path]:
    """RUN ...: each a run or trial directory (or a checkpoint file, where ``checkpoints``), or a sweep or tune
    directory standing for its trials, in their order."""
    out: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_file() and checkpoints:
            out.append(path)
            continue
        runs = [p for p, stats in run_records.find_run_dirs(path) if "tune.json" not in stats]  # a tune's own row: not a run
        out.extend([path] if path in runs or not runs else sorted(runs, key=_natural))
    return out


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in path.parts]


def output_format(ns: Namespace, command: str) -> str | None:
    """json or csv (--json, --csv, or --out's suffix), or None: the table on the terminal."""
    if ns.json or ns.csv:
        return "json" if ns.json else "csv"
    if ns.out is None:
        return None
    suffix = Path(ns.out).suffix.lower().lstrip(".")
    if suffix not in ("json", "csv"):
        raise CnnlabError(f"cnnlab {command}: --out {ns.out}: say --json or --csv, or name a .json or .csv file")
    return suffix


@contextlib.contextmanager
def stdout_or_out(ns: Namespace) -> Iterator[None]:
    """What the block prints goes to stdout, or with --out FILE to FILE, written whole at the end."""
    if ns.out is None:
        yield
        return
    check_writable(Path(ns.out), "--out")  # before the work, not after it
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    atomic_write(Path(ns.out), lambda f: f.write(buffer.getvalue().encode()))


def eval_command(ns: Namespace) -> int:
    splits = [x for x in ns.splits.split(",") if x]
    if [x for x in splits if x not in ("train", "val", "test")] or not splits or ns.tta_shift < 0:
        raise CnnlabError("cnnlab eval: --splits takes train, val and test (comma-separated); --tta-shift >= 0")
    fmt = output_format(ns, "eval")
    if ns.predictions:
        check_writable(Path(ns.predictions), "--predictions")
    # The table: on stdout, or on stderr when stdout carries the --json or --csv data; never into --out's file.
    console = make_console(stderr=True) if fmt is not None and ns.out is None else make_console(file=sys.stdout)
    with stdout_or_out(ns):
        result = evaluate_runs([str(p) for p in run_paths(ns.runs, checkpoints=True)], splits=splits,
                               tta_flip=ns.tta_flip, tta_shift=ns.tta_shift, device=ns.device, data_dir=ns.data_dir,
                               predictions=Path(ns.predictions) if ns.predictions else None, console=console)
        if fmt == "json":
            print(json.dumps(result, indent=1))
        elif fmt == "csv":
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(["split", "metric", "value"])
            for split, metrics in result.get("splits", {}).items():
                for name, value in metrics.items():
                    if isinstance(value, int | float):
                        writer.writerow([split, name, value])
    return 0


def report_command(ns: Namespace) -> int:
    if ns.plot:
        check_writable(Path(ns.plot), "--plot")  # before the work, not after it
    report(ns.runs, plot=None if ns.plot is None else Path(ns.plot) if ns.plot else True, test_best=ns.test_best,
           device=ns.device, data_dir=ns.data_dir)
    return 0


def runs_command(ns: Namespace) -> int:
    if ns.limit is not None and ns.limit < 1:
        raise CnnlabError(f"cnnlab runs: --limit must be >= 1, got {ns.limit}")
    fmt = output_format(ns, "runs")
    # paths.output_dir=DIR, as train was told it, names the same folder as DIR
    roots = [Path(d.split("=", 1)[1] if d.startswith("paths.output_dir=") else d) for d in ns.runs]
    rows, notes = run_records.collect(roots or [default_output_dir()])
    chosen = run_records.select(rows, ns.where, ns.sort, ns.limit)
    for note in notes:
        print(note, file=sys.stderr)
    with stdout_or_out(ns):
        if fmt == "json":
            print(json.dumps(run_records.as_records(chosen), indent=1))
        elif fmt == "csv":
            records = run_records.as_records(chosen)
            writer = csv.DictWriter(sys.stdout, fieldnames=list(records[0]) if records else list(run_records.FIELDS))
            writer.writeheader()
            writer.writerows(records)
        else:
            run_records.render(chosen, len(rows), make_console(file=sys.stdout))
    return 0


def compare_command(ns: Namespace) -> int:
    if ns.plot is not None:
        check_writable(Path(ns.plot), "--plot")  # before the work, not after it
    compare(run_paths(ns.runs, checkpoints=False), show_all=ns.all, plot=Path(ns.plot) if ns.plot else None,
            tensorboard=ns.tensorboard, console=make_console())
    return 0


def predict_command(ns: Namespace) -> int:
    if ns.top_k < 1 or ns.batch_size < 1 or ns.workers < 0:
        raise CnnlabError("cnnlab predict: --top-k and --batch-size must be at least 1, --workers at least 0")
    fmt = output_format(ns, "predict") or "table"
    predictor = open_predictor(ns.model, ns.weights, ns.device)
    files, passed = image_files(ns.paths)
    for line in passed:
        print_warning(line)
    if not files:
        raise CnnlabError(f"cnnlab predict: no image files in {' '.join(ns.paths)}")
    top_k = min(ns.top_k, len(predictor.classes))
    errors, table = make_console(stderr=True), make_console(file=sys.stdout)
    with stdout_or_out(ns), Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     console=errors, transient=True, disable=not errors.is_terminal) as progress:
        task = progress.add_task("images", total=len(files))
        rows = predictions(predictor, files, batch_size=ns.batch_size, workers=ns.workers, top_k=top_k,
                           tta_flip=ns.tta_flip, warn=print_warning, on_batch=lambda n: progress.advance(task, n))
        count = write_predictions(rows, fmt, top_k, table)
    if count == 0:
        raise CnnlabError(f"cnnlab predict: none of the {len(files)} files could be read as an image")
    return 0


def export_command(ns: Namespace) -> int:
    if ns.format == "onnx":
        try:  # the optional extra, asked for only here
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise CnnlabError("cnnlab export --format onnx needs onnx, onnxscript and onnxruntime: "
                              "pip install 'cnnlab[export]'") from None
    if ns.out is not None:
        check_writable(Path(ns.out), "--out")
    export(Path(ns.runs), ns.format, Path(ns.out) if ns.out else None, bake=ns.bake_preprocessing,
           weights=ns.weights, data_dir=ns.data_dir, device=ns.device, console=make_console())
    return 0


def viz_command(ns: Namespace) -> int:
    for path in write_pngs(ns.runs):
        print(path)
    return 0


HANDLERS = {"eval": eval_command, "report": report_command, "runs": runs_command, "compare": compare_command,
            "predict": predict_command, "export": export_command, "viz": viz_command, "list": list_command}


def run(command: Command, args: list[str]) -> int:
    """A command that is not a training: its arguments parsed from the table, its plugins imported, its handler."""
    ns = command.parser().parse_args(renamed(command, args))
    if "plugins" in command.groups:
        load_components()
        load_plugins(ns.plugin)
    return HANDLERS[command.name](ns)
