"""What a run shows in the terminal (rich) and writes to its log file.

On a terminal: a live progress bar per epoch (step, loss, images/s, ETA).
Otherwise (CI logs, redirected output): plain lines every log_every_n_steps.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from cnnlab.core.shown import printable

log = logging.getLogger("cnnlab")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


# Where output is not a terminal (a log file, a pipe, CI), nothing is wrapped: each record stays one
# line however long, and tables take the width they need.
UNWRAPPED_WIDTH = 1000


class PlainConsole(Console):
    """rich's Console for text that may come from someone else's files (run names, overrides, paths): no markup
    (``[evilplug]`` is shown, not taken for a style) and control characters shown escaped. cnnlab's own styling
    is given as ``style=`` or a ``Text``."""

    def __init__(self, **options: Any):
        super().__init__(**{"markup": False, **options})

    def render_str(self, text: str, **options: Any) -> Text:
        return super().render_str(printable(text), **options)


def make_console(**options: Any) -> Console:
    """A PlainConsole that wraps lines only on a terminal."""
    console = PlainConsole(**options)
    if console.is_terminal or "width" in options:
        return console
    return PlainConsole(soft_wrap=True, width=UNWRAPPED_WIDTH, **options)


def print_warning(message: str) -> None:
    """A warning where no run reporter is at hand (eval, export, predict): one line on stderr, and the log."""
    print(f"warning: {printable(message)}", file=sys.stderr, flush=True)
    if log.hasHandlers():  # a run's train.log; not Python's last-resort handler, which would print it again
        log.warning(message)


def titled(title: str, table: Table) -> Group:
    """A table under its title, the title a line of its own: never squeezed into the table's width."""
    return Group(Text(title, style="italic"), table)


def report_table(title: str, report: dict[str, dict[str, float | None]]) -> Group:
    """The homework's report: loss, error, accuracy and top-5 per split."""
    table = Table()
    for column in ("split", "loss", "error", "accuracy", "top-5"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for split, m in report.items():
        table.add_row(split, f"{m['loss']:.4f}", _pct(m["error"]), _pct(m["acc"]), _pct(m.get("top5")))
    return titled(title, table)


def member_log_name(run_dir) -> str:
    """The logger of one member of a pack: its lines go to its own train.log only (every member's handler hangs on
    its own logger, not on cnnlab's, which all members share)."""
    return f"cnnlab.member.{abs(hash(str(run_dir)))}"


class ConsoleReporter:
    def __init__(self, console: Console | None = None, log_name: str = "cnnlab"):
        self.console = console or make_console()
        self.log = logging.getLogger(log_name)
        self.live = self.console.is_terminal
        self.progress: Progress | None = None

    def start(self, info: dict[str, Any]) -> None:
        body = Text()
        for k, v in info.items():
            body.append(f"{k}", style="bold").append(f": {printable(v)}\n")
        body.rstrip()
        self.console.print(Panel(body, title="cnnlab train", expand=False))
        self.log.info("start: %s", "; ".join(f"{k}={v}" for k, v in info.items()))

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        """``done``: batches of this epoch trained before a resume."""
        self.epoch, self.epochs, self.steps, self.done = epoch, epochs, steps, done
        self.images, self.started, self.loss = 0, time.perf_counter(), float("nan")
        if self.live:
            self.progress = Progress(
                TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:,.0f} img/s"),
                TimeRemainingColumn(), console=self.console, transient=True,
            )
            self.task = self.progress.add_task("train", total=steps, completed=done, loss=float("nan"), ips=0.0)
            self.progress.start()

    @contextlib.contextmanager
    def scoring(self, what: str, loader, limit: int | None) -> Iterator[Callable[[], None]]:
        """A progress for a long evaluation (k-NN compares every image with every remembered one) of ``loader``'s
        batches, at most ``limit``: yields ``tick()``, called once per batch. Printed every 10% when not a terminal."""
        batches = min(len(loader), limit or len(loader))
        started, done = time.perf_counter(), 0
        progress = None
        if self.live:
            progress = Progress(TextColumn(f"scoring {what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=self.console, transient=True)
            task = progress.add_task(what, total=batches)
            progress.start()

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress.advance(task)
            elif done % max(1, batches // 10) == 0 or done == batches:
                self.console.print(f"scoring {what}: {done}/{batches} batches, {time.perf_counter() - started:.0f} s",
                                   highlight=False)

        try:
            yield tick
        finally:
            if progress is not None:
                progress.stop()

    def advance(self, images: int) -> None:
        self.done += 1
        self.images += images
        if self.progress is not None:
            self.progress.advance(self.task)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        ips = self.images / max(time.perf_counter() - self.started, 1e-9)
        if self.progress is not None:
            self.progress.update(self.task, loss=loss, ips=ips)
        else:
            eta = (self.steps - self.done) * (time.perf_counter() - self.started) / max(self.done, 1)
            self.console.print(
                f"epoch {self.epoch}/{self.epochs} step {self.done}/{self.steps} loss {loss:.4f} "
                f"lr {lr:.3g} {ips:,.0f} img/s eta {eta:.0f}s", highlight=False,
            )

    def warn(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(Text("warning:", style="yellow").append(f" {printable(message)}"), highlight=False)
        else:
            self.console.print(f"warning: {message}", highlight=False, markup=False)
        self.log.warning(message)

    def epoch_end(self, record: dict[str, Any], improved: bool) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        trained = record["train/loss"] is not None  # None: a k-NN remembered, it took no steps
        train = f"loss {record['train/loss']:.4f} acc {_pct(record['train/acc'])}" if trained else "remembered"
        line = (
            f"epoch {record['epoch']}/{self.epochs}  train {train}  "
            f"val loss {record['val/loss']:.4f} acc {_pct(record['val/acc'])}  lr {record['lr']:.3g}  "
            f"{record['train_time_s']:.1f}s {record['images_per_s']:,.0f} img/s" + ("  *best" if improved else "")
        )
        self.console.print(line, highlight=False)
        self.log.info(line)

    def finish(self, selected: dict[str, dict[str, float]], best_epoch: int | None, monitor: str) -> None:
        for split, m in selected.items():
            self.log.info("%s: loss %.4f error %s accuracy %s", split, m["loss"], _pct(m["error"]), _pct(m["acc"]))
        self.console.print(report_table(f"selected model: epoch {best_epoch} (best {monitor})", selected))
