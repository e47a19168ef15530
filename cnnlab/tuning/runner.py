"""`cnnlab tune`: the lectures' search method as one command, in one tune directory.

    gate  ->  coarse  ->  refine1 .. refineN  ->  final  ->  test once

Each stage is an Optuna study in the tune's storage, its trials claimed one at a time (cnnlab.sweep.study),
so any number of workers (the same command again, on this machine or another, or SLURM array tasks) share
every stage as they share a sweep; a stage starts when the one before it has finished. A worker that is
killed leaves its trial RUNNING with an unlocked directory: the next claim continues it from its checkpoint.
What a stage searches is written once (<stage>/stage.json), so a rerun or another worker searches the same.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console

from cnnlab.training.console import make_console

from cnnlab.service.compose import composed, composed_run
from cnnlab.service.run import SweepContext, auto_pack, run_log, start, start_pack
from cnnlab.training.pack import packable_key
from cnnlab.core.errors import CnnlabError
from cnnlab.core.schema import SUMMARY_RECORD, Fields, ListOf, MapOf
from cnnlab.core.shown import shell_line
from cnnlab.runtime.lock import discard_refused
from cnnlab.runtime.files import confine, open_append, read_json, write_json
from cnnlab.runtime.gpus import described, local_workers, visible_gpus
from cnnlab.sweep.study import (COPIED_FROM, JOB, Study, SweepSettings, claim_lock, fits_budget, is_helper,
                                 number_attr, override_value, quoted, search_space, start_local_workers, stop_helpers,
                                 trial_epochs, wait_for_helpers)
from cnnlab.sweep.storage import open_storage, storage_target
from cnnlab.sweep.report import best_curve
from cnnlab.core.shown import trial_label
from cnnlab.sweep.trials import direction_of
from cnnlab.tasks import monitor_of
from cnnlab.tuning import boxes
from cnnlab.tuning.gate import gate_epochs, sanity_gate
from cnnlab.tuning.plan import Plan, Stage, make_plan
from cnnlab.tuning.settings import TuneSettings, default_space, load_settings, split_arguments

STAGE_FILE, TUNE_FILE, PLAN_FILE = "stage.json", "tune.json", "plan.json"
PLAN_RECORD = Fields(optional={"started": float, "budget_s": (float, int, None)})
TEST_RECORD = Fields(required={"run": str, "acc": float, "loss": float})
STAGE_RECORD = Fields(required={"space": MapOf(str)},
                      optional={"configs": ListOf(MapOf((int, float, str, bool, None))), "epochs": int, "name": str})
CONFIG_KEY = "tune.config"  # the final stage's grid: which of the top configurations, and its seed
POLL_S = 1.0


def top_configurations(trials: list[tuple[dict[str, Any], float, bool]], top_k: int, maximize: bool) -> list[dict[str, Any]]:
    """The best ``top_k`` distinct configurations of the last search stage, from its finished trials as (params,
    value, told of): first those it ran itself, at its epochs; then, where ASHA left fewer finished than top_k, the
    earlier stages' trials it was told of (their values come from fewer epochs, so they rank after)."""
    configs: list[dict[str, Any]] = []
    for told in (False, True):
        for params, _, _ in sorted((t for t in trials if t[2] == told), key=lambda t: t[1], reverse=maximize):
            if len(configs) < top_k and params not in configs:
                configs.append(dict(params))
    return configs


@dataclass
class Base:
    """What the run's config says, composed once from the user's fixed overrides."""

    fixed: list[str]
    epochs: int
    seed: int
    batch_size: int
    monitor: str
    direction: str
    optimizer: str
    name: str
    output_dir: str
    tree: dict[str, Any]
    train_images: int  # the training split's size (the dataset read once, to plan the gate's cost)


def compose_base(fixed: list[str]) -> Base:
    from cnnlab.data.split import stratified_split

    with composed_run(fixed) as (run, cfg):
        data = run.components["dataset"].build()
        train = (len(data.validation_idx[0]) if data.validation_idx is not None else
                 len(stratified_split(data.train_labels, run.data.val_fraction, run.data.split_seed)[0]))
        return Base(fixed, run.trainer.epochs, run.seed, run.data.batch_size, monitor_of(cfg), direction_of(cfg),
                    run.components["optimizer"].name, run.name, str(cfg.paths.output_dir),
                    OmegaConf.to_container(cfg, resolve=True), train)


class Tune:
    def __init__(self, args: list[str], config_dirs: list[str], console: Console):
        tune_args, run_args = split_arguments(args)
        self.args, self.config_dirs = args, config_dirs  # what a helper worker is started with
        self.busy_s, self.busy_epochs = 0.0, 0  # this worker's time running trials, and the epochs they trained
        self.out_of_time: set[str] = set()  # the stages tune.budget_s stopped (said once)
        self._pack: int | None = None  # trials to a pack, once chosen (pack_for)
        self.started: float | None = None  # when the tune began (plan.json: its first worker's), once read
        self.settings: TuneSettings = load_settings(tune_args)
        self.gpus = visible_gpus(self.settings.gpus, "tune.gpus") if not is_helper() else []
        self.workers = 1 if is_helper() else local_workers(self.settings.n_jobs, self.gpus, self.settings.trials_per_gpu,
                                                            "tune.n_jobs")
        self.console = console
        space, fixed = search_space(run_args)
        self.base = compose_base(fixed)
        self.user_space = bool(space)
        if not space:  # the optimizer's default space, less the keys the user fixed
            typed = {f.partition("=")[0].lstrip("+~") for f in fixed}
            defaults = [o for o in default_space(self.base.optimizer, config_dirs) if o.partition("=")[0] not in typed]
            space = search_space(defaults)[0]
        self.space = space
        self.gate_estimate = gate_epochs(self.settings.gate_steps, self.settings.lr_find_steps, self.base.train_images,
                                         self.base.batch_size) if self.settings.gate else 0.0
        self.plan: Plan = make_plan(self.settings, self.base.epochs, self.gate_estimate)
        self.dir = Path(self.settings.dir or self._fresh_dir()).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        confine(self.dir)
        try:
            self.storage = open_storage(self.storage_target, self.dir, setting="tune.storage")
        except CnnlabError:
            discard_refused(self.dir)  # a refused tune leaves no folder it made
            raise

    def _fresh_dir(self) -> str:
        from cnnlab.runtime.lock import claim_fresh_dir

        return claim_fresh_dir(f"{self.base.output_dir}/tunes/{time.strftime('%Y-%m-%d')}/{time.strftime('%H-%M-%S')}",
                               self.base.name)

    @property
    def maximize(self) -> bool:
        return self.base.direction == "maximize"

    # ---- running one training in this process ----

    def train(self, overrides: list[str], run_dir: Path, trial=None) -> dict[str, Any]:
        """One run in ``run_dir``, its terminal output in <run_dir>/console.log; a claimed ``trial`` reports
        its epochs to its study."""
        # A run's warnings (a diverged loss, a pruned trial) are in its console.log and train.log (run_log), not
        # on the terminal: the tune prints its own line for the trial.
        with open_append(run_dir / "console.log") as log:
            console = make_console(file=log, width=120, force_terminal=False)
            args = [*overrides, f"hydra.run.dir={quoted(str(run_dir))}"]
            sweep = SweepContext(trial) if trial is not None else None  # the claim locked its directory already
            with composed(args) as cfg, run_log(run_dir):
                return start(cfg, run_dir, args, console=console, sweep=sweep) or {}

    def lr_find(self, overrides: list[str], run_dir: Path, steps: int) -> dict[str, Any]:
        from cnnlab.analysis.lr_find import lr_range_test

        with open_append(run_dir / "console.log", fresh=True) as log, composed_run(overrides) as (run, _):
            console = make_console(file=log, width=120, force_terminal=False)
            return lr_range_test(run, run_dir, 1e-6, 10.0, steps, console)

    # ---- the stages ----

    def run(self) -> dict[str, Any]:
        self.say(f"tune {self.dir}: {self.plan.describe()}")
        self.write_plan()
        helpers, pinned = self.start_workers()
        try:
            for process, _ in helpers if pinned else ():  # this process supervises: the workers run every
                process.wait()                            # stage, then it reads what they recorded
            return self.stages()
        except BaseException:  # pre-empted, Ctrl-C, a bug: the helpers stop too, after a checkpoint
            stop_helpers(helpers)
            raise
        finally:
            wait_for_helpers(helpers)

    def start_workers(self) -> tuple[list, bool]:
        """tune.n_jobs - 1 more workers on this machine (the same tune), or with GPUs, one worker per GPU slot,
        each seeing its GPU only, while this process supervises."""
        typed = [a for a in self.args if not a.startswith(("tune.dir=", "tune.n_jobs="))]
        args = ["tune", *(a for d in self.config_dirs for a in ("--config-dir", d)), *typed, str(self.dir)]
        helpers, assigned, pinned = start_local_workers(args, self.dir, self.workers, self.gpus)
        if helpers:
            self.say(f"{self.workers} workers" + (f"; GPUs: {described(assigned)}" if pinned else "")
                     + f"; their logs: {self.dir / 'workers'}")
        return helpers, pinned

    def stages(self) -> dict[str, Any]:
        gate = self.gate() if self.settings.gate else None
        if gate is not None:
            self.plan = make_plan(self.settings, self.base.epochs, gate["epochs"])
        searched = 0.0  # epochs the stages so far spent
        previous: dict[str, Any] | None = None
        results = []
        for stage in self.plan.stages:
            space = self.stage_space(stage, previous, gate)
            study = self.stage_study(stage, space)
            if previous is not None and stage.pruned:
                self.tell_earlier_trials(study, previous)
            self.work(stage, study, allotment=stage.cumulative - searched)
            previous = {"stage": stage, "study": study, "space": space}
            results.append(self.stage_result(stage, study, space))
            searched += results[-1]["epochs"]
        return self.finish(gate, results, previous["study"])

    def say(self, line: str) -> None:
        self.console.print(line, highlight=False, soft_wrap=True)

    def write_plan(self) -> None:
        """plan.json, before anything runs: what each part may spend (the gate's from the steps it will take), and
        the HParams experiment of the tune's TensorBoard over the keys it searches."""
        from cnnlab.training.tensorboard_log import sweep_experiment

        if (self.dir / PLAN_FILE).is_file():  # a rerun or another worker: the first plan stays
            return
        before, stages = 0.0, []
        for stage in self.plan.stages:
            stages.append({"stage": stage.name, "epochs_a_trial": stage.epochs,
                           "epochs": stage.cumulative - before, "asha": stage.pruned})
            before = stage.cumulative
        write_json(self.dir / PLAN_FILE, {"budget_epochs": self.plan.budget, "gate_epochs": self.plan.gate,
                                          "budget_s": self.settings.budget_s, "started": time.time(),
                                          "train_images": self.base.train_images, "stages": stages,
                                          "searched": list(self.space)})
        tree = {k: v for k, v in self.base.tree.items() if k != "hydra"}
        sweep_experiment(self.dir / "tensorboard", [*self.space, "seed"], tree, self.base.monitor)

    def gate(self) -> dict[str, Any]:
        def announce() -> None:
            self.say(f"gate: initial loss, overfit one batch ({self.settings.gate_steps} steps), "
                     f"LR range test ({self.settings.lr_find_steps} steps)")

        with claim_lock(self.dir / "gate"):
            record = sanity_gate(self.dir, self.base.fixed, self.settings.gate_steps, self.settings.lr_find_steps,
                                 self.base.batch_size, self.train, self.lr_find, announce)
        self.say(f"gate passed: initial loss {record['initial_loss']:.3f} (ln C = {record['expected_initial_loss']:.3f}), "
                 f"one batch overfit to {record['overfit_accuracy']:.0%}, LR range test: steepest at "
                 f"{record['suggested_lr']:.3g}, lowest loss at {record['lowest_loss_lr']:.3g}, so optimizer.lr in "
                 f"[{record['lr_window'][0]:.3g}, {record['lr_window'][1]:.3g}]; {record['epochs']:.2f} epochs")
        return record

    def stage_space(self, stage: Stage, previous: dict[str, Any] | None, gate: dict[str, Any] | None) -> dict[str, Any]:
        """What ``stage`` searches, decided once (stage.json) and read back by reruns and other workers."""
        folder = self.dir / stage.name
        with claim_lock(self.dir):
            record = read_json(folder / STAGE_FILE, STAGE_RECORD, "stage record")
            if record is None:
                record = self.decide_space(stage, previous, gate)
                write_json(folder / STAGE_FILE, record)
        space = self.checked_stage(record, stage, folder / STAGE_FILE)
        self.final_configs = record.get("configs", [])
        return space

    def checked_stage(self, record: dict[str, Any], stage: Stage, path: Path) -> dict[str, Any]:
        """A stage record's space, once it is shown to search only what this tune searches: its keys, and of strings
        only the choices the user's own space offers (a tune directory may be someone else's; its values become
        overrides). Numbers may differ: a refined box is narrower than the space it came from."""
        import optuna

        final = not stage.pruned
        allowed = {CONFIG_KEY, "seed"} if final else set(self.space)
        space = {}
        for key, text in record["space"].items():
            if key not in allowed:
                raise CnnlabError(f"stage record {path} searches {key!r}; this tune searches {', '.join(sorted(allowed))}")
            try:
                space[key] = optuna.distributions.json_to_distribution(text)
            except Exception:  # noqa: BLE001 - optuna raises several kinds for a string that is no distribution
                raise CnnlabError(f"stage record {path}: space.{key} is not an Optuna distribution") from None
        configs = record.get("configs", [])
        if final and set(space) != {CONFIG_KEY, "seed"}:
            raise CnnlabError(f"stage record {path}: the final stage searches {CONFIG_KEY} and seed, not "
                              f"{', '.join(sorted(space)) or 'nothing'}")
        for key, distribution in space.items():
            if key == CONFIG_KEY:
                ok = list(getattr(distribution, "choices", ())) == list(range(len(configs)))
            elif key == "seed":
                ok = all(isinstance(s, int) and not isinstance(s, bool) for s in getattr(distribution, "choices", [None]))
            else:
                ok = all(self.lends(key, choice) for choice in getattr(distribution, "choices", ()))
            if not ok:
                raise CnnlabError(f"stage record {path}: space.{key} offers values this tune's space does not")
        for k, config in enumerate(configs):
            for key, value in config.items():
                if key not in self.space or not self.lends(key, value):
                    raise CnnlabError(f"stage record {path}: configs[{k}].{key} is not a value this tune searches")
        return space

    def lends(self, key: str, value: Any) -> bool:
        """Whether ``value`` of ``key`` may come from a record: a number, or a choice the user's own space offers."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            return math.isfinite(value)
        choices = getattr(self.space.get(key), "choices", ())
        return any(type(value) is type(c) and value == c for c in choices)

    def decide_space(self, stage: Stage, previous: dict[str, Any] | None, gate: dict[str, Any] | None) -> dict[str, Any]:
        import optuna

        configs: list[dict[str, Any]] = []
        if previous is None:
            space = dict(self.space)
            lr = space.get("optimizer.lr")
            if gate is not None and not self.user_space and isinstance(lr, optuna.distributions.FloatDistribution):
                space["optimizer.lr"] = optuna.distributions.FloatDistribution(*gate["lr_window"], log=True)
        elif stage.pruned:
            space = boxes.refined_space(previous["space"], self.finished(previous["study"]), self.settings.top_q,
                                        self.maximize, self.option_ranges(previous["space"]))
        else:
            configs = self.top_configs(previous["study"])
            seeds = [self.base.seed + k for k in range(self.settings.seeds)]
            space = {CONFIG_KEY: optuna.distributions.CategoricalDistribution(list(range(len(configs)))),
                     "seed": optuna.distributions.CategoricalDistribution(seeds)}
        return {"name": stage.name, "epochs": stage.epochs, "configs": configs,
                "space": {k: optuna.distributions.distribution_to_json(d) for k, d in space.items()},
                "shown": {k: boxes.syntax(d) for k, d in space.items()}}

    def option_ranges(self, space: dict[str, Any]) -> dict[str, Any]:
        from cnnlab.sweep.report import option_range

        return {key: option_range(self.base.tree, key) for key in space}

    def finished(self, study: Study) -> list[tuple[dict[str, Any], float]]:
        from optuna.trial import TrialState

        return [(t.params, t.value) for t in study.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]

    def top_configs(self, study: Study) -> list[dict[str, Any]]:
        from optuna.trial import TrialState

        done = study.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        configs = top_configurations([(t.params, t.value, COPIED_FROM in t.user_attrs) for t in done],
                                     self.settings.top_k, self.maximize)
        if not configs:
            raise CnnlabError(f"no trial of the tune's search finished, so there is nothing to take to the final stage; "
                              f"see the trials' console.log under {self.dir}")
        return configs

    def stage_study(self, stage: Stage, space: dict[str, Any]) -> Study:
        sampler = "grid" if not stage.pruned else (self.settings.sampler if stage.name == "coarse" else "tpe")
        settings = SweepSettings(
            sampler=sampler, pruner="asha" if stage.pruned else "none",
            pruning={"min_resource": 1, "reduction_factor": self.settings.reduction_factor} if stage.pruned else {},
            n_trials=None if not stage.pruned else 10**6, storage=self.storage_target, study_name=f"tune-{stage.name}",
            direction=self.base.direction, seed=self.base.seed, max_epochs=stage.epochs)
        return Study(settings, self.dir / stage.name, space, [], self.storage)

    @property
    def storage_target(self) -> str:
        s = self.settings.storage
        return {"sqlite": f"sqlite:///{self.dir / 'tune.db'}", "journal": storage_target("journal", self.dir)}.get(s, s)

    def tell_earlier_trials(self, study: Study, previous: dict[str, Any]) -> None:
        """The earlier stage's finished trials inside the new box join the new study as completed trials (once):
        TPE starts from them, and nothing is paid twice."""
        import optuna

        with claim_lock(study.sweep_dir):
            if any(COPIED_FROM in t.user_attrs for t in study.study.get_trials(deepcopy=False)):
                return
            prior = previous["stage"].name
            for t in previous["study"].study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
                if boxes.inside(study.space, t.params):
                    source = t.user_attrs.get(COPIED_FROM) or f"{prior}/{number_attr(t, JOB)}"
                    study.study.add_trial(optuna.trial.create_trial(
                        params=t.params, distributions=study.space, value=t.value,
                        user_attrs={COPIED_FROM: source, "epochs": t.user_attrs.get("epochs", 0)}))

    def work(self, stage: Stage, study: Study, allotment: float) -> None:
        """Claim and run the stage's trials until its budget or grid is spent and no worker runs one."""
        from optuna.trial import TrialState

        study.admit = lambda trials: fits_budget(trials, stage.epochs, allotment) and self.in_time(stage)
        while True:
            claim = study.claim()
            if claim is None:
                running = study.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
                if not running:
                    return
                time.sleep(POLL_S)  # another worker's trial: this stage ends when it does
                continue
            claims = [claim]
            while len(claims) < self.pack_for(stage, claim) and (more := study.claim(wait=False)) is not None:
                claims.append(more)
            began = time.perf_counter()
            try:
                if len(claims) == 1:
                    summaries = [self.train(self.trial_overrides(stage, claim), study.sweep_dir / str(claim.job),
                                            trial=claim.trial)]
                else:
                    summaries = start_pack([(self.trial_overrides(stage, c), study.sweep_dir / str(c.job), c.trial)
                                            for c in claims])
                statuses = [study.tell(c, summary, None) for c, summary in zip(claims, summaries)]
            finally:
                for c in claims:
                    study.release(c)
            self.busy_s += time.perf_counter() - began
            self.busy_epochs += sum(len(s.get("history") or []) for s in summaries)
            for c, summary, status in zip(claims, summaries, statuses):
                self.say(self.trial_line(stage, c, summary, status))
            self.stop_if_all_failed(stage, study)

    def in_time(self, stage: Stage) -> bool:
        """tune.budget_s: a search stage may start a trial while the time since the tune began (plan.json), with
        what the final stage would take at the trial-epochs per second measured so far, fits; the final always."""
        budget = self.settings.budget_s
        if budget is None or stage.name == "final":
            return True
        if self.started is None:
            self.started = float((read_json(self.dir / PLAN_FILE, PLAN_RECORD, "tune plan") or {}).get("started")
                                 or time.time())
        started = self.started
        rate = self.busy_epochs / self.busy_s if self.busy_s > 0 and self.busy_epochs else None
        final_s = self.plan.stages[-1].epochs * self.plan.final_configs * self.plan.seeds / rate if rate else 0.0
        if time.time() - started + final_s <= budget:
            return True
        if stage.name not in self.out_of_time:
            self.out_of_time.add(stage.name)
            self.say(f"{stage.name}: tune.budget_s={budget:g} leaves no time for another trial (the final stage needs "
                     f"about {final_s:.0f} s at the {rate or 0:.2f} trial-epochs/s measured so far)")
        return False

    def pack_for(self, stage: Stage, claim) -> int:
        """tune.pack, where the searched keys allow a pack (else 1, said once); auto: sized once, by this worker's
        first trial (cnnlab.service.run.auto_pack)."""
        if self._pack is None:
            wanted, self._pack = self.settings.pack, 1
            unpackable = next((k for k in self.space if not packable_key(k)), None)
            if wanted != 1 and unpackable is not None:
                if wanted != "auto":
                    self.say(f"tune.pack={wanted}: the trials run one at a time, not packed: they differ in "
                             f"{unpackable}, and a pack's members share the model, data, batches and epochs")
            elif wanted == "auto":
                self._pack, line = auto_pack(self.trial_overrides(stage, claim), self.settings.trials_per_gpu, "tune.pack")
                if line:
                    self.say(line)
            else:
                self._pack = wanted
        return self._pack

    ALL_FAILED_AFTER = 3  # trials of a stage that all failed: the next ones would too (a bad fixed setting)

    def stop_if_all_failed(self, stage: Stage, study: Study) -> None:
        """Stop the tune when the stage's first trials all failed: their failures cost no epochs, so the budget
        would never end them. One line: the first trial's error."""
        from optuna.trial import TrialState

        own = [t for t in study.study.get_trials(deepcopy=False)
               if COPIED_FROM not in t.user_attrs and "cut_off" not in t.user_attrs and t.state.is_finished()]
        if len(own) < min(self.ALL_FAILED_AFTER, study.n_trials or self.ALL_FAILED_AFTER) \
                or any(t.state != TrialState.FAIL for t in own):
            return
        first = min(own, key=lambda t: t.number)
        reason = str(first.user_attrs.get("fail_reason") or "no reason recorded").splitlines()[0]
        raise CnnlabError(f"tune stopped: the {len(own)} trials of stage {stage.name} all failed; the first "
                          f"({study.sweep_dir / str(number_attr(first, JOB))}): {reason}")

    def trial_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's values; a final trial's configuration number replaced by the configuration itself."""
        params = dict(params)
        chosen = self.final_configs[params.pop(CONFIG_KEY)] if CONFIG_KEY in params else {}
        return {**chosen, **params}

    def trial_overrides(self, stage: Stage, claim) -> list[str]:
        params = self.trial_params(claim.trial.params)
        for key, value in params.items():  # the study's storage may be someone else's file too
            if key != "seed" and (key not in self.space or not self.lends(key, value)):
                raise CnnlabError(f"trial {claim.trial.number} of stage {stage.name} has {key}={str(value)[:40]!r}, "
                                  "which this tune does not search; its study storage was changed by hand")
        label = self.label(stage, claim.job, params)
        return [*self.base.fixed, *(f"{k}={override_value(v)}" for k, v in params.items()),
                f"trainer.epochs={stage.epochs}", f"paths.tensorboard={quoted(str(self.dir / 'tensorboard' / label))}"]

    def label(self, stage: Stage, job: int, params: dict[str, Any]) -> str:
        """A trial's TensorBoard name: its stage and what it varies, as ``refine1 lr=0.0123 wd=1.2e-05 #4``."""
        return f"{stage.name} {trial_label([f'{k}={override_value(v)}' for k, v in params.items()], list(params), str(job))}"

    def trial_line(self, stage: Stage, claim, summary: dict[str, Any], status: str) -> str:
        value = summary.get("best_value")
        shown = f"{self.base.monitor} {value:.4f}" if isinstance(value, float) else summary.get("error", "")
        epochs = len(summary.get("history") or [])
        return f"{stage.name} trial {claim.job}: {self.label(stage, claim.job, self.trial_params(claim.trial.params))}: " \
               f"{status}, {shown} ({epochs} of {stage.epochs} epochs)"

    # ---- the record ----

    def stage_result(self, stage: Stage, study: Study, space: dict[str, Any]) -> dict[str, Any]:
        trials = [t for t in study.study.get_trials(deepcopy=False) if COPIED_FROM not in t.user_attrs]
        done = [t for t in trials if t.state.name == "COMPLETE"]
        best = (max if self.maximize else min)(done, key=lambda t: t.value) if done else None
        return {"stage": stage.name, "epochs_a_trial": stage.epochs, "space": {k: boxes.syntax(d) for k, d in space.items()},
                "trials": len(trials), "told_of": sum(COPIED_FROM in t.user_attrs for t in study.study.get_trials(deepcopy=False)),
                "pruned": sum(t.state.name == "PRUNED" for t in trials), "failed": sum(t.state.name == "FAIL" for t in trials),
                "epochs": sum(trial_epochs(t) for t in trials),
                "best": None if best is None else {"value": best.value, "params": self.trial_params(best.params),
                                                   "trial": f"{stage.name}/{number_attr(best, JOB)}"},
                "curve": [(t.datetime_complete.timestamp(), trial_epochs(t), t.value)
                          for t in trials if t.state.is_finished() and t.datetime_complete is not None]}

    def final_ranking(self, study: Study) -> list[dict[str, Any]]:
        """The final configurations by the mean of their seeds' values, with the spread; each with its best seed's run."""
        import statistics

        from optuna.trial import TrialState

        by_config: dict[int, list] = {}
        for t in study.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            by_config.setdefault(t.params[CONFIG_KEY], []).append(t)
        ranked = []
        for index, trials in by_config.items():
            values = [t.value for t in trials]
            best = (max if self.maximize else min)(trials, key=lambda t: t.value)
            ranked.append({"config": self.final_configs[index], "seeds": [t.params["seed"] for t in trials],
                           "values": values, "mean": statistics.fmean(values),
                           "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                           "run": str(study.sweep_dir / str(number_attr(best, JOB))), "seed": best.params["seed"]})
        ranked.sort(key=lambda r: r["mean"], reverse=self.maximize)
        if not ranked:
            raise CnnlabError(f"no trial of the final stage finished; see the trials' console.log under {self.dir / 'final'}")
        return ranked

    def test_once(self, chosen: dict[str, Any]) -> dict[str, Any]:
        """The chosen configuration's selected model on the test split: once, whichever worker gets here first."""
        from cnnlab.analysis.evaluation import evaluate_runs

        with claim_lock(self.dir / "test"):
            done = read_json(self.dir / "test.json", TEST_RECORD, "test record")
            if done is not None:
                return done
            with open_append(Path(chosen["run"]) / "console.log") as log:
                scores = evaluate_runs([chosen["run"]], splits=["test"], tta_flip=False, tta_shift=0,
                                       device=str(self.base.tree["trainer"]["device"]), data_dir=None,
                                       console=make_console(file=log, width=120, force_terminal=False))
            test = {"run": chosen["run"], **scores["splits"]["test"]}
            write_json(self.dir / "test.json", test)
            summary_path = Path(chosen["run"]) / "summary.json"  # the chosen run's own record shows it too
            summary = read_json(summary_path, SUMMARY_RECORD, "run summary")
            if summary is not None:
                summary["selected"] = {**(summary.get("selected") or {}), "test": scores["splits"]["test"]}
                write_json(summary_path, summary)
            return test

    def finish(self, gate: dict[str, Any] | None, results: list[dict[str, Any]], final: Study) -> dict[str, Any]:
        ranking = self.final_ranking(final)
        chosen = ranking[0]
        test = self.test_once(chosen)
        overrides = [*self.base.fixed, *(f"{k}={override_value(v)}" for k, v in chosen["config"].items()),
                     f"seed={chosen['seed']}"]
        spent = (gate["epochs"] if gate else 0.0) + sum(r["epochs"] for r in results)
        started = (read_json(self.dir / PLAN_FILE, PLAN_RECORD, "tune plan") or {}).get("started")
        record = {"dir": str(self.dir), "budget_epochs": self.settings.budget_epochs, "epochs_spent": spent,
                  "budget_s": self.settings.budget_s,
                  "wall_time_s": time.time() - started if started is not None else None,
                  "monitor": self.base.monitor, "direction": self.base.direction, "gate": gate,
                  "stages": [{k: v for k, v in r.items() if k != "curve"} for r in results], "final": ranking,
                  "chosen": {k: chosen[k] for k in ("config", "mean", "std", "run", "seed")}, "test": test,
                  "best_so_far": self.best_so_far(gate, results),
                  "command": shell_line(["cnnlab", "train", *overrides]), "settings": vars(self.settings)}
        write_json(self.dir / TUNE_FILE, record)
        plot_path = self.plot(record)
        self.report(record, plot_path)
        return record

    def best_so_far(self, gate: dict[str, Any] | None, results: list[dict[str, Any]]) -> list[tuple[float, float]]:
        """(epochs spent, the best value so far) after each trial, in the order the trials ended, the gate's first."""
        ended = ((epochs, value) for _, epochs, value in sorted(c for r in results for c in r["curve"]))
        curve = best_curve(ended, self.maximize, start=gate["epochs"] if gate else 0.0)
        return [(spent, best) for spent, best in curve if best is not None]

    def plot(self, record: dict[str, Any]) -> Path:
        from cnnlab.analysis.plotting import pyplot, save_png

        fig, ax = pyplot().subplots(figsize=(6, 4), dpi=100)
        points = record["best_so_far"]
        ax.step([p[0] for p in points], [p[1] for p in points], where="post", color="tab:green")
        ax.axvline(record["budget_epochs"], color="0.5", linestyle="--", label="budget")
        ax.set_xlabel("epochs spent (every trial of every stage)")
        ax.set_ylabel(f"best {record['monitor']} so far")
        ax.set_title("cnnlab tune")
        ax.legend()
        path = self.dir / "tune.png"
        save_png(fig, path)
        return path

    def report(self, record: dict[str, Any], plot_path: Path) -> None:
        for stage in record["stages"]:
            best = stage["best"]
            self.say(f"{stage['stage']}: {stage['trials']} trials ({stage['pruned']} pruned, {stage['failed']} failed"
                     + (f", told of {stage['told_of']} earlier" if stage["told_of"] else "") + f"), {stage['epochs']} epochs"
                     + ("; space " + " ".join(f"{k}={v}" for k, v in stage["space"].items()) if stage["stage"] != "final" else "")
                     + (f"; best {best['value']:.4f} ({best['trial']})" if best else ""))
        chosen, test = record["chosen"], record["test"]
        self.say(f"chosen on validation: {' '.join(f'{k}={override_value(v)}' for k, v in chosen['config'].items())}: "
                 f"{record['monitor']} {chosen['mean']:.4f} ± {chosen['std']:.4f} over {self.settings.seeds} seeds")
        self.say(f"test, once: acc {test['acc']:.4f}, loss {test['loss']:.4f} ({test['run']})")
        self.say(f"epochs spent: {record['epochs_spent']:.1f} of {record['budget_epochs']}; plot: {plot_path}")
        self.say(f"train it again: {record['command']}")
        self.say(f"record: {self.dir / TUNE_FILE}")
