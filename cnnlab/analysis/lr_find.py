"""`cnnlab lr-find`: the learning-rate range test (Smith 2017).

Train from the configured start for up to `steps` updates while the learning rate
grows exponentially from min_lr to max_lr; record the loss (smoothed by an
exponential moving average); stop once it exceeds 4x its minimum. The suggested
rate is where the smoothed loss falls fastest against log(lr). The model is not
kept: this is a probe before choosing optimizer.lr.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from cnnlab.analysis.plotting import pyplot, save_png
from cnnlab.core.config import RunConfig
from cnnlab.core.shown import shell_line
from cnnlab.runtime.files import write_json
from cnnlab.training.loop import Trainer
from cnnlab.training.assemble import setup
from cnnlab.training.console import make_console
from cnnlab.training.tensorboard_log import TensorBoardLogger


class _Silent:
    """A reporter for a loop whose progress lr_find prints itself."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def lr_range_test(run: RunConfig, run_dir: Path, min_lr: float, max_lr: float, steps: int,
                  console: Console | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """``overrides``: the user's, repeated in the `cnnlab train` line it suggests (with the suggested lr)."""
    console = console or make_console()
    s = setup(run)
    data = s.data
    loader = s.loader("train", s.train_idx, train=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(s.optimizer, lambda step: 1.0)  # lr is set by hand below
    trainer = Trainer(s.model, s.optimizer, scheduler, settings=s.run.trainer, device=s.device,
                      num_classes=data.num_classes, reporter=_Silent(), checkpoint_dir=run_dir,
                      autocast_dtype=s.autocast_dtype, generators={}, checkpoint_extra={})
    s.model.train()
    lrs, losses, smoothed = [], [], []
    average, best = 0.0, math.inf
    batches = iter(())
    for i in range(steps):
        lr = min_lr * (max_lr / min_lr) ** (i / max(steps - 1, 1))
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        _, loss = trainer.train_step(x, y, first=True, update=True)
        value = loss.item()
        average = 0.98 * average + 0.02 * value
        smooth = average / (1 - 0.98 ** (i + 1))  # bias-corrected
        lrs.append(lr)
        losses.append(value)
        smoothed.append(smooth)
        best = min(best, smooth)
        if not math.isfinite(smooth) or smooth > 4 * best:
            break
    s.close()
    suggestion = suggest(lrs, smoothed)

    tensorboard = TensorBoardLogger(run_dir / "tensorboard", {}, "")
    for i, (lr, loss, smooth) in enumerate(zip(lrs, losses, smoothed)):
        tensorboard.scalars({"lr_find/lr": lr, "lr_find/loss": loss, "lr_find/smoothed_loss": smooth}, i)
    tensorboard.writer.add_text("lr_find/suggestion", f"suggested optimizer.lr: {suggestion:.3g}", 0)
    plot_path = run_dir / "lr_find.png"
    plot(lrs, losses, smoothed, suggestion, plot_path)
    tensorboard.close()
    result = {"suggested_lr": suggestion, "min_lr": min_lr, "max_lr": max_lr, "steps": len(lrs),
              "stopped_early": len(lrs) < steps, "lr": lrs, "loss": losses, "smoothed_loss": smoothed,
              "plot": str(plot_path)}
    write_json(run_dir / "lr_find.json", result)
    stopped = (f"{len(lrs)} of {steps} steps, stopped where the smoothed loss passed 4x its lowest"
               if len(lrs) < steps else f"{steps} steps")
    console.print(f"lr-find: {stopped}, from {min_lr:g} to {lrs[-1]:.3g}; suggested optimizer.lr={suggestion:.3g}",
                  highlight=False)
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("optimizer.lr=", "hydra."))]
    console.print(f"plot: {plot_path}\ntry:  {shell_line(['cnnlab', 'train', *kept, f'optimizer.lr={suggestion:.3g}'])}",
                  highlight=False)
    return result


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The lr where the smoothed loss falls fastest against log(lr), before its minimum."""
    stop = max(range(len(smoothed)), key=lambda i: -smoothed[i]) + 1  # up to the minimum
    if stop < 3:
        return lrs[0]
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
              for i in range(1, stop - 1)]
    steepest = min(range(len(slopes)), key=slopes.__getitem__) + 1
    return lrs[steepest]


def plot(lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float, path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 4), dpi=100)
    ax.plot(lrs, losses, color="0.8", label="loss")
    ax.plot(lrs, smoothed, color="C0", label="smoothed")
    ax.axvline(suggestion, color="C3", linestyle="--", label=f"suggested {suggestion:.3g}")
    ax.set_xscale("log")
    finite = [v for v in smoothed if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    ax.legend()
    save_png(fig, path)
