"""Options every model takes, whatever its family (a plugin's models too): the activation function
and DropConnect. Registered with ``MODELS.share``; each is applied to the model as built, so a
family's own file keeps reading like its paper's table."""

from __future__ import annotations

from typing import Optional

from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import MODELS
from cnnlab.core.validation import Probability
from cnnlab.models.blocks import Activation, DropConnectLinear, Maxout, activation, activation_name, conv_like

MAXOUT_PIECES = 2
# What model.activation replaces: every activation module but gates (sigmoid stays a gate).
_REPLACED = ("relu", "leaky_relu", "prelu", "elu", "gelu", "tanh", "lecun_tanh")


@MODELS.share
def every_model(model: nn.Module, /, *, activation: Optional[Activation] = None,
                drop_connect: Probability = 0.0) -> nn.Module:
    """activation: every activation function of the model becomes this one (null: the family's own);
    maxout gives the layer before each k = 2 x its outputs, where the architecture allows.
    drop_connect: DropConnect with this drop probability on every fully connected layer."""
    if activation is not None:
        use_activation(model, activation)
    if drop_connect > 0:
        use_drop_connect(model, drop_connect)
    return model


def use_activation(model: nn.Module, name: str) -> nn.Module:
    """Every activation module of ``model`` (not sigmoid gates) becomes ``name``."""
    for parent in list(model.modules()):
        for key, child in list(parent.named_children()):
            if activation_name(child) in _REPLACED:
                if name == "maxout":
                    _widen_layer_before(parent, key, MAXOUT_PIECES)
                setattr(parent, key, Maxout(MAXOUT_PIECES) if name == "maxout" else activation(name))
    return model


def _widen_layer_before(parent: nn.Module, key: str, pieces: int) -> None:
    """The conv or linear layer before ``parent.key`` (across batch norms) gives ``pieces`` x its outputs."""
    if isinstance(parent, nn.Sequential):
        names = list(parent._modules)
        norms = []
        for before in reversed(names[:names.index(key)]):
            layer = parent._modules[before]
            if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
                norms.append(before)
                continue
            if isinstance(layer, nn.Conv2d | nn.Linear):
                parent._modules[before] = _wider(layer, pieces)
                for norm in norms:
                    bn = parent._modules[norm]
                    parent._modules[norm] = type(bn)(bn.num_features * pieces, bn.eps, bn.momentum, bn.affine,
                                                     bn.track_running_stats)
                return
            break
    raise CnnlabError(f"model.activation=maxout does not fit this model: its activation {type(parent).__name__}.{key} "
                      "follows no conv or linear layer of its own (a residual sum, a pre-activation); maxout fits "
                      "the feed-forward families: mlp, lenet5, alexnet, vgg*, nin, googlenet")


def _wider(layer: nn.Conv2d | nn.Linear, pieces: int) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features * pieces, bias=layer.bias is not None)
    return conv_like(layer, out_channels=layer.out_channels * pieces)


def use_drop_connect(model: nn.Module, p: float) -> nn.Module:
    """Every nn.Linear of ``model`` becomes a DropConnectLinear with its weights."""
    for parent in list(model.modules()):
        for key, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                layer = DropConnectLinear(child.in_features, child.out_features, child.bias is not None, p)
                layer.load_state_dict(child.state_dict())
                setattr(parent, key, layer)
    return model
