"""The ``cnnlab`` command.

    cnnlab train [overrides...] [-m]     # Hydra: model=lenet5 optimizer.lr=0.1, --cfg job, -m sweeps
    cnnlab list <kind> [pattern]         # models, datasets, optimizers, schedulers, inits, augments

A user's mistake ends in one line on stderr (``error: ...``) and exit status 2;
only a bug in cnnlab shows a traceback.
"""

from __future__ import annotations

import os
import sys

from cnnlab import __version__
from cnnlab.errors import CnnlabError, CommandLineParser, JobAborted, suggestion

USAGE = """usage: cnnlab <command> [args]

commands:
  train [key=value ...]     train; choose parts and set options with Hydra overrides, e.g.
                            cnnlab train model=lenet5 optimizer=sgd optimizer.lr=0.1 trainer.epochs=20
                            -m / --multirun sweeps comma-separated values: optimizer.lr=0.01,0.1,1
                            --cfg job prints the resolved config; --help lists the config groups
  lr-find [--min-lr 1e-6] [--max-lr 10] [--steps 200] [key=value ...]
                            LR range test on the configured run: loss vs an exponentially growing
                            lr, to TensorBoard and a PNG, and a suggested optimizer.lr
  eval RUN [RUN ...] [--splits train,val,test] [--tta-flip] [--tta-shift N] [--data-dir D]
                            score a run's selected checkpoint, or an ensemble (softmax averaged),
                            with optional test-time augmentation; prints the report table
  report SWEEP_DIR [--plot] [--test-best] [--device D] [--data-dir D]
                            every trial of a sweep ranked on validation (also report.csv, .md);
                            flags a best value on the edge of its range with the command to run next;
                            --test-best scores only the chosen trial on the test split
  list <kind> [pattern]     what a registry holds; kinds: models, datasets, optimizers,
                            schedulers, inits, augments; pattern is shell-style, e.g. 'res*'
  --version                 print the version
"""

COMMANDS = ("train", "lr-find", "eval", "report", "list")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _dispatch(argv)
    except CnnlabError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
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
    if command == "train":
        return _train(rest)
    if command == "lr-find":
        return _lr_find(rest)
    if command == "eval":
        return _eval(rest)
    if command == "report":
        return _report(rest)
    if command == "list":
        from cnnlab.listing import list_command

        return list_command(rest)
    raise CnnlabError(f"unknown command {command!r}{suggestion(command, COMMANDS)}; see: cnnlab --help")


def _eval(args: list[str]) -> int:
    parser = CommandLineParser("cnnlab eval")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--splits", default="train,val,test")
    parser.add_argument("--tta-flip", action="store_true")
    parser.add_argument("--tta-shift", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the report here")
    ns = parser.parse_args(args)
    splits = [x for x in ns.splits.split(",") if x]
    bad = [x for x in splits if x not in ("train", "val", "test")]
    if bad or not splits or ns.tta_shift < 0:
        raise CnnlabError("cnnlab eval: --splits takes train, val and test (comma-separated); --tta-shift >= 0")
    from cnnlab.evaluation import evaluate_runs

    report = evaluate_runs(ns.runs, splits=splits, tta_flip=ns.tta_flip, tta_shift=ns.tta_shift,
                           device=ns.device, data_dir=ns.data_dir)
    if ns.json:
        from pathlib import Path

        from cnnlab.train.checkpoint import write_json

        write_json(Path(ns.json), report)
    return 0


def _report(args: list[str]) -> int:
    parser = CommandLineParser("cnnlab report")
    parser.add_argument("sweep_dir")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--test-best", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None)
    ns = parser.parse_args(args)
    from cnnlab.report import report

    report(ns.sweep_dir, plot=ns.plot, test_best=ns.test_best, device=ns.device, data_dir=ns.data_dir)
    return 0


def _lr_find(args: list[str]) -> int:
    parser = CommandLineParser("cnnlab lr-find")
    parser.add_argument("--min-lr", type=float, default=1e-6)
    parser.add_argument("--max-lr", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=200)
    flags, overrides = parser.parse_known_args(args)
    if not 0 < flags.min_lr < flags.max_lr or flags.steps < 3:
        raise CnnlabError("lr-find needs 0 < --min-lr < --max-lr and --steps >= 3")
    # The range test's parameters travel by environment: Hydra owns the command line.
    os.environ.update(CNNLAB_LR_FIND_MIN=str(flags.min_lr), CNNLAB_LR_FIND_MAX=str(flags.max_lr),
                      CNNLAB_LR_FIND_STEPS=str(flags.steps))
    overrides = ["hydra.run.dir=${paths.output_dir}/lr_find/${now:%Y-%m-%d}/${now:%H-%M-%S}-${name}", *overrides]
    return _train(overrides, task="hydra_lr_find")


def _train(overrides: list[str], task: str = "hydra_train") -> int:
    from cnnlab import hydra_app
    from cnnlab.hydra_app import translate_hydra_error

    from cnnlab.sweep import FAILED_EXIT_STATUS, last_sweep

    hydra_train = getattr(hydra_app, task)
    last_sweep.clear()

    # Hydra raises instead of printing its own (multi-line) report; we print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = ["cnnlab train", *overrides]
    try:
        hydra_train()
    except JobAborted as aborted:
        raise aborted.error from None
    except CnnlabError:
        raise
    except Exception as e:
        translated = translate_hydra_error(e)
        if translated is None and isinstance(e, OSError) and e.filename is not None:
            # e.g. an output directory that cannot be created (paths.output_dir)
            translated = CnnlabError(f"cannot use {e.filename}: {e.strerror or e}")
        if translated is None:
            raise  # not a config problem: a bug, keep the traceback
        raise translated from None
    return FAILED_EXIT_STATUS if last_sweep.get("failed") else 0
