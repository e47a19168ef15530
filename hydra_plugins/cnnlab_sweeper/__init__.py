"""cnnlab's Hydra sweeper (``hydra/sweeper=cnnlab``, the default of ``cnnlab train -m``): each
worker claims one trial at a time from an Optuna study, runs it as a Hydra job, tells the study
how it ended (COMPLETE, PRUNED, or FAIL with its reason) and claims the next, never waiting for
a batch. The loop and the study live in cnnlab.sweep.study; Hydra loads sweepers only from the
``hydra_plugins`` package, so this is the adapter.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger("cnnlab.sweep.study")


class CnnlabSweeper(Sweeper):
    def __init__(self, sampler: Any = "grid", pruner: str = "none", pruning: Any = None, n_trials: int | None = None,
                 n_jobs: Any = "auto", storage: str = "sqlite", study_name: str = "cnnlab", direction: str = "auto",
                 max_failure_rate: float = 1.0, storage_retry_s: float = 120.0, params: Any = None,
                 scheduler: str = "none", pbt: Any = None, budget_epochs: Any = None, gpus: Any = "auto",
                 trials_per_gpu: Any = 1, pack: Any = 1, budget_s: Any = None) -> None:
        sampler = OmegaConf.to_container(sampler, resolve=True) if isinstance(sampler, DictConfig) else sampler
        sampler = {"name": sampler} if isinstance(sampler, str) else dict(sampler or {})
        self.sampler_name = str(sampler.pop("name", "grid"))
        self.sampler_options = sampler
        self.pruner = str(pruner)
        self.pruning = OmegaConf.to_container(pruning, resolve=True) if isinstance(pruning, DictConfig) else dict(pruning or {})
        self.n_trials, self.n_jobs, self.storage = n_trials, n_jobs, str(storage)
        self.study_name, self.direction, self.max_failure_rate = str(study_name), str(direction), float(max_failure_rate)
        self.storage_retry_s = storage_retry_s
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.scheduler, self.budget_epochs = str(scheduler), budget_epochs
        self.pbt = OmegaConf.to_container(pbt, resolve=True) if isinstance(pbt, DictConfig) else dict(pbt or {})
        self.gpus = OmegaConf.to_container(gpus, resolve=True) if isinstance(gpus, ListConfig) else gpus
        self.trials_per_gpu = trials_per_gpu
        self.pack, self.budget_s = pack, budget_s

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from cnnlab.core.errors import CnnlabError
        from cnnlab.core.plugins import load_components
        from cnnlab.sweep import study as sweep_study
        from cnnlab.sweep.storage import dashboard_command, open_storage
        from cnnlab.runtime.gpus import described, visible_gpus
        from cnnlab.sweep.trials import record_sweep

        load_components()
        config = self.config
        if OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir") != "${hydra.job.num}":
            raise CnnlabError("the cnnlab sweeper names trial directories by trial number: "
                              "leave hydra.sweep.subdir as ${hydra.job.num}")
        sweep_dir = Path(config.hydra.sweep.dir)
        helper = sweep_study.is_helper()
        in_process = type(self.launcher).__name__ == "BasicLauncher"
        # This machine's GPUs, for its local workers (a helper was given its one; another launcher gives its own).
        gpus = visible_gpus(self.gpus) if in_process and not helper else []
        settings = self.settings(config, gpus)
        if helper:
            settings.n_jobs = 1
        sweep_study.check_settings(settings)
        space, fixed = sweep_study.search_space(sweep_study.merged_overrides(self.params, arguments))
        pbt = self.pbt_settings(config, settings, space)
        if settings.sampler == "grid":
            sweep_study.build_sampler(settings, space, 0)  # a grid of intervals is refused before anything is written
        if not in_process:
            check_launcher(config)
        pack = self.pack_size(space, in_process)
        storage = open_storage(settings.storage, sweep_dir, settings.storage_retry_s)  # reachable, before anything is written
        record_sweep(config)
        study = self.study(config, settings, pbt, (sweep_dir, space, fixed, storage))
        study.remote = not in_process
        workers = min(settings.n_jobs, study.n_trials)  # never a worker with no trial to run
        if in_process and not helper and not gpus and settings.n_jobs > (cores := os.cpu_count() or 1):
            print(f"warning: hydra.sweeper.n_jobs={settings.n_jobs} is more than this machine's {cores} CPU cores; "
                  f"{workers} workers start ({study.n_trials} trials), "
                  f"{'sharing the cores' if workers > cores else 'one core or more each'}", file=sys.stderr, flush=True)
        helpers, assigned, pinned = (sweep_study.start_local_workers(
            ["train", "-m", *self._helper_args(sweep_dir)], sweep_dir, workers, gpus) if in_process else ([], [], False))
        if not helper:
            budget = "".join(f" inside {k}={v}" for k, v in (("budget_epochs", settings.budget_epochs),
                                                             ("budget_s", settings.budget_s)) if v is not None)
            count = "trials until the budget ends" if study.n_trials == sweep_study.UNBOUNDED else f"{study.n_trials} trials"
            print(f"study {settings.study_name!r}: {count}{budget}, sampler {settings.sampler}, "
                  f"pruner {settings.pruner}, {workers} at a time; live view: "
                  f"{dashboard_command(study.target)}", flush=True)
            if pinned:
                print(f"GPUs: {described(assigned)}; their logs: {sweep_dir / 'workers'}", flush=True)
        try:
            if not pinned:  # pinned, each helper packs its own trials
                self._work(study, batch=1 if in_process else workers, pack=pack)
        except BaseException:  # pre-empted, Ctrl-C, a bug: the helpers stop too, after a checkpoint
            sweep_study.stop_helpers(helpers)
            raise
        finally:
            sweep_study.wait_for_helpers(helpers, fine=(0, 3))  # 3: the helper's trials failed, as they are told
        return None

    def settings(self, config: DictConfig, gpus: list[str] = ()):
        """hydra.sweeper as cnnlab.sweep.study.SweepSettings (not yet checked); n_jobs=auto from ``gpus``, the GPUs
        of this machine its workers may use."""
        from cnnlab.runtime.gpus import check_per_gpu, local_workers
        from cnnlab.sweep.study import SweepSettings
        from cnnlab.sweep.trials import direction_of

        options = dict(self.sampler_options)
        return SweepSettings(
            sampler=self.sampler_name, sampler_options={k: v for k, v in options.items() if k != "seed"},
            seed=options.get("seed"), pruner=self.pruner, pruning=dict(self.pruning), n_trials=self.n_trials,
            n_jobs=local_workers(self.n_jobs, list(gpus), check_per_gpu(self.trials_per_gpu, "hydra.sweeper.trials_per_gpu"),
                                 "hydra.sweeper.n_jobs"),
            storage=self.storage, study_name=self.study_name,
            direction=direction_of(config) if self.direction == "auto" else self.direction,
            max_failure_rate=self.max_failure_rate, max_epochs=int(config.trainer.epochs),
            storage_retry_s=self.storage_retry_s, budget_epochs=self.budget_epochs, budget_s=self.budget_s)

    @staticmethod
    def study(config: DictConfig, settings, pbt, where: tuple):
        """The sweep's study (sweep dir, space, fixed overrides, storage): a population's with scheduler=pbt."""
        from cnnlab.sweep import study as sweep_study

        if pbt is None:
            return sweep_study.Study(settings, *where)
        from cnnlab.sweep.pbt import PbtStudy
        from cnnlab.tasks import monitor_of

        return PbtStudy(settings, pbt, *where, epochs=int(config.trainer.epochs), monitor=monitor_of(config))

    def pbt_settings(self, config: DictConfig, settings, space: dict[str, Any]):
        """hydra.sweeper.pbt, checked, when hydra.sweeper.scheduler=pbt; None for scheduler none."""
        from cnnlab.core.errors import CnnlabError, suggestion
        from cnnlab.sweep.pbt import PbtSettings, check_pbt
        from cnnlab.tasks import task_name

        if self.scheduler == "none":
            return None
        if self.scheduler != "pbt":
            raise CnnlabError(f"hydra.sweeper.scheduler must be none or pbt, got {self.scheduler!r}"
                              f"{suggestion(self.scheduler, ['none', 'pbt'])}")
        known = PbtSettings.__dataclass_fields__
        for key in self.pbt:
            if key not in known:
                raise CnnlabError(f"hydra.sweeper.pbt has no setting {key!r}{suggestion(key, known)}; "
                                  f"settings: {', '.join(known)}")
        pbt = PbtSettings(**self.pbt)
        check_pbt(settings, pbt, space, int(config.trainer.epochs), task_name(config))
        return pbt

    def pack_size(self, space: dict[str, Any], in_process: bool) -> int | str:
        """hydra.sweeper.pack, checked: how many trials train as one pack here (1: each alone). Trials that may not
        share a pack say so in one line, and run alone."""
        from cnnlab.core.errors import CnnlabError
        from cnnlab.training.pack import packable_key

        pack = self.pack
        if pack != "auto" and (isinstance(pack, bool) or not isinstance(pack, int) or pack < 1):
            raise CnnlabError(f"hydra.sweeper.pack must be auto or an integer >= 1 (trials trained as one stacked "
                              f"model), got {pack!r}")
        if pack == 1:
            return 1
        why = None
        if not in_process:
            why = "another launcher runs each trial as a job of its own"
        elif unpackable := [k for k in space if not packable_key(k)]:
            why = (f"the trials differ in {unpackable[0]}, and a pack's members share the model, data, batches and "
                   "epochs (they may differ in seed, optimizer.*, scheduler.*, init.*, augment.ops.*, "
                   "trainer.label_smoothing and the stopping rules)")
        if why is not None:
            print(f"hydra.sweeper.pack={pack}: the trials run one at a time, not packed: {why}", file=sys.stderr,
                  flush=True)
            return 1
        return pack  # auto: sized by the worker that trains them, at its first trial (_work)

    def _helper_args(self, sweep_dir: Path) -> list[str]:
        from cnnlab.service.compose import CONFIG_DIRS

        overrides = self.config.hydra.overrides
        hydra_args = [o for o in overrides.hydra if not o.startswith("hydra.sweep.dir=")]
        folders = [arg for path in CONFIG_DIRS for arg in ("--config-dir", path)]
        return [*folders, *hydra_args, *overrides.task, f"hydra.sweep.dir={sweep_dir.resolve()}"]

    def _work(self, study, batch: int, pack: int | str = 1) -> None:
        """Claim, run, tell, until the study has nothing left. In this process (Hydra's basic launcher)
        one trial at a time, or ``pack`` trials as one pack (auto: sized at the first trial claimed); through
        another launcher (SLURM) ``batch`` trials at a time, one job array."""
        from cnnlab.sweep import study as sweep_study

        while True:
            asked = time.perf_counter()
            claims = []
            while len(claims) < max(batch, pack if pack != "auto" else 1) and (
                    claim := study.claim(wait=not claims)) is not None:
                claims.append(claim)
                if pack == "auto":
                    pack = self._auto_pack(claim)
            if not claims:
                return
            started = time.perf_counter()
            sweep_study.active.extend(claims if batch == 1 and len(claims) == 1 else [])
            try:
                outcomes = self._packed(study, claims) if len(claims) > 1 and pack > 1 else self._launched(claims)
                ran = time.perf_counter()
                for claim, (summary, error) in zip(claims, outcomes):
                    # Told before its directory is unlocked: an unlocked RUNNING trial is a cut-off one.
                    status = study.tell(claim, summary if isinstance(summary, dict) else None, error)
                    # The sweeper's own cost per trial (scripts/sweep_overhead.py reads this line).
                    log.info("trial %d (%s): %s in %.1f s; claim %.1f ms, tell %.1f ms", claim.trial.number,
                             " ".join(o for o in claim.overrides if not o.startswith(("hydra.", "+hydra."))), status,
                             ran - started, 1000 * (started - asked) / len(claims),
                             1000 * (time.perf_counter() - ran) / len(claims))
            finally:
                del sweep_study.active[:]
                # Pre-empted (a BaseException): the trials stay RUNNING, their directories unlocked: a rerun continues them.
                for claim in claims:
                    study.release(claim)


    def _auto_pack(self, claim) -> int:
        from cnnlab.runtime.gpus import check_per_gpu
        from cnnlab.service.run import auto_pack

        size, line = auto_pack([o for o in claim.overrides if not o.startswith(("hydra.", "+hydra."))],
                               check_per_gpu(self.trials_per_gpu, "hydra.sweeper.trials_per_gpu"), "hydra.sweeper.pack")
        if line:
            print(line, flush=True)
        return size

    def _launched(self, claims) -> list[tuple[Any, str | None]]:
        """The claims' trials as Hydra jobs through the launcher: (summary, None) or (None, the failure's line)."""
        outcomes = []
        for result in self.launcher.launch([c.overrides for c in claims], initial_job_idx=claims[0].job):
            if result.status == JobStatus.COMPLETED:
                outcomes.append((result.return_value, None))
            else:
                failure = result._return_value  # the job's exception
                outcomes.append((None, (str(failure).strip().splitlines() or [type(failure).__name__])[0]))
        return outcomes

    @staticmethod
    def _packed(study, claims) -> list[tuple[Any, str | None]]:
        """The claims' trials trained as one pack, by the run service, in this process."""
        from cnnlab.service.run import start_pack

        members = [([o for o in c.overrides if not o.startswith(("hydra.", "+hydra."))], study.sweep_dir / str(c.job),
                    c.trial) for c in claims]
        print(f"pack of {len(claims)}: trials {', '.join(str(c.job) for c in claims)} (each one's output: "
              f"{study.sweep_dir}/<trial>/console.log)", flush=True)
        return [(summary, None) for summary in start_pack(members)]


def check_launcher(config: DictConfig) -> None:
    """A SLURM partition that does not exist is one line before any trial is claimed."""
    import shutil
    import subprocess

    from cnnlab.core.errors import CnnlabError

    launcher = config.hydra.launcher
    if "slurm" not in str(launcher.get("_target_", "")).lower():
        return
    if shutil.which("sinfo") is None:
        raise CnnlabError("hydra/launcher=slurm: SLURM's commands (sinfo, sbatch) are not on this machine's PATH")
    found = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True)
    if found.returncode != 0:
        raise CnnlabError(f"hydra/launcher=slurm: sinfo failed: {(found.stderr.strip().splitlines() or [''])[0]}")
    partitions = sorted(set(found.stdout.split()))
    partition = launcher.get("partition")
    if partition is not None and str(partition) not in partitions:
        raise CnnlabError(f"hydra.launcher.partition={partition}: no such SLURM partition here; "
                          f"partitions: {', '.join(partitions)}")
    check_job_fits(launcher)
    quiet_sacct_without_accounting()


def check_job_fits(launcher) -> None:
    """A trial's job that SLURM would refuse (GPUs on a partition without any) or that no node of the partition can
    ever run (more CPUs or memory than a node has: it would pend forever) is one line naming the launcher setting."""
    import subprocess

    from cnnlab.core.errors import CnnlabError

    where = ["--partition", str(launcher.partition)] if launcher.get("partition") else []
    nodes = subprocess.run(["sinfo", "-h", "-N", *where, "-o", "%c %m"], capture_output=True, text=True)
    sizes = [tuple(map(int, line.split()[:2])) for line in nodes.stdout.splitlines()
             if len(line.split()) >= 2 and all(v.isdigit() for v in line.split()[:2])]
    name = f"partition {launcher.partition}" if launcher.get("partition") else "the default partition"
    cpus, mem_gb = launcher.get("cpus_per_task") or 1, launcher.get("mem_gb")
    if sizes:
        most_cpus, most_mem = max(c for c, _ in sizes), max(m for _, m in sizes)
        per_node = cpus * (launcher.get("tasks_per_node") or 1)
        if per_node > most_cpus:
            raise CnnlabError(f"hydra.launcher.cpus_per_task={cpus}: the nodes of {name} have at most {most_cpus} CPUs, "
                              "so the trials' jobs would pend forever; lower it")
        if mem_gb is not None and mem_gb * 1024 > most_mem:
            raise CnnlabError(f"hydra.launcher.mem_gb={mem_gb}: the nodes of {name} have at most {most_mem / 1024:.1f} "
                              "GB, so the trials' jobs would pend forever; lower it")
    test = ["sbatch", "--test-only", *where, f"--cpus-per-task={cpus}", "--wrap", "true"]
    if launcher.get("gpus_per_node"):
        test.insert(2, f"--gpus-per-node={launcher.gpus_per_node}")
    if mem_gb is not None:
        test.insert(2, f"--mem={int(mem_gb * 1024)}M")
    tried = subprocess.run(test, capture_output=True, text=True)
    if tried.returncode != 0:
        said = " ".join(tried.stderr.replace("sbatch: error:", "").split())
        if "gres" in said.lower() and launcher.get("gpus_per_node"):
            raise CnnlabError(f"hydra.launcher.gpus_per_node={launcher.gpus_per_node}: {name} has no GPUs to give "
                              f"(sbatch: {said}); set hydra.launcher.gpus_per_node=0")
        raise CnnlabError(f"hydra/launcher=slurm: SLURM refuses the trials' jobs on {name}: {said}")


def quiet_sacct_without_accounting() -> None:
    """submitit asks sacct for its jobs' states. On a cluster that keeps no accounting, sacct always fails and
    submitit warns each time ("Bypassing sacct error"), though the states come from the jobs' result files: those
    warnings cannot apply there, and are left out."""
    import logging
    import subprocess

    probe = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, text=True)
    if probe.returncode == 0 or "accounting storage is disabled" not in probe.stderr.lower():
        return
    logger = logging.getLogger("submitit")
    if not any(isinstance(f, _NoAccounting) for f in logger.filters):
        logger.addFilter(_NoAccounting())


class _NoAccounting:
    def filter(self, record) -> bool:
        return "Bypassing sacct error" not in record.getMessage()
