"""The DataLoader path's augmentation: the same op names, per image, through torchvision.transforms.v2.

Images read from disk (dataset=imagefolder) or streamed (data.in_memory=false) are augmented one
by one in the DataLoader's workers, as uint8 tensors. Each batched op of cnnlab.augment.batched maps onto
its v2 equivalent below; mixup and cutmix mix whole batches and run on the device on both paths.
Policies that exist only per image (AutoAugment, RandAugment, TrivialAugmentWide) are registered
here. An op with no version on the chosen path is one clear error, before any data is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, NamedTuple



class _TorchvisionV2:
    """torchvision.transforms.v2, imported when first used: importing torchvision costs a second (it brings
    torch._dynamo), which every `cnnlab list` and `--help` would otherwise pay for registering these ops."""

    def __getattr__(self, name: str):
        from torchvision.transforms import v2

        return getattr(v2, name)


v2 = _TorchvisionV2()

from cnnlab.core.errors import CnnlabError
from cnnlab.data.images import EvaluationView
from cnnlab.core.registry import AUGMENTS
from cnnlab.core.validation import PositiveInt, Range

# Ops that only ever run per image (there is no batched version of these policies).
_PER_IMAGE_ONLY = "per_image_only"


@AUGMENTS.register(family="policy", **{_PER_IMAGE_ONLY: True})
def auto_augment(*, policy: Literal["imagenet", "cifar10", "svhn"] = "cifar10") -> Callable:
    """AutoAugment (Cubuk et al. 2019): one of the learned sub-policies per image (DataLoader path only)."""
    return v2.AutoAugment(v2.AutoAugmentPolicy(policy))


@AUGMENTS.register(family="policy", **{_PER_IMAGE_ONLY: True})
def rand_augment(*, num_ops: PositiveInt = 2, magnitude: Annotated[int, Range(ge=0, le=30)] = 9) -> Callable:
    """RandAugment (Cubuk et al. 2020): num_ops random operations of one magnitude per image (DataLoader path only)."""
    return v2.RandAugment(num_ops=num_ops, magnitude=magnitude)


@AUGMENTS.register(family="policy", **{_PER_IMAGE_ONLY: True})
def trivial_augment() -> Callable:
    """TrivialAugmentWide (Müller & Hutter 2021): one random operation at a random strength per image (DataLoader path only)."""
    return v2.TrivialAugmentWide()


class Geometry(NamedTuple):
    """Where per-image ops run: images of `size` pixels; `resize` is the shorter side before a centre crop."""

    size: int
    resize: int


def _sometimes(transform: Callable, p: float, otherwise: Callable | None = None) -> Callable:
    if p >= 1:
        return transform
    if otherwise is None:
        return v2.RandomApply([transform], p=p)
    return v2.RandomChoice([transform, otherwise], p=[p, 1 - p])


def centre_crop(g: Geometry) -> EvaluationView:
    """The evaluation view of an image of any size: the one cnnlab.load, predict and export apply."""
    return EvaluationView(g.size, g.resize)


# Batched op -> the torchvision.transforms.v2 transform that does the same to one image.
V2_EQUIVALENTS: dict[str, Callable[..., v2.Transform]] = {
    "hflip": lambda g, p: v2.RandomHorizontalFlip(p),
    "vflip": lambda g, p: v2.RandomVerticalFlip(p),
    "random_crop": lambda g, padding, fill: v2.RandomCrop(
        g.size, padding=padding, padding_mode="constant" if fill == "zero" else "reflect"),
    # an image it leaves alone still has to come out at g.size: it gets the evaluation view
    "random_resized_crop": lambda g, scale_min, scale_max, ratio_min, ratio_max, p: _sometimes(
        v2.RandomResizedCrop(g.size, scale=(scale_min, scale_max), ratio=(ratio_min, ratio_max), antialias=True),
        p, centre_crop(g)),
    "random_affine": lambda g, degrees, translate, scale_min, scale_max, shear, p: _sometimes(
        v2.RandomAffine(degrees, translate=(translate, translate), scale=(scale_min, scale_max), shear=(-shear, shear),
                        interpolation=v2.InterpolationMode.BILINEAR), p),
    # v2 applies the three adjustments in a random order per image; the batched op in a fixed one
    "color_jitter": lambda g, brightness, contrast, saturation, p: _sometimes(
        v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation), p),
    "random_erasing": lambda g, p, scale_min, scale_max, ratio_min, ratio_max, value: v2.RandomErasing(
        p=p, scale=(scale_min, scale_max), ratio=(ratio_min, ratio_max), value=0 if value == "zero" else "random"),
}

MIXES_BATCHES = "mixing"  # the family of mixup and cutmix: they run on the device on both paths


def split_pipeline(ops: Mapping[str, Mapping[str, Any]], per_image: bool, where: str) -> tuple[dict, dict]:
    """(batched ops, per-image ops) of a pipeline for one path, in their order within each.

    ``where`` names the per-image path's cause for messages (e.g. "dataset=imagefolder").
    """
    batched, per_image_ops = {}, {}
    for name, options in ops.items():
        entry = AUGMENTS.get(name)
        if not per_image:
            if entry.meta.get(_PER_IMAGE_ONLY):
                raise CnnlabError(
                    f"augment op {name!r} runs per image through torchvision.transforms.v2, on the DataLoader path; "
                    "set data.in_memory=false to use it")
            batched[name] = options
        elif entry.family == MIXES_BATCHES:
            batched[name] = options
        elif entry.meta.get(_PER_IMAGE_ONLY) or name in V2_EQUIVALENTS:
            per_image_ops[name] = options
        else:
            equivalents = ", ".join(sorted([*V2_EQUIVALENTS, *(n for n in AUGMENTS.names() if AUGMENTS.get(n).meta.get(_PER_IMAGE_ONLY))]))
            raise CnnlabError(
                f"augment op {name!r} has no torchvision.transforms.v2 equivalent for the DataLoader path ({where}); "
                f"ops available there: {equivalents}, mixup, cutmix")
    return batched, per_image_ops


def per_image_transform(ops: Mapping[str, Mapping[str, Any]], g: Geometry, *, train: bool,
                        resized: bool) -> v2.Compose | None:
    """The per-image transform of one path: evaluation view first for images of any size (``resized``),
    unless training with an op that picks its own crop; then, in training, the per-image ops."""
    steps = []
    if resized and not (train and "random_resized_crop" in ops):
        steps.append(centre_crop(g))
    if train:
        for name, options in ops.items():
            entry = AUGMENTS.get(name)
            if entry.meta.get(_PER_IMAGE_ONLY):
                steps.append(AUGMENTS.build(name, options, prefix=f"augment.ops.{name}"))
            else:
                full = {k: o.default for k, o in entry.options.items()} | dict(options)
                steps.append(V2_EQUIVALENTS[name](g, **full))
    return v2.Compose(steps) if steps else None
