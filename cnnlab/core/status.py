"""How a run ended: one vocabulary for the loop, the tasks, the summaries, TensorBoard and the sweeps."""

from __future__ import annotations

from enum import Enum


class RunStatus(str, Enum):
    """A str, so summary.json, TensorBoard and a comparison with a status read back from a file see its value."""

    RUNNING = "running"
    COMPLETED = "completed"
    EARLY_STOPPED = "early_stopped"  # trainer.early_stopping_patience
    PRUNED = "pruned"                # a sweep's pruner: checkpoints kept, selected and reported like any
    PAUSED = "paused"                # at the end of a PBT interval: checkpoint kept, the next interval continues it
    DIVERGED = "diverged"            # the divergence guard stopped it
    FAILED = "failed"                # an error ended it (a sweep's trial records it and goes on)
    UNFINISHED = "unfinished"        # a trial folder with no summary yet (cut off, or running)

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__  # a dict keyed by status finds it by the value read back from a file


# Ended without a model worth selecting.
FAILED = (RunStatus.DIVERGED, RunStatus.FAILED)
# Ended for good: a resume does not run these again.
FINISHED = (RunStatus.COMPLETED, RunStatus.EARLY_STOPPED, RunStatus.DIVERGED)
# Ended with a value the study can rank.
RANKED = (RunStatus.COMPLETED, RunStatus.EARLY_STOPPED)

# `cnnlab train`'s exit status for a single run the divergence guard stopped: it trained, wrote its summary
# and checkpoints, and selected nothing (2: the input was refused; 3: some trials of a sweep failed; 75: stopped,
# resumable).
DIVERGED_EXIT_STATUS = 4
