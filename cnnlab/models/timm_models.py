"""Any timm architecture by name: `model=timm model.arch=<name>` (the optional extra cnnlab[timm]).

Input channels, classes and, for models that fix it (ViT), the input size come from the dataset as
for cnnlab's own models. Weights come only from `model.pretrained` (a local file); timm never
downloads here.
"""

from __future__ import annotations

from torch import nn

from cnnlab.core.errors import CnnlabError, suggestion
from cnnlab.core.registry import MODELS
from cnnlab.core.validation import Probability


def import_timm():
    try:
        import timm
    except ImportError:
        raise CnnlabError("model=timm needs timm: pip install 'cnnlab[timm]'") from None
    return timm


@MODELS.register(name="timm", family="timm")
def timm_model(
    *, in_channels: int, num_classes: int, input_size: int,
    arch: str = "resnet18",
    drop_rate: Probability = 0.0,
    drop_path_rate: Probability = 0.0,
) -> nn.Module:
    """A timm architecture by name (`model.arch`; pip install 'cnnlab[timm]'); drop_rate: dropout before the
    classifier; drop_path_rate: timm's stochastic depth; weights from `model.pretrained=<file>`."""
    timm = import_timm()
    if not timm.is_model(arch):
        raise CnnlabError(f"unknown timm architecture {arch!r}{suggestion(arch, timm.list_models())}; "
                          "see timm.list_models()")
    options = dict(pretrained=False, num_classes=num_classes, in_chans=in_channels, drop_rate=drop_rate)
    if drop_path_rate:
        options["drop_path_rate"] = drop_path_rate
    try:  # models with a fixed input size (ViT, Swin) take the dataset's
        return timm.create_model(arch, img_size=input_size, **options)
    except TypeError:
        return timm.create_model(arch, **options)
