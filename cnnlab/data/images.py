"""One image preprocessing for every consumer of a trained run: evaluation, ``cnnlab.load``, ``cnnlab predict``
and ``cnnlab export``.

``read_image`` decodes a file or a PIL image as training read it: EXIF rotation applied, 16-bit values scaled
to 8, a palette's transparency resolved, alpha dropped, then converted to the run's channels (RGB or grey).
``ImageTransform`` is what a run's evaluation does after that, in this order and with these sizes: resize
the shorter side, centre-crop to the input size, scale to [0, 1], then the run's data.preprocess (per-channel
normalisation, the mean image or whitening). A run records it in its checkpoints; the evaluation loader,
``cnnlab.load``, predict and export's metadata all apply that record.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from cnnlab.core.errors import CnnlabError
from cnnlab.data.statistics import Preprocessing

# torchvision.datasets.folder.IMG_EXTENSIONS, and GIF (its first frame)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class Unreadable(str):
    """In place of an image that failed to decode: the line naming it, and the item's position in its dataset
    (a loader makes the batch without it)."""

    position: int = -1

    @classmethod
    def at(cls, line: str, position: int) -> Unreadable:
        made = cls(line)
        made.position = position
        return made


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """``image`` upright and in mode RGB (``channels`` 3) or L (1), as training reads it."""
    image = ImageOps.exif_transpose(image)  # a phone's portrait JPEG is stored sideways, with a rotation tag
    if image.mode in _SIXTEEN_BIT:  # PNG's 16-bit grey: 0-65535 onto 0-255 (PIL's convert would clip at 255)
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:  # converted through RGBA, as PIL asks
        image = image.convert("RGBA")
    return image.convert("RGB" if channels == 3 else "L")  # alpha is dropped, as torchvision and timm drop it


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """(C, H, W) uint8 of an image already in mode RGB or L."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).view(*array.shape[:2], -1).permute(2, 0, 1).contiguous()


def read_image(source: str | Path | Image.Image, channels: int) -> torch.Tensor:
    """A file or PIL image as a (C, H, W) uint8 tensor; an unreadable file is one line naming it."""
    if isinstance(source, Image.Image):
        return pil_to_uint8(to_mode(source, channels))
    try:
        with Image.open(source) as image:
            return pil_to_uint8(to_mode(image, channels))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise CnnlabError(f"{source} is not a readable image ({type(e).__name__}: {str(e)[:120]})") from None


class EvaluationView:
    """The evaluation view of (C, H, W) or (N, C, H, W) images of any size: the shorter side to ``resize``
    (``size`` when None), then the central ``size`` x ``size``. Images of ``size`` x ``size`` pass unchanged
    (for them a resize to more than ``size`` would only blur what the crop keeps)."""

    def __init__(self, size: int, resize: int | None):
        from torchvision.transforms import v2  # here: importing torchvision costs a second (torch._dynamo)

        self.size, self.resize = size, resize
        self.steps = v2.Compose([v2.Resize(resize or size, antialias=True), v2.CenterCrop(size)])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) == (self.size, self.size):
            return image
        return self.steps(image)


def tensor_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) with C in 1, 3 or 4 (alpha dropped) as ``channels``: grey repeated, or colour to luma."""
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 3 and channels == 1:  # ITU-R 601-2 luma, as PIL's convert("L")
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        grey = (x.float() * weights).sum(1, keepdim=True)
        return grey.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else grey
    raise CnnlabError(f"images with {x.shape[1]} channels cannot be given to a model of {channels}")


class ImageTransform:
    """A run's evaluation preprocessing: images of any size and mode -> the model's input, (N, C, size, size).

    Takes a path, a PIL image, a numpy array (H, W[, C]), a uint8 (0-255) or float (0-1) tensor (C, H, W) or
    (N, C, H, W), or a list of any of these."""

    def __init__(self, size: int, resize: int | None, channels: int, preprocessing: Preprocessing,
                 device: torch.device | str = "cpu"):
        self.size, self.resize, self.channels = size, resize, channels
        self.device = torch.device(device)
        self.preprocessing = preprocessing.to(self.device)
        self.crop = EvaluationView(size, resize)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.channels, self.size, self.size

    def describe(self) -> str:
        resize = f"shorter side to {self.resize} px, " if self.resize and self.resize != self.size else ""
        return (f"{'RGB' if self.channels == 3 else 'grey'}, {resize}centre {self.size}x{self.size}, "
                f"data.preprocess={self.preprocessing.kind}")

    def uint8(self, source: Any) -> torch.Tensor:
        """One image (a path, PIL image or numpy array) as its (C, size, size) uint8 evaluation view."""
        if isinstance(source, np.ndarray):
            source = Image.fromarray(source)
        return self.crop(read_image(source, self.channels))

    def batch(self, inputs: Any) -> torch.Tensor:
        """``inputs`` as one (N, C, size, size) tensor, uint8 or float in [0, 1], before normalisation."""
        if isinstance(inputs, torch.Tensor):
            x = inputs[None] if inputs.ndim == 3 else inputs[None, None] if inputs.ndim == 2 else inputs
            if x.ndim != 4:
                raise CnnlabError(f"preprocess: expected images (C, H, W) or (N, C, H, W), got shape {tuple(inputs.shape)}")
            if x.dtype != torch.uint8 and not x.is_floating_point():
                raise CnnlabError(f"preprocess: images should be uint8 (0-255) or float (0-1), not {x.dtype}")
            return self.crop(tensor_channels(x, self.channels))
        if isinstance(inputs, Sequence) and not isinstance(inputs, str):
            if not inputs:
                raise CnnlabError("preprocess: no images given")
            parts = [self.batch(item) for item in inputs]
            if len({p.dtype for p in parts}) > 1:  # uint8 and float mixed: all as float in [0, 1]
                parts = [p.float().div(255) if p.dtype == torch.uint8 else p for p in parts]
            return torch.cat(parts)
        return self.uint8(inputs)[None]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """A batch from ``batch`` (uint8 or float in [0, 1]) -> the model's input."""
        x = x.to(self.device)
        return self.preprocessing.from_uint8(x) if x.dtype == torch.uint8 else self.preprocessing(x.float())

    def __call__(self, inputs: Any) -> torch.Tensor:
        return self.normalise(self.batch(inputs))


def checked_geometry(size: Any, resize: Any, channels: Any, where: str) -> tuple[int, int | None, int]:
    """A recorded geometry, as ImageTransform takes it: one line naming ``where`` when it is not one."""
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    if not whole(size) or channels not in (1, 3) or not (resize is None or whole(resize)):
        raise CnnlabError(f"{where} is not a valid record: the image geometry should be a size, a resize "
                          f"and 1 or 3 channels, got {size!r}, {resize!r}, {channels!r}")
    return size, resize, channels
