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
from cnnlab.errors import CnnlabError, JobAborted, suggestion

USAGE = """usage: cnnlab <command> [args]

commands:
  train [key=value ...]     train; choose parts and set options with Hydra overrides, e.g.
                            cnnlab train model=lenet5 optimizer=sgd optimizer.lr=0.1 trainer.epochs=20
                            -m / --multirun sweeps comma-separated values: optimizer.lr=0.01,0.1,1
                            --cfg job prints the resolved config; --help lists the config groups
  list <kind> [pattern]     what a registry holds; kinds: models, datasets, optimizers,
                            schedulers, inits, augments; pattern is shell-style, e.g. 'res*'
  --version                 print the version
"""

COMMANDS = ("train", "list")


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
    if command == "list":
        from cnnlab.listing import list_command

        return list_command(rest)
    raise CnnlabError(f"unknown command {command!r}{suggestion(command, COMMANDS)}; see: cnnlab --help")


def _train(overrides: list[str]) -> int:
    from cnnlab.hydra_app import hydra_train, translate_hydra_error

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
    return 0
