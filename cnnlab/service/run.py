"""The run service: every training cnnlab starts goes this one road, whoever asks for it (`cnnlab train`, a sweep's
trial in this process or in a SLURM job, `cnnlab tune`, cnnlab.train).

    composed config  ->  writer_of (the run directory's lock, .hydra/ records)  ->  RunConfig, checked once
                     ->  a run (or N DDP processes), or a trial of a search (SweepContext)

Its log lines go to <run_dir>/train.log (run_log). Modules below cnnlab/cli, cnnlab.api and cnnlab.tuning start runs
here, never through the CLI; tests/test_layers.py holds them to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cnnlab.core.config import parse_run_config
from cnnlab.core.errors import CnnlabError, ProcessesFailed
from cnnlab.core.shown import masked
from cnnlab.runtime import lock
from cnnlab.runtime.distributed import LOCK_HELD_ENV, Ranks, launch_processes, launched_ranks
from cnnlab.runtime.files import LogFile, atomic_write, confine_run, open_append
from cnnlab.runtime.lock import RunDirLock, discard_refused
from cnnlab.service.compose import CONFIG_DIRS, composed
from cnnlab.sweep.trials import failed_trial, run_packed, run_trial
from cnnlab.tasks import Job, train


@dataclass(frozen=True)
class SweepContext:
    """A trial's place in its search, for the run service: the study trial claimed for it, whose study hears of
    each epoch, may prune it, and sets a PBT member's interval (None under Hydra's basic sweeper)."""

    trial: Any = None  # optuna.Trial


def start(cfg: DictConfig, run_dir: Path, overrides: list[str], *, console=None,
          sweep: SweepContext | None = None) -> dict[str, Any] | None:
    """Start one run from its composed config (Hydra's node in HydraConfig) in ``run_dir``: a run, or with
    ``sweep`` a trial of a search. The one road of `cnnlab train`, a sweep's trials, `cnnlab tune` and
    cnnlab.train: the directory's writer first, then the config checked once into a RunConfig. A run's mistake
    raises, and a refused run leaves nothing behind; a trial's failure is recorded (its summary says why) and
    returned, so its search goes on. Returns the summary (None for the parent of ``trainer.devices`` processes)."""
    if sweep is not None:
        with writer_of(run_dir, cfg):
            try:
                run = parse_run_config(cfg)
            except CnnlabError as e:  # e.g. a value the search drew that the config refuses: the trial failed
                return failed_trial(cfg, run_dir, overrides, e)
            return run_trial(run, run_dir, overrides, sweep.trial, console=console)
    return run_one(cfg, run_dir, overrides, console=console)


def start_pack(trials: list[tuple[list[str], Path, Any]]) -> list[dict[str, Any]]:
    """Trials of a search (each its overrides, its claimed trial directory and study trial) trained as one pack.
    Each is composed, recorded in .hydra/ and checked as ``start`` does one trial: a config refused for one trial is
    that trial's failure, and the others go on. Each member's terminal output goes to <run_dir>/console.log and its
    log lines to its train.log. Returns their summaries, in order."""
    from cnnlab.sweep.study import quoted
    from cnnlab.training.console import make_console, member_log_name

    results: dict[int, dict[str, Any]] = {}
    ready: list[tuple[int, Any, Path, list[str], Any]] = []
    with contextlib.ExitStack() as held:
        consoles: dict[Path, Any] = {}
        for k, (overrides, run_dir, trial) in enumerate(trials):
            with composed([*overrides, f"hydra.run.dir={quoted(str(run_dir))}"]) as cfg:
                # its own logger: every member's lines on cnnlab's would reach every member's train.log
                held.enter_context(run_log(run_dir, member_log_name(run_dir)))  # stays after Hydra's node is gone
                with writer_of(run_dir, cfg):
                    try:
                        run = parse_run_config(cfg)
                    except CnnlabError as e:
                        results[k] = failed_trial(cfg, run_dir, overrides, e)
                        continue
            log = held.enter_context(open_append(run_dir / "console.log"))
            consoles[run_dir] = make_console(file=log, width=120, force_terminal=False)
            ready.append((k, run, run_dir, overrides, trial))
        if ready:
            summaries = run_packed([(run, run_dir, overrides, trial) for _, run, run_dir, overrides, trial in ready],
                                   consoles.get)
            results.update({k: summary for (k, *_), summary in zip(ready, summaries)})
    return [results[k] for k in range(len(trials))]


def auto_pack(overrides: list[str], workers: int, key: str) -> tuple[int, str | None]:
    """``key``=auto (hydra.sweeper.pack, tune.pack) for the trials of a search like the one ``overrides`` give: on a
    CUDA device, as many as fit in this worker's share of the GPU's memory (``workers`` train on it) at one member's
    peak, measured by one step of that trial (training.pack.pack_for_memory); elsewhere 1, each trial alone, as a
    pack's step on CPU cores is bound by compute, not launches (docs/performance.md). Returns the size, and the line
    that says how it was chosen (None when it was not measured)."""
    import torch

    from cnnlab.core.config import parse_run_config
    from cnnlab.tasks import pack_member_bytes
    from cnnlab.training.assemble import resolve_device
    from cnnlab.training.pack import pack_for_memory

    with composed(overrides) as cfg:
        try:
            run = parse_run_config(cfg)
        except CnnlabError:  # the trial's own start says why, as its failure
            return 1, None
    if resolve_device(run.trainer.device).type != "cuda":
        return 1, None
    member = pack_member_bytes(run)
    if member is None:
        return 1, None
    free, total = torch.cuda.mem_get_info()
    size = pack_for_memory(free, total, member, workers)
    shared = f", {workers} workers to this GPU" if workers > 1 else ""
    return size, (f"{key}=auto: packs of {size} (one member's peak {member / 2**20:.0f} MiB, "
                  f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free{shared})")


def lock_held_for(run_dir: Path) -> bool:
    """Whether ``run_dir``'s lock is held for this process already: by this process (it claimed the directory's
    trial from a study), or by the parent that started it (DDP ranks, a SLURM job's sweeper), which says so in the
    environment of the process it starts, as torchrun says a rank's number."""
    if run_dir.resolve() in lock.held():
        return True
    parent = os.environ.get(LOCK_HELD_ENV)
    return bool(parent) and Path(parent).resolve() == run_dir.resolve()


def run_one(cfg: DictConfig, run_dir: Path, task_overrides: list[str], console=None) -> dict[str, Any] | None:
    """One run from its composed config (Hydra's node in HydraConfig): the one road of `cnnlab train` and of
    cnnlab.train. Checked once into a RunConfig, then the task; ``trainer.devices=N`` starts N processes that
    each take this road. A run directory with a checkpoint continues (a requeued job). Returns the summary
    (None for the parent of N processes); a refused run leaves nothing behind."""
    try:
        with writer_of(run_dir, cfg):
            run = parse_run_config(cfg)
            devices = run.trainer.devices
            if devices > 1 and not launched_ranks().enabled:  # start the DDP processes; they train in run_dir
                from cnnlab.training.assemble import check_processes, resolve_device

                check_processes(run, Ranks(world_size=devices), resolve_device(run.trainer.device, Ranks()))
                folders = [arg for path in CONFIG_DIRS for arg in ("--config-dir", path)]  # the ranks search the same
                code = launch_processes(devices, [*folders, *task_overrides, f"hydra.run.dir={run_dir}"], run_dir)
                if code:
                    raise ProcessesFailed(code)
                return None
            return train(run, Job(run_dir, console=console, resume=True))
    except CnnlabError:
        if launched_ranks().is_main:
            discard_refused(run_dir)  # a refused command writes nothing
        raise


@contextlib.contextmanager
def run_log(run_dir: Path, logger: str = "cnnlab") -> Iterator[None]:
    """For a run in this process (cnnlab.train, a tune's trial; inside ``composed``): cnnlab's log lines go to
    <run_dir>/train.log, as hydra/job_logging's file handler writes them for `cnnlab train`, and nowhere else.
    The console shows each warning once already; with no handler anywhere, Python's last-resort handler
    printed it a second time. A job_logging without a file handler (hydra/job_logging=disabled): nowhere."""
    job_logging = HydraConfig.get().job_logging
    file = OmegaConf.select(job_logging, "handlers.file")
    if file is None:
        handler: logging.Handler = logging.NullHandler()
    else:
        confine_run(run_dir)
        handler = LogFile(run_dir / "train.log", delay=True)  # no line, no file (a refused run)
        formatter = file.get("formatter")
        handler.setFormatter(logging.Formatter(OmegaConf.select(job_logging, f"formatters.{formatter}.format")
                                               if formatter else None))
    logger = logging.getLogger(logger)
    before = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(OmegaConf.select(job_logging, "root.level", default="INFO"))
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(before[0])  # setLevel, not the attribute: it clears logging's cache of enabled levels
        logger.propagate = before[1]


@contextlib.contextmanager
def writer_of(run_dir: Path, cfg: DictConfig) -> Iterator[None]:
    """Be the one writer of ``run_dir`` for the block: take its lock, then record the run's config
    in .hydra/ as Hydra would (conf/train.yaml turns Hydra's own early write off, so that a second
    process refused here has written nothing). DDP ranks started for a run that holds the lock
    (trainer.devices, or torchrun's ranks other than 0) share it, and so does a sweep's trial that
    another launcher runs (a SLURM job): the sweeper holds its directory's lock for it. A trial this process
claimed (a sweep's or a tune's) runs under the lock its claim took."""
    confine_run(run_dir)  # hydra/job_logging appends to its train.log
    ranks = launched_ranks()
    held_for_us = lock_held_for(run_dir)
    if ranks.enabled and (not ranks.is_main or held_for_us):  # the DDP ranks' parent wrote the records
        yield
        return
    warn = lambda message: print(f"warning: {message}", file=sys.stderr, flush=True)  # noqa: E731
    with contextlib.nullcontext() if held_for_us else RunDirLock(run_dir, warn=warn):
        record = run_dir / ".hydra"
        hydra_node = HydraConfig.get()
        for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hydra_node})),
                           ("overrides.yaml", OmegaConf.create(list(hydra_node.overrides.task)))):
            text = masked(OmegaConf.to_yaml(node)).encode()  # a storage URL's password stays on the command line
            atomic_write(record / name, lambda f, text=text: f.write(text))
        yield
