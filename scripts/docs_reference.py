"""The documentation's generated parts, from the code: docs/reference/cli.md and the README's table of commands
from the CLI's table (cnnlab/cli/table.py), docs/reference/config.md from the registries and the settings'
dataclasses, docs/reference/models.md from `cnnlab list models`' counts. `--check` exits 1 when a checked-in page differs from what the code makes now (CI).

    python scripts/docs_reference.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cnnlab.cli.table import commands_table, reference  # noqa: E402

GENERATED = "Made from the code by `scripts/docs_reference.py`; do not edit."


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def config_reference() -> str:
    """docs/reference/config.md: the run's settings sections (trainer, data, finetune, viz, sweep) from their
    dataclasses, then every config group's entries with their options (type, range, default) from the registries."""
    import dataclasses
    import inspect
    import re
    import typing

    from cnnlab.core import config as run_config
    from cnnlab.core.plugins import load_components
    from cnnlab.core.registry import REGISTRIES
    from cnnlab.core.validation import describe_type

    load_components()
    out = ["# Configuration reference", "", GENERATED, "",
           "Set a settings key with `<section>.<key>=value`; choose a group's entry with `<group>=<entry>` and set its "
           "options with `<group>.<option>=value`. `cnnlab list <kind> [pattern]` shows the same from the command "
           "line.", "", "## Settings", ""]
    sections = {"trainer": run_config.TrainerSettings, "data": run_config.DataSettings,
                "finetune": run_config.FinetuneSettings, "viz": run_config.VizSettings, "sweep": run_config.SweepSettings}
    for section, cls in sections.items():
        comments = {m.group(1): m.group(2) for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls),
                                                                  re.M)}
        comments = {**yaml_comments(section), **comments}
        hints = typing.get_type_hints(cls, include_extras=True)
        out += [f"### {section}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{section}.{f.name}` | {cell(describe_type(hints[f.name]))} | `{f.default!r}` | "
                f"{cell(comments.get(f.name, ''))} |" for f in dataclasses.fields(cls)]
        out.append("")
    for kind, registry in REGISTRIES.items():
        out += [f"## {kind}", ""]
        for name in registry.names("*"):
            entry = registry.get(name)
            family = f" Family: {entry.family}." if entry.family else ""
            out += [f"### {registry.kind} {name}", "", cell(entry.description) + family, ""]
            if entry.options:
                out += ["| option | type | default |", "|---|---|---|"]
                out += [f"| `{o.name}` | {cell(describe_type(o.annotation))} | "
                        f"{'required' if o.required else '`' + cell(repr(o.default)) + '`'} |"
                        for o in entry.options.values()]
                out.append("")
    return "\n".join(out).rstrip() + "\n"


def yaml_comments(section: str) -> dict[str, str]:
    """The comments of a settings section's keys in its YAML (conf/trainer/default.yaml, or the section of
    conf/train.yaml), continuation lines joined: the meaning where the dataclass has no comment."""
    import re

    conf = REPO / "conf"
    lines = (conf / "trainer" / "default.yaml").read_text().splitlines() if section == "trainer" else []
    if not lines:
        text = (conf / "train.yaml").read_text().splitlines()
        start = next((i for i, line in enumerate(text) if line.startswith(f"{section}:")), None)
        if start is None:
            return {}
        for line in text[start + 1:]:
            if line and not line.startswith(" "):
                break
            lines.append(line[2:])
    found, last = {}, None
    for line in lines:
        if m := re.match(r"^(\w+):[^#]*#\s*(.*)$", line):
            last, found[m.group(1)] = m.group(1), m.group(2)
        elif (m := re.match(r"^\s+#\s*(.*)$", line)) and last:
            found[last] += " " + m.group(1)
        elif re.match(r"^\w+:", line):
            last = None
    return found


def models_reference() -> str:
    """docs/reference/models.md: every model with its parameters and forward FLOPs at the default dataset's input,
    as `cnnlab list models` counts them."""
    from cnnlab.cli.listing import default_dataset, model_rows
    from cnnlab.core.plugins import load_components
    from cnnlab.core.registry import DATASETS, MODELS

    load_components()
    dataset = DATASETS.get(default_dataset())
    (channels, size, _), classes = dataset.meta["input_shape"], dataset.meta["num_classes"]
    out = ["# Models", "", GENERATED, "",
           f"Parameters and forward FLOPs per image at the default dataset's input ({dataset.name}: "
           f"{channels}x{size}x{size}, {classes} classes), as `cnnlab list models` counts them; "
           "`cnnlab list models NAME --input CxHxW` counts at another shape. Each model's options are in the "
           "[configuration reference](config.md).", "",
           "| model | family | parameters | FLOPs | what it is |", "|---|---|---|---|---|"]
    out += [f"| `{name}` | {family} | {params} | {flops} | {cell(description)} |"
            for name, family, _, params, flops, description in model_rows(MODELS, MODELS.names("*"), channels, size,
                                                                          classes)]
    return "\n".join(out) + "\n"

START, END = "<!-- commands:start -->\n", "<!-- commands:end -->"


def readme() -> str:
    """README.md with its table of commands (between its markers) made anew."""
    text = (REPO / "README.md").read_text()
    head, rest = text.split(START, 1)
    return head + START + commands_table() + END + rest.split(END, 1)[1]


PAGES = {REPO / "docs" / "reference" / "cli.md": reference, REPO / "docs" / "reference" / "config.md": config_reference,
         REPO / "docs" / "reference" / "models.md": models_reference, REPO / "README.md": readme}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    ns = parser.parse_args()
    stale = []
    for path, make in PAGES.items():
        text = make()
        if ns.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    for path in stale:
        print(f"{path.relative_to(REPO)} is out of date: run python scripts/docs_reference.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
