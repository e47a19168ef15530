"""cnnlab's Optuna sweeper. Hydra loads sweepers only from the ``hydra_plugins`` namespace package.

Chosen in conf/sweep/*.yaml with ``hydra.sweeper._target_: hydra_plugins.cnnlab_sweeper.OptunaSweeper``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as HydraOptunaSweeper

log = logging.getLogger("cnnlab.sweep.trials")


class OptunaSweeper(HydraOptunaSweeper):
    """Hydra's Optuna sweeper, resumable: with the study in SQLite in the sweep directory, a rerun
    runs only the trials still to go, re-queues the parameters of trials that were cut off, and
    numbers its jobs after the old ones (cnnlab.sweep.trials.run_trial then continues a cut-off trial
    from its checkpoint). Failing trials return the worst value, so they never win."""

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        impl = self.sweeper
        Path(impl.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)  # the SQLite file lives there
        if impl.storage:
            try:
                study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
            except KeyError:  # no such study yet: a fresh sweep
                study = None
            if study is not None:
                trials = study.get_trials(deepcopy=False)
                cut_off = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
                for t in cut_off:  # their process is gone: fail them, and ask for the same parameters again
                    study._storage.set_trial_state(t._trial_id, optuna.trial.TrialState.FAIL)
                    study.enqueue_trial(t.params)
                done = len(trials) - len(cut_off)
                log.info("resuming study %s: %d trials done, %d re-queued", impl.study_name, done, len(cut_off))
                impl.n_trials = max(impl.n_trials - done, 0)
                impl.job_idx = len(trials)
        if impl.n_trials > 0:
            impl.sweep(arguments)
