"""A pack: N trials of one architecture trained as one stacked model, each member still a model of its own.

Every parameter (and buffer) of the N members lives in one stacked tensor of shape (N, ...). Each member's own
module keeps a parameter that is a view of its row, a leaf of its own, so that:

- the forward and backward run once for the pack (torch.func.vmap over functional_call): one set of kernel
  launches, where N separate trials launch N sets, and a small network's step is bound by launches on a GPU;
- each member's gradients are views of the stacked gradient's rows, with no copy;
- each member's optimizer, scheduler and EMA are the ones a trial alone builds (the optimizer registry, its
  step_kernel), stepping its own parameters in place, and so the stacked tensors;
- a member's BatchNorm statistics are its own rows of the stacked buffers, updated in place under vmap;
- a member's state_dict is the one a trial alone saves (cloned: a row alone, not the whole stack).

Members differ in numbers only: their initialisation (their own seed), optimizer values and schedule, label
smoothing. ``packable`` says why a model cannot be packed, in one line, and the trial then runs alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


def packable(models: Sequence[nn.Module]) -> str | None:
    """None when ``models`` can be stacked; else the reason, in words."""
    if len(models) < 2:
        return "a pack needs two members or more"
    shapes = [[(n, tuple(t.shape), t.dtype) for n, t in (*m.named_parameters(), *m.named_buffers())] for m in models]
    if any(s != shapes[0] for s in shapes[1:]):
        return "the members' architectures differ (their parameters' names or shapes)"
    if getattr(models[0], "memorises", False):
        return "the model learns by remembering (k-NN), not by gradient steps"
    return None


class Pack(nn.Module):
    """``members``: N models of one architecture, each initialised as its trial alone initialises it. After
    construction their parameters and buffers are views of the pack's stacked tensors; build each member's
    optimizer after it (it must hold the views)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        reason = packable(members)
        if reason is not None:
            raise ValueError(reason)
        self.members = nn.ModuleList(members)
        params, buffers = stack_module_state(list(members))
        self.stacked_params = {n: p.detach().requires_grad_(members[0].get_parameter(n).requires_grad)
                               for n, p in params.items()}
        self.stacked_buffers = {n: b.detach() for n, b in buffers.items()}
        for i, member in enumerate(members):
            for name, stacked in self.stacked_params.items():
                module, _, leaf = name.rpartition(".")
                owner = member.get_submodule(module) if module else member
                owner._parameters[leaf] = nn.Parameter(stacked.detach()[i], requires_grad=stacked.requires_grad)
            for name, stacked in self.stacked_buffers.items():
                module, _, leaf = name.rpartition(".")
                owner = member.get_submodule(module) if module else member
                owner._buffers[leaf] = stacked[i]
        # The stateless template functional_call runs: member 0's structure, its tensors replaced each call.
        self.template = members[0]

    def __len__(self) -> int:
        return len(self.members)

    def train(self, mode: bool = True) -> Pack:
        for m in self.members:
            m.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, B, C): every member on the same batch ``x`` (B, ...), or each on its own (N, B, ...)."""
        def one(params, buffers, images):
            return functional_call(self.template, (params, buffers), (images,))

        in_x = 0 if x.dim() > 0 and x.shape[0] == len(self) and getattr(x, "per_member", False) else None
        return vmap(one, in_dims=(0, 0, in_x), randomness="different")(self.stacked_params, self.stacked_buffers, x)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.stacked_params.values():
            p.grad = None
        for m in self.members:
            m.zero_grad(set_to_none=True)

    def share_grads(self) -> None:
        """After backward: each member's parameter's gradient is its row of the stacked gradient (a view)."""
        for name, stacked in self.stacked_params.items():
            if stacked.grad is None:
                continue
            for i, member in enumerate(self.members):
                member.get_parameter(name).grad = stacked.grad[i]

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Member ``i``'s state_dict, as its trial alone saves it: its own rows, copied out of the stack."""
        return {k: v.detach().clone() for k, v in self.members[i].state_dict().items()}


def member_losses(logits: torch.Tensor, y: torch.Tensor, label_smoothing: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each member (N,), with each member's own label smoothing (N,): what
    nn.CrossEntropyLoss(label_smoothing=e) gives for one member, (1 - e) * NLL + e * mean over classes of -log p."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = y if y.dim() == logits.dim() - 1 else y.expand(logits.shape[:-1])
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).mean(-1)
    uniform = -logp.mean(-1).mean(-1)
    return (1 - label_smoothing) * nll + label_smoothing * uniform
