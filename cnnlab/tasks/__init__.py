"""Tasks: what a run does with its parts. ``task=<name>`` picks one from the TASKS registry
(``classify``, the default, or ``image_fit``); this is the one place that chooses. A task is called
with the run's typed config and its job: ``task(run: RunConfig, job: Job, **its options)``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cnnlab.core.config import RunConfig
from cnnlab.core.plugins import load_components
from cnnlab.core.registry import TASKS
from cnnlab.runtime.environment import environment
from cnnlab.tasks.job import Job
from cnnlab.tasks.replay import replay

__all__ = ["Job", "check_resume", "monitor_of", "pack_member_bytes", "task_name", "train", "train_pack"]


def task_name(cfg) -> str:
    return str((cfg.get("task") or {}).get("name", "classify"))


def monitor_of(cfg) -> str:
    """What a run is ranked by: the task's own measure (image_fit: PSNR, maximised), else trainer.monitor.
    ``cfg``: a composed config (a sweep's, with its hydra node), or a RunConfig's resolved tree."""
    load_components()
    name = task_name(cfg)
    own = TASKS.get(name).meta.get("monitor") if name in TASKS else None
    return own or str((cfg.get("trainer") or {}).get("monitor"))


def train(run: RunConfig, job: Job) -> dict[str, Any]:
    """Run the configured task (``replay=``: along a PBT member's schedule); returns its summary (also its run
    directory's summary.json)."""
    load_components()
    if job.environment is None:
        job = dataclasses.replace(job, environment=environment(run.resolved.get("plugins") or []))
    if run.replay is not None:
        return replay(run, job, _run_task)
    return _run_task(run, job)


def train_pack(runs: list[RunConfig], jobs: list[Job]) -> list[dict[str, Any]]:
    """Train ``runs`` as one pack (their task's ``pack`` entry); raises PackRefused when they cannot be."""
    from cnnlab.core.errors import PackRefused

    load_components()
    names = {run.components["task"].name for run in runs}
    pack = TASKS.get(next(iter(names))).meta.get("pack") if len(names) == 1 else None
    if pack is None:
        raise PackRefused(f"task={', '.join(sorted(names))} trains one run at a time")
    jobs = [job if job.environment is not None else
            dataclasses.replace(job, environment=environment(run.resolved.get("plugins") or [])) for run, job in zip(runs, jobs)]
    return pack(runs, jobs)


def pack_member_bytes(run: RunConfig) -> int | None:
    """One pack member's measured peak of CUDA memory (its task's ``pack_peak``), or None for a task that trains
    one run at a time."""
    load_components()
    measure = TASKS.get(run.components["task"].name).meta.get("pack_peak")
    return None if measure is None else measure(run)


def _run_task(run: RunConfig, job: Job) -> dict[str, Any]:
    return run.components["task"].build(run=run, job=job)


def check_resume(run: RunConfig, run_dir: Path) -> None:
    """May ``run`` continue the checkpoint in ``run_dir``? Raises CnnlabError naming what differs. Asked
    before anything is written there (Hydra would overwrite the run's .hydra/ record first)."""
    load_components()
    check = TASKS.get(run.components["task"].name).meta.get("resume_check")
    if check is not None:
        check(run, run_dir)
