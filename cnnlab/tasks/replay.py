"""``cnnlab train replay=<member dir>``: a PBT member trained again from scratch along its schedule.

A member's ``pbt.json`` (written by cnnlab.sweep.pbt) lists the intervals of its lineage: the epochs of
each and the values of the searched keys it trained them with (a member that copied another's checkpoint
inherits that member's earlier intervals). The replay trains each interval as the member did: paused at
the interval's end, continued from its own checkpoint with the next interval's values. With
``trainer.deterministic=true`` on CPU it ends with the member's weights, bit for bit.

The file may come from someone else: only the epochs and numeric values of the keys PBT may change are
read from it (cnnlab.training.resume.RETUNABLE); everything else is the config the user composed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.core.config import RunConfig
from cnnlab.core.errors import CnnlabError
from cnnlab.core.status import RunStatus
from cnnlab.runtime.files import read_json
from cnnlab.runtime.checkpoint import LAST, load_checkpoint, load_resumable
from cnnlab.tasks.job import Job
from cnnlab.training.resume import config_changes, retunable

SCHEDULE_FILE = "pbt.json"  # <member dir>/pbt.json


@dataclass
class Interval:
    start: int
    end: int
    values: dict[str, float | int]


def read_schedule(member: Path) -> tuple[int, list[Interval]]:
    """(the member's trainer.epochs, its intervals), checked; one line naming the file otherwise."""
    path = member / SCHEDULE_FILE
    where = f"replay={member}: {path}"
    record = read_json(path, Any, f"replay={member}: schedule")
    if record is None:
        raise CnnlabError(f"replay={member}: no {SCHEDULE_FILE} there; replay retrains a member of a "
                          "hydra.sweeper.scheduler=pbt sweep (<sweep dir>/<member>)")
    if not isinstance(record, dict) or not isinstance(record.get("schedule"), list) or not record["schedule"]:
        raise CnnlabError(f"{where} has no schedule (a non-empty list under 'schedule')")
    intervals, reached = [], 0
    for i, entry in enumerate(record["schedule"]):
        epochs = entry.get("epochs") if isinstance(entry, dict) else None
        values = entry.get("params") if isinstance(entry, dict) else None
        if not (isinstance(epochs, list) and len(epochs) == 2 and all(type(e) is int for e in epochs)
                and epochs[0] == reached < epochs[1] <= 10**6):
            raise CnnlabError(f"{where}: interval {i} must be 'epochs': [{reached}, a later epoch]")
        if not isinstance(values, dict):
            raise CnnlabError(f"{where}: interval {i} has no 'params' mapping")
        for key, value in values.items():
            if not retunable(key):
                raise CnnlabError(f"{where}: interval {i} sets {key}, which PBT does not change; replay refuses it")
            if type(value) not in (int, float) or abs(value) > 1e300 or not math.isfinite(value):
                raise CnnlabError(f"{where}: interval {i} sets {key} to {value!r}, not a number")
        intervals.append(Interval(epochs[0], epochs[1], values))
        reached = epochs[1]
    return reached, intervals


def replay(run: RunConfig, job: Job, train) -> dict[str, Any]:
    """Train ``run`` along the member's schedule in ``job.run_dir`` (a stopped replay continues), with
    ``train(run, job)`` for each interval. Returns the last interval's summary."""
    member = Path(run.replay)
    epochs, intervals = read_schedule(member)
    if run.trainer.epochs != epochs:
        raise CnnlabError(f"replay={member}: the member trained trainer.epochs={epochs}; this run has "
                          f"trainer.epochs={run.trainer.epochs}")
    keys = tuple(sorted({key for interval in intervals for key in interval.values}))
    check_same_run(run, member, keys)
    found = load_resumable(job.run_dir / "checkpoints")
    done = found[0]["epoch"] if found is not None else 0  # a stopped replay: the intervals it finished
    summary: dict[str, Any] = {}
    for interval in intervals:
        if interval.end <= done:
            continue
        last = interval is intervals[-1]
        summary = train(run.with_values(interval.values), dataclasses.replace(
            job, resume=True, retune=keys, pause_after=None if last else interval.end, test=job.test and last))
        if summary.get("status") != RunStatus.PAUSED and not last:
            return summary  # diverged, or stopped early: the member could not have gone on either
    return summary


def check_same_run(run: RunConfig, member: Path, keys: tuple[str, ...]) -> None:
    """The replay trains what the member trained: its config may differ only where a resume allows."""
    try:
        saved = load_checkpoint(member / "checkpoints" / LAST).get("config") or {}
    except CnnlabError as e:
        raise CnnlabError(f"replay={member}: {e}") from None
    changes = config_changes(saved, run.resolved, (*keys, "replay"))
    if changes:
        raise CnnlabError(f"replay={member}: this run differs from the member's in {'; '.join(changes)}")
