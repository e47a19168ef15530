"""A pack trains N trials as one stacked model: each member ends with the weights, BatchNorm statistics and
losses of the same trial trained alone (with its own seed, optimizer values, schedule and label smoothing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab.core.plugins import load_components
from cnnlab.core.registry import MODELS, OPTIMIZERS, SCHEDULERS
from cnnlab.training.losses import build_loss
from cnnlab.training.pack import Pack, member_losses, packable

STEPS = 12


def lenet(seed: int) -> nn.Module:
    load_components()
    torch.manual_seed(seed)
    return MODELS.build("lenet5", {}, "model", in_channels=1, num_classes=10, input_size=28)


def bn_mlp(seed: int) -> nn.Module:
    load_components()
    torch.manual_seed(seed)
    return MODELS.build("mlp", {"hidden": [32, 16], "batch_norm": True}, "model", in_channels=1, num_classes=10,
                        input_size=28)


def batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.rand(24, 1, 28, 28, generator=g), torch.randint(0, 10, (24,), generator=g)) for _ in range(STEPS)]


MEMBERS = [  # (seed, optimizer options, label smoothing)
    (0, {"lr": 0.05}, 0.0), (1, {"lr": 0.01, "weight_decay": 1e-3}, 0.1),
    (2, {"lr": 0.1, "momentum": 0.5}, 0.0), (3, {"lr": 0.02}, 0.2),
]


def optimizer_and_schedule(model, optimizer: str, options: dict, scheduler: str):
    if optimizer != "sgd" and "momentum" in options:  # Adam's own momentum: its first beta
        options = {**{k: v for k, v in options.items() if k != "momentum"}, "betas": (options["momentum"], 0.99)}
    opt = OPTIMIZERS.build(optimizer, options, "optimizer", model=model)
    options = {"step_size": 1} if scheduler == "step" else {}
    sched = SCHEDULERS.build(scheduler, options, "scheduler", optimizer=opt, steps_per_epoch=STEPS // 2, epochs=2)
    return opt, sched


def trained_alone(build, optimizer, scheduler, seed, options, smoothing):
    model = build(seed)
    opt, sched = optimizer_and_schedule(model, optimizer, options, scheduler)
    loss_fn, losses = build_loss("cross_entropy", smoothing), []
    model.train()
    for x, y in batches():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.state_dict(), losses


def trained_packed(build, optimizer, scheduler):
    members = [build(seed) for seed, _, _ in MEMBERS]
    pack = Pack(members)
    steppers = [optimizer_and_schedule(m, optimizer, opts, scheduler) for m, (_, opts, _) in zip(members, MEMBERS)]
    smoothing = torch.tensor([s for _, _, s in MEMBERS])
    losses = []
    pack.train()
    for x, y in batches():
        pack.zero_grad()
        loss = member_losses(pack(x), y, smoothing)
        loss.sum().backward()
        pack.share_grads()
        for opt, sched in steppers:
            opt.step()
            sched.step()
        losses.append(loss.tolist())
    return [pack.member_state(i) for i in range(len(members))], [list(column) for column in zip(*losses)]


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-12)).item()
               for k in a)


@pytest.mark.parametrize("build, optimizer, scheduler", [
    (lenet, "sgd", "onecycle"),      # SGD with Nesterov momentum (sgd's default)
    (bn_mlp, "adamw", "cosine"),     # BatchNorm: each member's running statistics are its own
    (bn_mlp, "sgd", "step"),
])
def test_each_member_of_a_pack_of_4_trains_as_its_trial_alone(build, optimizer, scheduler):
    """Weights and BatchNorm statistics within 1e-4 (relative), every step's loss to 4 decimals."""
    packed, packed_losses = trained_packed(build, optimizer, scheduler)
    worst = 0.0
    for i, (seed, options, smoothing) in enumerate(MEMBERS):
        alone, losses = trained_alone(build, optimizer, scheduler, seed, options, smoothing)
        worst = max(worst, relative_difference(alone, packed[i]))
        assert packed_losses[i] == pytest.approx(losses, abs=1e-4)
    assert worst < 1e-4
    # the members trained apart: no two ended alike
    assert relative_difference(packed[0], packed[1]) > 1e-2


def test_a_member_saves_its_own_rows_only_and_loads_into_a_model_alone():
    pack = Pack([bn_mlp(s) for s in range(3)])
    state = pack.member_state(1)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in state.values())
    alone = bn_mlp(9)
    alone.load_state_dict(state)
    x = torch.rand(5, 1, 28, 28)
    alone.eval(), pack.train(False)
    torch.testing.assert_close(alone(x), pack(x)[1])


def test_what_cannot_be_packed_says_why():
    assert packable([lenet(0)]) == "a pack needs two members or more"
    assert packable([lenet(0), bn_mlp(0)]) == "the members' architectures differ (their parameters' names or shapes)"
    with pytest.raises(ValueError, match="architectures differ"):
        Pack([lenet(0), bn_mlp(0)])
