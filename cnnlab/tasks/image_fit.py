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

from cnnlab import __version__
from cnnlab.core.config import RunConfig
from cnnlab.train.console import make_console
from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import TASKS
from cnnlab.core.status import RunStatus
from cnnlab.tasks.job import Job
from cnnlab.tasks.summary import run_summary, write_summary
from cnnlab.core.validation import PositiveInt
from cnnlab.runtime.checkpoint import atomic_write, save_checkpoint
from cnnlab.train.assemble import resolve_device, seed_everything
from cnnlab.train.tensorboard_log import TensorBoardLogger, events_dir


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


@TASKS.register(monitor="psnr", models=("a coordinate MLP", COORDINATE_MODELS))
def image_fit(run: RunConfig, job: Job, image: Optional[str] = None, size: PositiveInt = 128) -> dict[str, Any]:
    """Fit one image as (x, y) -> RGB with a coordinate MLP; PSNR each epoch (the homework).

    ``image``: an image file, centre-cropped and resized to ``size`` x ``size``; None: the bundled
    procedural image. Writes TensorBoard (loss, PSNR, the reconstruction each epoch),
    reconstruction.png, target.png, checkpoints/last.pt and summary.json. It has no mid-run resume
    and no test split: of the job it takes the run directory, the console and ``on_epoch``."""
    wall_start = time.perf_counter()
    console, run_dir, on_epoch = job.console or make_console(), job.run_dir, job.on_epoch
    image_file = image  # the task option; ``image`` below is the loaded picture
    settings = run.trainer
    device = resolve_device(settings.device)
    seed_everything(run.seed)
    image = load_image(image_file, size) if image_file else procedural_image(size)
    size = image.shape[-1]
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    coords = torch.stack(torch.meshgrid(t, t, indexing="ij")[::-1], dim=-1).reshape(-1, 2).to(device)  # (x, y)
    target = image.permute(1, 2, 0).reshape(-1, 3).to(device)

    model = run.components["model"].build(in_channels=2, num_classes=3, input_size=1)
    run.components["init"].build(model=model)
    model.to(device)
    optimizer = run.components["optimizer"].build(model=model)
    batches = math.ceil(len(coords) / run.data.batch_size)
    scheduler = run.components["scheduler"].build(optimizer=optimizer, steps_per_epoch=batches, epochs=settings.epochs)
    generator = torch.Generator(device=device).manual_seed(run.seed)

    tensorboard = TensorBoardLogger(events_dir(run.resolved, run_dir), run.resolved, OmegaConf.to_yaml(run.resolved))
    tensorboard.writer.add_image("image_fit/target", image, 0)
    write_png(image, run_dir / "target.png")
    console.print(f"image_fit: {image_file or 'the bundled procedural image'} at {size}x{size}, "
                  f"{run.components['model'].name} ({sum(p.numel() for p in model.parameters()):,} parameters), "
                  f"{settings.epochs} epochs x {batches} batches of {run.data.batch_size} pixels, {device}",
                  highlight=False)

    @torch.no_grad()
    def reconstruct() -> torch.Tensor:
        model.eval()
        out = torch.cat([torch.sigmoid(model(c)) for c in coords.split(65536)])
        return out.reshape(size, size, 3).permute(2, 0, 1)

    history, train_time, step, status = [], 0.0, 0, RunStatus.COMPLETED
    report_every = max(1, settings.epochs // 20)
    for epoch in range(1, settings.epochs + 1):
        model.train()
        start = time.perf_counter()
        for rows in torch.randperm(len(coords), device=device, generator=generator).split(run.data.batch_size):
            loss = F.mse_loss(torch.sigmoid(model(coords[rows])), target[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
        train_time += time.perf_counter() - start
        if not math.isfinite(loss.item()):
            raise CnnlabError(f"image_fit: the loss became {loss.item()} at epoch {epoch}; lower optimizer.lr")
        recon = reconstruct()
        record = {"epoch": epoch, "step": step, "loss": loss.item(),
                  "psnr": psnr(F.mse_loss(recon, image.to(device)).item()), "lr": optimizer.param_groups[0]["lr"]}
        history.append(record)
        tensorboard.scalars({"image_fit/loss": record["loss"], "image_fit/psnr": record["psnr"], "train/lr": record["lr"]}, step)
        tensorboard.writer.add_image("image_fit/reconstruction", recon, step)
        if epoch % report_every == 0 or epoch == settings.epochs:
            console.print(f"epoch {epoch:>4}/{settings.epochs}  loss {record['loss']:.5f}  PSNR {record['psnr']:.2f} dB",
                          highlight=False)
        if on_epoch is not None and on_epoch(epoch, record) and epoch < settings.epochs:
            status = RunStatus.PRUNED  # a sweep's pruner: this fit is behind the others at this epoch
            console.print(f"pruned after epoch {epoch}", highlight=False)
            break

    write_png(recon, run_dir / "reconstruction.png")
    save_checkpoint(run_dir / "checkpoints" / "last.pt", {"model": model.state_dict(), "config": run.resolved,
                                                          "epoch": epoch, "version": __version__})
    best = max(history, key=lambda r: r["psnr"])
    summary = write_summary(run_dir, run_summary(
        run, run_dir, status, wall_start=wall_start, tensorboard=str(events_dir(run.resolved, run_dir)),
        image=image_file or "procedural", size=size, device=str(device), monitor="psnr", best_epoch=best["epoch"],
        best_value=best["psnr"], final_psnr=history[-1]["psnr"], train_time_s=train_time, history=history))
    tensorboard.scalars({"best/psnr": best["psnr"]}, step)
    tensorboard.close(summary["status"])
    console.print(f"final PSNR {summary['final_psnr']:.2f} dB (best {best['psnr']:.2f} at epoch {best['epoch']}); "
                  f"reconstruction: {run_dir / 'reconstruction.png'}", highlight=False)
    return summary
