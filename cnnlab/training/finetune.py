"""Transfer learning: start from pretrained weights (`model.pretrained`), then train the whole
network, only its last k stages and head, or only its head (`finetune.mode`), with their own
learning rates for the backbone and the head.

A network's *stages* are its top-level parts in forward order, with top-level containers
opened one level: an nn.ModuleList or ModuleDict always, an nn.Sequential unless it is a run
of blocks itself (torchvision's layer1). So ResNet has its stem and four stages, LeNet C1, C3,
C5, F6, VGG its conv layers, GoogLeNet its inception modules. A normalisation layer belongs to
the stage before it; parts without parameters are not stages. The last stage is the head.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.models.blocks import NORM_LAYERS



@dataclass
class Stage:
    name: str
    modules: list[nn.Module]

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules for p in m.parameters()]

    @property
    def output(self) -> nn.Module:
        """The module whose output is the stage's output (for feature-map hooks)."""
        return self.modules[-1]


def _is_run_of_blocks(sequence: nn.Sequential) -> bool:
    """True for a Sequential of custom blocks only, i.e. a stage (torchvision's layer1), not a list of layers."""
    return all(not type(m).__module__.startswith("torch.nn") for m in sequence)


def timm_stages(model: nn.Module) -> list[Stage]:
    """A timm model's stages as timm itself groups them (its coarse group_matcher, the head last): each
    group is the module its members share (layer1, stages.0, head), or the members themselves (a stem)."""
    from timm.models import group_modules

    found = []
    for names in group_modules(model, model.group_matcher(coarse=True)).values():
        prefix = names[0].split(".")
        for name in names[1:]:
            parts = name.split(".")
            while prefix != parts[:len(prefix)]:
                prefix = prefix[:-1]
        if prefix:
            found.append(Stage(".".join(prefix), [model.get_submodule(".".join(prefix))]))
        else:
            label = "+".join(names) if len(names) <= 3 else f"{names[0]}..{names[-1]}"
            found.append(Stage(label, [model.get_submodule(n) for n in names]))
    return found


def stages(model: nn.Module) -> list[Stage]:
    """The model's stages (see the module's docstring); the last one is the head."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if type(model).__module__.startswith("timm.") and hasattr(model, "group_matcher"):
        return timm_stages(model)
    parts: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or (isinstance(child, nn.Sequential) and not _is_run_of_blocks(child)):
            parts += [(f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children()]
        else:
            parts.append((name, child))
    found: list[Stage] = []
    for name, module in parts:
        if not any(True for _ in module.parameters()):
            continue
        if isinstance(module, NORM_LAYERS) and found:
            found[-1].modules.append(module)
        else:
            found.append(Stage(name, [module]))
    if len(found) < 2:
        raise CnnlabError(f"{type(model).__name__} has {len(found)} stage(s) with parameters; "
                          "transfer learning needs a backbone and a head")
    return found


def read_pretrained(path: str) -> dict[str, torch.Tensor]:
    """Weights from a cnnlab checkpoint (the weights its run selected), a safetensors file, or a torchvision-style
    state dict."""
    from cnnlab.runtime.checkpoint import has_digest, load_checkpoint, safe_load
    from cnnlab.training.state import selected_weights

    file = Path(path).expanduser()
    if not file.is_file():
        raise CnnlabError(f"model.pretrained: {file} does not exist (weights are never downloaded)")
    if has_digest(file):  # a cnnlab checkpoint, verified
        return selected_weights(load_checkpoint(file))
    if file.suffix == ".safetensors":  # tensors only (cnnlab export --format safetensors, a model hub's file)
        try:
            return load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CnnlabError(f"model.pretrained: {file} is not a safetensors file cnnlab can read "
                              f"({str(e).splitlines()[0][:120]})") from None
    state = safe_load(file, f"model.pretrained: {file}")
    if isinstance(state, dict) and "model" in state and "rng" in state:  # a cnnlab checkpoint without its trailer
        return selected_weights(state)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CnnlabError(f"model.pretrained: {file} holds no state dict of tensors")
    return state


def _fit_channels(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """A first conv's filters for other input channels: RGB summed for grey, grey spread over RGB."""
    if source.dim() != 4 or source.shape[:1] + source.shape[2:] != target.shape[:1] + target.shape[2:]:
        return None
    if target.shape[1] == 1:
        return source.sum(dim=1, keepdim=True)  # a grey image is R = G = B: the same response
    if source.shape[1] == 1:
        return source.repeat(1, target.shape[1], 1, 1) / target.shape[1]
    return None


def load_pretrained(model: nn.Module, path: str) -> list[str]:
    """Copy ``path``'s weights into ``model``. The head keeps its initialisation where its shape
    differs (another number of classes); any other missing or misfitting tensor is an error.
    Returns the names of the tensors left at their initialisation."""
    source = read_pretrained(path)
    own = model.state_dict()
    module_names = {id(m): n for n, m in model.named_modules()}
    head = {f"{module_names[id(m)]}.{k}" for m in stages(model)[-1].modules for k in m.state_dict()}
    first_conv = next((f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    fitted, kept = {}, []
    for name, target in own.items():
        tensor = source.get(name)
        if tensor is not None and tensor.shape != target.shape and name == first_conv:
            tensor = _fit_channels(tensor, target)
        if tensor is not None and tensor.shape == target.shape:
            fitted[name] = tensor
        elif name in head:
            kept.append(name)
        else:
            why = "missing" if name not in source else f"{tuple(source[name].shape)} there, {tuple(target.shape)} here"
            raise CnnlabError(f"model.pretrained: {path} does not fit the configured model: {name} ({why})")
    model.load_state_dict(fitted, strict=False)
    return kept


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """A frozen part's ``train``: batch norm keeps using, and never updates, its running statistics."""
    return nn.Module.train(module, False)


def freeze(model: nn.Module, mode: str, k: int) -> list[Stage]:
    """Freeze all but the head (linear_probe) or all but the last k stages and the head (last_k);
    returns the stages that train. Frozen stages stay in eval mode."""
    all_stages = stages(model)
    if mode == "full":
        return all_stages
    backbone = len(all_stages) - 1
    if mode == "last_k" and k > backbone:
        raise CnnlabError(f"finetune.k={k}, but the model has {backbone} stages before its head "
                          f"({', '.join(s.name for s in all_stages[:-1])}); use finetune.mode=full")
    trained = all_stages[-(k + 1):] if mode == "last_k" else all_stages[-1:]
    for stage in all_stages[:len(all_stages) - len(trained)]:
        for module in stage.modules:
            module.requires_grad_(False)
            for m in module.modules():
                m.train = types.MethodType(_stay_in_eval, m)  # bound, so deepcopy (EMA) rebinds it
            module.eval()
    return trained


def set_learning_rates(optimizer: torch.optim.Optimizer, head: Stage, head_lr: float | None,
                       backbone_lr: float | None) -> None:
    """Split each parameter group into backbone and head parts with their own learning rates
    (None: the optimizer's). Done before the scheduler is built, which scales each group's own lr."""
    if head_lr is None and backbone_lr is None:
        return
    inner = getattr(optimizer, "inner", optimizer)  # Lookahead shares its inner optimizer's groups
    if isinstance(inner, torch.optim.LBFGS):
        raise CnnlabError("optimizer=lbfgs has one learning rate; finetune.head_lr and finetune.backbone_lr must be null")
    head_ids = {id(p) for p in head.parameters()}
    groups = []
    for group in inner.param_groups:
        for is_head, lr in ((False, backbone_lr), (True, head_lr)):
            params = [p for p in group["params"] if (id(p) in head_ids) == is_head]
            if params:
                groups.append({**group, "params": params, "lr": group["lr"] if lr is None else lr})
    inner.param_groups[:] = groups


@dataclass
class Transfer:
    """What model.pretrained and finetune.* did to a model."""

    pretrained: str | None
    reinitialised: list[str]  # tensors of the pretrained file's head that did not fit
    mode: str
    trained: list[Stage] | None  # None: everything trains, one learning rate

    def describe(self, model: nn.Module) -> str | None:
        parts = []
        if self.pretrained:
            kept = f" ({', '.join(self.reinitialised)} re-initialised)" if self.reinitialised else ""
            parts.append(f"weights from {self.pretrained}{kept}")
        if self.mode != "full":
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            parts.append(f"{self.mode} trains {', '.join(s.name for s in self.trained)} "
                         f"({trainable:,} of {total:,} parameters)")
        return "; ".join(parts) or None


def transfer_learning(run, model: nn.Module) -> Transfer:
    """Load model.pretrained into ``model`` and freeze what finetune.mode leaves out."""
    reinitialised = load_pretrained(model, run.pretrained) if run.pretrained else []
    settings = run.finetune
    split_lr = settings.head_lr is not None or settings.backbone_lr is not None
    trained = freeze(model, settings.mode, settings.k) if settings.mode != "full" or split_lr else None
    return Transfer(run.pretrained, reinitialised, settings.mode, trained)
