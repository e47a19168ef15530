"""Tasks: what a run does with its parts. ``task=<name>`` picks one from the TASKS registry
(``classify``, the default, or ``image_fit``); this is the one place that chooses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnlab.core.config import to_container
from cnnlab.core.plugins import load_components
from cnnlab.core.registry import TASKS


def task_name(cfg) -> str:
    return str((cfg.get("task") or {}).get("name", "classify"))


def monitor_of(cfg) -> str:
    """What a run is ranked by: the task's own measure (image_fit: PSNR, maximised), else trainer.monitor."""
    load_components()
    name = task_name(cfg)
    own = TASKS.get(name).meta.get("monitor") if name in TASKS else None
    return own or str(cfg.trainer.monitor)


def train(cfg, run_dir: Path, console=None, *, test: bool = True, resume: bool = False,
          resume_hint: str | None = None, on_epoch=None) -> dict[str, Any]:
    """Run the configured task into ``run_dir``; returns its summary. ``test=False`` (a sweep's
    trials) leaves the test split unscored; ``resume``: continue from the run directory's newest
    good checkpoint when there is one; ``on_epoch(epoch, record)`` returning True stops the run
    there with status ``pruned`` (a sweep's pruner)."""
    load_components()
    options = {k: v for k, v in (to_container(cfg).get("task") or {}).items() if k != "name"}
    return TASKS.build(task_name(cfg), options, prefix="task", cfg=cfg, run_dir=run_dir, console=console,
                       test=test, resume=resume, resume_hint=resume_hint, on_epoch=on_epoch)
