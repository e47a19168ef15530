"""A sweep on an Optuna study: what hydra_plugins.cnnlab_sweeper runs.

Every worker (the command itself, its ``n_jobs - 1`` helper processes, the same command started
on other machines or as SLURM array tasks) runs the same loop on one study:

    claim a trial  ->  run it as a Hydra job in <sweep dir>/<job>  ->  tell the study how it ended

A claim happens under the sweep's claim lock (a lock file in the sweep directory, cnnlab.runtime.lock),
so the count of trials and the ask that follows are one step: exactly ``n_trials`` trials run,
each once. Trial k's directory is ``<sweep dir>/<k>``; the claiming worker locks it before the
claim lock is let go, so a RUNNING trial whose directory is not locked by a live process was cut
off (its worker was killed). The next claim fails it with that reason and queues its values
again; the worker that takes the retry continues the cut-off trial in its directory, from its
last checkpoint.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.core.errors import CnnlabError, suggestion
from cnnlab.core.registry import PRUNERS, SAMPLERS
from cnnlab.core.status import FAILED, RANKED, RunStatus
from cnnlab.runtime import lock
from cnnlab.runtime.files import confine, open_append
from cnnlab.runtime.distributed import LOCK_HELD_ENV, cnnlab_command
from cnnlab.sweep.storage import RETRY_ENV, STORAGE_FILES, open_storage, retry_seconds, shown, storage_target

log = logging.getLogger("cnnlab.sweep.study")

CLAIM_DIR = ".claims"           # <sweep dir>/.claims/.cnnlab.lock: held while a worker claims a trial
WORKER_ENV = "CNNLAB_SWEEP_WORKER"  # set in the helper processes of n_jobs > 1: they start no helpers themselves
RETRY_OF, JOB = "retry_of", "job"  # user attributes: the trial a retry continues; the trial's directory number
UNBOUNDED = 10**6  # n_trials of a search that only hydra.sweeper.budget_s ends
COPIED_FROM = "copied_from"  # user attribute of a trial an earlier study ran (cnnlab tune's refine stages): no slot


@dataclass
class SweepSettings:
    """hydra.sweeper (conf/hydra/sweeper/cnnlab.yaml), checked."""

    sampler: str = "grid"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    pruner: str = "none"
    pruning: dict[str, Any] = field(default_factory=dict)
    n_trials: int | None = None
    n_jobs: int = 1  # hydra.sweeper.n_jobs, auto resolved (cnnlab.runtime.gpus.local_workers)
    storage: str = "sqlite"
    study_name: str = "cnnlab"
    direction: str = "maximize"
    max_failure_rate: float = 1.0
    seed: int | None = None
    max_epochs: int = 1
    storage_retry_s: float = 120.0
    budget_epochs: float | None = None
    budget_s: float | None = None  # wall-clock: no trial starts once this many seconds have passed since the sweep began


def check_settings(s: SweepSettings) -> None:
    SAMPLERS.get(s.sampler)
    PRUNERS.get(s.pruner)
    known = {name for entry in PRUNERS.names() for name in PRUNERS.get(entry).options}
    for key in s.pruning:
        if key not in known:
            raise CnnlabError(f"hydra.sweeper.pruning has no setting {key!r}{suggestion(key, known)}; "
                              f"settings: {', '.join(sorted(known))}")
    PRUNERS.check_options(s.pruner, pruner_options(s), "hydra.sweeper.pruning")
    SAMPLERS.check_options(s.sampler, {"seed": s.seed, **s.sampler_options}, "hydra.sweeper.sampler")
    for key, value, low in (("n_jobs", s.n_jobs, 1), ("n_trials", s.n_trials, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise CnnlabError(f"hydra.sweeper.{key} must be an integer >= {low}, got {value!r}")
    if s.direction not in ("minimize", "maximize"):
        raise CnnlabError(f"hydra.sweeper.direction must be minimize or maximize, got {s.direction!r}")
    if isinstance(s.storage_retry_s, bool) or not isinstance(s.storage_retry_s, int | float) \
            or not 0 <= s.storage_retry_s < math.inf:
        raise CnnlabError(f"hydra.sweeper.storage_retry_s must be a number of seconds >= 0, got {s.storage_retry_s!r}")
    if s.budget_epochs is not None and (isinstance(s.budget_epochs, bool) or not isinstance(s.budget_epochs, int | float)
                                        or not s.max_epochs <= s.budget_epochs < math.inf):
        raise CnnlabError(f"hydra.sweeper.budget_epochs must be a number of epochs >= one trial's trainer.epochs="
                          f"{s.max_epochs}, got {s.budget_epochs!r}")
    if s.budget_s is not None and (isinstance(s.budget_s, bool) or not isinstance(s.budget_s, int | float)
                                   or not 0 < s.budget_s < math.inf):
        raise CnnlabError(f"hydra.sweeper.budget_s must be a number of seconds > 0, got {s.budget_s!r}")
    if not 0 <= s.max_failure_rate <= 1:
        raise CnnlabError(f"hydra.sweeper.max_failure_rate must be in [0, 1], got {s.max_failure_rate!r}")


_UNSET = object()


def number_attr(trial, key: str, below: int = 10**6, default: Any = _UNSET) -> int | None:
    """A trial's user attribute that names a folder or a place (its job, a PBT member or generation): a whole number
    in [0, below). A study's storage may be someone else's file; anything else there is one line, never a path."""
    value = trial.user_attrs.get(key, default)
    if value is None and default is None:  # an optional attribute: absent (or null) is None
        return None
    if value is _UNSET:
        raise CnnlabError(f"trial {trial.number} of the study has no {key!r} attribute; the study was not made by cnnlab")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < below:
        raise CnnlabError(f"trial {trial.number} of the study has {key}={str(value)[:40]!r}, not a whole number in "
                          f"[0, {below}); the study's storage was changed by hand or is not cnnlab's")
    return value


def trial_epochs(trial) -> int:
    """The epochs a finished trial cost: those it trained, and the one a diverged trial stopped in."""
    if not trial.state.is_finished():
        return 0
    return number_attr(trial, "epochs", default=0) + (trial.user_attrs.get("status") == RunStatus.DIVERGED)


def fits_budget(trials, epochs: int, budget: float) -> bool:
    """Whether one more trial of ``epochs`` fits in ``budget`` beside what the study's trials spent (those an
    earlier study ran excepted) and what its running and queued ones may still spend (``epochs`` each)."""
    spent = sum(trial_epochs(t) for t in trials if COPIED_FROM not in t.user_attrs)
    reserved = epochs * sum(t.state.name in ("RUNNING", "WAITING") for t in trials)
    return spent + reserved + epochs <= budget + 1e-9


def build_sampler(s: SweepSettings, space: dict[str, Any], trial_number: int):
    return SAMPLERS.build(s.sampler, {"seed": s.seed, **s.sampler_options}, "hydra.sweeper.sampler",
                          trial_number=trial_number, search_space=space)


def pruner_options(s: SweepSettings) -> dict[str, Any]:
    """The settings under hydra.sweeper.pruning that the chosen pruner takes."""
    chosen = PRUNERS.get(s.pruner).options
    return {k: v for k, v in s.pruning.items() if k in chosen}


def build_pruner(s: SweepSettings):
    return PRUNERS.build(s.pruner, pruner_options(s), "hydra.sweeper.pruning",
                         max_epochs=s.max_epochs)


# ---- the search space: Hydra's sweep grammar as Optuna distributions ----

def search_space(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(distributions by key, the overrides every trial gets) from Hydra overrides: ``a,b,c`` and
    ``range(...)`` are lists of values, ``interval(lo, hi)`` a range, ``tag(log, interval(...))`` log-uniform."""
    import optuna
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep, Transformer

    space, fixed = {}, []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        sweep = override.value()
        if isinstance(sweep, IntervalSweep):
            log_scale = "log" in sweep.tags
            low, high = sweep.start, sweep.end
            if log_scale and low <= 0:
                raise CnnlabError(f"{key}: a log-scale interval needs a lower end > 0, got {low}")
            if not low < high:
                raise CnnlabError(f"{key}=interval({low}, {high}): the lower end must come first and be below the upper")
            if "int" in sweep.tags or (isinstance(low, int) and isinstance(high, int)):
                space[key] = optuna.distributions.IntDistribution(int(low), int(high), log=log_scale)
            else:
                space[key] = optuna.distributions.FloatDistribution(float(low), float(high), log=log_scale)
            continue
        values = list(override.sweep_iterator())
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            choices = values  # numbers stay numbers: the dashboard and the samplers see them as such
        else:
            choices = list(override.sweep_iterator(transformer=Transformer.encode))
        space[key] = optuna.distributions.CategoricalDistribution(choices)
    return space, fixed


def merged_overrides(params: dict[str, Any], arguments: list[str]) -> list[str]:
    """hydra.sweeper.params first, then the command line (which wins for the same key)."""
    keys = {a.partition("=")[0].lstrip("+~") for a in arguments}
    return [f"{k}={v}" for k, v in params.items() if str(k).lstrip("+~") not in keys] + list(arguments)


def grid_points(space: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the listed values, the first key outermost (as Hydra's basic sweeper)."""
    keys = list(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k].choices for k in keys))]


def override_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


# ---- the claim lock ----

@contextlib.contextmanager
def claim_lock(sweep_dir: Path, timeout_s: float = 900.0) -> Iterator[None]:
    """Held by one worker at a time while it counts trials and asks for the next."""
    folder = sweep_dir / CLAIM_DIR
    confine(sweep_dir)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            lock.acquire(folder)
            break
        except CnnlabError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    try:
        yield
    finally:
        lock.release(folder)


# ---- the trial a worker is running (read by cnnlab.sweep.trials.run_trial) ----

@dataclass
class Claim:
    trial: Any        # optuna.Trial
    job: int          # the trial's directory: <sweep dir>/<job>
    overrides: list[str]


active: list[Claim] = []  # the claim whose Hydra job runs now in this process
# A trial launched in another process (a SLURM job) finds its study through these (hydra.job.env_set).
TRIAL_ENV, STUDY_ENV, STORAGE_ENV = "CNNLAB_TRIAL_ID", "CNNLAB_STUDY", "CNNLAB_STUDY_STORAGE"


def quoted(value: str) -> str:
    """A value in Hydra's override grammar, quoted."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def active_claim() -> Claim | None:
    """The trial this process runs now: the sweeper's own, or one it launched elsewhere (from the environment)."""
    if active:
        return active[-1]
    trial_id = os.environ.get(TRIAL_ENV)
    if trial_id is None:
        return None
    import optuna

    target = os.environ[STORAGE_ENV]
    storage = open_storage("journal" if target.endswith(".journal") else target, Path(target).parent,
                           retry_seconds(), patient=True)  # its sweeper reached it: an error now is an outage
    study = optuna.load_study(study_name=os.environ[STUDY_ENV], storage=storage,
                              sampler=optuna.samplers.RandomSampler())
    return Claim(optuna.Trial(study, int(trial_id)), job=-1, overrides=[])


class Study:
    """One worker's view of the sweep's study."""

    carried_attrs: tuple[str, ...] = ()  # user attributes a cut-off trial's retry keeps
    remote = False  # whether its trials run in processes another launcher starts (the sweeper sets it)

    def __init__(self, settings: SweepSettings, sweep_dir: Path, space: dict[str, Any], fixed: list[str], storage):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.s, self.sweep_dir, self.space, self.fixed = settings, sweep_dir, space, fixed
        self.n_trials, self.grid = settings.n_trials, None
        if settings.sampler == "grid":  # intervals were refused before (the sweeper builds the grid sampler first)
            self.grid = grid_points(space)
            if self.n_trials is None or self.n_trials > len(self.grid):
                self.n_trials = len(self.grid)
        elif self.n_trials is None and settings.budget_epochs is not None:
            self.n_trials = math.ceil(settings.budget_epochs)  # a trial that fails before its first epoch costs none
        elif self.n_trials is None and settings.budget_s is not None:
            self.n_trials = UNBOUNDED  # the clock alone ends it
        elif self.n_trials is None:
            raise CnnlabError(f"sampler {settings.sampler!r} needs hydra.sweeper.n_trials (how many trials to run), "
                              "hydra.sweeper.budget_epochs or hydra.sweeper.budget_s")
        self.storage = storage
        # Called under the claim lock with the study's trials: False when no new trial may start (an epoch budget).
        self.admit: Callable[[list], bool] | None = None
        if settings.budget_epochs is not None or settings.budget_s is not None:
            self.admit = lambda trials: (
                (settings.budget_epochs is None or fits_budget(trials, settings.max_epochs, settings.budget_epochs))
                and (settings.budget_s is None or time.time() - self.started < settings.budget_s))
        pruner = build_pruner(settings)
        with claim_lock(sweep_dir):
            try:
                self.study = optuna.create_study(storage=self.storage, study_name=settings.study_name,
                                                 direction=settings.direction, pruner=pruner, load_if_exists=True,
                                                 sampler=optuna.samplers.RandomSampler())
            except Exception as e:  # noqa: BLE001
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise CnnlabError(f"study {settings.study_name!r} in {shown(self.target)}: {first}") from None
            self._check_or_record()

    @property
    def target(self) -> str:
        return storage_target(self.s.storage, self.sweep_dir)

    def _check_or_record(self) -> None:
        """A study belongs to one sweep: the same directory and the same search space."""
        self.started = time.time()
        mine = {"sweep_dir": str(self.sweep_dir.resolve()), "space": sorted(self.space), "started": self.started}
        attrs = self.study.user_attrs
        if "cnnlab" not in attrs:
            self.study.set_user_attr("cnnlab", mine)
            return
        theirs = attrs["cnnlab"]
        started = theirs.get("started", self.started)  # the first worker's clock: budget_s is the sweep's
        if isinstance(started, bool) or not isinstance(started, int | float) or not math.isfinite(started):
            raise CnnlabError(f"study {self.s.study_name!r} in {shown(self.target)} records started={str(started)[:40]!r}, "
                              "not a time; the study's storage was changed by hand or is not cnnlab's")
        self.started = float(started)
        if theirs.get("space") != mine["space"]:
            raise CnnlabError(f"study {self.s.study_name!r} in {shown(self.target)} searches {', '.join(theirs.get('space', []))}; "
                              f"this sweep searches {', '.join(mine['space'])}: choose another hydra.sweeper.study_name")
        if theirs.get("sweep_dir") != mine["sweep_dir"] and self.s.storage not in STORAGE_FILES:
            raise CnnlabError(f"study {self.s.study_name!r} in {shown(self.target)} belongs to the sweep in {theirs.get('sweep_dir')}; "
                              f"run with hydra.sweep.dir={theirs.get('sweep_dir')} to join it, or choose another "
                              "hydra.sweeper.study_name")

    def build_sampler(self, trial_number: int):
        return build_sampler(self.s, self.space, trial_number)

    # -- claims --

    def claim(self, wait: bool = True) -> Claim | None:
        """The next trial for this worker, its directory locked; None when the sweep has nothing left to run
        (``wait``: whether a study whose next trial waits for others' may wait; this one never does).
        Its Hydra job's overrides: _claim_of."""
        from optuna.trial import TrialState

        with claim_lock(self.sweep_dir):
            self._recover_cut_off()
            trials = self.study.get_trials(deepcopy=False)
            slots = [t for t in trials if RETRY_OF not in t.user_attrs and COPIED_FROM not in t.user_attrs]
            waiting = [t for t in trials if t.state == TrialState.WAITING]
            if self._too_many_failures(trials):
                return None
            if not waiting and (len(slots) >= self.n_trials or (self.admit is not None and not self.admit(trials))):
                return None
            if not waiting and self.grid is not None:  # the grid in order: slot k is combination k
                self.study.enqueue_trial(self.grid[len(slots)])
            self.study.sampler = self.build_sampler(len(trials))
            trial = self.study.ask(fixed_distributions=self.space)
            retry_of = number_attr(trial, RETRY_OF, default=None)
            # Directories 0..n_trials-1: a trial's place among the trials that are not retries.
            place = sum(1 for t in slots if t.number < (trial.number if retry_of is None else retry_of))
            job = number_attr(trial, JOB, default=place)
            trial.set_user_attr(JOB, job)
            lock.acquire(self.sweep_dir / str(job))  # before the claim lock goes: never taken for cut off
        return self._claim_of(trial, job)

    def _claim_of(self, trial, job: int) -> Claim:
        """``trial`` as a claim: the overrides of its Hydra job in <sweep dir>/<job>. A job another launcher runs
        in another process (``remote``: a SLURM job) learns its trial in the study, and that its directory is
        locked for it, from its environment (hydra.job.env_set); a job in this process needs neither: its claim
        is ``active`` and its lock this process's own."""
        trial_dir = (self.sweep_dir / str(job)).resolve()
        overrides = [*self.fixed, *(f"{k}={override_value(v)}" for k, v in trial.params.items()),
                     f"hydra.sweep.subdir={job}"]
        if self.remote:
            overrides += [f"+hydra.job.env_set.{k}={quoted(v)}" for k, v in (
                (TRIAL_ENV, str(trial._trial_id)), (STUDY_ENV, self.s.study_name), (STORAGE_ENV, self.target),
                (RETRY_ENV, repr(float(self.s.storage_retry_s))), (LOCK_HELD_ENV, str(trial_dir)))]
        return Claim(trial, job, overrides)

    def _too_many_failures(self, trials) -> bool:
        from optuna.trial import TrialState

        if self.s.max_failure_rate >= 1:
            return False
        done = [t for t in trials if t.state.is_finished() and "cut_off" not in t.user_attrs]
        failed = [t for t in done if t.state == TrialState.FAIL]
        if done and len(failed) / len(done) > self.s.max_failure_rate:
            log.warning("%d of %d trials failed (more than max_failure_rate=%s): no more trials start",
                        len(failed), len(done), self.s.max_failure_rate)
            return True
        return False

    def _recover_cut_off(self) -> None:
        """Fail the RUNNING trials whose worker is gone, and queue their values again (claim lock held)."""
        import optuna
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            job = number_attr(t, JOB, default=None)
            if job is not None:
                try:
                    lock.check_free(self.sweep_dir / str(job))
                    if (self.sweep_dir / str(job)).resolve() in lock.held():
                        continue  # this process runs it (an n_jobs helper never shares a process)
                except CnnlabError:
                    continue  # its worker is alive
            reason = f"cut off: its worker stopped; trial {t.number} is queued again" + (
                f" to continue in {self.sweep_dir / str(job)}" if job is not None else "")
            try:
                self.storage.set_trial_user_attr(t._trial_id, "cut_off", reason)
                self.study.tell(t.number, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # told by its worker after all: it was not cut off
            except ValueError:  # Optuna's word for "already finished" in tell
                continue
            attrs = {RETRY_OF: t.number, **({JOB: job} if job is not None else {}),
                     **{k: t.user_attrs[k] for k in self.carried_attrs if k in t.user_attrs}}
            self.study.enqueue_trial(t.params, user_attrs=attrs)
            log.warning("trial %d was %s", t.number, reason)

    def tell(self, claim: Claim, summary: dict[str, Any] | None, error: str | None) -> str:
        """Tell the study how ``claim``'s trial ended; returns its status."""
        import optuna
        from optuna.trial import TrialState

        trial = claim.trial
        status = (summary or {}).get("status", RunStatus.FAILED) if error is None else RunStatus.FAILED
        value = (summary or {}).get("best_value")
        history = (summary or {}).get("history") or []
        trial.set_user_attr("status", status)
        trial.set_user_attr("epochs", len(history))
        self.study.sampler = optuna.samplers.RandomSampler()  # after_trial hooks (the grid's stop) need Study.optimize
        if status == RunStatus.PRUNED:
            self.study.tell(trial, state=TrialState.PRUNED)
        elif status in RANKED and value is not None and math.isfinite(value):
            self.study.tell(trial, float(value))
        else:
            reason = error or (summary or {}).get("error") or f"{status}: no value of the monitored metric"
            trial.set_user_attr("fail_reason", reason)
            self.study.tell(trial, state=TrialState.FAIL)
            status = status if status in FAILED else RunStatus.FAILED
        return status

    def release(self, claim: Claim) -> None:
        lock.release(self.sweep_dir / str(claim.job))


# ---- helper processes for n_jobs > 1 ----

def start_helpers(args: list[str], folder: Path, threads: int, gpus: list[str | None]) -> list[tuple[subprocess.Popen, Path]]:
    """One more worker on this machine for each entry of ``gpus``: the same command (``cnnlab ARGS``: a sweep's
    `train -m ...`, a tune's `tune ...`), seeing only that GPU (CUDA_VISIBLE_DEVICES; None: as this process
    does), logging to <folder>/workers/."""
    logs = folder / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, WORKER_ENV: "1", "OMP_NUM_THREADS": str(threads)}
    helpers = []
    for k, gpu in enumerate(gpus, start=1):
        path = logs / f"worker-{os.getpid()}-{k}.log"
        with open_append(path) as out:
            process = subprocess.Popen(cnnlab_command(*args),
                                       env=env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu},
                                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       preexec_fn=_die_with_parent)
        helpers.append((process, path))
    return helpers


def start_local_workers(args: list[str], folder: Path, workers: int, gpus: list[str]) -> tuple[list, list, bool]:
    """A search's workers on this machine, for a sweep or a tune (``cnnlab ARGS``): without GPUs, ``workers - 1``
    helpers beside this process; with GPUs, ``workers`` helpers, each seeing its own GPU round-robin, while this
    process only supervises (CUDA may be initialised here already, so it cannot narrow its own view). Each gets its
    share of the CPU threads. Returns (helpers, each worker's GPU, whether pinned)."""
    pinned = bool(gpus)
    if workers == 1 and not pinned:
        return [], [], False
    import torch

    from cnnlab.runtime.gpus import worker_gpus

    assigned = worker_gpus(workers, gpus)
    threads = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    return start_helpers(args, folder, threads, assigned if pinned else assigned[1:]), assigned, pinned


def wait_for_helpers(helpers: list[tuple[subprocess.Popen, Path]], fine: tuple[int, ...] = (0,)) -> None:
    """Until every helper worker has exited; one whose exit status is not ``fine`` is named with its log."""
    for process, path in helpers:
        if (code := process.wait()) not in fine:
            print(f"a helper worker exited with status {code}; its log: {path}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """A helper is sent SIGTERM when the worker that started it dies (Linux): it checkpoints and stops."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_helpers(helpers: list[tuple[subprocess.Popen, Path]]) -> None:
    """Pass a stop on: the helpers still running checkpoint their trials and stop."""
    for process, _ in helpers:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)


def is_helper() -> bool:
    return os.environ.get(WORKER_ENV) == "1"
