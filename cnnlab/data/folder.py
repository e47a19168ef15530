"""Class-per-folder image trees (ImageNet style), read per image from disk by DataLoader workers.

Two layouts:
- ``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>``: the second folder
  (``test_dir``) is the test split, scored once at the end, as ImageNet's val is used; an
  optional ``val_dir`` is a fixed validation set, else validation is split from train.
- ``<root>/<class>/<image>``: ``test_fraction`` of each class is held out as the test split.

Images of any size are resized (shorter side to ``resize``) and centre-cropped to ``size`` for
evaluation; training uses the augment pipeline, which may pick its own crop (random_resized_crop).
``size=auto`` (the default) is the images' own: the median shorter side of a sample of them, at most 224.
A file that is not an image is skipped with a warning naming it, when the folders are read or, for a file
that only fails to decode (truncated), when its batch is made.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from PIL import Image
from torch.utils.data import Dataset

from cnnlab.data.images import IMAGE_SUFFIXES, Unreadable, read_image
from cnnlab.data.split import stratified_split
from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import DATASETS
from cnnlab.core.validation import PositiveInt, UnitInterval

AUTO_LARGEST = 224  # size=auto never trains above ImageNet's crop: larger images are scaled down to it
AUTO_SAMPLE = 64    # images whose size size=auto reads (headers only)
UPSCALE_WARNING = 2.0  # dataset.size more than this many times the images' own: a warning
_LAYOUT_HELP = "dataset=imagefolder reads <root>/<class>/<image>, or <root>/train/<class>/<image> and <root>/val/<class>/<image>"


def scan_class_folders(root: Path, classes: list[str] | None = None, skipped: list[Path] | None = None
                       ) -> tuple[list[Path], list[int], list[str]]:
    """Every image under ``root/<class>/`` (recursively, sorted), its class index, and the classes.

    Hidden files are passed over; any other file whose name is not an image's is added to ``skipped``
    (the caller warns, naming it). ``classes`` (from the training folder) must match the folders found.
    """
    if not root.is_dir():
        raise CnnlabError(f"{root} is not a folder; {_LAYOUT_HELP}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise CnnlabError(f"{root} has no class subfolders; {_LAYOUT_HELP}")
    if classes is not None and found != classes:
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise CnnlabError(f"{root} has other classes than the training folder (extra: {extra or 'none'}, "
                          f"missing: {missing or 'none'})")
    files, labels = [], []
    for label, name in enumerate(found):
        count = 0
        for folder, subfolders, names in os.walk(root / name, followlinks=True):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for file_name in sorted(names):
                if file_name.startswith("."):
                    continue
                path = Path(folder) / file_name
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    if skipped is not None:
                        skipped.append(path)
                    continue
                files.append(path)
                labels.append(label)
                count += 1
        if count == 0:
            raise CnnlabError(f"class folder {root / name} has no images")
    return files, labels, found


SKIPPED_NAMED = 10  # files passed over that get a warning line each; then one line counts the rest


def skipped_lines(paths: list[Path], why: str) -> list[str]:
    """A warning for each file passed over (the first SKIPPED_NAMED), then one counting the rest."""
    lines = [f"skipped {path}: {why}" for path in paths[:SKIPPED_NAMED]]
    if len(paths) > SKIPPED_NAMED:
        lines.append(f"skipped {len(paths) - SKIPPED_NAMED} more files {why}")
    return lines


class FileImageDataset(Dataset):
    """Decodes one image file per item into a uint8 tensor (C, H, W), then runs ``transform`` on it. A file that
    fails to decode gives an ``Unreadable`` line in place of the image: the loader leaves it out and warns."""

    def __init__(self, files: list[Path], labels: torch.Tensor, channels: int, transform=None):
        self.files, self.labels, self.transform, self.channels = files, labels, transform, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | Unreadable, torch.Tensor]:
        try:
            tensor = read_image(self.files[i], self.channels)
        except CnnlabError as e:
            return Unreadable.at(f"{e}; skipped", i), self.labels[i]
        return (tensor if self.transform is None else self.transform(tensor)), self.labels[i]


def common_size(files: list[Path], sample: int = AUTO_SAMPLE) -> tuple[int, int] | None:
    """The median shorter side of up to ``sample`` images spread over ``files`` (their headers only), and how
    many were read; None when none could be."""
    picks = files[::max(1, len(files) // sample)][:sample]
    sides = []
    for path in picks:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue  # named when its batch is made
    return (int(statistics.median_low(sides)), len(sides)) if sides else None


@dataclass
class FolderData:
    """An image tree's file lists; images are read per sample, never all at once."""

    name: str
    train_files: list[Path]
    train_labels: torch.Tensor
    test_files: list[Path]
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    input_size: int                 # the square crop the model sees
    resize: int                     # shorter side before the evaluation centre crop
    layout: str                     # how the splits were found, for the run's header
    validation_idx: tuple[torch.Tensor, torch.Tensor] | None = None  # (train, val) into train_files, from val_dir
    size_note: str = ""             # how dataset.size was chosen, for the run's header
    warnings: list[str] = field(default_factory=list)  # what reading the folders passed over or found amiss

    reads_files = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def per_image(self, split: str, idx: torch.Tensor | None, transform) -> FileImageDataset:
        files, labels = (self.train_files, self.train_labels) if split == "train" else (self.test_files, self.test_labels)
        if idx is not None:
            files, labels = [files[i] for i in idx.tolist()], labels[idx]
        return FileImageDataset(files, labels, self.channels, transform)


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@DATASETS.register(family="folder", input_shape=(3, 224, 224), num_classes=1000, reads_files=True)
def imagefolder(
    *,
    root: Optional[str] = None,
    size: Union[PositiveInt, Literal["auto"]] = "auto",
    resize: Optional[PositiveInt] = None,
    channels: Literal[1, 3] = 3,
    train_dir: str = "train",
    val_dir: Optional[str] = None,
    test_dir: str = "val",
    test_fraction: UnitInterval = 0.1,
    split_seed: int = 0,
    mean: Optional[list[float]] = None,
    std: Optional[list[float]] = None,
) -> FolderData:
    """Class-per-folder images of any size from dataset.root (ImageNet layout, or one tree split by test_fraction); read per image."""
    if root is None:
        raise CnnlabError("dataset=imagefolder needs dataset.root=<folder>; " + _LAYOUT_HELP)
    base = Path(root).expanduser()
    if size != "auto" and resize is not None and resize < size:
        raise CnnlabError(f"dataset.resize={resize} is smaller than dataset.size={size}")
    gray = (sum(m * w for m, w in zip(_IMAGENET_MEAN, (0.299, 0.587, 0.114))),)
    mean = tuple(mean) if mean is not None else (_IMAGENET_MEAN if channels == 3 else gray)
    std = tuple(std) if std is not None else (_IMAGENET_STD if channels == 3 else (0.226,))
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise CnnlabError(f"dataset.mean and dataset.std need {channels} values (std > 0), got {list(mean)} and {list(std)}")

    validation_idx, skipped = None, []
    if (base / train_dir).is_dir():
        files, labels, classes = scan_class_folders(base / train_dir, skipped=skipped)
        if not (base / test_dir).is_dir():
            raise CnnlabError(f"{base / train_dir} exists but the test folder {base / test_dir} does not "
                              "(set dataset.test_dir to it)")
        test_files, test_labels, _ = scan_class_folders(base / test_dir, classes, skipped)
        layout = f"{train_dir}/ and {test_dir}/ (test)"
        if val_dir is not None:
            val_files, val_labels, _ = scan_class_folders(base / val_dir, classes, skipped)
            validation_idx = (torch.arange(len(files)), torch.arange(len(files), len(files) + len(val_files)))
            files, labels = files + val_files, labels + val_labels
            layout += f", {val_dir}/ (validation)"
    else:
        if val_dir is not None:
            raise CnnlabError(f"dataset.val_dir={val_dir} needs the train/ layout, but {base / train_dir} is not a folder")
        all_files, all_labels, classes = scan_class_folders(base, skipped=skipped)
        keep, held_out = stratified_split(torch.tensor(all_labels), test_fraction, split_seed, what="dataset.test_fraction")
        files, labels = [all_files[i] for i in keep.tolist()], [all_labels[i] for i in keep.tolist()]
        test_files, test_labels = [all_files[i] for i in held_out.tolist()], [all_labels[i] for i in held_out.tolist()]
        layout = f"one tree, {test_fraction:g} of each class held out as test"
    warnings = skipped_lines(skipped, f"not an image file (images end in {', '.join(IMAGE_SUFFIXES)})")
    size, resize, size_note, too_large = chosen_size(size, resize, files)
    if too_large:
        warnings.append(too_large)
    return FolderData(base.name or "imagefolder", files, torch.tensor(labels), test_files, torch.tensor(test_labels),
                      classes, mean, std, channels, size, resize, layout, validation_idx, size_note, warnings)


def chosen_size(size: int | str, resize: int | None, files: list[Path]) -> tuple[int, int, str, str | None]:
    """(size, resize, how size was chosen, an upscaling warning or None) for dataset.size and dataset.resize.

    ``auto``: the images' median shorter side (at most AUTO_LARGEST), the whole shorter side kept for
    evaluation unless dataset.resize says otherwise; a number: as given, with the usual 0.875 centre crop."""
    found = common_size(files)
    if size == "auto":
        if found is None:
            raise CnnlabError(f"dataset.size=auto: none of the {min(len(files), AUTO_SAMPLE)} images sampled could be "
                              "read; set dataset.size")
        side, count = found
        size = min(side, AUTO_LARGEST)
        note = (f"dataset.size=auto: {size} px, the median shorter side of {count} sampled images"
                + (f" ({side} px, scaled down to at most {AUTO_LARGEST})" if side > AUTO_LARGEST else ""))
        resize = resize or size
        if resize < size:
            raise CnnlabError(f"dataset.resize={resize} is smaller than dataset.size=auto's {size}")
        return size, resize, note, None
    resize = resize or round(size * 256 / 224)  # the usual 0.875 centre crop
    too_large = None
    if found is not None and resize > UPSCALE_WARNING * found[0]:
        too_large = (f"dataset.size={size} upscales these images {resize / found[0]:.1f}x (their median shorter side "
                     f"is {found[0]} px), which costs about {(size / found[0]) ** 2:.0f}x the work of training at their "
                     "size; dataset.size=auto trains at the images' own size")
    return size, resize, f"dataset.size={size}", too_large
