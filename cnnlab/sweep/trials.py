"""Sweeps that survive failing trials and resume.

- ``run_trial`` is each trial's task under ``cnnlab train -m``: it records the trial
  (``trial.json``, then ``summary.json``), turns any failure (an exception, a diverged
  loss, CUDA out of memory) into a recorded status and the worst objective, so neither
  Hydra's basic sweeper nor the Optuna study stops, and, with ``sweep.resume=true``,
  skips trials that finished and continues unfinished ones from their last checkpoint.
- ``hydra_plugins.cnnlab_sweeper.OptunaSweeper`` (there because Hydra loads plugins
  only from that package) is Hydra's Optuna sweeper with a resume that counts the
  trials already done in the study's SQLite file.
- ``SweepSummary`` (a Hydra callback) prints the sweep's last line: how many trials
  failed; ``cnnlab train -m`` then exits with status 3 when any did.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cnnlab.core.errors import CnnlabError
from cnnlab.tasks import monitor_of, train
from cnnlab.runtime.lock import RunDirLock
from cnnlab.runtime.checkpoint import LAST, load_checkpoint, read_json, write_json

log = logging.getLogger("cnnlab.sweep.trials")

TRIAL_FILE, SUMMARY_FILE = "trial.json", "summary.json"
FINISHED = ("completed", "early_stopped", "diverged")  # a resume does not run these again
FAILED = ("diverged", "failed")
FAILED_EXIT_STATUS = 3  # `cnnlab train -m` when some trials failed; 2 stays "your input is wrong"

# What the last sweep in this process ended with (set by SweepSummary, read by the CLI).
last_sweep: dict[str, Any] = {}


def objective(summary: dict[str, Any], monitor: str) -> float:
    """The value a sweeper optimises: the trial's best ``monitor`` value; for a failed trial the
    worst value there is (-inf for accuracy, +inf for loss), so it never wins and Optuna's samplers
    learn that its region is bad (NaN would abort Hydra's Optuna sweeper)."""
    if summary.get("status") in FAILED or summary.get("best_value") is None:
        return math.inf if monitor.endswith("loss") else -math.inf
    return float(summary["best_value"])


def _previous_attempt(sweep_dir: Path, overrides: list[str], here: Path) -> Path | None:
    """The trial directory of an earlier attempt at the same overrides (this one's own first)."""
    candidates = [here, *sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p != here)]
    for folder in candidates:
        trial = read_json(folder / TRIAL_FILE)
        if trial and trial.get("overrides") == overrides and not trial.get("continued_in"):
            return folder
    return None


def _last_history(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return load_checkpoint(run_dir / "checkpoints" / LAST).get("history", [])
    except CnnlabError:
        return []


def _tensorboard_session(cfg: DictConfig, run_dir: Path) -> None:
    """A trial that failed before training began still gets its HParams session, marked failed."""
    from cnnlab.train.tensorboard_log import TensorBoardLogger

    if (run_dir / "tensorboard").exists():
        return
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - the failure may be in the config itself
        tree = OmegaConf.to_container(cfg, resolve=False)
    TensorBoardLogger(run_dir / "tensorboard", tree, OmegaConf.to_yaml(cfg)).close(status_ok=False)


def run_trial(cfg: DictConfig, run_dir: Path) -> float:
    """One trial of a sweep; never raises for a failure of the trial itself."""

    settings = cfg.get("sweep") or {}
    monitor = monitor_of(cfg)
    overrides = list(HydraConfig.get().overrides.task)
    overrides = [o for o in overrides if not o.startswith(("sweep.resume=", "hydra.sweep.dir="))]
    if settings.get("resume"):
        previous = _previous_attempt(run_dir.parent, overrides, run_dir)
        if previous is not None:
            done = read_json(previous / SUMMARY_FILE)
            if done and done.get("status") in FINISHED:
                log.info("trial %s: %s already, skipped (resume)", previous.name, done["status"])
                return objective(done, monitor)
            if previous != run_dir:  # Optuna numbers a resumed sweep's jobs anew: continue in the old folder
                with RunDirLock(previous):
                    write_json(run_dir / TRIAL_FILE, {"overrides": overrides, "continued_in": str(previous)})
                    return _attempt(cfg, previous, overrides, settings, monitor)
    return _attempt(cfg, run_dir, overrides, settings, monitor)


def _attempt(cfg: DictConfig, run_dir: Path, overrides: list[str], settings, monitor: str) -> float:
    start = time.time()
    write_json(run_dir / TRIAL_FILE, {"overrides": overrides, "started": start, "pid": os.getpid()})
    try:
        summary = train(cfg, run_dir, test=bool(settings.get("test_trials", False)),
                        resume=bool(settings.get("resume")),
                        resume_hint=f"the same command with hydra.sweep.dir={run_dir.parent} sweep.resume=true")
    except Exception as e:  # noqa: BLE001 - a trial's failure is data for the sweep, not the end of it
        first_line = (str(e).strip().splitlines() or [""])[0]
        error = first_line if isinstance(e, CnnlabError) else f"{type(e).__name__}: {first_line}"
        if "out of memory" in first_line.lower():
            error = f"out of memory: {error}"
        print(f"trial {run_dir.name} failed: {error}", file=sys.stderr, flush=True)
        history = _last_history(run_dir)
        _tensorboard_session(cfg, run_dir)
        summary = {"status": "failed", "error": error, "run_dir": str(run_dir), "history": history,
                   "best_value": None, "wall_time_s": time.time() - start}
        write_json(run_dir / SUMMARY_FILE, summary)
        return objective(summary, monitor)
    if summary["status"] == "diverged":
        summary["error"] = f"loss diverged at step {summary.get('diverged_at_step')}"
        write_json(run_dir / SUMMARY_FILE, summary)
    return objective(summary, monitor)


def trial_dirs(sweep_dir: Path) -> list[Path]:
    """The folders of a sweep's trials, in job order (folders that only point to another are left out)."""
    found = []
    for folder in sweep_dir.iterdir():
        trial = read_json(folder / TRIAL_FILE) if folder.is_dir() else None
        if trial is not None and not trial.get("continued_in"):
            found.append(folder)
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def sweep_status(sweep_dir: Path) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for folder in trial_dirs(sweep_dir):
        status = (read_json(folder / SUMMARY_FILE) or {}).get("status", "unfinished")
        counts[status] = counts.get(status, 0) + 1
    failed = sum(counts.get(s, 0) for s in FAILED)
    return {"dir": str(sweep_dir), "trials": sum(counts.values()), "failed": failed, "counts": counts}


SWEEP_FILE = "sweep.json"


class SweepSummary(Callback):
    """Hydra callback: records what a multirun searches (sweep.json, for `cnnlab report`), and at
    its end prints one line with the trial count and failures."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if (sweep_dir / SWEEP_FILE).is_file():  # a resumed sweep keeps its first record
            return
        params = config.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
        write_json(sweep_dir / SWEEP_FILE, {
            "task_overrides": list(config.hydra.overrides.task),  # as typed, sweep syntax included
            "sweeper_params": {str(k): str(v) for k, v in params.items()},
            "sweeper": str(config.hydra.sweeper.get("_target_", "")),
            "monitor": monitor_of(config),
        })

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        status = sweep_status(sweep_dir)
        last_sweep.clear()
        last_sweep.update(status)
        detail = ", ".join(f"{n} {s}" for s, n in sorted(status["counts"].items()))
        print(f"sweep: {status['trials']} trials ({detail}), {status['failed']} failed; "
              f"results: cnnlab report {sweep_dir}", flush=True)


def register_resolvers() -> None:
    """${cnnlab_direction:val/acc} -> maximize: a sweep's direction follows trainer.monitor."""
    if not OmegaConf.has_resolver("cnnlab_fresh_dir"):  # the default run directory, claimed once per run
        from cnnlab.runtime.lock import claim_fresh_dir

        OmegaConf.register_new_resolver("cnnlab_fresh_dir", claim_fresh_dir, use_cache=True)
    if not OmegaConf.has_resolver("cnnlab_direction"):
        OmegaConf.register_new_resolver("cnnlab_direction",
                                        lambda monitor: "minimize" if str(monitor).endswith("loss") else "maximize")
