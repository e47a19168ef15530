"""DistributedDataParallel under torchrun: which rank this process is, and the few
collectives the loop needs (metric sums, agreeing to stop).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK (and MASTER_ADDR/PORT); without them
a run is one process and every call here is a no-op. Backend: NCCL on CUDA, gloo on
the CPU. Every rank runs the same loop on its share of each global batch; only rank
0 writes logs, checkpoints and summary.json.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from cnnlab.core.errors import CnnlabError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the ranks, in place."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one: ranks must leave the loop at the same step.
        A CPU tensor, so gloo carries it and the GPU's queue is never waited on (asked every step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def min_step(self, step: int, device: torch.device) -> int:
        """The earliest of the ranks' flagged steps (-1: none flagged anywhere)."""
        if not self.enabled:
            return step
        t = torch.tensor([step if step >= 0 else 2**62], device=device, dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        earliest = int(t.item())
        return earliest if earliest < 2**62 else -1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE = Ranks()  # one process: what every rank-aware function assumes unless told otherwise


def launched_ranks() -> Ranks:
    """This process's place under torchrun (one process when not launched by it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    return Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def init_process_group(ranks: Ranks) -> None:
    """One group for both kinds of tensor: NCCL for CUDA ones, gloo for CPU ones (and a CPU-only run)."""
    if not ranks.enabled or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


def agree_on_run(overrides: list[str], ranks: Ranks) -> list[str]:
    """Hydra runs on every rank: give all ranks rank 0's run directory, and let only rank 0 write
    Hydra's own files and log."""
    import datetime

    init_process_group(ranks)
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        stamp = [datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S") if ranks.is_main else None]
        dist.broadcast_object_list(stamp, src=0)
        # train.yaml's hydra.run.dir, with rank 0's clock in place of ${now:...}
        overrides = [*overrides, f"hydra.run.dir=${{paths.output_dir}}/runs/{stamp[0]}-${{name}}"]
    if not ranks.is_main:
        overrides = [*overrides, "hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return overrides


def check_global_batch(batch_size: int, ranks: Ranks, key: str = "data.batch_size") -> None:
    if batch_size % ranks.world_size:
        raise CnnlabError(f"{key}={batch_size} is the global batch and must divide evenly over "
                          f"{ranks.world_size} processes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cnnlab_command(*args: str) -> list[str]:
    """``cnnlab ARGS`` as a new Python process with this one's import path: ``python -m`` would put the working
    directory first, and Hydra would import a ``hydra_plugins/`` found there (the folder may be someone else's)."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", "cnnlab", *args]
    return [sys.executable, "-c", "import runpy, sys; del sys.path[0]; "
            "runpy.run_module('cnnlab', run_name='__main__', alter_sys=True)", *args]


# Set for the ranks trainer.devices starts: their parent holds the run directory's lock for them.
LOCK_HELD_ENV = "CNNLAB_RUN_LOCK_HELD_BY_PARENT"


def launch_processes(processes: int, args: list[str], run_dir: Path) -> int:
    """``trainer.devices=N``: run ``cnnlab train args`` as N DDP processes on this machine, with the
    environment torchrun would give them. Returns rank 0's exit status (or the first failure's).

    SIGTERM and SIGUSR1 sent to this process are passed on, so every rank checkpoints and stops;
    Ctrl-C reaches the ranks from the terminal directly. When one rank fails the others cannot
    finish their collectives, so they are stopped.
    """
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes), LOCK_HELD_ENV: str(run_dir)}
    ranks = [subprocess.Popen(cnnlab_command("train", *args),
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(processes)]

    def forward(number, _frame):
        for p in ranks:
            if p.poll() is None:
                p.send_signal(number)

    previous = {n: signal.signal(n, forward) for n in (signal.SIGTERM, signal.SIGUSR1)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        failed_at = None
        while any(p.poll() is None for p in ranks):
            failed = [p for p in ranks if p.poll() not in (None, 0)]
            if failed and failed_at is None:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > 10:
                for p in ranks:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    codes = [p.returncode for p in ranks]
    return codes[0] if codes[0] != 0 else next((c for c in codes if c != 0), 0)
