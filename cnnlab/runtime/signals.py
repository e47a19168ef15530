"""Stopping on request without losing work: SIGTERM (a scheduler's kill), SIGINT (Ctrl-C)
and SIGUSR1 (SLURM's warning before pre-emption, `#SBATCH --signal=USR1@120`) ask the
loop to save a checkpoint at the next step boundary and stop; a second Ctrl-C stops at once."""

from __future__ import annotations

import signal
import sys
import threading

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class StopRequest:
    """While entered, the stop signals set ``signal`` (the first one's name) instead of killing."""

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for name in STOP_SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.signal is not None:
            if number == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, the last checkpoint stays as it is
            return
        self.signal = name
        print(f"received {name}: saving a checkpoint at the next step, then stopping"
              + (" (Ctrl-C again to stop at once)" if number == signal.SIGINT else ""), file=sys.stderr, flush=True)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader workers leave Ctrl-C (sent to the whole process group) and SLURM's SIGUSR1 to the
    training process, which finishes its step, checkpoints and shuts them down. SIGTERM keeps its
    default: multiprocessing ends workers with it at exit."""
    for number in (signal.SIGINT, getattr(signal, "SIGUSR1", None)):
        if number is not None:
            signal.signal(number, signal.SIG_IGN)
