"""Seeing inside the network: first-layer filters over training, feature maps of a fixed image at
each stage, what the augmentation makes of training images, the most confidently misclassified
test images, and the confusion matrix.

During training they go to TensorBoard (tags viz/*), and what they are drawn from goes to
<run dir>/viz/record.pt, from which `cnnlab viz <run dir>` draws PNGs at any time later.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab.models.inspect_model import forward_with_hooks
from cnnlab.core.errors import CnnlabError
from cnnlab.training.finetune import stages
from cnnlab.analysis.plotting import pyplot, save_png
from cnnlab.runtime.checkpoint import safe_load
from cnnlab.core.schema import SUMMARY_RECORD, Fields, ListOf, MapOf
from cnnlab.runtime.files import atomic_write, checked, confine, read_json

MAX_FILTERS = 64       # the first layer's filters drawn (all of LeNet's 6, the first 64 of an MLP's)
MAX_CHANNELS = 16      # feature maps drawn per stage
RECORD = "record.pt"


def make_grid(images: torch.Tensor, **options) -> torch.Tensor:
    """torchvision.utils.make_grid, imported when a grid is drawn (importing torchvision costs a second)."""
    from torchvision.utils import make_grid as grid

    return grid(images, **options)


def first_layer_filters(model: nn.Module, channels: int, size: int) -> torch.Tensor | None:
    """(N, C, k, k) weights of the first conv, or of a first linear layer seen as images (an MLP's templates)."""
    for m in getattr(model, "_orig_mod", model).modules():
        if isinstance(m, nn.Conv2d):
            return m.weight.detach()[:MAX_FILTERS].float().cpu()
        if isinstance(m, nn.Linear):
            if m.in_features == channels * size * size:
                return m.weight.detach()[:MAX_FILTERS].float().cpu().view(-1, channels, size, size)
            return None  # the first layer does not see pixels (Fourier features)
    return None


def each_scaled(x: torch.Tensor) -> torch.Tensor:
    """Every image of (N, C, H, W) stretched to [0, 1] on its own, so weak ones still show."""
    flat = x.flatten(1)
    low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return (x - low) / (high - low).clamp_min(1e-12)


def filter_grid(weights: torch.Tensor) -> torch.Tensor:
    """(3, H, W) image of the filters: RGB filters in colour, others as the mean over their channels."""
    if weights.shape[1] not in (1, 3):
        weights = weights.mean(1, keepdim=True)
    nrow = 8 if len(weights) > 16 else len(weights)
    return make_grid(each_scaled(weights), nrow=nrow, padding=1, pad_value=1.0)


def feature_grid(maps: torch.Tensor) -> torch.Tensor:
    """(3, H, W) image of one image's feature maps (C, h, w), one tile per channel."""
    return make_grid(each_scaled(maps[:MAX_CHANNELS].unsqueeze(1)), nrow=8, padding=1, pad_value=1.0)


@torch.no_grad()
def stage_outputs(model: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The spatial output (C, h, w) of each stage for one normalised image (1, C, H, W)."""
    found: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def keep(module, inputs, output) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                found[name] = output[0, :MAX_CHANNELS].float().cpu()
        return keep

    forward_with_hooks(model, image, [(stage.output, keeper(stage.name)) for stage in stages(model)])
    return found


def log_spaced(epoch: int) -> bool:
    """Epochs whose filters the record keeps: 0, 1, 2, 4, 8, ... (the lectures' figure is log-spaced)."""
    return epoch == 0 or epoch & (epoch - 1) == 0


@dataclass
class Record:
    """What the PNGs are drawn from; saved as <run dir>/viz/record.pt."""

    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    filters: dict[int, torch.Tensor] = field(default_factory=dict)  # epoch -> first-layer weights
    sample: torch.Tensor | None = None  # the fixed (validation) image, uint8
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # stage -> maps, at features_epoch
    features_epoch: int | None = None
    augmented: torch.Tensor | None = None  # uint8 (N, C, H, W)
    misclassified: dict[str, Any] | None = None  # images (uint8), true, predicted, confidence

    def save(self, folder: Path) -> None:
        buffer = io.BytesIO()  # serialised first: torch's zip writer reports a full disk as a RuntimeError
        torch.save(self.__dict__, buffer)
        atomic_write(folder / RECORD, lambda f: f.write(buffer.getbuffer()))

    @classmethod
    def load(cls, folder: Path) -> Record | None:
        path = folder / RECORD
        if not path.is_file():
            return None
        state = safe_load(path, f"viz record {path}")
        if not isinstance(state, dict) or not set(state) <= {f.name for f in dataclasses.fields(cls)}:
            raise CnnlabError(f"viz record {path} is not a cnnlab viz record; delete it to start a new one")
        check_record(checked(state, path, "viz record", RECORD_SPEC), path)
        return cls(**state)  # its keys are fields, the required ones checked


_TENSOR = torch.Tensor
RECORD_SPEC = Fields(required={"classes": ListOf((str, int)), "mean": ListOf(float), "std": ListOf(float)}, optional={
    "filters": MapOf(_TENSOR), "sample": (_TENSOR, None), "features": MapOf(_TENSOR), "features_epoch": (int, None),
    "augmented": (_TENSOR, None),
    "misclassified": (Fields(required={"images": _TENSOR, "true": _TENSOR, "predicted": _TENSOR, "confidence": _TENSOR},
                             optional={"index": _TENSOR}), None)})


def check_record(state: dict[str, Any], path: Path) -> None:
    """The shapes the figures draw: images of the record's channels, labels among its classes."""
    def bad(field_name: str, wanted: str) -> CnnlabError:
        return CnnlabError(f"viz record {path} is not a valid record: {field_name} should be {wanted}")

    channels = len(state["mean"])
    if channels not in (1, 3) or len(state["std"]) != channels:
        raise bad("mean and std", "one number per channel (1 or 3) each")
    for name, tensor in state.get("filters", {}).items():
        if tensor.ndim != 4:
            raise bad(f"filters.{name}", "first-layer weights (out, in, h, w)")
    for name, tensor in state.get("features", {}).items():
        if tensor.ndim != 3:
            raise bad(f"features.{name}", "feature maps (channels, h, w)")
    for name in ("sample", "augmented"):
        tensor = state.get(name)
        if tensor is not None and (tensor.ndim not in (3, 4) or tensor.shape[-3] != channels):
            raise bad(name, f"images with {channels} channels")
    wrong = state.get("misclassified")
    if wrong is not None and len(wrong["images"]):  # none wrong: empty tensors of any shape
        n, classes = len(wrong["images"]), len(state["classes"])
        if wrong["images"].ndim != 4 or wrong["images"].shape[1] != channels:
            raise bad("misclassified.images", f"images (N, {channels}, H, W)")
        for name in ("true", "predicted", "confidence"):
            if wrong[name].ndim != 1 or len(wrong[name]) != n:
                raise bad(f"misclassified.{name}", f"{n} values, one per image")
        for name in ("true", "predicted"):
            if (wrong[name].is_floating_point() or int(wrong[name].min()) < 0 or int(wrong[name].max()) >= classes):
                raise bad(f"misclassified.{name}", f"class numbers below {classes}")


def to_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images back to uint8 pixels."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (x.float().cpu() * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)


class Visualizer:
    """Training-time pictures for one run (rank 0): to TensorBoard and to the record."""

    def __init__(self, settings, writer, folder: Path, model: nn.Module, record: Record,
                 sample: torch.Tensor, channels: int, size: int):
        self.settings, self.writer, self.folder, self.model = settings, writer, folder, model
        self.record, self.sample, self.channels, self.size = record, sample, channels, size

    def augmented(self, images: torch.Tensor) -> None:
        """A grid of augmented training images (uint8), once per run."""
        self.record.augmented = images
        self.writer.add_image("viz/augmented_samples", make_grid(images, nrow=8, padding=1, pad_value=255), 0)
        self.record.save(self.folder)

    def epoch_end(self, epoch: int, step: int) -> None:
        every = self.settings.every_n_epochs
        if not every or epoch % every:
            return
        filters = first_layer_filters(self.model, self.channels, self.size)
        if filters is not None and filters.isfinite().all():  # a diverged run's NaN weights draw nothing
            self.writer.add_image("viz/first_layer_filters", filter_grid(filters), step)
            if log_spaced(epoch):
                self.record.filters[epoch] = filters.half()
        try:
            maps = {k: m for k, m in stage_outputs(self.model, self.sample).items() if m.isfinite().all()}
        except CnnlabError:  # a model without a backbone/head split has no stages to show
            maps = {}
        for i, (name, m) in enumerate(maps.items()):
            self.writer.add_image(f"viz/features/{i:02d}_{name}", feature_grid(m), step)
        self.record.features, self.record.features_epoch = maps, epoch
        self.record.save(self.folder)

    def misclassified(self, images_at, probs: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        """The test images the selected model got wrong with the highest confidence; ``images_at(idx)``
        reads the test images at idx (uint8)."""
        n = self.settings.misclassified
        confidence, predicted = probs.max(1)
        wrong = (predicted != labels).nonzero().flatten()
        chosen = wrong[confidence[wrong].argsort(descending=True)[:n]]
        images = images_at(chosen) if len(chosen) else torch.zeros(0, dtype=torch.uint8)
        self.record.misclassified = {"images": images, "true": labels[chosen], "predicted": predicted[chosen],
                                     "confidence": confidence[chosen], "index": chosen}
        if len(chosen):
            self.writer.add_figure("test/misclassified", misclassified_figure(self.record), step)
        self.record.save(self.folder)


# --- figures: for TensorBoard and for `cnnlab viz` ---------------------------------------------------

def show(ax, image: torch.Tensor, title: str = "") -> None:
    """One (C, H, W) image, uint8 or in [0, 1], on ``ax``."""
    image = image.float() / 255 if image.dtype == torch.uint8 else image
    ax.imshow(image.permute(1, 2, 0).numpy().squeeze(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def misclassified_figure(record: Record):
    m = record.misclassified
    n = len(m["images"])
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    fig, axes = pyplot().subplots(rows, cols, figsize=(1.7 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t, p, c in zip(axes.flat, m["images"], m["true"], m["predicted"], m["confidence"]):
        show(ax, image, f"{record.classes[t]}\n→ {record.classes[p]} ({100 * c:.0f}%)")
    fig.suptitle("most confidently misclassified (test): true → predicted (confidence)", fontsize=9)
    fig.tight_layout()
    return fig


def filters_figure(record: Record):
    epochs = sorted(record.filters)
    fig, axes = pyplot().subplots(len(epochs), 1, figsize=(8, 1.4 * len(epochs) + 0.6), squeeze=False)
    for ax, epoch in zip(axes[:, 0], epochs):
        show(ax, filter_grid(record.filters[epoch].float()), "initialisation" if epoch == 0 else f"after epoch {epoch}")
    fig.suptitle("first-layer filters during training", fontsize=10)
    fig.tight_layout()
    return fig


def features_figure(record: Record):
    names = list(record.features)
    fig, axes = pyplot().subplots(len(names) + 1, 1, figsize=(8, 1.6 * (len(names) + 1)), squeeze=False)
    show(axes[0, 0], record.sample, "input")
    for ax, name in zip(axes[1:, 0], names):
        m = record.features[name]
        show(ax, feature_grid(m), f"{name}: {m.shape[0]} of its maps, {m.shape[1]}x{m.shape[2]}")
    fig.suptitle(f"feature maps of a fixed validation image, after epoch {record.features_epoch}", fontsize=10)
    fig.tight_layout()
    return fig


def augmented_figure(record: Record):
    fig, ax = pyplot().subplots(figsize=(8, 8 * (len(record.augmented) // 8 or 1) / 8 + 0.5))
    show(ax, make_grid(record.augmented, nrow=8, padding=1, pad_value=255), "augmented training images")
    fig.tight_layout()
    return fig


def write_pngs(run_dir: Path) -> list[Path]:
    """`cnnlab viz <run dir>`: the run's pictures as PNGs in <run dir>/viz/."""
    from cnnlab.analysis.evaluation import confusion_figure

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CnnlabError(f"{run_dir} is not a directory; give a run directory (outputs/runs/<date>/<time>-<name>)")
    folder = run_dir / "viz"
    confine(run_dir)  # someone else's run directory: its viz/ may link anywhere
    record = Record.load(folder)
    if record is None:
        raise CnnlabError(f"{run_dir} has no viz/{RECORD}: it is not a run directory, or it ran with viz off "
                          "or before cnnlab had viz")
    figures = {"filters.png": filters_figure if record.filters else None,
               "features.png": features_figure if record.features else None,
               "augmented.png": augmented_figure if record.augmented is not None else None,
               "misclassified.png": misclassified_figure if record.misclassified and len(record.misclassified["images"]) else None}
    confusion = (read_json(run_dir / "summary.json", SUMMARY_RECORD, "run summary") or {}).get("confusion_matrix")
    n = len(record.classes)
    if confusion and (len(confusion) != n or any(len(row) != n for row in confusion)):  # before any PNG is written
        raise CnnlabError(f"run summary {run_dir / 'summary.json'} is not a valid record: confusion_matrix should be "
                          f"{n} x {n} (one row and column per class)")
    written = []
    for name, draw in figures.items():
        if draw is not None:
            save_png(draw(record), folder / name)
            written.append(folder / name)
    if confusion:
        save_png(confusion_figure(torch.tensor(confusion), record.classes), folder / "confusion.png")
        written.append(folder / "confusion.png")
    return written


# --- wiring into a run ----------------------------------------------------------------------------------

def images_of(setup, split: str, idx: torch.Tensor, *, train: bool) -> torch.Tensor:
    """uint8 images of ``split`` at ``idx`` as the run's data path delivers them (on the per-image
    path after its per-image transforms, leaving out a file that does not decode: the loader names it), without
    touching the training's random streams."""
    if setup.in_memory:
        return setup.data.tensors(split, idx.to(setup.data.train_labels.device))[0].cpu()
    dataset = setup.data.per_image(split, idx, setup.per_image[train])
    with torch.random.fork_rng(devices=[]):
        images = [x for x in (dataset[i][0] for i in range(len(idx))) if not isinstance(x, str)]
    size = setup.data.input_size
    return torch.stack(images) if images else torch.zeros(0, setup.data.channels, size, size, dtype=torch.uint8)


def start_visualizer(setup, run_dir: Path, writer, fresh: bool) -> Visualizer | None:
    """The run's Visualizer (None with viz off); on a fresh run, the augmented grid and the filters at init."""
    settings, data = setup.run.viz, setup.data
    if not (settings.every_n_epochs or settings.augment_samples or settings.misclassified):
        return None
    folder = run_dir / "viz"
    record = (None if fresh else Record.load(folder)) or Record(list(data.classes), tuple(data.mean), tuple(data.std))
    sample = images_of(setup, "train", setup.val_idx[:16], train=False)[:1]  # the first that decodes
    if len(sample) == 0:
        sample = torch.zeros(1, data.channels, data.input_size, data.input_size, dtype=torch.uint8)
    record.sample = sample[0]
    normalised = setup.eval_pipe(sample.to(setup.device))
    model = getattr(setup.model, "module", setup.model)
    viz = Visualizer(settings, writer, folder, model, record, normalised, data.channels, data.input_size)
    if fresh:
        if settings.augment_samples:
            idx = setup.train_idx[:settings.augment_samples]
            images = images_of(setup, "train", idx, train=True).to(setup.device)
            pipe = setup.train_pipe
            state = pipe.generator.get_state()  # the training's augmentation draws stay as they were
            labels = setup.data.train_labels[idx.to(setup.data.train_labels.device)][:len(images)]  # (mixup's)
            augmented, _ = pipe.apply(images, labels.to(setup.device))
            pipe.generator.set_state(state)
            viz.augmented(to_uint8(augmented, data.mean, data.std))
        viz.epoch_end(0, 0)
    return viz
