"""TensorBoard: one event directory per run, scalars, the config as text, and hparams.

Hyperparameters are written into the run's own event file as an HParams
session (start and end info), not with SummaryWriter.add_hparams, which makes a
separate timestamped sub-run per call. The session is written when the run ends,
with its status as the hyperparameter ``status`` (completed, early_stopped,
pruned, diverged, failed): TensorBoard keeps the first session record of a run,
and only the end knows the status. A sweep also writes an experiment record
(``sweep_experiment``) that opens the HParams dashboard on what it searched.
"""

from __future__ import annotations

import json

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from cnnlab.core.config import flatten
from cnnlab.core.errors import CnnlabError
from cnnlab.runtime.files import check_inside
from cnnlab.core.status import FAILED, RunStatus


def events_dir(cfg: Mapping[str, Any], run_dir: Path) -> Path:
    """Where a run writes its events: paths.tensorboard when set, else <run dir>/tensorboard."""
    chosen = (cfg.get("paths") or {}).get("tensorboard")
    return Path(chosen) if chosen else run_dir / "tensorboard"


def hparam_value(value: Any) -> float | str | bool:
    """HParams take numbers, strings and booleans; lists and None become text."""
    if isinstance(value, bool | int | float | str):
        return value
    return "null" if value is None else str(value)


def _quiet_writer_threads(args) -> None:
    """TensorBoard's writer thread keeps its error (a full disk) and the next write, flush or close raises it
    in the run's own thread, where it becomes one line: the thread's own traceback would only repeat it."""
    if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
        return
    _previous_hook(args)


_previous_hook = threading.excepthook
threading.excepthook = _quiet_writer_threads


class EventWriter:
    """A SummaryWriter whose failed writes (OSError: a full disk, a folder gone) are one CnnlabError naming the
    event folder."""

    def __init__(self, log_dir: Path, **kwargs):
        self.log_dir = log_dir
        check_inside(Path(log_dir) / "events")  # a tensorboard/ that links out of the run: not written through
        self._writer = self._call(SummaryWriter, log_dir=str(log_dir), **kwargs)

    def _call(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except OSError as e:
            raise CnnlabError(f"cannot write {self.log_dir}: {e.strerror or e}") from None

    @property
    def file_writer(self) -> EventWriter:
        return self  # add_summary goes through _call too

    def add_summary(self, summary) -> None:
        self._call(self._writer.file_writer.add_summary, summary)

    def __getattr__(self, name: str):
        if name.startswith("_"):  # not the writer's: _writer itself before it is set, copy and pickle hooks
            raise AttributeError(name)
        attribute = getattr(self._writer, name)
        return (lambda *a, **k: self._call(attribute, *a, **k)) if callable(attribute) else attribute


class TensorBoardLogger:
    def __init__(self, log_dir: Path, config: Mapping[str, Any], config_yaml: str, purge_step: int | None = None,
                 environment: Mapping[str, Any] | None = None):
        """``config``: the run's config tree; its keys but paths.* become the HParams.
        purge_step: a resumed run drops what the interrupted one logged after its checkpoint.
        environment: where the run came from (cnnlab.runtime.environment), as the ``environment`` text."""
        self.writer = EventWriter(log_dir, purge_step=purge_step)
        hparams = flatten({k: v for k, v in config.items() if k != "paths"})
        self.hparams = {k: hparam_value(v) for k, v in hparams.items()}
        self.writer.add_text("config", f"```yaml\n{config_yaml}\n```", 0)
        if environment is not None:
            self.writer.add_text("environment", f"```json\n{json.dumps(environment, indent=1)}\n```", 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def parameters(self, model, step: int) -> None:
        """Per-layer gradient norms (vanishing or exploding gradients show here) and weight histograms."""
        for name, p in model.named_parameters():
            if p.grad is not None:
                self.writer.add_scalar(f"grad_norm/{name}", p.grad.detach().norm().item(), step)
            self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)

    def close(self, status: str = RunStatus.COMPLETED) -> None:
        """End the run's HParams session with its ``status`` (a run's or trial's status)."""
        _, session_start, _ = hparams_summaries({**self.hparams, "status": status}, {})
        self.writer.file_writer.add_summary(session_start)
        self.writer.file_writer.add_summary(session_end(status not in FAILED))
        self.writer.close()


SELECTION_METRICS = ("selected/val_acc", "selected/val_loss")  # logged when a run (or trial) ends


def sweep_experiment(log_dir: Path, searched: list[str], config: Mapping[str, Any], monitor: str) -> None:
    """The HParams experiment of a sweep's TensorBoard folder: the searched keys and the trial's status (marked
    as the ones that differ), and only those: TensorBoard ticks the first five columns whatever they are, so any
    other key listed would be ticked beside them (each run's full config stays in its `config` text); the
    selection metrics only."""
    infos = [api_pb2.HParamInfo(name=k, differs=True) for k in [*searched, "status"]]
    metrics = ["best/" + monitor.replace("/", "_"), *SELECTION_METRICS]
    metric_infos = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m), dataset_type=api_pb2.DATASET_VALIDATION)
                    for m in dict.fromkeys(metrics)]
    writer = EventWriter(log_dir)
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos, time_created_secs=time.time())
    writer.file_writer.add_summary(_hparams_record("experiment", HParamsPluginData(experiment=experiment, version=0)))
    writer.close()


def session_end(status_ok: bool) -> Summary:
    """The HParams session-end record (torch's helper can only say success)."""
    info = SessionEndInfo(status=api_pb2.STATUS_SUCCESS if status_ok else api_pb2.STATUS_FAILURE)
    return _hparams_record("session_end_info", HParamsPluginData(session_end_info=info, version=0))


def _hparams_record(name: str, data: HParamsPluginData) -> Summary:
    """An HParams plugin record as TensorBoard's own hparams summary writes it (which needs TensorFlow)."""
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams",
                                                                      content=data.SerializeToString()))
    return Summary(value=[Summary.Value(tag=f"_hparams_/{name}", metadata=metadata)])
