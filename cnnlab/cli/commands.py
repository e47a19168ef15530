"""The ``cnnlab`` command.

    cnnlab train [overrides...] [-m]     # Hydra: model=lenet5 optimizer.lr=0.1, --cfg job, -m sweeps
    cnnlab list <kind> [pattern]         # models, datasets, optimizers, schedulers, inits, augments

A user's mistake ends in one line on stderr (``error: ...``) and exit status 2;
only a bug in cnnlab shows a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cnnlab.core.version import __version__
from cnnlab.core.shown import masked, printable
from cnnlab.core.errors import (CnnlabError, CommandLineParser, JobAborted, Preempted, ProcessesFailed, StorageOutage,
                                suggestion)

USAGE = """usage: cnnlab <command> [args]

commands:
  train [key=value ...]     train; choose parts and set options with Hydra overrides, e.g.
                            cnnlab train model=lenet5 optimizer=sgd optimizer.lr=0.1 trainer.epochs=20
                            -m / --multirun sweeps comma-separated values: optimizer.lr=0.01,0.1,1
                            --cfg job prints the resolved config; --help lists the config groups
                            resume=RUN_DIR continues a stopped run exactly where it stopped
                            (a run directory reused with hydra.run.dir resumes by itself);
                            SIGTERM, SIGINT, SIGUSR1 checkpoint and exit with status 75;
                            a run whose loss diverged exits with status 4
                            multi-GPU: torchrun --nproc_per_node=N -m cnnlab train ...
  tune [key=value ...] tune.budget_epochs=N
                            the lectures' whole search under a budget of epochs: a sanity gate
                            (initial loss, overfit one batch, LR range test), coarse random search
                            with ASHA, refine stages, the top configurations with several seeds,
                            and one test of the one chosen on validation; see cnnlab tune --help
  lr-find [--min-lr 1e-6] [--max-lr 10] [--steps 200] [key=value ...]
                            LR range test on the configured run: loss vs an exponentially growing
                            lr, to TensorBoard and a PNG, and a suggested optimizer.lr
  eval RUN [RUN ...] [--splits train,val,test] [--tta-flip] [--tta-shift N] [--predictions FILE.csv]
                            score a run's selected checkpoint, or an ensemble (softmax averaged),
                            with optional test-time augmentation; prints the report table
  report SWEEP_DIR [--plot] [--test-best] [--device D] [--data-dir D] [--plugin M]
                            every trial of a sweep ranked on validation (also report.csv, .md);
                            flags a best value on the edge of its range with the command to run next;
                            --test-best scores only the chosen trial on the test split
  runs [DIR ...] [--where KEY=PATTERN|METRIC>=X ...] [--sort=[-]KEY] [--limit N] [--csv|--json]
                            every run and sweep trial under the output directory (or DIR ...): date,
                            name, status, task, model, dataset, what varies among them, the best
                            validation value, test accuracy, epochs and wall time
  compare RUN RUN [RUN ...] [--all] [--plot [FILE]] [--tensorboard]
                            runs side by side: the config groups that switched, the values and
                            the environment that differ, each metric with its change from the
                            first run, the learning curves as sparklines
  predict RUN|EXPORTED_FILE PATH [PATH ...] [--top-k K] [--csv|--json] [--tta-flip]
                            class names and top-k probabilities for image files, folders or globs,
                            prepared as the run's evaluation prepared its images; unreadable files
                            are a warning each and the rest go on
  export RUN --format onnx|torchscript [--out FILE] [--bake-preprocessing] [--weights best|last]
                            the selected model as a file an app loads (dynamic batch), checked
                            against torch on the validation images (max |logit difference| <= 1e-4)
  viz RUN_DIR               the run's pictures as PNGs in RUN_DIR/viz/: first-layer filters during
                            training, feature maps per stage, augmented samples, the most
                            confidently misclassified test images, the confusion matrix
  list <kind> [pattern]     what a registry holds; kinds: models, datasets, optimizers,
                            schedulers, inits, augments, tasks, samplers, pruners; pattern is shell-style, e.g. 'res*'
  --version                 print the version
"""

COMMANDS = ("train", "tune", "lr-find", "eval", "predict", "report", "runs", "compare", "export", "viz", "list")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _dispatch(argv)
    except CnnlabError as e:
        rank = os.environ.get("RANK", "0")  # under torchrun every rank reports, rank 0 plainly
        print(f"{'' if rank == '0' else f'rank {rank}: '}error: {printable(masked(str(e)))}", file=sys.stderr)
        code = 2
    except Preempted as stopped:
        if os.environ.get("RANK", "0") == "0":
            print(printable(masked(str(stopped))), file=sys.stderr)
        code = Preempted.EXIT_STATUS
    except StorageOutage as outage:
        print(f"error: {printable(masked(str(outage)))}", file=sys.stderr)
        code = StorageOutage.EXIT_STATUS
    except ProcessesFailed as failed:
        code = failed.status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] == "--version":
        print(f"cnnlab {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "list":
        from cnnlab.cli.listing import list_command

        return list_command(rest)
    handlers = {"train": _train, "tune": _tune, "lr-find": _lr_find, "eval": _eval, "report": _report, "runs": _runs,
                "compare": _compare, "export": _export, "viz": _viz, "predict": _predict}
    if command not in handlers:
        raise CnnlabError(f"unknown command {command!r}{suggestion(command, COMMANDS)}; see: cnnlab --help")
    return handlers[command](rest)


def _eval(args: list[str]) -> int:
    parser = CommandLineParser("cnnlab eval", "score a run's selected checkpoint, or an ensemble of runs "
                               "(softmax averaged), with optional test-time augmentation")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a run directory or a checkpoint file; several: an ensemble")
    parser.add_argument("--splits", default="train,val,test", help="comma-separated, from train, val, test (default: all)")
    parser.add_argument("--tta-flip", action="store_true", help="also average over each image's mirror image")
    parser.add_argument("--tta-shift", type=int, default=0, metavar="N", help="also over 4 copies shifted by N pixels")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--data-dir", default=None, help="where the dataset is, when not where the run found it")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the report here")
    parser.add_argument("--predictions", default=None, metavar="FILE",
                        help="also a CSV of every image scored: split, index, file, label, predicted, prob")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import this module first (a model the run's plugin registered); repeatable")
    ns = parser.parse_args(args)
    splits = [x for x in ns.splits.split(",") if x]
    bad = [x for x in splits if x not in ("train", "val", "test")]
    if bad or not splits or ns.tta_shift < 0:
        raise CnnlabError("cnnlab eval: --splits takes train, val and test (comma-separated); --tta-shift >= 0")
    from cnnlab.analysis.evaluation import evaluate_runs
    from cnnlab.core.plugins import load_plugins
    from cnnlab.runtime.files import check_writable, write_json

    if ns.json:
        check_writable(Path(ns.json), "--json")  # before the work, not after it
    if ns.predictions:
        check_writable(Path(ns.predictions), "--predictions")
    load_plugins(ns.plugin)
    report = evaluate_runs(ns.runs, splits=splits, tta_flip=ns.tta_flip, tta_shift=ns.tta_shift,
                           device=ns.device, data_dir=ns.data_dir,
                           predictions=Path(ns.predictions) if ns.predictions else None)
    if ns.json:
        write_json(Path(ns.json), report)
    return 0


def _report(args: list[str]) -> int:
    parser = CommandLineParser("cnnlab report", "every trial of a sweep ranked on validation (also report.csv "
                               "and report.md), with the coarse-to-fine command to run next")
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR")
    parser.add_argument("--plot", action="store_true", help="write report.png: the metric against each searched option")
    parser.add_argument("--test-best", action="store_true", help="score only the chosen trial on the test split, once")
    parser.add_argument("--device", default="auto", help="for --test-best: auto, cpu, cuda, cuda:N")
    parser.add_argument("--data-dir", default=None, help="for --test-best: where the dataset is")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import this module first (the trials' plugin); repeatable")
    ns = parser.parse_args(args)
    from cnnlab.core.plugins import load_plugins
    from cnnlab.sweep.report import report

    load_plugins(ns.plugin)
    report(ns.sweep_dir, plot=ns.plot, test_best=ns.test_best, device=ns.device, data_dir=ns.data_dir)
    return 0


def _runs(args: list[str]) -> int:
    parser = CommandLineParser("cnnlab runs", "every run and sweep trial under the output directory (or DIR ...), "
                               "one row each")
    parser.add_argument("dirs", nargs="*", metavar="DIR", help="folders to look in (default: the output directory)")
    parser.add_argument("--where", action="append", default=[], metavar="FILTER",
                        help="KEY=PATTERN (model=resnet*, status!=failed, optimizer.lr=0.1) or METRIC>=NUMBER "
                             "(val/acc>=0.9; also >, <, <=, =, !=); repeatable, all must hold")
    parser.add_argument("--sort", default="-date", metavar="[-]KEY", help="a field or config key; --sort=-KEY: descending "
                        "(default: -date, newest first)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="at most N rows")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="CSV on stdout, every field")
    output.add_argument("--json", action="store_true", help="JSON on stdout, every field")
    ns = parser.parse_args(args)
    if ns.limit is not None and ns.limit < 1:
        raise CnnlabError(f"cnnlab runs: --limit must be >= 1, got {ns.limit}")
    import csv
    import json

    from cnnlab.records import runs
    from cnnlab.training.console import make_console

    roots = [Path(d) for d in ns.dirs] or [Path(os.environ.get("CNNLAB_OUTPUT_DIR", "outputs"))]
    rows, notes = runs.collect(roots)
    chosen = runs.select(rows, ns.where, ns.sort, ns.limit)
    for note in notes:
        print(note, file=sys.stderr)
    if ns.json:
        print(json.dumps(runs.as_records(chosen), indent=1))
    elif ns.csv:
        records = runs.as_records(chosen)
        writer = csv.DictWriter(sys.stdout, fieldnames=list(records[0]) if records else list(runs.FIELDS))
        writer.writeheader()
        writer.writerows(records)
    else:
        runs.render(chosen, len(rows), make_console())
    return 0


def _compare(args: list[str]) -> int:
    parser = CommandLineParser("cnnlab compare", "runs or sweep trials side by side, the first as the reference")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (two or more)")
    parser.add_argument("--all", action="store_true", help="also the keys that are equal")
    parser.add_argument("--plot", nargs="?", const="compare.png", default=None, metavar="FILE",
                        help="write the runs' training and validation curves in one PNG (default: compare.png)")
    parser.add_argument("--tensorboard", action="store_true", help="print the command that opens these runs in TensorBoard")
    ns = parser.parse_args(args)
    from cnnlab.records.compare import compare
    from cnnlab.runtime.files import check_writable
    from cnnlab.training.console import make_console

    if ns.plot is not None:
        check_writable(Path(ns.plot), "--plot")  # before the work, not after it
    compare([Path(r) for r in ns.runs], show_all=ns.all, plot=Path(ns.plot) if ns.plot else None,
            tensorboard=ns.tensorboard, console=make_console())
    return 0


def _predict(args: list[str]) -> int:
    parser = CommandLineParser("cnnlab predict", "class names and probabilities for images, from a run or an "
                               "exported file, prepared as the run's evaluation prepared its images")
    parser.add_argument("model", metavar="RUN|EXPORTED_FILE",
                        help="a run directory, a checkpoint, or a file cnnlab export wrote (with its .json)")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    parser.add_argument("--top-k", type=int, default=3, metavar="K", help="classes shown per image (default 3)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="CSV on stdout: file, class_1, prob_1, ...")
    output.add_argument("--json", action="store_true", help="a JSON array on stdout")
    parser.add_argument("--tta-flip", action="store_true", help="also average over each image's mirror image")
    parser.add_argument("--weights", default="best", choices=["best", "last"], help="a run's selected (best) or newest")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="processes decoding images (0: none)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import this module first (a model the run's plugin registered); repeatable")
    ns = parser.parse_args(args)
    if ns.top_k < 1 or ns.batch_size < 1 or ns.workers < 0:
        raise CnnlabError("cnnlab predict: --top-k and --batch-size must be at least 1, --workers at least 0")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from cnnlab.analysis.inference import image_files, open_predictor, predictions, write_predictions
    from cnnlab.core.plugins import load_plugins
    from cnnlab.training.console import make_console, print_warning

    load_plugins(ns.plugin)
    predictor = open_predictor(ns.model, ns.weights, ns.device)
    files, passed = image_files(ns.paths)
    for line in passed:
        print_warning(line)
    if not files:
        raise CnnlabError(f"cnnlab predict: no image files in {' '.join(ns.paths)}")
    top_k = min(ns.top_k, len(predictor.classes))
    errors = make_console(stderr=True)
    with Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=errors,
                  transient=True, disable=not errors.is_terminal) as progress:
        task = progress.add_task("images", total=len(files))
        rows = predictions(predictor, files, batch_size=ns.batch_size, workers=ns.workers, top_k=top_k,
                           tta_flip=ns.tta_flip, warn=print_warning,
                           on_batch=lambda n: progress.advance(task, n))
        count = write_predictions(rows, "csv" if ns.csv else "json" if ns.json else "table", top_k, make_console())
    if count == 0:
        raise CnnlabError(f"cnnlab predict: none of the {len(files)} files could be read as an image")
    return 0


def _export(args: list[str]) -> int:
    parser = CommandLineParser("cnnlab export", "a run's selected model as ONNX or TorchScript, checked against torch")
    parser.add_argument("run", metavar="RUN", help="a run directory (or one of its checkpoint files)")
    parser.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    parser.add_argument("--out", default=None, metavar="FILE", help="default: RUN/model.onnx or RUN/model.pt")
    parser.add_argument("--bake-preprocessing", action="store_true",
                        help="the graph takes images in [0, 1] and applies the run's preprocessing itself")
    parser.add_argument("--weights", default="best", choices=["best", "last"], help="the selected (best) or newest")
    parser.add_argument("--data-dir", default=None, help="where the dataset is, when not where the run found it")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import this module first (a model the run's plugin registered); repeatable")
    ns = parser.parse_args(args)
    from cnnlab.core.plugins import load_plugins
    from cnnlab.records.export import export
    from cnnlab.runtime.files import check_writable
    from cnnlab.training.console import make_console

    if ns.format == "onnx":
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise CnnlabError("cnnlab export --format onnx needs onnx, onnxscript and onnxruntime: "
                              "pip install 'cnnlab[export]'") from None
    if ns.out is not None:
        check_writable(Path(ns.out), "--out")
    load_plugins(ns.plugin)
    export(Path(ns.run), ns.format, Path(ns.out) if ns.out else None, bake=ns.bake_preprocessing, weights=ns.weights,
           data_dir=ns.data_dir, console=make_console())
    return 0


def _viz(args: list[str]) -> int:
    parser = CommandLineParser("cnnlab viz", "a run's pictures as PNGs in RUN_DIR/viz/: first-layer filters over "
                               "training, feature maps, augmented samples, misclassified test images, confusion matrix")
    parser.add_argument("run_dir", metavar="RUN_DIR")
    ns = parser.parse_args(args)
    from cnnlab.analysis.viz import write_pngs

    for path in write_pngs(ns.run_dir):
        print(path)
    return 0


TUNE_HELP = """usage: cnnlab tune [--config-dir DIR] [key=value ...] tune.budget_epochs=N [tune.<setting>=value ...]

The lectures' search method as one command, in one tune directory, never past tune.budget_epochs (the
epochs of every trial of every stage, and the gate's steps, together):
  1. gate     the initial loss against ln C, overfit one batch, the LR range test (its suggestion
              centres the learning-rate window when no space is given); a failure stops the tune
  2. coarse   random (or Sobol) draws over the space, tune.coarse_epochs each, ASHA
  3. refine   tune.refine_stages times: a box around the best tune.top_q, moved past an edge the best
              sits on; the earlier trials inside it are told to the new study (TPE) and not run again
  4. final    the tune.top_k best configurations x tune.seeds seeds at trainer.epochs, ranked on
              the mean validation value with its spread
  5. test     the chosen configuration's selected model on the test split, once
The space: the run's sweep overrides (optimizer.lr='tag(log, interval(1e-4, 1))', a,b,c), or
conf/tune/space/<optimizer>.yaml. Rerun with tune.dir=<dir> to continue; start the same command with
the same tune.dir on more machines (tune.storage=postgresql://...) to add workers.

settings (conf/tune/default.yaml):
"""


def _tune(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        from cnnlab.core.config import CONF_DIR

        lines = (CONF_DIR / "tune" / "default.yaml").read_text().splitlines()
        print(TUNE_HELP + "\n".join(lines[next(i for i, line in enumerate(lines) if not line.startswith("#")):]))
        return 0
    if any(a in ("-m", "--multirun") for a in args):
        raise CnnlabError("cnnlab tune runs its own search: give the space as sweep overrides, without -m")
    from cnnlab.service.compose import CONFIG_DIRS, search_path_restored, take_config_dirs
    from cnnlab.training.console import make_console
    from cnnlab.tune.runner import Tune

    with search_path_restored():
        overrides = take_config_dirs(args)
        Tune(overrides, list(CONFIG_DIRS), make_console()).run()
    return 0


def _lr_find(args: list[str]) -> int:
    parser = CommandLineParser("cnnlab lr-find", "LR range test on the configured run: the loss against an "
                               "exponentially growing learning rate, to TensorBoard and lr_find.png, and a suggested "
                               "optimizer.lr. Other arguments are the run's Hydra overrides (key=value).")
    parser.add_argument("--min-lr", type=float, default=1e-6, help="the first learning rate (default 1e-6)")
    parser.add_argument("--max-lr", type=float, default=10.0, help="the last learning rate (default 10)")
    parser.add_argument("--steps", type=int, default=200, help="steps from --min-lr to --max-lr (default 200)")
    flags, overrides = parser.parse_known_args(args)
    if not 0 < flags.min_lr < flags.max_lr or flags.steps < 3:
        raise CnnlabError("lr-find needs 0 < --min-lr < --max-lr and --steps >= 3")
    from cnnlab.cli.hydra_app import lr_find_app

    overrides = ["hydra.run.dir='${cnnlab_fresh_dir:${paths.output_dir}/lr_find/${now:%Y-%m-%d}/${now:%H-%M-%S},${name}}'",
                 *overrides]
    return _train(overrides, app=lr_find_app(flags.min_lr, flags.max_lr, flags.steps))


def _train(overrides: list[str], app=None) -> int:
    """Run the Hydra application ``app`` (default: training) on ``overrides``."""
    from cnnlab.cli.hydra_app import hydra_train, last_run
    from cnnlab.service.compose import config_errors_in_one_line, prepared_overrides
    from cnnlab.core.status import DIVERGED_EXIT_STATUS, RunStatus

    from cnnlab.sweep.trials import FAILED_EXIT_STATUS, last_sweep

    training = app is None
    app = app or hydra_train
    if {"-h", "--help"} & set(overrides):
        from cnnlab.core.config import want_help_group_list

        want_help_group_list()
    last_sweep.clear()
    last_run.clear()
    overrides, multirun = prepared_overrides(overrides, training=training)
    from cnnlab.runtime.distributed import agree_on_run, launched_ranks

    ranks = launched_ranks()
    if ranks.enabled:
        if multirun:
            raise CnnlabError("torchrun runs one training; a sweep runs its trials through hydra/launcher")
        overrides = agree_on_run(overrides, ranks)

    # Hydra raises instead of printing its own (multi-line) report; we print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = ["cnnlab train", *overrides]
    try:
        with config_errors_in_one_line():
            app()
    except JobAborted as aborted:
        raise aborted.error from None
    except OSError as e:
        if e.filename is None:
            raise  # not a config problem: a bug, keep the traceback
        # e.g. an output directory that cannot be created (paths.output_dir)
        raise CnnlabError(f"cannot use {e.filename}: {e.strerror or e}") from None
    finally:
        if ranks.enabled:
            import gc

            import torch.distributed as dist

            if dist.is_initialized():
                # DDP's reducer may sit in a reference cycle: freed now, while the process group and the interpreter
                # are alive, not at exit, where gloo's threads then abort ("terminate called without an active
                # exception", seen once in a loaded CI run; pytorch/pytorch#179291 describes the exit race).
                gc.collect()
                dist.destroy_process_group()
    if last_sweep.get("failed"):
        return FAILED_EXIT_STATUS
    return DIVERGED_EXIT_STATUS if last_run.get("status") == RunStatus.DIVERGED else 0


