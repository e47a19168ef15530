"""The `cnnlab` command line, declared once: every subcommand with its own arguments, the shared argument
groups it takes, its help and one example. `cnnlab --help`, each `cnnlab <command> --help` (parser) and the
CLI reference page (reference) are all made from this table; cnnlab.cli.commands runs what it parses.

One grammar across commands:
- runs are positional, RUN ...: a run, trial, sweep or tune directory, or a checkpoint file where a checkpoint
  makes sense; a sweep or tune directory stands for its trials where a command works on runs;
- one flag per meaning: --plugin, --data-dir, --device, and --json/--csv printing to stdout, --out FILE writing;
- train, tune and lr-find take the run's Hydra overrides (key=value) after their flags, and the shared flags
  as the overrides they stand for (--device cuda: trainer.device=cuda).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from cnnlab.core.errors import CommandLineParser


@dataclass(frozen=True)
class Arg:
    """One argparse argument: its flags (or a positional's name) and add_argument's keywords."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def help(self) -> str:
        return self.options.get("help", "")


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


# The shared groups: each meaning has one flag, in every command that takes it.
PLUGINS = arg("--plugin", action="append", default=[], metavar="MODULE",
              help="import this module first (a plugin that registers models, datasets, ...); repeatable")
DATA_DIR = arg("--data-dir", default=None, metavar="DIR", help="where the dataset is, when not where the run found it")
DEVICE = arg("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N, mps")
JSON = arg("--json", action="store_true", help="JSON on stdout (with --out FILE: to FILE)")
CSV = arg("--csv", action="store_true", help="CSV on stdout (with --out FILE: to FILE)")
OUT = arg("--out", default=None, metavar="FILE", help="write the --json or --csv output (or the file's suffix's) to FILE")
GROUPS: dict[str, tuple[Arg, ...]] = {
    "plugins": (PLUGINS,),
    "data": (DATA_DIR,),
    "device": (DEVICE,),
    "output": (JSON, CSV, OUT),
}
# What the shared flags stand for in a command that takes Hydra overrides.
AS_OVERRIDES = {"plugin": "plugins", "data_dir": "paths.data_dir", "device": "trainer.device"}


@dataclass(frozen=True)
class Command:
    name: str
    summary: str  # one line: the top-level usage and the reference
    example: str
    args: tuple[Arg, ...] = ()
    groups: tuple[str, ...] = ()
    runs: str | None = None  # the positional RUN's nargs ("1": exactly one), where the command takes runs
    runs_help: str = ""
    overrides: bool = False  # the rest of the line is the run's Hydra overrides (key=value)
    description: str = ""  # more than the summary, for --help and the reference

    def parser(self, positional: bool = True) -> CommandLineParser:
        """The command's argparse parser; ``positional=False``: its flags only (train, tune and lr-find find their
        RUN among the Hydra overrides themselves)."""
        parser = CommandLineParser(f"cnnlab {self.name}", self.summary + (f". {self.description}" if self.description else ""),
                                   epilog=f"example: {self.example}")
        if self.overrides and not positional:
            parser.usage = f"cnnlab {self.name} [flags] [RUN] [key=value ...]"
        if self.runs is not None and positional:
            one = self.runs == "1"  # exactly one: the value itself, not a list
            parser.add_argument("runs", **({} if one else {"nargs": self.runs}), metavar="RUN", help=self.runs_help)
        for a in self.args:
            parser.add_argument(*a.flags, **a.options)
        for group in self.groups:
            section = parser.add_argument_group(f"shared: {group}")
            exclusive = section.add_mutually_exclusive_group() if group == "output" else None
            for a in GROUPS[group]:
                (exclusive if exclusive is not None and a.flags[0] in ("--json", "--csv") else section).add_argument(
                    *a.flags, **a.options)
        return parser


HYDRA_HELP = "the run's Hydra overrides, e.g. model=lenet5 optimizer.lr=0.1 (cnnlab train --help lists the groups)"

COMMANDS: tuple[Command, ...] = (
    Command("train", "train a model: choose its parts and options with Hydra overrides; -m sweeps them",
            "cnnlab train model=lenet5 optimizer=sgd optimizer.lr=0.1 trainer.epochs=20",
            runs="?", runs_help="a stopped run's directory: continue it exactly where it stopped",
            groups=("plugins", "data", "device"), overrides=True,
            description="-m / --multirun sweeps comma-separated values or ranges (optimizer.lr=0.01,0.1,1); --cfg job "
                        "prints the resolved config. SIGTERM, SIGINT and SIGUSR1 checkpoint and exit with status 75; a "
                        "run whose loss diverged exits with 4. Several GPUs: trainer.devices=N, or torchrun -m cnnlab train"),
    Command("tune", "the lectures' whole search under a budget of epochs: gate, coarse, refine, final, test once",
            "cnnlab tune tune.budget_epochs=60 optimizer=sgd",
            runs="?", runs_help="a tune directory: continue it, or add a worker to it",
            groups=("plugins", "data", "device"), overrides=True,
            description="Its settings are tune.<key>=value (cnnlab tune --help lists them); the space is the run's "
                        "sweep overrides or conf/tune/space/<optimizer>.yaml"),
    Command("lr-find", "the LR range test: the loss against a growing learning rate, and a suggested optimizer.lr",
            "cnnlab lr-find model=lenet5 optimizer=sgd",
            args=(arg("--min-lr", type=float, default=1e-6, help="the first learning rate (default 1e-6)"),
                  arg("--max-lr", type=float, default=10.0, help="the last learning rate (default 10)"),
                  arg("--steps", type=int, default=200, help="steps from --min-lr to --max-lr (default 200)")),
            groups=("plugins", "data", "device"), overrides=True),
    Command("eval", "score a run's selected checkpoint, or an ensemble of runs (softmax averaged), with optional TTA",
            "cnnlab eval outputs/runs/2026-12-08/10-00-00-lenet5 --tta-flip",
            runs="+", runs_help="runs or checkpoint files; several, or a sweep: an ensemble",
            args=(arg("--splits", default="train,val,test", help="comma-separated, from train, val, test (default: all)"),
                  arg("--tta-flip", action="store_true", help="also average over each image's mirror image"),
                  arg("--tta-shift", type=int, default=0, metavar="N", help="also over 4 copies shifted by N pixels"),
                  arg("--predictions", default=None, metavar="FILE",
                      help="also a CSV of every image scored: split, index, file, label, predicted, prob")),
            groups=("plugins", "data", "device", "output")),
    Command("predict", "class names and top-k probabilities for image files, folders or globs",
            "cnnlab predict outputs/runs/2026-12-08/10-00-00-lenet5 photos/ --top-k 3",
            args=(arg("model", metavar="RUN", help="a run directory, a checkpoint, or a file cnnlab export wrote"),
                  arg("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs"),
                  arg("--top-k", type=int, default=3, metavar="K", help="classes shown per image (default 3)"),
                  arg("--tta-flip", action="store_true", help="also average over each image's mirror image"),
                  arg("--weights", default="best", choices=["best", "last"], help="a run's selected (best) or newest"),
                  arg("--batch-size", type=int, default=64, metavar="N"),
                  arg("--workers", type=int, default=2, metavar="N", help="processes decoding images (0: none)")),
            groups=("plugins", "device", "output")),
    Command("report", "every trial of a sweep ranked on validation, with the coarse-to-fine search to run next",
            "cnnlab report outputs/sweeps/2026-12-08/10-00-00 --plot",
            runs="1", runs_help="a sweep directory",
            args=(arg("--plot", nargs="?", const="", default=None, metavar="FILE",
                      help="the metric against each searched option as a PNG (default: SWEEP/report.png)"),
                  arg("--test-best", action="store_true", help="score only the chosen trial on the test split, once")),
            groups=("plugins", "data", "device"),
            description="Also writes report.csv and report.md in the sweep directory"),
    Command("runs", "every run and trial under the output directory (or RUN ...), one row each",
            "cnnlab runs --where 'val/acc>=0.9' --sort=-val/acc --limit 10",
            runs="*", runs_help="folders to look in (default: the output directory, paths.output_dir)",
            args=(arg("--where", action="append", default=[], metavar="FILTER",
                      help="KEY=PATTERN (model=resnet*, status!=failed) or METRIC>=NUMBER (val/acc>=0.9; also >, <, <=, "
                           "=, !=); repeatable, all must hold"),
                  arg("--sort", default="-date", metavar="[-]KEY",
                      help="a field or config key; -KEY: descending (default: -date, newest first)"),
                  arg("--limit", type=int, default=None, metavar="N", help="at most N rows")),
            groups=("output",)),
    Command("compare", "runs side by side: what differs, each metric's change from the first, the curves",
            "cnnlab compare RUN_A RUN_B --plot",
            runs="+", runs_help="two or more runs, or a sweep: its trials",
            args=(arg("--all", action="store_true", help="also the keys that are equal"),
                  arg("--plot", nargs="?", const="compare.png", default=None, metavar="FILE",
                      help="the runs' training and validation curves as one PNG (default: compare.png)"),
                  arg("--tensorboard", action="store_true", help="print the command that opens these runs in TensorBoard"))),
    Command("export", "the selected model as ONNX, TorchScript or safetensors, checked against torch on validation "
                      "images",
            "cnnlab export outputs/runs/2026-12-08/10-00-00-lenet5 --format onnx",
            runs="1", runs_help="a run directory or one of its checkpoint files",
            args=(arg("--format", required=True, choices=["onnx", "torchscript", "safetensors"],
                      help="onnx or torchscript: a graph an app runs; safetensors: the weights, with the model and "
                           "preprocessing in FILE.json (model.pretrained, cnnlab.load and predict read it)"),
                  arg("--out", default=None, metavar="FILE",
                      help="the exported file (default: RUN/model.onnx, RUN/model.pt or RUN/model.safetensors)"),
                  arg("--bake-preprocessing", action="store_true",
                      help="the graph takes images in [0, 1] and applies the run's preprocessing itself"),
                  arg("--weights", default="best", choices=["best", "last"], help="the selected (best) or newest")),
            groups=("plugins", "data", "device")),
    Command("viz", "a run's pictures as PNGs in RUN/viz/: filters, feature maps, augmentations, mistakes, confusion",
            "cnnlab viz outputs/runs/2026-12-08/10-00-00-lenet5",
            runs="1", runs_help="a run directory"),
    Command("list", "what a registry holds, with each entry's options; models with parameters and FLOPs",
            "cnnlab list models 'res*'",
            args=(arg("kind", nargs="?", help="models, datasets, optimizers, schedulers, inits, augments, tasks, samplers, "
                                               "pruners"),
                  arg("pattern", nargs="?", default="*", help="shell-style wildcards, e.g. 'res*' (default: all)"),
                  arg("--input", default=None, metavar="CxHxW", help="models: count FLOPs at this input shape"),
                  arg("--classes", type=int, default=None, help="models: the number of classes to count with"),
                  arg("--arch", default=None, help="models: the architecture model=timm or model=tv counts")),
            groups=("plugins",)),
)
BY_NAME = {c.name: c for c in COMMANDS}


def usage() -> str:
    """`cnnlab --help`: every command, its summary and one example."""
    width = max(len(c.name) for c in COMMANDS) + 2
    lines = ["usage: cnnlab <command> [args]   (cnnlab <command> --help: its arguments)", "", "commands:"]
    for c in COMMANDS:
        lines += [f"  {c.name:<{width}}{c.summary}", f"  {'':<{width}}  {c.example}"]
    lines += ["", "shared flags, the same in every command that takes them:"]
    lines += [f"  {a.flags[0]:<{width + 8}}{a.help}" for group in GROUPS.values() for a in group]
    lines += ["  --version" + " " * (width - 1) + "print the version"]
    return "\n".join(lines) + "\n"


def commands_table() -> str:
    """The README's table of commands: each with what it does and one example."""
    rows = [f"| `{c.name}` | {c.summary} | `{c.example}` |" for c in COMMANDS]
    return "\n".join(["| command | what it does | example |", "|---|---|---|", *rows]) + "\n"


def reference() -> str:
    """The CLI reference page (Markdown), from the table: each command's usage, arguments and example. Usage lines
    are wrapped at 100 columns whatever the terminal (argparse reads COLUMNS), so the page is the same everywhere."""
    import os

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return _reference()
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def _reference() -> str:
    out = ["# Command-line reference", "", "Made from `cnnlab/cli/table.py` by `scripts/docs_reference.py`; do not edit.",
           "", "| command | what it does |", "|---|---|"]
    out += [f"| [`{c.name}`](#{c.name}) | {c.summary} |" for c in COMMANDS]
    out += ["", "## Shared flags", "", "Each meaning has one flag, in every command that takes it:", "",
            "| flag | meaning |", "|---|---|"]
    out += [f"| `{a.flags[0]}` | {a.help} |" for group in GROUPS.values() for a in group]
    for c in COMMANDS:
        parser = c.parser()
        out += ["", f"## {c.name}", "", c.summary + "." + (f" {c.description}." if c.description else ""), "",
                "```text", parser.format_usage().strip(), "```", "", "| argument | meaning |", "|---|---|"]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = ", ".join(action.option_strings) or action.metavar or action.dest
            out.append(f"| `{name}` | {(action.help or '').replace('|', '/')} |")
        if c.overrides:
            out.append(f"| `key=value ...` | {HYDRA_HELP} |")
        if c.groups:
            out += ["", f"Shared groups: {', '.join(c.groups)}."]
        out += ["", "Example:", "", "```bash", c.example, "```"]
    return "\n".join(out) + "\n"
