"""Scoring saved models: test-time augmentation, ensembles, confusion matrices, `cnnlab eval`.

An ensemble averages the members' softmax outputs (the lectures' model ensemble);
test-time augmentation averages over views of each image (mirror, and shifts by a
few pixels). Loss is the negative log-likelihood of the averaged probabilities, computed in log space
(logsumexp), so that for one model and one view it is exactly the cross-entropy of the logits: the val
loss of the epoch lines, of the final table, of `cnnlab eval` and of summary.json is one number.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import DATASETS
from cnnlab.data.images import ImageTransform
from cnnlab.analysis.plotting import pyplot
from cnnlab.data.statistics import Preprocessing
from cnnlab.runtime.checkpoint import load_checkpoint, load_weights
from cnnlab.runtime.files import write_csv
from cnnlab.training.console import make_console, report_table
from cnnlab.training.metrics import Metrics, MetricSums, autocast_for
from cnnlab.training.state import selected_weights


def check_tta_shift(shift: int, image_size: int, key: str) -> None:
    """A shift of the whole image or more leaves views of nothing but padding (and costs memory in proportion)."""
    if shift >= image_size:
        raise CnnlabError(f"{key}={shift}: shifts must be smaller than the images ({image_size} pixels); "
                          "a pixel or two is usual")


def tta_view_count(flip: bool, shift: int) -> int:
    """How many views tta_views makes."""
    return 1 + int(flip) + (4 if shift else 0)


def tta_views(x: torch.Tensor, flip: bool, shift: int) -> list[torch.Tensor]:
    """The image, its mirror image, and copies shifted by `shift` pixels up, down, left and right."""
    views = [x]
    if flip:
        views.append(x.flip(3))
    if shift:
        h, w = x.shape[2:]
        padded = F.pad(x, (shift,) * 4)  # zeros: the mean image after normalisation
        for dy, dx in ((shift, 0), (-shift, 0), (0, shift), (0, -shift)):
            views.append(padded[:, :, shift + dy:shift + dy + h, shift + dx:shift + dx + w])
    return views


def averaged_log_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the softmaxes of ``logits`` (models x views), without leaving log space: one
    member's is exactly log_softmax, so its NLL is the cross-entropy of its logits however confident."""
    stacked = torch.stack([F.log_softmax(z.float(), dim=1) for z in logits])
    return torch.logsumexp(stacked, dim=0) - math.log(len(logits))


@torch.inference_mode()
def predict(models: Sequence[nn.Module], loader, *, autocast_dtype: torch.dtype | None = None,
            tta_flip: bool = False, tta_shift: int = 0, limit: int | None = None,
            on_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities averaged (in probability) over models and views, with the labels: (N, C), (N,).
    ``on_batch()``: called after each batch (a progress)."""
    for m in models:
        m.eval()
    log_probs, labels = [], []
    for i, (x, y) in enumerate(loader):
        if limit is not None and i == limit:
            break
        logits = []
        for model in models:
            for view in tta_views(x, tta_flip, tta_shift):
                with autocast_for(x.device, autocast_dtype):
                    logits.append(model(view).float())
        log_probs.append(averaged_log_probs(logits).cpu())
        labels.append(y.cpu())
        if on_batch is not None:
            on_batch()
    return torch.cat(log_probs), torch.cat(labels)


def metrics_from_log_probs(log_probs: torch.Tensor, labels: torch.Tensor) -> Metrics:
    """Loss (the NLL: cross-entropy), accuracy and top-5, counted as during training."""
    sums = MetricSums(log_probs.device, top5=log_probs.shape[1] > 5)
    sums.add(log_probs, labels, F.nll_loss(log_probs, labels))
    return sums.result()


def confusion_matrix(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted] (``scores``: probabilities or log-probabilities)."""
    index = labels * num_classes + scores.argmax(1)
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def confusion_figure(matrix: torch.Tensor, classes: Sequence[str]):
    n = len(classes)
    size = min(max(4.0, 0.45 * n + 2), 20)
    fig, ax = pyplot().subplots(figsize=(size, size), dpi=100)
    rates = matrix.float() / matrix.sum(1, keepdim=True).clamp_min(1)
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test, selected model)")
    fig.tight_layout()
    return fig


def legacy_resize(stored) -> int | None:
    """The evaluation resize of a run recorded before checkpoints held it (an image folder's 256/224 rule)."""
    dataset = stored.components["dataset"]
    size, resize = dataset.options.get("size", 224), dataset.options.get("resize")
    if not DATASETS.get(dataset.name).meta.get("reads_files", False) or not isinstance(size, int):
        return None
    return resize or round(size * 256 / 224)


def recorded_geometry(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """dataset.size and dataset.resize as the checkpoint's run chose them (size=auto chose from the images of
    the day), for stored_run_config to lay over its config; nothing for a dataset without those options or a
    checkpoint from before they were recorded."""
    config = checkpoint.get("config")
    dataset = config.get("dataset") if isinstance(config, dict) else None
    name = dataset.get("name") if isinstance(dataset, dict) else None
    if (not isinstance(name, str) or name not in DATASETS or not {"size", "resize"} <= set(DATASETS.get(name).options)
            or "input_shape" not in checkpoint or "resize" not in checkpoint):
        return {}
    return {"dataset": {"size": checkpoint["input_shape"][1], "resize": checkpoint["resize"]}}


def recorded_transform(checkpoint: dict[str, Any], stored, device: torch.device | str = "cpu") -> ImageTransform:
    """The evaluation preprocessing a checkpoint's run applied: its geometry and data.preprocess, statistics
    and all. An older checkpoint's missing facts come from its dataset, built once at most."""
    dataset = functools.cache(stored.components["dataset"].build)
    if "input_shape" in checkpoint:
        channels, size, _ = checkpoint["input_shape"]
        resize = checkpoint["resize"] if "resize" in checkpoint else legacy_resize(stored)
    else:
        data = dataset()
        channels, size, resize = data.channels, data.input_size, data.resize
    recorded = checkpoint.get("preprocess")
    preprocessing = (Preprocessing.from_state(recorded) if recorded is not None else
                     Preprocessing.per_channel(dataset().mean, dataset().std))
    return ImageTransform(size, resize, channels, preprocessing, device)


# --- cnnlab eval ------------------------------------------------------------------------------------

WEIGHTS = {"best": "best.pt", "last": "last.pt"}


def checkpoint_file(target: str | Path, weights: str = "best") -> Path:
    """A run directory's checkpoints/best.pt (or last.pt), or a checkpoint file as given."""
    if weights not in WEIGHTS:
        raise CnnlabError(f"weights={weights!r}: choose best or last")
    path = Path(target)
    if path.is_dir():
        path = path / "checkpoints" / WEIGHTS[weights]
    if not path.exists():  # a FIFO or a folder is load_checkpoint's to name
        raise CnnlabError(f"{target}: no checkpoint (give a run directory with checkpoints/{WEIGHTS[weights]}, "
                          "or a .pt file)")
    return path


def prediction_rows(data, split: str, source: str, idx: torch.Tensor | None, skipped, log_probs: torch.Tensor,
                    labels: torch.Tensor) -> list[list[Any]]:
    """A row per image scored: split, its index in the dataset's ``source`` split, its file (image folders),
    the true and the predicted class and the predicted class's probability."""
    positions = idx.tolist() if idx is not None else list(range(len(data.train_labels if source == "train"
                                                                    else data.test_labels)))
    positions = [p for j, p in enumerate(positions) if j not in skipped]  # files a loader could not read
    files = getattr(data, "train_files" if source == "train" else "test_files", None)
    probs, predicted = log_probs.exp().max(1)
    return [[split, position, str(files[position]) if files is not None else "", data.classes[label],
             data.classes[guess], f"{prob:.6f}"]
            for position, label, guess, prob in zip(positions, labels.tolist(), predicted.tolist(), probs.tolist())]


def evaluate_runs(targets: Sequence[str], *, splits: Sequence[str], tta_flip: bool, tta_shift: int,
                  device: str, data_dir: str | None, console: Console | None = None,
                  predictions: Path | None = None) -> dict[str, Any]:
    """Score one run or an ensemble of runs on the given splits; print the homework's report table.
    ``predictions``: also a CSV of every image's true and predicted class."""
    from cnnlab.core.config import stored_run_config
    from cnnlab.training.assemble import build_model, resolve_device, setup

    console = console or make_console()
    checkpoints = [(p, load_checkpoint(p)) for p in map(checkpoint_file, targets)]
    runs = [stored_run_config(ckpt.get("config"), path, data_dir=data_dir, trainer={"device": device},
                              **recorded_geometry(ckpt)) for path, ckpt in checkpoints]
    first = runs[0]
    for (path, _), other in zip(checkpoints[1:], runs[1:]):
        if (other.components["dataset"].options, other.components["dataset"].name, other.data.val_fraction,
                other.data.split_seed, other.data.preprocess) != (
                first.components["dataset"].options, first.components["dataset"].name, first.data.val_fraction,
                first.data.split_seed, first.data.preprocess):
            raise CnnlabError(f"{path} was trained on other data, another validation split or another data.preprocess "
                              f"than {checkpoints[0][0]}; an ensemble must share them")
    resolve_device(device)
    recorded = checkpoints[0][1].get("preprocess")  # what training applied, statistics and all
    base = setup(first, preprocessing=None if recorded is None else Preprocessing.from_state(recorded))
    check_tta_shift(tta_shift, base.data.input_size, "--tta-shift")
    models = [base.model, *(build_model(run, base.data, base.device, init=False) for run in runs[1:])]
    for (path, ckpt), model in zip(checkpoints, models):
        load_weights(model, selected_weights(ckpt), path)
        if getattr(model, "memorises", False):  # k-NN's uint8 memory, prepared as the queries are
            model.prepare = base.eval_pipe
    where = {"train": ("train", base.train_idx), "val": ("train", base.val_idx), "test": ("test", None)}
    report, rows = {}, []
    for split in splits:
        loader = base.loader(*where[split], train=False)
        log_probs, labels = predict(models, loader, autocast_dtype=base.autocast_dtype, tta_flip=tta_flip,
                                    tta_shift=tta_shift)
        report[split] = metrics_from_log_probs(log_probs, labels).report()
        if predictions is not None:
            rows += prediction_rows(base.data, split, *where[split], getattr(loader, "skipped", ()), log_probs, labels)
    base.close()
    if predictions is not None:
        write_csv(predictions, ["split", "index", "file", "label", "predicted", "prob"], rows)
    views = tta_view_count(tta_flip, tta_shift)
    title = (f"{'ensemble of ' + str(len(models)) if len(models) > 1 else 'model'}: "
             f"{', '.join(str(p) for p, _ in checkpoints)}" + (f"; TTA, {views} views" if views > 1 else ""))
    console.print(report_table(title, report))
    return {"members": [str(p) for p, _ in checkpoints], "tta_views": views, "splits": report}

