"""``cnnlab list <kind> [pattern]``: what a registry holds, as a rich table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from cnnlab.errors import CnnlabError, suggestion
from cnnlab.registry import REGISTRIES, load_components

ALIASES = {"model": "models", "dataset": "datasets", "optimizer": "optimizers", "scheduler": "schedulers",
           "init": "inits", "augment": "augments", "augmentations": "augments", "augmentation": "augments"}


def list_command(args: list[str], console: Console | None = None) -> int:
    load_components()
    if not args:
        raise CnnlabError(f"cnnlab list needs a kind: {', '.join(REGISTRIES)}")
    if len(args) > 2:
        raise CnnlabError("usage: cnnlab list <kind> [pattern]")
    kind = ALIASES.get(args[0], args[0])
    if kind not in REGISTRIES:
        raise CnnlabError(f"unknown kind {args[0]!r}{suggestion(args[0], REGISTRIES)}; kinds: {', '.join(REGISTRIES)}")
    registry = REGISTRIES[kind]
    pattern = args[1] if len(args) == 2 else "*"
    names = registry.names(pattern)
    if not names:
        raise CnnlabError(f"no {registry.kind} matches {pattern!r}; see all with: cnnlab list {kind}")
    table = Table(title=f"{kind} ({len(names)} of {len(registry)})", show_lines=False)
    for column in ("name", "family", "description", "options"):
        table.add_column(column, overflow="fold")
    for name in names:
        entry = registry.get(name)
        options = "\n".join(o.describe() for o in entry.options.values())
        table.add_row(name, entry.family, entry.description, options)
    (console or Console()).print(table)
    return 0
