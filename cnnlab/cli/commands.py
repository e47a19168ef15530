"""The ``cnnlab`` command: each subcommand as cnnlab.cli.table declares it. `cnnlab --help` and every
`cnnlab <command> --help` come from that table; train, tune and lr-find run through Hydra (cnnlab.cli.hydra_app),
the others through cnnlab.cli.handlers.

A user's mistake ends in one line on stderr (``error: ...``) and exit status 2;
only a bug in cnnlab shows a traceback.
"""

from __future__ import annotations

import os
import sys

from cnnlab.cli.arguments import hydra_arguments
from cnnlab.cli.table import BY_NAME, COMMANDS, Command, usage
from cnnlab.core.version import __version__
from cnnlab.core.shown import masked, printable
from cnnlab.core.errors import (CnnlabError, JobAborted, Preempted, ProcessesFailed, StorageOutage,
                                suggestion)


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
        print(usage(), end="")
        return 0
    if argv[0] == "--version":
        print(f"cnnlab {__version__}")
        return 0
    command, rest = BY_NAME.get(argv[0]), argv[1:]
    if command is None:
        raise CnnlabError(f"unknown command {argv[0]!r}{suggestion(argv[0], [c.name for c in COMMANDS])}; "
                          "see: cnnlab --help")
    if command.overrides:
        return {"train": _train_command, "tune": _tune, "lr-find": _lr_find}[command.name](command, rest)
    # Imported only to run a command: `cnnlab --help` and a mistyped command never load torch and Hydra.
    from cnnlab.cli import handlers

    return handlers.run(command, rest)


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
conf/tune/space/<optimizer>.yaml. Rerun as cnnlab tune <tune dir> to continue; start that command on
more machines (tune.storage=postgresql://...) to add workers.

settings (conf/tune/default.yaml):
"""


def _tune(command: Command, args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        from cnnlab.core.config import CONF_DIR  # cheap: the package's folder, for its settings file

        lines = (CONF_DIR / "tune" / "default.yaml").read_text().splitlines()
        print(command.parser(positional=False).format_help() + "\n" + TUNE_HELP
              + "\n".join(lines[next(i for i, line in enumerate(lines) if not line.startswith("#")):]))
        return 0
    if any(a in ("-m", "--multirun") for a in args):
        raise CnnlabError("cnnlab tune runs its own search: give the space as sweep overrides, without -m")
    # Imported only to run a tune, as in _dispatch.
    from cnnlab.service.compose import CONFIG_DIRS, search_path_restored, take_config_dirs
    from cnnlab.training.console import make_console
    from cnnlab.tuning.runner import Tune

    _, overrides = hydra_arguments(command, args)
    with search_path_restored():
        overrides = take_config_dirs(overrides)
        Tune(overrides, list(CONFIG_DIRS), make_console()).run()
    return 0


def _lr_find(command: Command, args: list[str]) -> int:
    from cnnlab.cli.hydra_app import lr_find_app  # imported only to run it, as in _dispatch

    flags, overrides = hydra_arguments(command, args)
    if not 0 < flags.min_lr < flags.max_lr or flags.steps < 3:
        raise CnnlabError("lr-find needs 0 < --min-lr < --max-lr and --steps >= 3")
    overrides = ["hydra.run.dir='${cnnlab_fresh_dir:${paths.output_dir}/lr_find/${now:%Y-%m-%d}/${now:%H-%M-%S},${name}}'",
                 *overrides]
    return _train(overrides, app=lr_find_app(flags.min_lr, flags.max_lr, flags.steps))


def _train_command(command: Command, args: list[str]) -> int:
    if {"-h", "--help"} & set(args):
        print(command.parser(positional=False).format_help())
        return _train(args)  # then Hydra's own help: the config groups
    return _train(hydra_arguments(command, args)[1])


def _train(overrides: list[str], app=None) -> int:
    """Run the Hydra application ``app`` (default: training) on ``overrides``."""
    # Imported only to run a training, as in _dispatch.
    from cnnlab.cli.hydra_app import hydra_train, last_run
    from cnnlab.core.config import want_help_group_list
    from cnnlab.core.status import DIVERGED_EXIT_STATUS, RunStatus
    from cnnlab.runtime.distributed import agree_on_run, launched_ranks
    from cnnlab.service.compose import config_errors_in_one_line, prepared_overrides
    from cnnlab.sweep.trials import FAILED_EXIT_STATUS, last_sweep

    training = app is None
    app = app or hydra_train
    if {"-h", "--help"} & set(overrides):
        want_help_group_list()
    last_sweep.clear()
    last_run.clear()
    overrides, multirun = prepared_overrides(overrides, training=training)
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
            import gc  # noqa: I001 - under torchrun only, as the imports above

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


