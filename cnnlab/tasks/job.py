"""How a run is carried out, beside what it is (cnnlab.core.config.RunConfig)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console


@dataclass
class Job:
    run_dir: Path
    console: Console | None = None  # None: a console of its own (cnnlab.training.console.make_console)
    test: bool = True  # score the selected model on the test split, once; a sweep's trials leave it to the report
    resume: bool = False  # continue from run_dir's newest good checkpoint when there is one
    resume_hint: str | None = None  # the command that continues the run, for the line a stop prints
    on_epoch: Callable[[int, dict[str, Any]], bool] | None = None  # after each epoch; True stops it (a sweep's pruner)
    pause_after: int | None = None  # stop after this epoch with status paused, to be continued (a PBT interval)
    retune: tuple[str, ...] = ()  # keys a resume may change beyond the usual (PBT's), applied to the loaded optimizer
    environment: dict[str, Any] | None = None  # where the run came from (cnnlab.runtime.environment), at its start
    log_name: str = "cnnlab"  # the logger its lines go to (a pack's member: its own, so its train.log holds its own)
