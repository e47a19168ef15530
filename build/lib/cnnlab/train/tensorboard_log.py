"""TensorBoard: one event directory per run, scalars, the config as text, and hparams.

Hyperparameters are written into the run's own event file as an HParams
session (start and end info), not with SummaryWriter.add_hparams, which makes a
separate timestamped sub-run per call. No experiment summary is written: the
HParams plugin then builds the experiment from the sessions of all runs under
--logdir, so every run of a sweep appears in one table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from cnnlab.core.config import flatten


def hparam_value(value: Any) -> float | str | bool:
    """HParams take numbers, strings and booleans; lists and None become text."""
    if isinstance(value, bool | int | float | str):
        return value
    return "null" if value is None else str(value)


class TensorBoardLogger:
    def __init__(self, log_dir: Path, config: Mapping[str, Any], config_yaml: str, purge_step: int | None = None):
        """``config``: the run's config tree; its keys but paths.* become the HParams.
        purge_step: a resumed run drops what the interrupted one logged after its checkpoint."""
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        hparams = flatten({k: v for k, v in config.items() if k != "paths"})
        self.hparams = {k: hparam_value(v) for k, v in hparams.items()}
        self.writer.add_text("config", f"```yaml\n{config_yaml}\n```", 0)
        _, session_start, _ = hparams_summaries(self.hparams, {})
        self.writer.file_writer.add_summary(session_start)

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

    def close(self, status_ok: bool = True) -> None:
        self.writer.file_writer.add_summary(session_end(status_ok))
        self.writer.close()


def session_end(status_ok: bool) -> Summary:
    """The HParams session-end record (torch's helper can only say success)."""
    info = SessionEndInfo(status=api_pb2.STATUS_SUCCESS if status_ok else api_pb2.STATUS_FAILURE)
    content = HParamsPluginData(session_end_info=info, version=0).SerializeToString()
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=content))
    return Summary(value=[Summary.Value(tag="_hparams_/session_end_info", metadata=metadata)])
