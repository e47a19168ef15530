"""The Hydra applications behind ``cnnlab train`` and ``cnnlab lr-find``: Hydra composes the config and
names the run directory, and the run service (cnnlab.service) starts the run or the sweep's trial."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cnnlab.core.errors import CnnlabError, JobAborted
from cnnlab.core.schema import SUMMARY_RECORD
from cnnlab.runtime.files import read_json
from cnnlab.service.run import SweepContext, start, writer_of
from cnnlab.sweep.study import active_claim


last_run: dict[str, Any] = {}  # how the last single run of `cnnlab train` ended, for its exit status


@hydra.main(version_base="1.3", config_path=None, config_name="train")
def hydra_train(cfg: DictConfig) -> dict | float | None:
    """Hydra's task: one run, or one trial of a sweep. Returns a trial's summary (for the sweeper), or
    a run's best validation value."""
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    try:
        overrides = list(hydra_config.overrides.task)
        if hydra_config.mode == RunMode.MULTIRUN:  # a trial records its failure instead of raising: the sweep goes on
            claim = active_claim()  # cnnlab's sweeper: the study trial it claimed for this job
            overrides = [o for o in overrides if not o.startswith(("sweep.resume=", "hydra.sweep.dir="))]
            return start(cfg, run_dir, overrides, sweep=SweepContext(claim.trial if claim is not None else None))
        summary = start(cfg, run_dir, overrides)
        if summary is None:  # trainer.devices=N: the processes wrote it
            summary = read_json(run_dir / "summary.json", SUMMARY_RECORD, "run summary") or {}
    except CnnlabError as e:
        raise JobAborted(e) from None
    last_run["status"] = summary.get("status")
    return summary.get("best_value")


def lr_find_app(min_lr: float, max_lr: float, steps: int):
    """The Hydra application of `cnnlab lr-find`: the same config as training, the range test instead."""

    @hydra.main(version_base="1.3", config_path=None, config_name="train")
    def hydra_lr_find(cfg: DictConfig) -> None:
        from cnnlab.analysis.lr_find import lr_range_test
        from cnnlab.core.config import parse_run_config

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            with writer_of(run_dir, cfg):
                lr_range_test(parse_run_config(cfg), run_dir, min_lr, max_lr, steps,
                              overrides=list(HydraConfig.get().overrides.task))
        except CnnlabError as e:
            raise JobAborted(e) from None

    return hydra_lr_find


