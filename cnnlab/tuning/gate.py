"""The sanity gate a tune passes before it searches: the lectures' babysitting checks, run once.

1. The initial loss is about ln(C) (the loss the run's first step measured; C - 1 for the SVM loss).
2. The model overfits one batch: trained on one fixed batch (no augmentation) for ``gate_steps`` steps,
   it must classify at least OVERFIT_ACCURACY of it. A model that cannot is broken, or its rate is.
3. The LR range test (cnnlab lr-find): it sets the learning-rate window of the default space (lr_window).

A failed check stops the tune before any search, with the lectures' diagnosis in one line.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnlab.core.errors import CnnlabError
from cnnlab.core.status import RunStatus
from cnnlab.core.schema import Fields, ListOf
from cnnlab.runtime.files import checked, read_json, write_json

OVERFIT_ACCURACY = 0.9
GATE_FILE = "gate.json"
QUIET = ["viz.every_n_epochs=0", "viz.augment_samples=0", "viz.misclassified=0", "trainer.log_update_ratio=false",
         "trainer.log_dead_units=false"]  # a probe, not a run to look at: no pictures, no babysitting warnings


def overfit_overrides(fixed: list[str], steps: int) -> list[str]:
    """One fixed batch, no augmentation. A single batch's loss may spike on the way down (the default run on
    Fashion-MNIST: 2.3, 13.6 at step 6, 0.10 at step 59), so only NaN/inf or a 100-fold rise counts as diverged."""
    return [*fixed, "trainer.overfit_batches=1", f"trainer.epochs={steps}", "augment=none",
            "trainer.early_stopping_patience=null", "trainer.eval_train_at_end=false", "trainer.divergence_factor=100",
            *QUIET]


def overfit_accuracy(summary: dict[str, Any]) -> float | None:
    """The best accuracy on the memorised batch (its validation rows are that batch); None before an epoch ended."""
    return max((h.get("val/acc") or 0.0 for h in summary.get("history") or []), default=None)


def judge_overfit(summary: dict[str, Any], steps: int, batch_size: int) -> str | None:
    """The lectures' diagnosis when the overfit probe fails; None when it passed."""
    initial, expected = summary.get("initial_loss"), summary.get("expected_initial_loss")
    if initial is not None and expected and not 0.5 * expected <= initial <= 1.5 * expected:
        return (f"the initial loss is {initial:.3f}, far from the {expected:.3f} of random scores (ln C): check the "
                "initialisation (init=...), the labels and the loss before searching")
    if summary.get("status") == RunStatus.DIVERGED:
        return (f"the loss diverged while overfitting one batch of {batch_size} images (step "
                f"{summary.get('diverged_at_step')}): the learning rate is too high for this model; lower optimizer.lr")
    accuracy = overfit_accuracy(summary) or 0.0
    if accuracy < OVERFIT_ACCURACY:
        return (f"the model cannot overfit one batch of {batch_size} images: {accuracy:.0%} of it right after {steps} "
                f"steps (the lectures expect ~100%, here at least {OVERFIT_ACCURACY:.0%}); the model, the loss or the "
                "learning rate is wrong, so no search would help; fix that, or give more tune.gate_steps")
    return None


def lr_window(suggested: float, lowest: float, last: float) -> tuple[float, float]:
    """The learning rates the coarse stage draws from: from a third of the steepest descent to ten times the rate
    of the lowest loss, but no higher than the test went. The range test runs at constant rates from a fresh
    network, so it finds a lower edge; a warm-up schedule takes more (on Fashion-MNIST the test's loss was lowest
    at 0.011 and climbed past it, while the default one-cycle run peaks at 0.1). Where the loss never climbed
    (its lowest at the last rate tried), nothing is known above that rate."""
    return min(suggested, lowest) / 3, min(lowest * 10, last)


_NUMBER_OR_NULL = (float, None)
GATE_RECORD = Fields(optional={"passed": bool})
PASSED_GATE = Fields(required={  # what a tune reads back from a gate that passed
    "passed": bool, "initial_loss": _NUMBER_OR_NULL, "expected_initial_loss": _NUMBER_OR_NULL,
    "overfit_accuracy": _NUMBER_OR_NULL, "suggested_lr": float, "lowest_loss_lr": float, "lr_window": ListOf(float),
    "epochs": float})


def gate_epochs(steps: int, lr_steps: int, train_images: int | None, batch_size: int) -> float:
    """What the gate's steps cost in the budget's unit (epochs of the training split): the tune plans with this
    before the gate runs, and the gate records it after."""
    return (steps + lr_steps) / math.ceil((train_images or batch_size) / batch_size)


def sanity_gate(tune_dir: Path, fixed: list[str], steps: int, lr_steps: int, batch_size: int,
                run: Callable[[list[str], Path], dict[str, Any]],
                lr_find: Callable[[list[str], Path, int], dict[str, Any]], announce: Callable[[], None]) -> dict[str, Any]:
    """gate.json of an earlier pass, or the checks run now from clean folders (``announce()`` first).
    ``run(overrides, dir)`` trains a run and returns its summary; ``lr_find(overrides, dir, steps)`` returns the
    range test's record (lr_find.json)."""
    done = read_json(tune_dir / GATE_FILE, GATE_RECORD, "gate record")
    if done and done.get("passed") is True:
        window = checked(done, tune_dir / GATE_FILE, "gate record", PASSED_GATE)["lr_window"]
        if len(window) != 2 or not 0 < window[0] <= window[1] < math.inf:
            raise CnnlabError(f"gate record {tune_dir / GATE_FILE}: lr_window is not two learning rates, low to high")
        return done
    for probe in ("overfit", "lr_find"):  # a failed or killed earlier pass: its runs start again
        shutil.rmtree(tune_dir / "gate" / probe, ignore_errors=True)
    announce()
    summary = run(overfit_overrides(fixed, steps), tune_dir / "gate" / "overfit")
    diagnosis = judge_overfit(summary, steps, batch_size)
    record = {"initial_loss": summary.get("initial_loss"), "expected_initial_loss": summary.get("expected_initial_loss"),
              "overfit_accuracy": overfit_accuracy(summary),
              "overfit_steps": steps, "train_images": (summary.get("sizes") or {}).get("train"), "passed": diagnosis is None}
    if diagnosis is not None:
        write_json(tune_dir / GATE_FILE, {**record, "diagnosis": diagnosis})
        raise CnnlabError(f"the sanity gate stopped the tune before any search: {diagnosis}")
    found = lr_find([*fixed, *QUIET], tune_dir / "gate" / "lr_find", lr_steps)
    lowest = found["lr"][min(range(len(found["smoothed_loss"])), key=found["smoothed_loss"].__getitem__)]
    record.update(suggested_lr=found["suggested_lr"], lowest_loss_lr=lowest, lr_find_steps=lr_steps,
                  lr_window=lr_window(found["suggested_lr"], lowest, found["lr"][-1]))
    record["epochs"] = gate_epochs(steps, lr_steps, record["train_images"], batch_size)
    write_json(tune_dir / GATE_FILE, record)
    return record
