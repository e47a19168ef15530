"""Population-based training (Jaderberg et al. 2017) on cnnlab's exact-resume checkpoints:
``cnnlab train -m hydra.sweeper.scheduler=pbt 'optimizer.lr=tag(log, interval(0.01, 0.5))' ...``.

The population is ``pbt.population`` members, each a directory of the sweep (``<sweep dir>/<member>``)
that trains ``trainer.epochs`` in intervals of ``pbt.interval_epochs``. Each interval of each member is a
trial of the study (its user attributes say which member and which generation), claimed, run and told
like any trial, so any number of workers, machines or SLURM array tasks share a population. An interval
ends with status ``paused``; the member's checkpoints at that point are kept in ``<member>/pbt/<generation>``.

When every member has ended generation g, each member's next interval is decided from the values at g
(the monitored metric at the interval's last epoch), the same whichever worker claims it:

- a member in the bottom ``pbt.quantile`` (a failed or diverged one among them) **exploits**: it copies
  the checkpoints of a member drawn from the top quantile, and **explores** that member's hyperparameters:
  each is multiplied by one of ``pbt.perturb`` (a list of values moves to a neighbour), or with
  ``pbt.resample_probability`` drawn anew from its range;
- any other member goes on with its own checkpoint and hyperparameters.

A continued member takes the new values through the resume (cnnlab.optim.retune for the optimizer; the
model's dropout and the augmentation are built from the config). ``<member>/pbt.json`` holds the member's
hyperparameter schedule along its lineage, which ``cnnlab train replay=<member dir>`` follows from scratch.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.core.errors import CnnlabError
from cnnlab.core.status import RunStatus
from cnnlab.runtime import lock
from cnnlab.runtime.checkpoint import BEST, LAST, PREVIOUS
from cnnlab.runtime.files import check_inside, write_json
from cnnlab.tasks.replay import SCHEDULE_FILE
from cnnlab.training.resume import RETUNABLE, retunable
from cnnlab.sweep.study import JOB, Claim, Study, SweepSettings, claim_lock, number_attr

MEMBER, GENERATION, LINEAGE = "pbt_member", "pbt_generation", "pbt_lineage"  # a trial's user attributes
SNAPSHOTS = "pbt"  # <member dir>/pbt/<generation>/{last,best}.pt
ENDED = (RunStatus.COMPLETED, RunStatus.EARLY_STOPPED)  # a member that ended so goes on no further


def lineage_of(trial) -> list[dict[str, Any]]:
    """A member's schedule so far (its trial's lineage attribute), checked: the study may be someone else's."""
    lineage = trial.user_attrs.get(LINEAGE)
    if not isinstance(lineage, list) or not all(isinstance(step, dict) for step in lineage):
        raise CnnlabError(f"trial {trial.number} of the study has a {LINEAGE} attribute that is not a list of "
                          "intervals; the study's storage is not cnnlab's")
    return list(lineage)


@dataclass
class PbtSettings:
    """hydra.sweeper.pbt (conf/hydra/sweeper/cnnlab.yaml)."""

    population: int = 8
    interval_epochs: int = 1
    quantile: float = 0.25
    perturb: list[float] = field(default_factory=lambda: [0.8, 1.2])
    resample_probability: float = 0.25


def check_pbt(s: SweepSettings, p: PbtSettings, space: dict[str, Any], epochs: int, task: str) -> None:
    """One line for the first PBT setting that cannot work."""
    where = "hydra.sweeper.pbt"
    for key, value, low in (("population", p.population, 2), ("interval_epochs", p.interval_epochs, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise CnnlabError(f"{where}.{key} must be an integer >= {low}, got {value!r}")
    if not isinstance(p.quantile, int | float) or not 0 < p.quantile <= 0.5:
        raise CnnlabError(f"{where}.quantile must be in (0, 0.5] (the bottom fraction that copies the top), got {p.quantile!r}")
    if not (isinstance(p.perturb, list) and p.perturb
            and all(isinstance(f, int | float) and not isinstance(f, bool) and f > 0 for f in p.perturb)):
        raise CnnlabError(f"{where}.perturb must be a list of factors > 0 (e.g. [0.8, 1.2]), got {p.perturb!r}")
    if not isinstance(p.resample_probability, int | float) or not 0 <= p.resample_probability <= 1:
        raise CnnlabError(f"{where}.resample_probability must be in [0, 1], got {p.resample_probability!r}")
    if s.pruner != "none":
        raise CnnlabError(f"hydra.sweeper.scheduler=pbt decides itself which members go on; leave hydra.sweeper.pruner "
                          f"none (got {s.pruner})")
    if s.sampler not in ("random", "sobol"):
        raise CnnlabError(f"hydra.sweeper.scheduler=pbt draws its first population at random: choose "
                          f"hydra/sweeper/sampler=random or sobol (got {s.sampler})")
    if s.budget_epochs is not None:
        raise CnnlabError(f"hydra.sweeper.scheduler=pbt spends population x trainer.epochs = {p.population * epochs} "
                          "epochs; leave hydra.sweeper.budget_epochs unset")
    if s.n_trials is not None and s.n_trials != p.population:
        raise CnnlabError(f"hydra.sweeper.scheduler=pbt trains {where}.population={p.population} members; "
                          f"leave hydra.sweeper.n_trials unset (got {s.n_trials})")
    if task != "classify":
        raise CnnlabError(f"hydra.sweeper.scheduler=pbt continues classify runs from their checkpoints; task={task} has none")
    if not p.interval_epochs < epochs:
        raise CnnlabError(f"{where}.interval_epochs={p.interval_epochs} must be below trainer.epochs={epochs}: "
                          "a member would never exploit another")
    if not space:
        raise CnnlabError("hydra.sweeper.scheduler=pbt needs what it may change, e.g. "
                          "'optimizer.lr=tag(log, interval(0.01, 0.5))'")
    for key in space:
        if not retunable(key):
            raise CnnlabError(f"hydra.sweeper.scheduler=pbt changes only {', '.join(RETUNABLE)} while a member "
                              f"trains; {key} cannot change mid-run (fix it for the whole sweep)")


def interval_ends(epochs: int, interval: int) -> list[int]:
    """The epoch each generation ends at: interval, 2 x interval, ..., epochs."""
    return [*range(interval, epochs, interval), epochs]


def explore(params: dict[str, Any], space: dict[str, Any], p: PbtSettings, rng: random.Random) -> dict[str, Any]:
    """A top member's values, each perturbed or (with pbt.resample_probability) drawn anew from its range."""
    import optuna

    new = {}
    for key, dist in space.items():
        value = params[key]
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            choices = list(dist.choices)
            if rng.random() < p.resample_probability:
                value = rng.choice(choices)
            elif all(isinstance(c, int | float) for c in choices):  # numbers: the next one down or up
                ordered = sorted(choices)
                i = ordered.index(value) + (1 if rng.choice(p.perturb) >= 1 else -1)
                value = ordered[min(max(i, 0), len(ordered) - 1)]
        else:
            if rng.random() < p.resample_probability:
                value = (math.exp(rng.uniform(math.log(dist.low), math.log(dist.high))) if dist.log
                         else rng.uniform(dist.low, dist.high))
            else:
                value = value * rng.choice(p.perturb)
            value = min(max(value, dist.low), dist.high)
            if isinstance(dist, optuna.distributions.IntDistribution):
                value = int(round(value))
        new[key] = value
    return new


def interval_value(summary: dict[str, Any] | None, monitor: str) -> float | None:
    """What PBT ranks a member on: the monitored metric at its interval's last epoch."""
    history = (summary or {}).get("history") or []
    value = history[-1].get(monitor) if history else None
    return float(value) if value is not None and math.isfinite(value) else None


@dataclass
class Fate:
    """A member's next interval: its own checkpoint and values, or a top member's explored."""

    params: dict[str, Any]
    source: int  # the member whose checkpoint it continues (itself when it does not exploit)
    lineage: list[dict[str, Any]]


class PbtStudy(Study):
    """The population's intervals as the trials of one study (see the module's docstring)."""

    carried_attrs = (MEMBER, GENERATION, LINEAGE)  # a cut-off interval's retry is the same interval

    def __init__(self, settings: SweepSettings, pbt: PbtSettings, sweep_dir: Path, space: dict[str, Any],
                 fixed: list[str], storage, *, epochs: int, monitor: str):
        settings.n_trials = pbt.population
        super().__init__(settings, sweep_dir, space, fixed, storage)
        self.pbt, self.monitor = pbt, monitor
        self.ends = interval_ends(epochs, pbt.interval_epochs)

    def claim(self, wait: bool = True) -> Claim | None:
        """The next interval of some member; waits while the generation's last intervals train (unless
        ``wait`` is False). None when the population has trained its last interval."""
        while True:
            with claim_lock(self.sweep_dir):
                self._recover_cut_off()
                trials = self.study.get_trials(deepcopy=False)
                if any(t.state.name == "WAITING" for t in trials):  # a cut-off interval, queued again
                    return self._claimed(self.study.ask(fixed_distributions=self.space))
                step = self._next(trials)
                if step is None:
                    return None
                if step != "wait":
                    return self._start(*step, trials)
            if not wait:
                return None
            time.sleep(0.5)

    # -- the population's state, from the study's trials --

    def _units(self, trials) -> dict[tuple[int, int], Any]:
        """(member, generation) -> its newest attempt."""
        units = {}
        for t in sorted(trials, key=lambda t: t.number):
            if MEMBER in t.user_attrs:
                units[(number_attr(t, MEMBER, self.pbt.population), number_attr(t, GENERATION, len(self.ends)))] = t
        return units

    def _next(self, trials):
        """(member, generation, its fate; None at generation 0) to start; "wait" while intervals of the newest
        generation train; None: done."""
        units = self._units(trials)
        if not units:
            return 0, 0, None
        g = max(generation for _, generation in units)
        due = dict.fromkeys(range(self.pbt.population)) if g == 0 else self._fates(units, g - 1)
        missing = [m for m in due if (m, g) not in units]
        if missing:
            return missing[0], g, due[missing[0]]
        if any(not units[(m, g)].state.is_finished() for m in due):
            return "wait"
        if g + 1 == len(self.ends) or not (going := self._fates(units, g)):
            return None
        return min(going), g + 1, going[min(going)]

    def _fates(self, units: dict, g: int) -> dict[int, Fate]:
        """Each member's next interval after generation ``g`` ended (all of it): the bottom quantile exploits."""
        ended = {m: t for (m, generation), t in units.items() if generation == g}
        values = {m: (t.value if t.state.name == "COMPLETE" else None) for m, t in ended.items()}
        sign = 1 if self.s.direction == "maximize" else -1
        ranked = sorted(ended, key=lambda m: (values[m] is not None, sign * (values[m] or 0.0), -m))  # worst first
        n = len(ranked)
        count = min(math.ceil(n * self.pbt.quantile), n // 2)
        failed = [m for m in ranked if values[m] is None]
        bottom = set(ranked[:max(count, len(failed))])
        top = [m for m in ranked[n - count:] if values[m] is not None and m not in bottom] if count else []
        fates = {}
        for m in sorted(ended):
            t = ended[m]
            params, lineage = dict(t.params), lineage_of(t)
            if m in bottom and top:
                rng = random.Random(f"{self.s.seed}-{g}-{m}")
                source = rng.choice(top)
                params = explore(ended[source].params, self.space, self.pbt, rng)
                lineage = lineage_of(ended[source])
            elif m in bottom or t.user_attrs.get("status") in ENDED:
                continue  # failed with no one to copy, or trained to its end
            else:
                source = m
            fates[m] = Fate(params, source, lineage)
        return fates

    # -- starting an interval --

    def _start(self, member: int, g: int, fate: Fate | None, trials) -> Claim:
        """Ask for (member, g)'s trial: the sampler's values at generation 0, else its fate's (claim lock held)."""
        if fate is None:
            self.study.sampler = self.build_sampler(len(trials))
            trial = self.study.ask(fixed_distributions=self.space)
            source, lineage, params = member, [], dict(trial.params)
        else:
            self.study.enqueue_trial(fate.params)
            trial = self.study.ask(fixed_distributions=self.space)
            source, lineage, params = fate.source, fate.lineage, fate.params
            if source != member:
                self._copy_checkpoints(source, member, g - 1)
        start = 0 if g == 0 else self.ends[g - 1]
        lineage = [*lineage, {"epochs": [start, self.ends[g]], "params": params, "member": member,
                              "copied_from": source if source != member else None}]
        for key, value in ((MEMBER, member), (GENERATION, g), (LINEAGE, lineage), (JOB, member)):
            trial.set_user_attr(key, value)
        write_json(self.sweep_dir / str(member) / SCHEDULE_FILE, {
            "member": member, "population": self.pbt.population, "interval_epochs": self.pbt.interval_epochs,
            "epochs": self.ends[-1], "monitor": self.monitor, "schedule": lineage})
        return self._claimed(trial)

    def _claimed(self, trial) -> Claim:
        member, g = number_attr(trial, MEMBER, self.pbt.population), number_attr(trial, GENERATION, len(self.ends))
        lock.acquire(self.sweep_dir / str(member))  # before the claim lock goes: never taken for cut off
        trial.set_user_attr("pbt", {"pause_after": self.ends[g], "retune": [*self.space], "worker": os.getpid()})
        return self._claim_of(trial, member)

    def _copy_checkpoints(self, source: int, member: int, g: int) -> None:
        """Exploit: ``source``'s checkpoints at generation g become ``member``'s (its own are dropped)."""
        folder = self.sweep_dir / str(member) / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        for name in (LAST, BEST):
            copied = folder / f".{name}.copying"
            check_inside(copied)  # a member's folder in someone else's sweep may link out of it
            shutil.copyfile(self.sweep_dir / str(source) / SNAPSHOTS / str(g) / name, copied)
            os.replace(copied, folder / name)
        (folder / PREVIOUS).unlink(missing_ok=True)
        (self.sweep_dir / str(member) / "summary.json").unlink(missing_ok=True)

    # -- ending an interval --

    def tell(self, claim: Claim, summary: dict[str, Any] | None, error: str | None) -> str:
        """Keep the member's checkpoints of this generation, then tell the study the interval's value."""
        from optuna.trial import TrialState

        trial, member = claim.trial, number_attr(claim.trial, MEMBER, self.pbt.population)
        g = number_attr(trial, GENERATION, len(self.ends))
        status = (summary or {}).get("status", RunStatus.FAILED) if error is None else RunStatus.FAILED
        value = interval_value(summary, self.monitor)
        trial.set_user_attr("status", status)
        trial.set_user_attr("epochs", len((summary or {}).get("history") or []))
        if status in (RunStatus.PAUSED, *ENDED) and value is not None:
            self._snapshot(member, g)
            self.study.tell(trial, value)
            return status
        trial.set_user_attr("fail_reason", error or (summary or {}).get("error") or f"{status}: no value of {self.monitor}")
        self.study.tell(trial, state=TrialState.FAIL)
        return status if status != RunStatus.PAUSED else RunStatus.FAILED

    def _snapshot(self, member: int, g: int) -> None:
        """<member>/pbt/<g>/{last,best}.pt, hard links where the file system has them; generation g - 2's go
        (every member has started generation g, so none copies from g - 2 any more)."""
        folder = self.sweep_dir / str(member)
        target = folder / SNAPSHOTS / str(g)
        check_inside(target / LAST)  # no link on the way out of the member's folder
        target.mkdir(parents=True, exist_ok=True)
        for name in (LAST, BEST):
            (target / name).unlink(missing_ok=True)
            try:
                os.link(folder / "checkpoints" / name, target / name)
            except OSError:
                shutil.copyfile(folder / "checkpoints" / name, target / name)
        shutil.rmtree(folder / SNAPSHOTS / str(g - 2), ignore_errors=True)
