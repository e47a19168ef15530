"""Registered optimizers.

Every optimizer also takes the options of ``optimizer_entry`` below (how weight
decay is applied, which parameters it spares, and the Lookahead wrapper), so each
builder lists only what is its own. ``model`` is supplied by cnnlab.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections import defaultdict
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.models.blocks import NORM_LAYERS
from cnnlab.core.registry import OPTIMIZERS
from cnnlab.core.validation import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability, UnitInterval

DecayMode = Literal["optimizer", "l2"]
StepKernel = Literal["auto", "fused", "foreach", "for_loop"]


def _common(
    weight_decay_mode: DecayMode = "optimizer",
    l1_decay: NonNegativeFloat = 0.0,
    no_decay_norm_bias: bool = False,
    lookahead_steps: NonNegativeInt = 0,
    lookahead_alpha: UnitInterval = 0.5,
    step_kernel: StepKernel = "auto",
) -> None:
    """The options every optimizer takes:

    weight_decay_mode: "optimizer" passes weight_decay to the optimizer (decoupled for AdamW; SGD and
      Adam add it to the gradient); "l2" adds weight_decay/2 * ||w||^2 to the loss instead.
    l1_decay: adds l1_decay * ||w||_1 to the loss (the lectures' L1 penalty); with weight_decay as well,
      the elastic net. It spares what weight decay spares.
    no_decay_norm_bias: normalisation weights and biases get no weight decay (their own parameter group).
    lookahead_steps: k > 0 wraps the optimizer in Lookahead (Zhang et al. 2019): every k steps the slow
      weights move lookahead_alpha of the way to the fast ones, and the fast ones restart from there.
    step_kernel: how torch runs the update. fused: one kernel for every parameter (SGD, Adam, AdamW; Adagrad
      on the CPU); foreach: a few kernels over lists of tensors; for_loop: a few kernels per parameter. auto:
      fused on a GPU where torch offers it (a small network's step is bound by kernel launches there), torch's
      own choice otherwise.
    """


_COMMON = {p.name: p for p in inspect.signature(_common).parameters.values()}


def decay_groups(model: nn.Module, weight_decay: float, spare_norm_bias: bool) -> list[dict]:
    """Parameter groups: with ``spare_norm_bias``, norm weights and biases get weight_decay 0."""
    if not spare_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(module, NORM_LAYERS) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Lookahead(torch.optim.Optimizer):
    """Lookahead around any optimizer; its param_groups are the inner optimizer's (schedulers see one)."""

    def __init__(self, inner: torch.optim.Optimizer, k: int, alpha: float):
        self.inner, self.k, self.alpha = inner, k, alpha
        self.param_groups = inner.param_groups
        self.defaults = inner.defaults
        self.state = defaultdict(dict)
        for group in self.param_groups:  # the slow weights start where the fast ones do
            for p in group["params"]:
                self.state[p]["slow"] = p.detach().clone()
        self._steps = 0
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}  # what Optimizer.__init__ sets

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = self.inner.step(closure)
        self._steps += 1
        if self._steps % self.k == 0:
            for group in self.param_groups:
                for fast in group["params"]:
                    slow = self.state[fast]["slow"]
                    slow.add_(fast - slow, alpha=self.alpha)
                    fast.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        slow = [[self.state[p].get("slow") for p in g["params"]] for g in self.param_groups]
        return {"inner": self.inner.state_dict(), "slow": slow, "steps": self._steps}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self._steps = state["steps"]
        for group, slows in zip(self.param_groups, state["slow"]):
            for p, slow in zip(group["params"], slows):
                if slow is not None:
                    self.state[p]["slow"] = slow.to(p.device)


def with_step_kernel(optimizer: torch.optim.Optimizer, kernel: str) -> torch.optim.Optimizer:
    """``optimizer`` built again with optimizer.step_kernel (it reads fused and foreach at construction, where it
    checks that its parameters' device and dtype allow them)."""
    accepted = inspect.signature(type(optimizer)).parameters
    offered = "fused" in accepted
    if kernel == "auto":
        on_gpu = all(p.is_cuda for g in optimizer.param_groups for p in g["params"])
        if not (offered and on_gpu):
            return optimizer
        kernel = "fused"
    if kernel in ("fused", "foreach") and kernel not in accepted:
        raise CnnlabError(f"optimizer.step_kernel={kernel}: torch has no {kernel} {type(optimizer).__name__}; "
                          "use auto")
    flags = {k: v for k, v in {"fused": kernel == "fused", "foreach": kernel == "foreach"}.items() if k in accepted}
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    try:
        return type(optimizer)([{**g, **flags} for g in optimizer.param_groups], **{**defaults, **flags})
    except (RuntimeError, ValueError) as e:  # e.g. fused Adagrad on a GPU: the device is not supported
        raise CnnlabError(f"optimizer.step_kernel={kernel}: {str(e).splitlines()[0]}") from None


def optimizer_entry(family: str) -> Callable:
    """Register ``build(params, **own)`` with the common options added to its signature.

    The registered function takes the model, makes the parameter groups, builds the optimizer,
    and records the penalties the trainer adds to the loss: ``l2_weight_decay`` (non-zero only for
    weight_decay_mode=l2, or L-BFGS) and ``l1_decay``, over ``penalised_params``.
    """

    def register(build: Callable) -> Callable:
        own = inspect.signature(build).parameters
        hints = typing.get_type_hints(build, include_extras=True)
        common_hints = typing.get_type_hints(_common, include_extras=True)

        @functools.wraps(build)
        def entry(*, model: nn.Module, **options):
            common = {name: options.pop(name, p.default) for name, p in _COMMON.items()}
            # The builder's own default when weight_decay is not given: the groups carry the value.
            weight_decay = options.setdefault("weight_decay", own["weight_decay"].default)
            l2 = weight_decay if common["weight_decay_mode"] == "l2" else 0.0
            groups = decay_groups(model, 0.0 if l2 else weight_decay, common["no_decay_norm_bias"])
            optimizer = with_step_kernel(build(groups, **options), common["step_kernel"])
            if isinstance(optimizer, torch.optim.LBFGS):
                l2 = weight_decay  # L-BFGS has no weight decay of its own: it goes into the loss
            if common["lookahead_steps"] > 0:
                optimizer = Lookahead(optimizer, common["lookahead_steps"], common["lookahead_alpha"])
            optimizer.l2_weight_decay, optimizer.l1_decay = l2, common["l1_decay"]
            optimizer.penalised_params = groups[0]["params"]  # the decayed group (all parameters unless spared)
            return optimizer

        params = [inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY)]
        params += [p for name, p in own.items() if name != "params"]
        params += list(_COMMON.values())
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
        entry.__signature__ = inspect.Signature(params)
        entry.__annotations__ = {**{k: v for k, v in hints.items() if k not in ("params", "return")}, **common_hints}
        del entry.__wrapped__  # the registry must see this signature, not the inner one
        OPTIMIZERS.register(entry, name=build.__name__, family=family)
        return build

    return register


@optimizer_entry(family="sgd")
def sgd(
    params, *, lr: PositiveFloat = 0.1, momentum: UnitInterval = 0.9, nesterov: bool = True,
    dampening: UnitInterval = 0.0, weight_decay: NonNegativeFloat = 5e-4,
) -> torch.optim.SGD:
    """Stochastic gradient descent, with (Nesterov) momentum and weight decay."""
    if nesterov and (momentum <= 0 or dampening != 0):
        raise CnnlabError("optimizer.nesterov=true needs optimizer.momentum > 0 and optimizer.dampening=0")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, dampening=dampening,
                           weight_decay=weight_decay)


@optimizer_entry(family="adagrad")
def adagrad(
    params, *, lr: PositiveFloat = 0.01, lr_decay: NonNegativeFloat = 0.0, eps: PositiveFloat = 1e-10,
    initial_accumulator_value: NonNegativeFloat = 0.0, weight_decay: NonNegativeFloat = 0.0,
) -> torch.optim.Adagrad:
    """AdaGrad (Duchi et al. 2011): steps scaled by the root of each parameter's summed squared gradients."""
    return torch.optim.Adagrad(params, lr=lr, lr_decay=lr_decay, eps=eps,
                               initial_accumulator_value=initial_accumulator_value, weight_decay=weight_decay)


@optimizer_entry(family="rmsprop")
def rmsprop(
    params, *, lr: PositiveFloat = 0.001, alpha: Probability = 0.99, eps: PositiveFloat = 1e-8,
    momentum: UnitInterval = 0.0, centered: bool = False, weight_decay: NonNegativeFloat = 0.0,
) -> torch.optim.RMSprop:
    """RMSProp (Hinton): steps scaled by a running average (alpha) of squared gradients; centered subtracts the mean."""
    return torch.optim.RMSprop(params, lr=lr, alpha=alpha, eps=eps, momentum=momentum, centered=centered,
                               weight_decay=weight_decay)


@optimizer_entry(family="adam")
def adam(
    params, *, lr: PositiveFloat = 1e-3, betas: tuple[Probability, Probability] = (0.9, 0.999),
    eps: PositiveFloat = 1e-8, weight_decay: NonNegativeFloat = 0.0, amsgrad: bool = False,
) -> torch.optim.Adam:
    """Adam (Kingma & Ba): per-parameter steps from running moments of the gradient; weight decay in the gradient."""
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


@optimizer_entry(family="adam")
def adamw(
    params, *, lr: PositiveFloat = 1e-3, betas: tuple[Probability, Probability] = (0.9, 0.999),
    eps: PositiveFloat = 1e-8, weight_decay: NonNegativeFloat = 0.01, amsgrad: bool = False,
) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter): Adam with weight decay decoupled from the gradient."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


@optimizer_entry(family="adam")
def amsgrad(
    params, *, lr: PositiveFloat = 1e-3, betas: tuple[Probability, Probability] = (0.9, 0.999),
    eps: PositiveFloat = 1e-8, weight_decay: NonNegativeFloat = 0.01, decoupled: bool = True,
) -> torch.optim.Optimizer:
    """AMSGrad (Reddi et al. 2018): Adam that divides by the running maximum of the second moment; AdamW-style decay by default."""
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=True)


@optimizer_entry(family="lbfgs")
def lbfgs(
    params, *, lr: PositiveFloat = 1.0, max_iter: PositiveInt = 20, history_size: PositiveInt = 100,
    line_search: Literal["none", "strong_wolfe"] = "strong_wolfe", weight_decay: NonNegativeFloat = 0.0,
) -> torch.optim.LBFGS:
    """L-BFGS: quasi-Newton steps from the last history_size gradients; re-evaluates the loss through a closure.

    Use full batches or large ones (data.batch_size): its curvature estimate needs a steady objective.
    Weight decay is added to the loss (L-BFGS has none of its own).
    """
    return torch.optim.LBFGS(_flat_params(params), lr=lr, max_iter=max_iter, history_size=history_size,
                             line_search_fn=None if line_search == "none" else line_search)


def _flat_params(groups: list[dict]) -> list[torch.Tensor]:
    return [p for g in groups for p in g["params"]]
