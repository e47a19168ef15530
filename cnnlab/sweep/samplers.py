"""The samplers and pruners a sweep chooses from (``hydra/sweeper/sampler=<name>``,
``hydra.sweeper.pruner=<name>``), as Optuna objects.

A sampler is built anew for every trial, seeded from trial k's own stream of the sweep's seed (numpy's
``SeedSequence(seed, spawn_key=(k,))``, as ``SeedSequence(seed).spawn`` makes its children): the values of
trial k then depend on the sweep's seed and k alone, whichever worker asks for it, so parallel workers never
draw the same values and a one-worker sweep is reproducible. ``seed + k`` was not independent: MT19937 seeded
with 0, 1, 2, 3 clumps its first draws, and seed 1's trials were seed 0's shifted by one.
Sobol is the exception: its points come from one scrambled sequence, indexed in the study.
Optuna is imported when a sampler or pruner is built, not when cnnlab starts.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Annotated, Literal

from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import PRUNERS, SAMPLERS
from cnnlab.core.validation import NonNegativeInt, PositiveInt, Range

Percentile = Annotated[float, Range(ge=0, le=100)]
Reduction = Annotated[int, Range(ge=2)]


def _seed(seed: int | None, trial_number: int) -> int | None:
    if seed is None:
        return None
    import numpy as np

    return int(np.random.SeedSequence(seed, spawn_key=(trial_number,)).generate_state(1)[0])


def _quiet_experimental() -> None:
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@SAMPLERS.register(family="grid")
def grid(*, trial_number: int, search_space: dict, seed: int | None = None):
    """Every combination of the listed values (trial k takes the k-th), kept in a study like the others."""
    import optuna

    choices = {}
    for key, distribution in search_space.items():
        if not isinstance(distribution, optuna.distributions.CategoricalDistribution):
            raise CnnlabError(f"the grid sampler takes lists of values, and {key} is an interval; choose another "
                              "sampler (hydra/sweeper/sampler=random, sobol, tpe or cmaes) or list values: a,b,c")
        choices[key] = list(distribution.choices)
    # cnnlab.sweep.study queues the combinations in order (the first key outermost, as Hydra's basic
    # sweeper runs them); the sampler records the grid in the study.
    return optuna.samplers.GridSampler(choices, seed=seed)


@SAMPLERS.register(family="random")
def random(*, trial_number: int, search_space: dict, seed: int | None = None):
    """Independent uniform draws (log-uniform for tag(log, ...)): the lectures' default over a grid."""
    import optuna

    return optuna.samplers.RandomSampler(seed=_seed(seed, trial_number))


@SAMPLERS.register(family="random")
def sobol(*, trial_number: int, search_space: dict, seed: int | None = None, scramble: bool = True):
    """Quasi-random: a scrambled Sobol sequence covers the space more evenly than random draws."""
    import optuna

    _quiet_experimental()
    return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=scramble, seed=seed, warn_independent_sampling=False,
                                      warn_asynchronous_seeding=False)


@SAMPLERS.register(family="bayesian")
def tpe(*, trial_number: int, search_space: dict, seed: int | None = None, n_startup_trials: NonNegativeInt = 10,
        multivariate: bool = True, constant_liar: bool = True):
    """Tree-structured Parzen estimator: random for the first n_startup_trials, then proposals where good
    trials were. multivariate: model the hyperparameters jointly; constant_liar: trials still running count
    as bad, so parallel workers do not all propose the same point."""
    import optuna

    _quiet_experimental()
    return optuna.samplers.TPESampler(seed=_seed(seed, trial_number), n_startup_trials=n_startup_trials,
                                      multivariate=multivariate, constant_liar=constant_liar)


@SAMPLERS.register(family="evolutionary", needs="cmaes")
def cmaes(*, trial_number: int, search_space: dict, seed: int | None = None, n_startup_trials: NonNegativeInt = 1,
          consider_pruned_trials: bool = False):
    """CMA-ES for continuous hyperparameters (needs the `cmaes` package: pip install cnnlab[cmaes])."""
    if importlib.util.find_spec("cmaes") is None:
        raise CnnlabError("sampler 'cmaes' needs the cmaes package: pip install cmaes (or cnnlab[cmaes])")
    import optuna

    _quiet_experimental()
    return optuna.samplers.CmaEsSampler(seed=_seed(seed, trial_number), n_startup_trials=n_startup_trials,
                                        consider_pruned_trials=consider_pruned_trials, warn_independent_sampling=False)


# Pruners. Their options live together under hydra.sweeper.pruning; each takes those it names.

@PRUNERS.register
def none(*, max_epochs: int):
    """No pruning: every trial trains trainer.epochs (the default)."""
    import optuna

    return optuna.pruners.NopPruner()


@PRUNERS.register(family="median")
def median(*, max_epochs: int, warmup_epochs: NonNegativeInt = 1, startup_trials: NonNegativeInt = 5,
           interval_epochs: PositiveInt = 1):
    """Stop a trial whose best value so far is worse than the median of the other trials at the same epoch."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs,
                                       interval_steps=interval_epochs)


@PRUNERS.register(family="median")
def percentile(*, max_epochs: int, percentile: Percentile = 25.0, warmup_epochs: NonNegativeInt = 1,
               startup_trials: NonNegativeInt = 5, interval_epochs: PositiveInt = 1):
    """Stop a trial outside the best `percentile` percent of the other trials at the same epoch."""
    import optuna

    return optuna.pruners.PercentilePruner(percentile, n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs,
                                           interval_steps=interval_epochs)


@PRUNERS.register(family="successive halving")
def asha(*, max_epochs: int, min_resource: PositiveInt = 1, reduction_factor: Reduction = 3,
         min_early_stopping_rate: NonNegativeInt = 0, bootstrap_count: NonNegativeInt = 0):
    """Asynchronous successive halving: at min_resource * reduction_factor^k epochs, only the top
    1/reduction_factor of the trials that reached that rung go on. No trial waits for another."""
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=reduction_factor,
                                                  min_early_stopping_rate=min_early_stopping_rate,
                                                  bootstrap_count=bootstrap_count)


@PRUNERS.register(family="successive halving")
def hyperband(*, max_epochs: int, min_resource: PositiveInt = 1, max_resource: PositiveInt | Literal["auto"] = "auto",
              reduction_factor: Reduction = 3, bootstrap_count: NonNegativeInt = 0):
    """Hyperband: several successive-halving brackets, from aggressive to none; max_resource auto: trainer.epochs."""
    import optuna

    return optuna.pruners.HyperbandPruner(min_resource=min_resource,
                                          max_resource=max_epochs if max_resource == "auto" else max_resource,
                                          reduction_factor=reduction_factor, bootstrap_count=bootstrap_count)
