"""``cnnlab list <kind> [pattern]``: what a registry holds, as a rich table.

Models also show parameters and forward FLOPs for the default dataset's input
shape, or for ``--input CxHxW`` (and ``--classes N``). A pattern that matches one
entry shows that entry's options.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import yaml
from rich.console import Console, Group
from rich.table import Table

from cnnlab.training.console import make_console, titled
from cnnlab.core.errors import CnnlabError, suggestion
from cnnlab.core.plugins import load_components
from cnnlab.core.registry import DATASETS, REGISTRIES, Registry
from cnnlab.core.schema import ListOf, MapOf
from cnnlab.core.validation import describe_type
from cnnlab.runtime.files import read_json, user_cache_dir, write_json
from cnnlab.core.version import __version__

ALIASES = {"model": "models", "dataset": "datasets", "optimizer": "optimizers", "scheduler": "schedulers",
           "init": "inits", "augment": "augments", "augmentations": "augments", "augmentation": "augments",
           "task": "tasks"}


def default_dataset() -> str:
    from cnnlab.core.config import CONF_DIR

    defaults = yaml.safe_load((CONF_DIR / "train.yaml").read_text())["defaults"]
    return next(d["dataset"] for d in defaults if isinstance(d, dict) and "dataset" in d)


def parse_input(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
    if not m or m.group(2) != m.group(3) or min(map(int, m.groups())) < 1:
        raise CnnlabError(f"--input must be CxHxW with H == W, e.g. 3x224x224, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def list_command(ns, console: Console | None = None) -> int:
    """`cnnlab list` with its parsed arguments (cnnlab.cli.table), its plugins imported."""
    load_components()
    if ns.kind is None:
        raise CnnlabError(f"cnnlab list needs a kind: {', '.join(REGISTRIES)}")
    kind = ALIASES.get(ns.kind, ns.kind)
    if kind not in REGISTRIES:
        raise CnnlabError(f"unknown kind {ns.kind!r}{suggestion(ns.kind, REGISTRIES)}; kinds: {', '.join(REGISTRIES)}")
    registry = REGISTRIES[kind]
    names = registry.names(ns.pattern)
    if not names:
        raise CnnlabError(f"no {registry.kind} matches {ns.pattern!r}; see all with: cnnlab list {kind}")
    console = console or make_console()
    if kind == "models":
        console.print(_models_table(registry, names, ns.input, ns.classes, ns.arch))
    else:
        table = Table()
        for column in ("name", "family", "from", "description"):
            table.add_column(column, overflow="fold")
        for name in names:
            entry = registry.get(name)
            table.add_row(name, entry.family, entry.origin, entry.description)
        console.print(titled(f"{kind} ({len(names)} of {len(registry)})", table))
    if len(names) == 1 or kind != "models":
        console.print(_options_table(registry, names))
    return 0


def _models_table(registry: Registry, names: list[str], input_text: str | None, classes: int | None,
                  arch: str | None = None) -> Group:
    if input_text is None:
        dataset = DATASETS.get(default_dataset())
        (channels, size, _), source = dataset.meta["input_shape"], f"default dataset {dataset.name}"
        classes = classes or dataset.meta["num_classes"]
    else:
        channels, size = parse_input(input_text)
        source, classes = "--input", classes or 1000
    title = (f"models ({len(names)} of {len(registry)}): {channels}x{size}x{size} input ({source}), "
             f"{classes} classes; forward FLOPs per image")
    table = Table()
    for column, justify in (("name", "left"), ("family", "left"), ("from", "left"), ("parameters", "right"),
                            ("FLOPs", "right"), ("description", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for row in model_rows(registry, names, channels, size, classes, arch):
        table.add_row(*row)
    return titled(title, table)


def model_rows(registry: Registry, names: list[str], channels: int, size: int, classes: int,
               arch: str | None = None) -> list[tuple[str, str, str, str, str, str]]:
    """Each model's (name, family, origin, parameters, forward FLOPs per image, description) at this input, measured
    once and cached (`cnnlab list models`, and the documentation's model reference)."""
    measured = read_measured()
    before = dict(measured)
    rows = []
    for name in names:
        entry = registry.get(name)
        options = {"arch": arch} if arch is not None and "arch" in entry.options else {}
        if entry.meta.get("memorises"):  # k-NN: any size; it holds and compares its training images
            p, f = "-", f"{_count(2 * channels * size * size)} x train images"
        else:
            key = json.dumps([__version__, entry.origin, name, channels, size, classes, options])
            if key not in measured:
                from cnnlab.models.measure import measure, smallest_input  # torch's FLOP counter: only when measuring

                try:
                    params, flops = measure(name, channels, size, classes, options)
                    measured[key] = _count(params), _count(flops)
                except (CnnlabError, RuntimeError) as e:  # too small for this architecture: the smallest it takes
                    smallest = smallest_input(name, options, channels, size, classes)
                    measured[key] = "-", (f"needs >= {channels}x{smallest}x{smallest}" if smallest else
                                          str(e).split(": ")[-1][:40])
            p, f = measured[key]
        shown = f"{name} ({arch})" if arch is not None and "arch" in entry.options else name
        rows.append((shown, entry.family, entry.origin, p, f, entry.description))
    if measured != before:
        with contextlib.suppress(CnnlabError, OSError):  # a cache that cannot be written: measured again next time
            write_json(MEASURED_CACHE(), measured)
    return rows


def MEASURED_CACHE() -> Path:  # noqa: N802 - a path, read from the environment each time
    return user_cache_dir("models") / "measured.json"


def read_measured() -> dict[str, list[str]]:
    """Parameters and FLOPs measured before (building 35 models on the meta device takes seconds), keyed by
    version, model, input and options; an unreadable cache is measured anew."""
    try:
        return {k: tuple(v) for k, v in (read_json(MEASURED_CACHE(), MapOf(ListOf(str)), "models cache") or {}).items()}
    except CnnlabError:
        return {}


def _options_table(registry: Registry, names: list[str]) -> Group:
    table = Table()
    for column in ("name", "option", "type", "default"):
        table.add_column(column, overflow="fold")
    for name in names:
        for option in registry.get(name).options.values():
            default = "required" if option.required else repr(option.default)
            table.add_row(name, option.name, describe_type(option.annotation), default)
    return titled("options (set with <group>.<option>=value)", table)
