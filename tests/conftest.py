"""Shared helpers: compose real configs from conf/, run tiny trainings on CPU."""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

# One intra-op thread for every process of the suite (this one, the warm CLI's children, the workers it starts):
# its models are tiny, and pytest-xdist (-n auto in pyproject.toml) already keeps every core busy.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# `cnnlab runs` caches rows in the user's cache folder: the suite's go to a folder of its own, not ~/.cache.
if "CNNLAB_CACHE_DIR" not in os.environ:
    os.environ["CNNLAB_CACHE_DIR"] = tempfile.mkdtemp(prefix="cnnlab-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CNNLAB_CACHE_DIR"], True)

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from rich.console import Console  # noqa: E402

from cnnlab.core.config import CONF_DIR  # noqa: E402
from cnnlab.core.plugins import load_components  # noqa: E402


def pytest_configure(config) -> None:
    """Every component registered before the tests are collected; not in pytest-xdist's controller, which
    only hands out tests (importing torch and every component costs 4 s of CPU)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    load_components()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """-n auto: a worker a core and one more, at most 4 (each holds a warm CLI and trains on one thread): the extra
    worker fills the time others wait on a process, a database or SLURM (docs/performance.md)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) + 1))


# The modules whose tests run one after another on one pytest-xdist worker: they share a module-scoped fixture
# (built once, not once a worker), or, test_cluster.py, the session's cluster and its PostgreSQL restarts.
SHARED_MODULES = {f"tests/test_{name}.py" for name in (
    "bad_input", "cluster", "compare", "disk_full", "distributed", "export", "finetune", "foreign", "guides", "packaging",
    "pbt",
    "resume", "runs", "sweep", "trust", "viz")}
# Modules of long single tests (the GPU acceptance smoke, ~50 s; packed sweeps against unpacked ones): one scope
# each, so they go out early with the large scopes instead of landing last, where pytest-randomly's order put the
# smoke at the end of a run and one worker idled for its minute (the suite took 5:38 to 6:36 for the same code).
LONG_MODULES = {f"tests/test_{name}.py" for name in ("gpu_acceptance", "pack", "guides")}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's load-by-scope scheduling with a scope per test, except a scope per module for SHARED_MODULES;
    scopes go out largest first, so the shared modules start early and single tests fill the end. (Not
    --dist loadgroup: with pytest 9.2 its xdist_group marks are silently ignored, pytest-xdist issue #1386.)"""
    from xdist.scheduler import LoadScopeScheduling

    if config.getvalue("dist") != "load":  # another --dist asked for on the command line
        return None

    class SharedModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED_MODULES | LONG_MODULES else nodeid

        def _assign_work_unit(self, node) -> None:
            # The long modules first, whatever their number of tests: one landing last keeps a worker busy alone.
            for scope in [s for s in self.workqueue if s in LONG_MODULES]:
                self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return SharedModuleScheduling(config, log)


def cpu_seconds() -> float:
    """This process's CPU seconds, its waited-for children's and the warm CLI's commands' (CNNLAB_TEST_CPU)."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN))) + WarmCli.cpu_s


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """CNNLAB_TEST_CPU=FILE: each test's CPU seconds (setup, call, teardown; the processes it ran included) as a
    line of FILE, "seconds<TAB>test id": scripts/suite_cost.py ranks them."""
    where = os.environ.get("CNNLAB_TEST_CPU")
    if not where:
        return (yield)
    before = cpu_seconds()
    try:
        return (yield)
    finally:
        with open(where, "a") as out:
            out.write(f"{cpu_seconds() - before:.2f}\t{item.nodeid}\n")


def full_run(config) -> bool:
    """The whole suite, integration tests included: in CI (CI=true, as .ci/run sets it), or asked for with -m."""
    return os.environ.get("CI") == "true" or "integration" in (config.getoption("markexpr", "") or "")


def pytest_collection_modifyitems(config, items) -> None:
    if not full_run(config):
        later = pytest.mark.skip(reason="integration test: runs with CI=true (as .ci/run) or -m integration")
        for item in items:
            if item.get_closest_marker("integration") or item.get_closest_marker("cluster"):
                item.add_marker(later)
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        defs = item._fixtureinfo.name2fixturedefs.values()
        if module not in SHARED_MODULES and any(d.scope == "module" for found in defs for d in found):
            raise pytest.UsageError(f"{module} has a module-scoped fixture: add it to SHARED_MODULES in "
                                    "tests/conftest.py, or under pytest-xdist each worker builds it again")


# A run that takes well under a second: 4 classes of 8x8 grayscale synthetic images.
TINY = [
    "dataset=synthetic", "dataset.channels=1", "dataset.size=8", "dataset.classes=4",
    "dataset.train_size=160", "dataset.test_size=40",
    "model=mlp", "model.hidden=[16]",
    "trainer.epochs=2", "trainer.device=cpu", "trainer.log_every_n_steps=1",
    "data.batch_size=16", "data.eval_batch_size=32",
]


def tiny_with(group: str, entry: str) -> list[str]:
    """TINY with ``group`` set to ``entry`` and TINY's own options for that group dropped."""
    return [o for o in TINY if not o.startswith((f"{group}=", f"{group}."))] + [f"{group}={entry}"]


def compose_config(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200)


def tiny_plus(*overrides: str) -> list[str]:
    """TINY, then ``overrides``; a group choice among them (model=lenet5) drops TINY's options for that group."""
    base = list(TINY)
    for o in overrides:
        key = o.split("=", 1)[0]
        if "." not in key and any(t.startswith(f"{key}=") for t in TINY):
            base = [t for t in base if not t.startswith((f"{key}=", f"{key}."))]
    return base + list(overrides)


def train(cfg, run_dir: Path | None, **job) -> dict:
    """cnnlab.tasks.train on a composed config, checked as every entry point checks it (parse_run_config),
    run as ``Job(run_dir, **job)``."""
    from cnnlab.core.config import parse_run_config
    from cnnlab.tasks import Job
    from cnnlab.tasks import train as run_task

    return run_task(parse_run_config(cfg), Job(run_dir, **job))


def setup(cfg, **options):
    """cnnlab.training.assemble.setup of a composed config, checked first as the entry points check it."""
    from cnnlab.core.config import parse_run_config
    from cnnlab.training import assemble

    return assemble.setup(parse_run_config(cfg), **options)


def run_tiny(run_dir: Path, *overrides: str) -> dict:
    return train(compose_config(*tiny_plus(*overrides)), run_dir, console=quiet_console())


class WarmCli:
    """Runs `cnnlab` commands as children forked from one warm process (tests/warm_cli.py): real
    processes with their own cwd, environment, output and exit status, without re-importing torch
    and Hydra for each. CNNLAB_TESTS_COLD=1 runs every command as `python -m cnnlab` instead."""

    _instance: WarmCli | None = None

    def __init__(self):
        self.server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("warm_cli.py"))],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent)
        self.slots: dict[str, dict] = {}
        self.guard = threading.Lock()
        self.outputs = Path(tempfile.mkdtemp(prefix="cnnlab-warm-"))
        threading.Thread(target=self._read, daemon=True).start()
        atexit.register(self.close)

    @classmethod
    def get(cls) -> WarmCli:
        if cls._instance is None or cls._instance.server.poll() is not None:
            cls._instance = cls()
        return cls._instance

    cpu_s = 0.0  # the CPU seconds of the commands that ended, with their children's (cpu_seconds)

    def _read(self) -> None:
        for line in self.server.stdout:
            message = json.loads(line)
            WarmCli.cpu_s += message.get("cpu", 0.0)
            slot = self.slots[message["id"]]
            slot.update(message)
            slot["done" if "code" in message else "started"].set()

    def start(self, args: list[str], cwd: Path, env: dict) -> WarmProcess:
        key = uuid.uuid4().hex
        out, err = self.outputs / f"{key}.out", self.outputs / f"{key}.err"
        slot = {"started": threading.Event(), "done": threading.Event()}
        request = {"id": key, "args": args, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        with self.guard:
            self.slots[key] = slot
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
        if not slot["started"].wait(60):
            raise RuntimeError("the warm cnnlab process did not answer")
        return WarmProcess([sys.executable, "-m", "cnnlab", *args], slot, out, err)

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.kill()
            self.server.wait()
        shutil.rmtree(self.outputs, ignore_errors=True)


class WarmProcess:
    """A `cnnlab` command forked by the warm CLI, used as a subprocess.Popen with text output piped: pid,
    poll, wait, communicate, send_signal, kill, returncode."""

    def __init__(self, args: list[str], slot: dict, out: Path, err: Path):
        self.args, self.slot, self.files = args, slot, (out, err)
        self.pid: int = slot["pid"]
        self.output: tuple[str, str] | None = None

    @property
    def returncode(self) -> int | None:
        return self.slot.get("code")

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self.slot["done"].wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        if self.output is None:
            self.output = tuple(f.read_text() for f in self.files)
            for f in self.files:
                f.unlink()
        return self.output

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # as Popen: nothing once it has ended (its pid may be another's by then)
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start_cnnlab(args: list[str], cwd: Path, env: dict) -> WarmProcess | subprocess.Popen:
    """The real `cnnlab` command with ``args`` started in ``cwd`` with exactly ``env``, its output piped."""
    if os.environ.get("CNNLAB_TESTS_COLD"):
        return subprocess.Popen([sys.executable, "-m", "cnnlab", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return WarmCli.get().start(list(args), cwd, env)


def run_cnnlab(args: list[str], cwd: Path, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    """The real `cnnlab` command with ``args`` run to its end in ``cwd`` with exactly ``env``."""
    process = start_cnnlab(args, cwd, env)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    """The real `cnnlab` command, outputs under cwd."""
    # A narrow COLUMNS: output that is not a terminal must never be wrapped to it.
    full_env = {**os.environ, "CNNLAB_OUTPUT_DIR": str(cwd / "outputs"), "COLUMNS": "40", **(env or {})}
    return run_cnnlab(list(args), cwd, full_env, timeout)


def start_worker(cwd: Path, *args: str) -> WarmProcess | subprocess.Popen:
    """A `cnnlab train -m` worker process (one intra-op thread), its output piped."""
    return start_cnnlab(["train", "-m", *args], cwd, {**os.environ, "COLUMNS": "80", "OMP_NUM_THREADS": "1"})


def lr_values(optimizer, scheduler, steps: int) -> list[float]:
    """The learning rate of each of ``steps`` optimizer updates under ``scheduler``."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.fixture
def captured(monkeypatch):
    """What a run built: its Trainer, its validation split arguments and its loaders."""
    import cnnlab.tasks.classify as classify_module
    import cnnlab.training.assemble as assemble_module

    seen = {}

    class CapturingTrainer(classify_module.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["trainer"] = self

    original_split, original_loader = assemble_module.stratified_split, assemble_module.Setup.loader

    def split(labels, val_fraction, seed):
        seen["split"] = (val_fraction, seed)
        return original_split(labels, val_fraction, seed)

    def loader(self, *args, **kwargs):
        made = original_loader(self, *args, **kwargs)
        seen.setdefault("loaders", []).append(made)
        return made

    monkeypatch.setattr(classify_module, "Trainer", CapturingTrainer)
    monkeypatch.setattr(assemble_module, "stratified_split", split)
    monkeypatch.setattr(assemble_module.Setup, "loader", loader)
    return seen


@pytest.fixture
def tiny_run(tmp_path):
    def run(*overrides: str) -> dict:
        return run_tiny(tmp_path / "run", *overrides)

    return run


@dataclass
class Cluster:
    partition: str
    database: str
    env: dict[str, str]  # os.environ with SLURM_CONF: what a SLURM command of this cluster needs


@pytest.fixture(scope="session")
def cluster():
    """The one-node SLURM cluster and PostgreSQL server of scripts/local_cluster.sh, up for the session.
    Where they cannot start, the tests that need them are skipped with the reason, except in CI
    (CI=true), where that is a failure: a cluster test never passes by not running."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "local_cluster.sh"
    up = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        reason = f"no local cluster: {(up.stderr.strip().splitlines() or ['scripts/local_cluster.sh up failed'])[-1]}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    facts = dict(line.split(": ", 1) for line in up.stdout.splitlines() if ": " in line)
    conf = next(line.split("=", 1)[1] for line in up.stdout.splitlines() if line.startswith("export SLURM_CONF="))
    yield Cluster(partition=facts["partition"], database=facts["database"], env={**os.environ, "SLURM_CONF": conf})
    subprocess.run(["bash", str(script), "down"], capture_output=True, text=True, timeout=300)

