"""The arguments of train, tune and lr-find: their flags from the table (cnnlab.cli.table), the shared ones turned
into the Hydra overrides they stand for, a positional RUN into the run to continue, and the old spellings told."""

from __future__ import annotations

import sys
from argparse import Namespace

from cnnlab.cli.table import AS_OVERRIDES, Command
from cnnlab.core.errors import CnnlabError

# Hydra's own flags that take a value: the token after one is never a RUN.
HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                     "-cd", "--experimental-rerun"}
# The spellings of one release ago, each with its new one (told once, in one line, and still honoured).
OLD_RUN_KEYS = {"train": "resume", "tune": "tune.dir"}


def deprecated(old: str, new: str) -> None:
    print(f"warning: {old} is deprecated and goes in the next release: use {new}", file=sys.stderr)


def hydra_arguments(command: Command, args: list[str]) -> tuple[Namespace, list[str]]:
    """train, tune and lr-find: (their own flags, the Hydra overrides): the shared flags become the overrides they
    stand for (--device cuda: trainer.device=cuda), and a positional RUN the run (or tune) to continue."""
    ns, rest = command.parser(positional=False).parse_known_args(args)
    overrides, run, value_next = [], None, False
    for token in rest:
        if value_next or token in HYDRA_VALUE_FLAGS or token.startswith(("-", "~", "+")) or "=" in token:
            value_next = token in HYDRA_VALUE_FLAGS
            overrides.append(token)
        elif run is None and command.runs is not None:
            run = token
        else:
            raise CnnlabError(f"cnnlab {command.name}: {token!r} is neither key=value nor a flag"
                              + (f" (one RUN only; {run!r} is the first)" if run is not None else ""))
    key = OLD_RUN_KEYS.get(command.name)
    if key is not None:
        typed = [o for o in overrides if o.startswith(f"{key}=")]
        if typed and run is not None:
            raise CnnlabError(f"cnnlab {command.name}: give the run once: {run} or {typed[0]}")
        for o in typed:
            deprecated(o, f"cnnlab {command.name} {o.split('=', 1)[1]}")
        if run is not None:
            overrides.insert(0, f"{key}={run}")
    for dest, key in AS_OVERRIDES.items():
        value = getattr(ns, dest, None)
        if dest == "plugin":
            if value:
                overrides.append(f"plugins=[{','.join(value)}]")
        elif value is not None and (dest != "device" or any(a.startswith("--device") for a in args)):
            overrides.append(f"{key}={value}")
    return ns, overrides


def renamed(command: Command, args: list[str]) -> list[str]:
    """``args`` with the old spellings of the other commands in their new form, each told once: eval's
    --json FILE (now --json --out FILE)."""
    out, i = [], 0
    while i < len(args):
        following = args[i + 1] if i + 1 < len(args) else ""
        if command.name == "eval" and args[i] == "--json" and following.lower().endswith(".json"):
            deprecated(f"cnnlab eval --json {following}", f"cnnlab eval --json --out {following}")
            out += ["--json", "--out", following]
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out
