"""The Hydra application behind ``cnnlab train``, and the translation of
Hydra's composition errors into cnnlab's one-line messages."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from cnnlab.config import (CONF_DIR, GROUP_REGISTRIES, TOP_LEVEL_KEYS, DataSettings, TrainerSettings, check_settings,
                           parse_run_config)
from cnnlab.errors import CnnlabError, JobAborted, ProcessesFailed, suggestion
from cnnlab.registry import load_components
from cnnlab.sweep import register_resolvers, run_trial
from cnnlab.train.distributed import launch_processes, launched_ranks


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_train(cfg: DictConfig) -> float | None:
    """Hydra's task: one run, or one trial of a sweep. Returns the best validation value, the sweepers' objective."""
    from cnnlab.train.run import train

    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    if hydra_config.mode == RunMode.MULTIRUN:
        return run_trial(cfg, run_dir)  # records failures instead of raising: the sweep goes on
    try:
        devices = parse_run_config(cfg).trainer.devices
        if devices > 1 and not launched_ranks().enabled:  # start the DDP processes; they train in run_dir
            code = launch_processes(devices, [*hydra_config.overrides.task, f"hydra.run.dir={run_dir}"])
            if code:
                raise ProcessesFailed(code)
            return None
        summary = train(cfg, run_dir, resume=True)  # a run directory with a checkpoint continues (requeued jobs)
    except CnnlabError as e:
        raise JobAborted(e) from None
    return summary["best_value"]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_lr_find(cfg: DictConfig) -> None:
    """Hydra's task for `cnnlab lr-find`: the same config as training, the range test instead."""
    import os

    from cnnlab.lr_find import lr_range_test

    try:
        lr_range_test(cfg, Path(HydraConfig.get().runtime.output_dir), float(os.environ["CNNLAB_LR_FIND_MIN"]),
                      float(os.environ["CNNLAB_LR_FIND_MAX"]), int(os.environ["CNNLAB_LR_FIND_STEPS"]))
    except CnnlabError as e:
        raise JobAborted(e) from None


def translate_hydra_error(e: BaseException) -> CnnlabError | None:
    """A CnnlabError for a config mistake Hydra or OmegaConf caught; None for anything else."""
    load_components()
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
