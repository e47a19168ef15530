"""The coordinate-MLP homework (`task=image_fit`): an MLP learns one image as a function from a
pixel's (x, y) in [0, 1]² to its RGB, through a sigmoid, with an L2 loss. Without Fourier features
(`model=mlp`) it is blurred by the network's spectral bias; with them (`model=fourier_mlp`,
Tancik et al. 2020) it resolves edges and fine texture. PSNR = -10 log10(MSE) measures the fit.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cnnlab.core.version import __version__
from cnnlab.core.config import RunConfig
from cnnlab.training.console import make_console
from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import TASKS
from cnnlab.core.status import RunStatus
from cnnlab.tasks.job import Job
from cnnlab.tasks.summary import run_summary, write_summary
from cnnlab.core.validation import PositiveInt
from cnnlab.runtime.checkpoint import save_checkpoint
from cnnlab.runtime.files import atomic_write
from cnnlab.training.assemble import resolve_device, seed_everything
from cnnlab.training.tensorboard_log import TensorBoardLogger, events_dir


COORDINATE_MODELS = ("fourier_mlp", "mlp")


def procedural_image(size: int) -> torch.Tensor:
    """The bundled test image (3, size, size) in [0, 1], drawn from formulas (nothing to download):
    smooth colour gradients, a disc and a square with sharp edges, a checkerboard, a ring chirp
    whose frequency rises outwards, and fine diagonal stripes, from low to high frequencies."""
    t = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    y, x = torch.meshgrid(t, t, indexing="ij")
    image = torch.stack([0.5 + 0.4 * torch.sin(2 * math.pi * (x + 0.5 * y)), 0.2 + 0.6 * y, 0.9 - 0.7 * x])

    def paint(mask: torch.Tensor, rgb) -> None:
        for c in range(3):
            image[c][mask] = rgb[c] if not isinstance(rgb[c], torch.Tensor) else rgb[c][mask]

    paint((x - 0.27) ** 2 + (y - 0.27) ** 2 < 0.17 ** 2, (0.95, 0.8, 0.1))                 # disc
    square = (x > 0.56) & (x < 0.92) & (y > 0.08) & (y < 0.44)
    checker = ((x * 36).floor() + (y * 36).floor()) % 2
    paint(square, (0.1 + 0.8 * checker, 0.1 + 0.8 * checker, 0.3 + 0.4 * checker))       # checkerboard
    r2 = (x - 0.28) ** 2 + (y - 0.74) ** 2
    rings = 0.5 + 0.5 * torch.cos(2 * math.pi * 90 * r2)
    paint(r2 < 0.2 ** 2, (rings, 0.3 * rings, 1 - rings))                                  # chirp
    stripes = (torch.sin(2 * math.pi * 24 * (x + y)) > 0).double()
    paint((x > 0.56) & (x < 0.92) & (y > 0.56) & (y < 0.92), (stripes, 1 - stripes, 0.5 * stripes))
    return image.float().clamp(0, 1)


def load_image(path: str, size: int) -> torch.Tensor:
    """An image file, centre-cropped to a square and resized to (3, size, size) in [0, 1]."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import center_crop, resize

    file = Path(path).expanduser()
    if not file.is_file():
        raise CnnlabError(f"task.image: {file} does not exist")
    try:
        image = decode_image(str(file), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as e:
        raise CnnlabError(f"task.image: {file} is not a readable image (PNG, JPEG, GIF or WebP; "
                          f"{type(e).__name__})") from None
    side = min(image.shape[1:])
    image = resize(center_crop(image, [side, side]), [size, size], antialias=True)
    return image.float() / 255


def psnr(mse: float) -> float:
    return -10 * math.log10(max(mse, 1e-12))


def write_png(image: torch.Tensor, path: Path) -> None:
    from torchvision.io import encode_png

    data = encode_png(image.mul(255).round().to(torch.uint8).cpu()).numpy().tobytes()
    atomic_write(path, lambda f: f.write(data))


class CoordinateFit:
    """The image as (x, y) -> RGB pairs, and the coordinate MLP that learns them (built in this order: the
    seeded draws of a run are the same as ever)."""

    def __init__(self, run: RunConfig, image: torch.Tensor, device: torch.device):
        self.image, self.size, self.device, self.batch_size = image, image.shape[-1], device, run.data.batch_size
        t = (torch.arange(self.size, dtype=torch.float32) + 0.5) / self.size
        self.coords = torch.stack(torch.meshgrid(t, t, indexing="ij")[::-1], dim=-1).reshape(-1, 2).to(device)  # (x, y)
        self.target = image.permute(1, 2, 0).reshape(-1, 3).to(device)
        self.model = run.components["model"].build(in_channels=2, num_classes=3, input_size=1)
        run.components["init"].build(model=self.model)
        self.model.to(device)
        self.optimizer = run.components["optimizer"].build(model=self.model)
        self.batches = math.ceil(len(self.coords) / self.batch_size)
        self.scheduler = run.components["scheduler"].build(optimizer=self.optimizer, steps_per_epoch=self.batches,
                                                           epochs=run.trainer.epochs)
        self.generator = torch.Generator(device=device).manual_seed(run.seed)
        self.step = 0

    def train_epoch(self) -> float:
        """One pass over every pixel in a random order; the last batch's loss."""
        self.model.train()
        for rows in torch.randperm(len(self.coords), device=self.device, generator=self.generator).split(self.batch_size):
            loss = F.mse_loss(torch.sigmoid(self.model(self.coords[rows])), self.target[rows])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
        return loss.item()

    @torch.no_grad()
    def reconstruct(self) -> torch.Tensor:
        self.model.eval()
        out = torch.cat([torch.sigmoid(self.model(c)) for c in self.coords.split(65536)])
        return out.reshape(self.size, self.size, 3).permute(2, 0, 1)


@TASKS.register(monitor="psnr", models=("a coordinate MLP", COORDINATE_MODELS))
def image_fit(run: RunConfig, job: Job, *, image: Optional[str] = None, size: PositiveInt = 128) -> dict[str, Any]:
    """Fit one image as (x, y) -> RGB with a coordinate MLP; PSNR each epoch (the homework).

    ``image``: an image file, centre-cropped and resized to ``size`` x ``size``; None: the bundled
    procedural image. Writes TensorBoard (loss, PSNR, the reconstruction each epoch),
    reconstruction.png, target.png, checkpoints/last.pt and summary.json. It has no mid-run resume
    and no test split: of the job it takes the run directory, the console and ``on_epoch``."""
    wall_start = time.perf_counter()
    console, run_dir = job.console or make_console(), job.run_dir
    device = resolve_device(run.trainer.device)
    seed_everything(run.seed)
    fit = CoordinateFit(run, load_image(image, size) if image else procedural_image(size), device)
    tensorboard = TensorBoardLogger(events_dir(run.resolved, run_dir), run.resolved, OmegaConf.to_yaml(run.resolved),
                                    environment=job.environment)
    tensorboard.writer.add_image("image_fit/target", fit.image, 0)
    write_png(fit.image, run_dir / "target.png")
    console.print(f"image_fit: {image or 'the bundled procedural image'} at {fit.size}x{fit.size}, "
                  f"{run.components['model'].name} ({sum(p.numel() for p in fit.model.parameters()):,} parameters), "
                  f"{run.trainer.epochs} epochs x {fit.batches} batches of {run.data.batch_size} pixels, {device}",
                  highlight=False)
    history, train_time, status, recon = fit_epochs(fit, run, job, console, tensorboard)
    write_png(recon, run_dir / "reconstruction.png")
    save_checkpoint(run_dir / "checkpoints" / "last.pt", {"model": fit.model.state_dict(), "config": run.resolved,
                                                          "epoch": history[-1]["epoch"], "version": __version__})
    best = max(history, key=lambda r: r["psnr"])
    summary = write_summary(run_dir, run_summary(
        run, job, status, wall_start=wall_start, tensorboard=str(events_dir(run.resolved, run_dir)),
        image=image or "procedural", size=fit.size, device=str(device), monitor="psnr", best_epoch=best["epoch"],
        best_value=best["psnr"], final_psnr=history[-1]["psnr"], train_time_s=train_time, history=history))
    tensorboard.scalars({"best/psnr": best["psnr"]}, fit.step)
    tensorboard.close(summary["status"])
    console.print(f"final PSNR {summary['final_psnr']:.2f} dB (best {best['psnr']:.2f} at epoch {best['epoch']}); "
                  f"reconstruction: {run_dir / 'reconstruction.png'}", highlight=False)
    return summary


def fit_epochs(fit: CoordinateFit, run: RunConfig, job: Job, console, tensorboard: TensorBoardLogger):
    """Every epoch, each logged with its reconstruction; a sweep's pruner may stop it. Returns the history,
    the seconds of training, the status and the last reconstruction."""
    epochs = run.trainer.epochs
    history, train_time, status = [], 0.0, RunStatus.COMPLETED
    report_every = max(1, epochs // 20)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        loss = fit.train_epoch()
        train_time += time.perf_counter() - start
        if not math.isfinite(loss):
            raise CnnlabError(f"image_fit: the loss became {loss} at epoch {epoch}; lower optimizer.lr")
        recon = fit.reconstruct()
        record = {"epoch": epoch, "step": fit.step, "loss": loss,
                  "psnr": psnr(F.mse_loss(recon, fit.image.to(fit.device)).item()),
                  "lr": fit.optimizer.param_groups[0]["lr"]}
        history.append(record)
        tensorboard.scalars({"image_fit/loss": loss, "image_fit/psnr": record["psnr"], "train/lr": record["lr"]}, fit.step)
        tensorboard.writer.add_image("image_fit/reconstruction", recon, fit.step)
        if epoch % report_every == 0 or epoch == epochs:
            console.print(f"epoch {epoch:>4}/{epochs}  loss {loss:.5f}  PSNR {record['psnr']:.2f} dB", highlight=False)
        if job.on_epoch is not None and job.on_epoch(epoch, record) and epoch < epochs:
            status = RunStatus.PRUNED  # a sweep's pruner: this fit is behind the others at this epoch
            console.print(f"pruned after epoch {epoch}", highlight=False)
            break
    return history, train_time, status, recon
