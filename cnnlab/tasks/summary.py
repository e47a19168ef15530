"""A run's summary.json: what every task writes at its end, built the same way by each."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cnnlab.core.version import __version__
from cnnlab.core.config import RunConfig
from cnnlab.runtime.files import write_json
from cnnlab.tasks.job import Job

SUMMARY_FILE = "summary.json"


def run_summary(run: RunConfig, job: Job, status: str, *, wall_start: float, **fields: Any) -> dict[str, Any]:
    """The keys every run's summary has, then the task's own ``fields``; wall time up to now; where the run came
    from (cnnlab.runtime.environment, recorded when it started)."""
    return {"status": status, "task": run.components["task"].name, "name": run.name, "run_dir": str(job.run_dir),
            "version": __version__, "model": run.components["model"].name, **fields,
            "wall_time_s": time.perf_counter() - wall_start, "environment": job.environment}


def write_summary(run_dir: Path, summary: dict[str, Any], console=None, prefix: str = "") -> dict[str, Any]:
    """summary.json, and its path as the run's last line (``prefix`` before it, e.g. the status)."""
    write_json(run_dir / SUMMARY_FILE, summary)
    if console is not None:
        console.print(f"{prefix}summary: {run_dir / SUMMARY_FILE}", highlight=False)
    return summary
