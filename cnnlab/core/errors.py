"""User-facing errors: each one is printed as a single line, never a traceback."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable


class CnnlabError(Exception):
    """A mistake in the user's input (config, files, command line).

    The CLI prints ``error: <message>`` and exits with status 2; bugs in
    cnnlab itself stay ordinary exceptions with a full traceback.
    """


class JobAborted(BaseException):
    """Carries a CnnlabError out of a Hydra job.

    Hydra's job runner catches Exception and prints its own line before
    re-raising; a BaseException passes through untouched, so the user sees
    only cnnlab's one line.
    """

    def __init__(self, error: CnnlabError):
        super().__init__(str(error))
        self.error = error


class CommandLineParser(argparse.ArgumentParser):
    """argparse for cnnlab's subcommands: ``-h``/``--help`` prints the command's usage and exits 0;
    a bad argument is a CnnlabError (one line), not a usage dump."""

    def __init__(self, prog: str, description: str | None = None, epilog: str | None = None):
        super().__init__(prog=prog, description=description, epilog=epilog)

    def error(self, message: str):
        raise CnnlabError(f"{self.prog}: {message}")


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    candidates = list(candidates)
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates), reverse=True)
    # Close enough, and not far behind the best: 'lenet' suggests lenet5, not alexnet as well.
    matches = [c for score, c in scored[:n] if score >= 0.6 and score >= scored[0][0] - 0.05]
    if not matches:
        # Prefix matches catch abbreviations such as "res" -> "resnet18".
        matches = [c for c in candidates if c.startswith(word) or word.startswith(c)][:n]
    return matches


def suggestion(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean: a, b?)' or '' when nothing is close."""
    matches = close_matches(word, candidates)
    return f" (did you mean: {', '.join(matches)}?)" if matches else ""


class Preempted(BaseException):
    """A run stopped on request (SIGTERM, SIGINT, SLURM's SIGUSR1) after saving a checkpoint.

    A BaseException, like JobAborted, so Hydra and a sweep's trial handler let it through:
    a pre-empted sweep stops as a whole and is resumed as a whole.
    """

    EXIT_STATUS = 75  # sysexits' EX_TEMPFAIL: try again later; distinct from 2 (input) and 3 (failed trials)

    def __init__(self, signal_name: str, step: int, checkpoint: str, resume_hint: str):
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint: {checkpoint}; resume with: {resume_hint}")
        self.signal_name, self.step, self.checkpoint, self.resume_hint = signal_name, step, checkpoint, resume_hint


class StorageOutage(BaseException):
    """A sweep's study could not be reached for hydra.sweeper.storage_retry_s (cnnlab.sweep.storage).

    A BaseException, like Preempted, so neither Hydra nor a trial's failure handler takes it for the trial's
    own failure: the worker stops, its trial stays RUNNING and unlocked, and the next claim continues it.
    """

    EXIT_STATUS = 75  # try again later, as for a pre-emption


class ProcessesFailed(BaseException):
    """``trainer.devices=N``: a rank's non-zero exit status, passed on (the ranks printed their own lines)."""

    def __init__(self, status: int):
        super().__init__(f"exit status {status}")
        self.status = status


class PackRefused(CnnlabError):
    """Trials that cannot be trained as one pack (cnnlab.training.pack); the line names why, and they run apart."""
