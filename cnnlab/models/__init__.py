"""The model zoo: one file per family; importing this package registers them all."""

from cnnlab.models import (  # noqa: F401  (registration)
    alexnet, baselines, googlenet, lenet, mlp, nin, resnet, resnext, senet, shared, small_resnet, timm_models,
    torchvision_models,
    vgg, wrn,
)
