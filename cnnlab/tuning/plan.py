"""How a tune spends its budget: the stages, their epochs a trial, and the epochs each may spend.

The final stage's cost is fixed (top_k configurations x seeds x trainer.epochs, never pruned), so it is set
aside first, with the sanity gate's steps. The rest is the search: the coarse stage may spend
``coarse_share`` of it, and each refine stage an equal part of what is left. A stage may also spend what
the stages before it left unspent (ASHA stops hopeless trials early). A trial is admitted only when the
epochs its stage has spent and reserved, plus its own, fit: the budget is never exceeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cnnlab.core.errors import CnnlabError
from cnnlab.tuning.settings import TuneSettings


@dataclass
class Stage:
    name: str             # coarse, refine1, ..., final: also the stage's folder and study
    epochs: int           # trainer.epochs of each of its trials
    cumulative: float     # the search's epochs up to the end of this stage (all stages before it included)
    pruned: bool = True   # ASHA in the search stages; the final stage trains every trial to the end


@dataclass
class Plan:
    budget: int
    gate: float           # the sanity gate's steps, in epochs
    stages: list[Stage]
    final_configs: int
    seeds: int

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def describe(self) -> str:
        search = [s for s in self.stages if s.pruned]
        parts = [f"gate {self.gate:.1f}"] if self.gate else []
        before = 0.0
        for s in search:
            parts.append(f"{s.name} {s.cumulative - before:.0f} ({s.epochs} a trial, ASHA)")
            before = s.cumulative
        parts.append(f"final {self.final_configs} x {self.seeds} seeds x {self.final.epochs} = "
                     f"{self.final_configs * self.seeds * self.final.epochs}")
        return f"budget {self.budget} epochs: " + ", ".join(parts)


def make_plan(s: TuneSettings, full_epochs: int, gate_epochs: float) -> Plan:
    coarse = s.coarse_epochs or max(1, full_epochs // 4)
    refine = s.refine_epochs or max(coarse, full_epochs // 2)
    for key, value in (("coarse_epochs", coarse), ("refine_epochs", refine)):
        if value > full_epochs:
            raise CnnlabError(f"tune.{key}={value} is more than trainer.epochs={full_epochs}, the final stage's epochs")
    final = s.top_k * s.seeds * full_epochs
    search = s.budget_epochs - gate_epochs - final
    least = 2 * coarse + s.refine_stages * 2 * refine  # two trials a stage, or the stage compares nothing
    if search < least:
        raise CnnlabError(
            f"tune.budget_epochs={s.budget_epochs} is too small: the final stage takes tune.top_k x tune.seeds x "
            f"trainer.epochs = {s.top_k} x {s.seeds} x {full_epochs} = {final} epochs"
            + (f", the sanity gate {gate_epochs:.1f}" if gate_epochs else "")
            + f", and the search at least {least} (two trials a stage); give at least "
            f"{math.ceil(final + gate_epochs + least)}, or lower tune.top_k, tune.seeds or trainer.epochs")
    coarse_part = max(2 * coarse, s.coarse_share * search)
    refine_part = (search - coarse_part) / s.refine_stages if s.refine_stages else 0.0
    if s.refine_stages and refine_part < 2 * refine:  # the coarse share leaves the refine stages too little
        coarse_part = search - s.refine_stages * 2 * refine
        refine_part = 2 * refine
    stages = [Stage("coarse", coarse, coarse_part if s.refine_stages else search)]
    for k in range(1, s.refine_stages + 1):
        stages.append(Stage(f"refine{k}", refine, coarse_part + k * refine_part))
    stages.append(Stage("final", full_epochs, search + final, pruned=False))
    return Plan(s.budget_epochs, gate_epochs, stages, s.top_k, s.seeds)
