"""A warm `python -m cnnlab` for the tests: one process imports cnnlab and its dependencies (torch,
torchvision, Hydra, and what a run imports on its way: about 4 s of every cold start) once, then forks a
child per command.

Each child is a real process running the real ``cnnlab`` entry point: its own working directory,
environment, stdout and stderr files and exit status, as ``subprocess.run`` would give. Only the
imports are shared. The server never runs a tensor operation itself, so the children's thread
pools start fresh after the fork.

Protocol (JSON lines): the client writes {"id", "args", "cwd", "env", "stdout", "stderr"}; the server
answers {"id", "pid"} at once and {"id", "code", "cpu"} when the child has exited (cpu: its CPU seconds).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback

import matplotlib
import torch  # noqa: F401  - the expensive imports, done once
import torch._dynamo  # noqa: F401  - what the first optimizer imports
import torchvision  # noqa: F401

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402, F401  - what a run's first figure imports

import cnnlab.cli.hydra_app  # noqa: F401
import cnnlab.tasks.classify  # noqa: F401
from cnnlab.cli import main
from cnnlab.core.plugins import load_components

load_components()

_answer = threading.Lock()


def answer(message: dict) -> None:
    with _answer:
        sys.__stdout__.write(json.dumps(message) + "\n")
        sys.__stdout__.flush()


def child(request: dict) -> None:
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        if "OMP_NUM_THREADS" in os.environ:
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        sys.argv = [sys.executable, *request["args"]]
        main(request["args"])
        code = 0
    except SystemExit as stopped:
        code = stopped.code if isinstance(stopped.code, int) else (0 if stopped.code is None else 1)
    except BaseException:  # noqa: BLE001 - as the interpreter would: a traceback and status 1
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def reap(request_id: str, pid: int) -> None:
    _, status, usage = os.wait4(pid, 0)  # its CPU seconds, with its own children's: the suite's cost (CNNLAB_TEST_CPU)
    answer({"id": request_id, "code": os.waitstatus_to_exitcode(status), "cpu": usage.ru_utime + usage.ru_stime})


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        sys.__stdout__.flush()
        sys.__stderr__.flush()
        pid = os.fork()
        if pid == 0:
            child(request)
        answer({"id": request["id"], "pid": pid})
        threading.Thread(target=reap, args=(request["id"], pid), daemon=True).start()


if __name__ == "__main__":
    serve()
