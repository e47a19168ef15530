"""The Hydra application behind ``cnnlab train``, and the translation of
Hydra's composition errors into cnnlab's one-line messages."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from cnnlab.core.config import (CONF_DIR, GROUP_REGISTRIES, TOP_LEVEL_KEYS, DataSettings, TrainerSettings, check_settings,
                           parse_run_config)
from cnnlab.core.errors import CnnlabError, JobAborted, ProcessesFailed, suggestion
from cnnlab.core.plugins import load_components
from cnnlab.sweep.trials import register_resolvers, run_trial
from cnnlab.core.shown import masked
from cnnlab.core.schema import SUMMARY_RECORD
from cnnlab.runtime.files import LogFile, atomic_write, confine_run, read_json
from cnnlab.runtime.distributed import LOCK_HELD_ENV, Ranks, launch_processes, launched_ranks
from cnnlab.runtime.lock import RunDirLock, discard_refused


register_resolvers()


# Hydra's config search path while cnnlab runs (hydra_plugins/cnnlab_searchpath reads it): the user's
# --config-dir folders (CONFIG_DIRS), then cnnlab's own. A user's YAML adds entries to a group or replaces ours.
CONFIG_DIRS: list[str] = []
SEARCH_PATH: list[str] = []


def use_config_dirs(folders: list[str]) -> None:
    """Search ``folders`` (the user's, in order) before cnnlab's own configs."""
    absolute = []
    for folder in folders:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise CnnlabError(f"--config-dir {folder}: no such folder")
        absolute.append(str(path))
    CONFIG_DIRS[:] = absolute
    SEARCH_PATH[:] = [f"file://{p}" for p in absolute] + [f"file://{CONF_DIR}"]


@contextlib.contextmanager
def search_path_restored() -> Iterator[None]:
    """The config folders as they were before the block: a Python caller's config_dirs end with its call."""
    saved = list(CONFIG_DIRS), list(SEARCH_PATH)
    try:
        yield
    finally:
        CONFIG_DIRS[:], SEARCH_PATH[:] = saved


last_run: dict[str, Any] = {}  # how the last single run of `cnnlab train` ended, for its exit status


@hydra.main(version_base="1.3", config_path=None, config_name="train")
def hydra_train(cfg: DictConfig) -> dict | float | None:
    """Hydra's task: one run, or one trial of a sweep. Returns a trial's summary (for the sweeper), or
    a run's best validation value."""
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    try:
        if hydra_config.mode == RunMode.MULTIRUN:
            with writer_of(run_dir, cfg):
                return run_trial(cfg, run_dir)  # records failures instead of raising: the sweep goes on
        summary = run_one(cfg, run_dir, list(hydra_config.overrides.task))
        if summary is None:  # trainer.devices=N: the processes wrote it
            summary = read_json(run_dir / "summary.json", SUMMARY_RECORD, "run summary") or {}
    except CnnlabError as e:
        raise JobAborted(e) from None
    last_run["status"] = summary.get("status")
    return summary.get("best_value")


def run_one(cfg: DictConfig, run_dir: Path, task_overrides: list[str], console=None) -> dict | None:
    """One run from its composed config (Hydra's node in HydraConfig): the one road of `cnnlab train` and of
    cnnlab.train. Checked once into a RunConfig, then the task; ``trainer.devices=N`` starts N processes that
    each take this road. A run directory with a checkpoint continues (a requeued job). Returns the summary
    (None for the parent of N processes); a refused run leaves nothing behind."""
    from cnnlab.tasks import Job, train

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
def composed(overrides: list[str]) -> Iterator[DictConfig]:
    """The config `cnnlab train` would compose from ``overrides`` (cnnlab's config groups after the user's
    --config-dir folders, as set by use_config_dirs), with Hydra's node in HydraConfig for the block, as
    Hydra's own job runner leaves it. Hydra's global state is cleared after, so it can be called again."""
    from hydra import compose, initialize
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import setup_globals

    if not SEARCH_PATH:
        use_config_dirs([])
    GlobalHydra.instance().clear()
    setup_globals()  # ${now:...} and ${hydra:...}
    try:
        with config_errors_in_one_line(), initialize(config_path=None, version_base="1.3"):
            full = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(full)
        cfg = copy.deepcopy(full)  # the task's config without Hydra's node, as Hydra's run_job makes it
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        yield cfg
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()


@contextlib.contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
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
    logger = logging.getLogger("cnnlab")
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
    another launcher runs (a SLURM job): the sweeper holds its directory's lock for it."""
    confine_run(run_dir)  # hydra/job_logging appends to its train.log
    ranks = launched_ranks()
    held_for_us = os.environ.get(LOCK_HELD_ENV)  # a sweeper or `trainer.devices` holds it for this process
    held_for_us = bool(held_for_us) and Path(held_for_us).resolve() == run_dir.resolve()
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


def lr_find_app(min_lr: float, max_lr: float, steps: int):
    """The Hydra application of `cnnlab lr-find`: the same config as training, the range test instead."""

    @hydra.main(version_base="1.3", config_path=None, config_name="train")
    def hydra_lr_find(cfg: DictConfig) -> None:
        from cnnlab.analysis.lr_find import lr_range_test

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            with writer_of(run_dir, cfg):
                lr_range_test(parse_run_config(cfg), run_dir, min_lr, max_lr, steps,
                              overrides=list(HydraConfig.get().overrides.task))
        except CnnlabError as e:
            raise JobAborted(e) from None

    return hydra_lr_find


@contextlib.contextmanager
def config_errors_in_one_line() -> Iterator[None]:
    """A config mistake that Hydra or OmegaConf raised in the block becomes cnnlab's one line
    (translate_hydra_error); anything else, a bug, keeps its traceback."""
    try:
        yield
    except CnnlabError:
        raise
    except Exception as e:  # noqa: BLE001 - translated when it is a config problem, else raised as it is
        translated = translate_hydra_error(e)
        if translated is None:
            raise
        raise translated from None


def translate_hydra_error(e: BaseException) -> CnnlabError | None:
    """A CnnlabError for a config mistake Hydra or OmegaConf caught; None for anything else."""
    load_components()
    cause: BaseException | None = e
    while cause is not None:  # a resolver of ours (cnnlab_fresh_dir) raised it: its line as it is
        if isinstance(cause, CnnlabError):
            return cause
        cause = cause.__cause__ or cause.__context__
    if isinstance(e, MissingConfigException):
        group, _, choice = (e.missing_cfg_file or "").rpartition("/")
        if group in GROUP_REGISTRIES:
            try:
                GROUP_REGISTRIES[group].get(choice)
            except CnnlabError as err:
                return err
        if group and e.options:
            return CnnlabError(f"unknown {group} {choice!r}{suggestion(choice, e.options)}; choose from: {', '.join(e.options)}")
        return CnnlabError(_one_line(e))
    cause = e.__cause__ or e
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        parent, _, key = str(cause.full_key).rpartition(".")
        node = getattr(cause, "parent_node", None)
        try:
            if parent in GROUP_REGISTRIES and node is not None and "name" in node:
                GROUP_REGISTRIES[parent].check_options(str(node["name"]), {key: None}, parent)
            elif parent in ("trainer", "data"):
                check_settings(TrainerSettings if parent == "trainer" else DataSettings, {key: None}, parent)
            elif parent == "":
                return CnnlabError(f"unknown config key {key!r}{suggestion(key, TOP_LEVEL_KEYS)}; top-level keys: {', '.join(sorted(TOP_LEVEL_KEYS))}")
        except CnnlabError as err:
            return err
        keys = list(node.keys()) if node is not None and hasattr(node, "keys") else []
        return CnnlabError(f"{parent or 'config'} has no key {key!r}{suggestion(key, map(str, keys))}" + (f"; it has: {', '.join(map(str, keys))}" if keys else ""))
    if isinstance(e, OverrideParseException):
        return CnnlabError(f"cannot parse override {e.override!r}: {_one_line(e)}")
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return CnnlabError(_one_line(e))
    return None


def _one_line(e: BaseException) -> str:
    """Hydra's messages span lines; fold them into one, adding the cause's if it says more."""
    text = " ".join(str(e).split())
    if e.__cause__ is not None and str(e.__cause__).split():
        text += ": " + str(e.__cause__).splitlines()[0].strip()
    return text
