"""What each trial of a sweep does, and the sweep's record and last line.

- ``run_trial`` is each trial's task under ``cnnlab train -m``: it records the trial
  (``trial.json``, then ``summary.json``), turns any failure (an exception, a diverged
  loss, CUDA out of memory) into a recorded status with its reason, so the sweep goes on,
  and returns the summary (cnnlab's sweeper tells the study: COMPLETE, PRUNED or FAIL).
  Under cnnlab's sweeper it reports the monitored metric to the study after every epoch
  and stops at the epoch boundary when the pruner says so (status ``pruned``).
  Under Hydra's basic sweeper (``hydra/sweeper=basic``), ``sweep.resume=true`` skips
  trials that finished and continues unfinished ones from their last checkpoint.
- A trial's TensorBoard folder is named by what the sweep varies
  (``<sweep dir>/tensorboard/lr=0.01 wd=0.0001 #3``; ``<trial>/tensorboard`` links there).
- ``SweepSummary`` (a Hydra callback) records what the sweep searches (``sweep.json``, the
  HParams experiment) and prints the sweep's last line: how many trials failed;
  ``cnnlab train -m`` then exits with status 3 when any did.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cnnlab.core.errors import CnnlabError, PackRefused
from cnnlab.core.status import FAILED, FINISHED, RunStatus
from cnnlab.core.config import RunConfig
from cnnlab.tasks import Job, monitor_of, train, train_pack
from cnnlab.runtime.environment import environment
from cnnlab.runtime.lock import RunDirLock
from cnnlab.runtime.checkpoint import LAST, load_checkpoint
from cnnlab.core.schema import SUMMARY_RECORD, Fields, ListOf, MapOf, SchemaMismatch, check
from cnnlab.core.shown import shell_line, trial_label
from cnnlab.runtime.files import read_json, write_json
from cnnlab.training.console import member_log_name

log = logging.getLogger("cnnlab.sweep.trials")

TRIAL_FILE, SUMMARY_FILE = "trial.json", "summary.json"
FAILED_EXIT_STATUS = 3  # `cnnlab train -m` when some trials failed; 2 stays "your input is wrong"

# What the last sweep in this process ended with (set by SweepSummary, read by the CLI).
last_sweep: dict[str, Any] = {}
TENSORBOARD_DIR = "tensorboard"  # <sweep dir>/tensorboard: one folder per trial, named by its values


def _previous_attempt(sweep_dir: Path, overrides: list[str], here: Path) -> Path | None:
    """The trial directory of an earlier attempt at the same overrides (this one's own first)."""
    candidates = [here, *sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p != here)]
    for folder in candidates:
        trial = read_json(folder / TRIAL_FILE, TRIAL_RECORD, "trial record")
        if trial and trial.get("overrides") == overrides and not trial.get("continued_in"):
            return folder
    return None


def _last_history(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return load_checkpoint(run_dir / "checkpoints" / LAST).get("history", [])
    except CnnlabError:
        return []


def _tensorboard_session(tree: dict[str, Any], run_dir: Path) -> None:
    """A trial that failed before training began still gets its HParams session, marked failed."""
    from cnnlab.training.tensorboard_log import TensorBoardLogger, events_dir

    folder = events_dir(tree, run_dir)
    if folder.is_dir() and any(folder.iterdir()):
        return
    TensorBoardLogger(folder, tree, OmegaConf.to_yaml(tree)).close(RunStatus.FAILED)


def _named_tensorboard(tree: dict[str, Any], run_dir: Path, overrides: list[str], member: bool = False) -> dict[str, Any]:
    """The trial's config tree with its events going to <sweep dir>/tensorboard/<label> (paths.tensorboard), unless
    set otherwise; a PBT member's to ``member <n>`` (its values change from one interval to the next)."""
    paths = tree.get("paths") or {}
    if paths.get("tensorboard"):
        return tree
    searched = (read_json(run_dir.parent / SWEEP_FILE, SWEEP_RECORD, "sweep record") or {}).get("searched") or []
    label = f"member {run_dir.name}" if member else trial_label(overrides, searched, run_dir.name)
    return {**tree, "paths": {**paths, "tensorboard": str(run_dir.parent / TENSORBOARD_DIR / label)}}


def _pruning(trial, monitor: str):
    """Report the monitored metric to the study after each epoch; True when the pruner stops the trial."""
    def on_epoch(epoch: int, record: dict[str, Any]) -> bool:
        value = record.get(monitor)
        if value is None or not math.isfinite(value):
            return False
        trial.report(float(value), epoch)
        return trial.should_prune()
    return on_epoch


def _report_history(trial, monitor: str, history: list[dict[str, Any]]) -> None:
    """A continued trial (its worker was cut off) is a new trial of the study: it hears of the epochs its
    checkpoint already holds, so the study keeps every epoch's value (a fresh trial has no checkpoint)."""
    for record in history:
        value = record.get(monitor)
        if value is not None and math.isfinite(value):
            trial.report(float(value), int(record["epoch"]))


def run_trial(run: RunConfig, run_dir: Path, overrides: list[str], trial=None, *, console=None) -> dict[str, Any]:
    """One trial of a search (run by the run service, cnnlab.service.run.start); returns its summary and never raises
    for a failure of the trial itself. ``trial``: the study trial claimed for it (cnnlab's sweeper, a tune stage), a
    fresh trial directory or a cut-off trial's to continue; None under Hydra's basic sweeper, where
    ``sweep.resume=true`` skips a finished trial and continues an unfinished one."""
    if trial is not None:
        return _run_claimed(run, run_dir, overrides, trial, console)
    if run.sweep.resume:
        previous = _previous_attempt(run_dir.parent, overrides, run_dir)
        if previous is not None:
            done = read_json(previous / SUMMARY_FILE, SUMMARY_RECORD, "run summary")
            if done and done.get("status") in FINISHED:
                log.info("trial %s: %s already, skipped (resume)", previous.name, done["status"])
                return done
            if previous != run_dir:  # a rerun numbers its jobs anew: continue in the old folder
                with RunDirLock(previous):
                    write_json(run_dir / TRIAL_FILE, {"overrides": overrides, "continued_in": str(previous)})
                    return _attempt(run, previous, overrides, resume=True, console=console)
    return _attempt(run, run_dir, overrides, resume=run.sweep.resume, console=console)


def _run_claimed(run: RunConfig, run_dir: Path, overrides: list[str], trial, console) -> dict[str, Any]:
    """A trial claimed from a study (a sweep's or a tune stage's), fresh or continued from its checkpoint: the
    study hears of every epoch's value and may prune it at an epoch boundary. A PBT member's interval
    (its trial's "pbt" attribute) pauses at the interval's end and may change the searched keys on resume."""
    monitor = monitor_of(run.resolved)
    _report_history(trial, monitor, _last_history(run_dir))
    pbt = _pbt_interval(trial)
    return _attempt(run, run_dir, overrides, resume=True, on_epoch=_pruning(trial, monitor),
                    console=console, pause_after=pbt.get("pause_after"), retune=tuple(pbt.get("retune", ())))


def run_packed(members: list[tuple[RunConfig, Path, list[str], Any]], console_of) -> list[dict[str, Any]]:
    """Trials claimed from one study (run, trial directory, overrides, study trial), trained as one pack; each is
    recorded as a trial alone is (trial.json, its TensorBoard name, every epoch told to its study, its own
    pruning) and returns its summary. Trials that cannot be packed (PackRefused) run one after another, after one
    line that says why; a failure of the pack fails each of its trials, with its reason."""
    runs, jobs, records = [], [], []
    for run, run_dir, overrides, trial in members:
        record = {**_trial_record(overrides, run.resolved.get("plugins")), "pack": [str(m[1]) for m in members]}
        write_json(run_dir / TRIAL_FILE, record)
        pbt = _pbt_interval(trial)
        run = dataclasses.replace(run, resolved=_named_tensorboard(run.resolved, run_dir, overrides,
                                                                   pbt.get("pause_after") is not None))
        monitor = monitor_of(run.resolved)
        _report_history(trial, monitor, _last_history(run_dir))
        runs.append(run)
        records.append(record)
        jobs.append(Job(run_dir, console=console_of(run_dir), test=run.sweep.test_trials, resume=True,
                        on_epoch=_pruning(trial, monitor), environment=record["environment"],
                        pause_after=pbt.get("pause_after"), retune=tuple(pbt.get("retune", ())),
                        log_name=member_log_name(run_dir),
                        resume_hint=f"the same command with {shell_line([f'hydra.sweep.dir={run_dir.parent}', 'sweep.resume=true'])}"))
    try:
        summaries = train_pack(runs, jobs)
    except PackRefused as e:
        print(f"trials {', '.join(j.run_dir.name for j in jobs)} run one after another, not packed: {e}",
              file=sys.stderr, flush=True)
        return [_run_claimed(run, run_dir, overrides, trial, console_of(run_dir))
                for run, run_dir, overrides, trial in members]
    except Exception as e:  # noqa: BLE001 - the pack's failure is each trial's, recorded; the sweep goes on
        return [_failed(run.resolved, job.run_dir, e, record["started"]) for run, job, record in zip(runs, jobs, records)]
    for summary in summaries:
        if summary["status"] == RunStatus.DIVERGED:
            summary["error"] = f"loss diverged at step {summary.get('diverged_at_step')}"
            write_json(Path(summary["run_dir"]) / SUMMARY_FILE, summary)
    return summaries


def _pbt_interval(trial) -> dict[str, Any]:
    """A PBT member's interval (its trial's "pbt" attribute: where it pauses, the keys it may retune); {} else."""
    pbt = trial.user_attrs.get("pbt") or {}
    try:  # a study's attributes may be someone else's
        check(pbt, PBT_ATTR, "pbt")
    except SchemaMismatch as e:
        raise CnnlabError(f"trial {trial.number} of the study: {e}; the study's storage is not cnnlab's") from None
    return pbt


def _trial_record(overrides: list[str], plugins) -> dict[str, Any]:
    """trial.json: what the trial ran, when, where (the SLURM job, the GPU it was given) and with what software."""
    record = {"overrides": overrides, "started": time.time(), "pid": os.getpid()}
    if os.environ.get("SLURM_JOB_ID"):  # where it ran, when SLURM ran it
        record["slurm"] = {"job": os.environ["SLURM_JOB_ID"], "array_job": os.environ.get("SLURM_ARRAY_JOB_ID"),
                           "array_task": os.environ.get("SLURM_ARRAY_TASK_ID")}
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # the GPU its worker was given (hydra.sweeper.gpus)
        record["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    record["environment"] = environment([str(p) for p in plugins or []])
    return record


def _attempt(run: RunConfig, run_dir: Path, overrides: list[str], *, resume: bool, on_epoch=None, console=None,
             pause_after: int | None = None, retune: tuple[str, ...] = ()) -> dict[str, Any]:
    record = _trial_record(overrides, run.resolved.get("plugins"))
    write_json(run_dir / TRIAL_FILE, record)
    run = dataclasses.replace(run, resolved=_named_tensorboard(run.resolved, run_dir, overrides, pause_after is not None))
    try:
        summary = train(run, Job(
            run_dir, console=console, test=run.sweep.test_trials, resume=resume, on_epoch=on_epoch,
            resume_hint=f"the same command with {shell_line([f'hydra.sweep.dir={run_dir.parent}', 'sweep.resume=true'])}",
            pause_after=pause_after, retune=retune, environment=record["environment"]))
    except Exception as e:  # noqa: BLE001 - a trial's failure is data for the sweep, not the end of it
        return _failed(run.resolved, run_dir, e, record["started"])
    if summary["status"] == RunStatus.DIVERGED:
        summary["error"] = f"loss diverged at step {summary.get('diverged_at_step')}"
        write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def failed_trial(cfg: DictConfig, run_dir: Path, overrides: list[str], error: CnnlabError) -> dict[str, Any]:
    """A trial whose config was refused before it could start (a drawn value out of range): recorded as failed,
    with its reason, so the search goes on."""
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - the failure may be in the config itself
        tree = OmegaConf.to_container(cfg, resolve=False)
    record = _trial_record(overrides, tree.get("plugins") if isinstance(tree.get("plugins"), list) else [])
    write_json(run_dir / TRIAL_FILE, record)
    return _failed(_named_tensorboard(tree, run_dir, overrides), run_dir, error, record["started"])


def _failed(tree: dict[str, Any], run_dir: Path, e: Exception, start: float) -> dict[str, Any]:
    first_line = (str(e).strip().splitlines() or [""])[0]
    error = first_line if isinstance(e, CnnlabError) else f"{type(e).__name__}: {first_line}"
    if "out of memory" in first_line.lower():
        error = f"out of memory: {error}"
    print(f"trial {run_dir.name} failed: {error}", file=sys.stderr, flush=True)
    history = _last_history(run_dir)
    _tensorboard_session(tree, run_dir)
    summary = {"status": RunStatus.FAILED, "error": error, "run_dir": str(run_dir), "history": history,
               "best_value": None, "wall_time_s": time.time() - start}
    write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def trial_dirs(sweep_dir: Path) -> list[Path]:
    """The folders of a sweep's trials, in job order (folders that only point to another are left out)."""
    found = []
    for folder in sweep_dir.iterdir():
        trial = read_json(folder / TRIAL_FILE, TRIAL_RECORD, "trial record") if folder.is_dir() else None
        if trial is not None and not trial.get("continued_in"):
            found.append(folder)
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def sweep_status(sweep_dir: Path) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for folder in trial_dirs(sweep_dir):
        status = (read_json(folder / SUMMARY_FILE, SUMMARY_RECORD, "run summary") or {}).get("status", RunStatus.UNFINISHED)
        counts[status] = counts.get(status, 0) + 1
    failed = sum(counts.get(s, 0) for s in FAILED)
    return {"dir": str(sweep_dir), "trials": sum(counts.values()), "failed": failed, "counts": counts}


SWEEP_FILE = "sweep.json"
TRIAL_RECORD = Fields(optional={"overrides": ListOf(str), "continued_in": (str, None), "started": float, "pid": int,
                                "cuda_visible_devices": str, "pack": ListOf(str)})
PBT_ATTR = Fields(optional={"pause_after": (int, None), "retune": ListOf(str), "worker": int})
SWEEP_RECORD = Fields(optional={"searched": ListOf(str), "monitor": str, "task_overrides": ListOf(str),
                                "sweeper_params": MapOf(Any)})


def record_sweep(config: DictConfig) -> None:
    """What a multirun searches: sweep.json (for `cnnlab report` and the trials' TensorBoard names) and the
    HParams experiment of <sweep dir>/tensorboard. The first record stays (a rerun, another worker)."""
    from cnnlab.sweep.study import merged_overrides, search_space
    from cnnlab.training.tensorboard_log import sweep_experiment

    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if (sweep_dir / SWEEP_FILE).is_file():
        return
    params = config.hydra.sweeper.get("params")
    params = {str(k): str(v) for k, v in (OmegaConf.to_container(params, resolve=True) if params else {}).items()}
    task_overrides = list(config.hydra.overrides.task)  # as typed, sweep syntax included
    try:
        searched = [k.lstrip("+~") for k in search_space(merged_overrides(params, task_overrides))[0]]
    except CnnlabError:  # the basic sweeper's grammar is not all ours (e.g. glob): named by nothing then
        searched = []
    monitor = monitor_of(config)
    write_json(sweep_dir / SWEEP_FILE, {
        "task_overrides": task_overrides, "sweeper_params": params, "searched": searched,
        "sweeper": str(config.hydra.sweeper.get("_target_", "")), "monitor": monitor,
    })
    tree = OmegaConf.to_container(config, resolve=False)
    tree.pop("hydra", None)
    sweep_experiment(sweep_dir / TENSORBOARD_DIR, searched, tree, monitor)


class SweepSummary(Callback):
    """Hydra callback: records what a multirun searches (sweep.json, for `cnnlab report`), and at
    its end prints one line with the trial count and failures."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not str(config.hydra.sweeper.get("_target_", "")).startswith("hydra_plugins.cnnlab_sweeper"):
            record_sweep(config)  # cnnlab's sweeper records the sweep itself, once its settings are checked

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


def direction_of(cfg) -> str:
    """A sweep's direction: minimize a loss, maximize the rest (val/acc, image_fit's PSNR)."""
    return "minimize" if monitor_of(cfg).endswith("loss") else "maximize"
