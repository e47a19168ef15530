"""The remaining lecture knobs (issue 17): each reaches the object it configures, checked against a
closed form or a published value where there is one."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import OPTIMIZERS
from cnnlab.train.losses import MulticlassSVMLoss, build_loss, expected_initial_loss
from tests.conftest import run_tiny

# The loss-function lecture's three training images (cat, car, frog) and their class scores.
LECTURE_SCORES = torch.tensor([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])
LECTURE_LABELS = torch.tensor([0, 1, 2])


def test_the_svm_loss_is_the_lectures_hinge_loss():
    per_image = [2.9, 0.0, 12.9]  # max(0, 5.1 - 3.2 + 1) + max(0, -1.7 - 3.2 + 1) = 2.9, ...
    loss = build_loss("multi_margin")(LECTURE_SCORES, LECTURE_LABELS)
    assert isinstance(build_loss("multi_margin"), MulticlassSVMLoss)
    assert loss.item() == pytest.approx(sum(per_image) / 3)  # 5.27, the lecture's average
    assert build_loss("multi_margin")(LECTURE_SCORES[1:2], LECTURE_LABELS[1:2]).item() == 0.0  # car: margins met


def test_softmax_cross_entropy_is_the_lectures_value():
    cat = -math.log(math.exp(3.2) / (math.exp(3.2) + math.exp(5.1) + math.exp(-1.7)))
    assert cat == pytest.approx(2.04, abs=0.005)
    assert build_loss("cross_entropy")(LECTURE_SCORES[:1], LECTURE_LABELS[:1]).item() == pytest.approx(cat)


def test_the_initial_loss_check_knows_each_loss():
    assert expected_initial_loss("cross_entropy", 10) == pytest.approx(math.log(10))
    assert expected_initial_loss("multi_margin", 10) == 9.0  # the lecture's sanity check: C - 1
    # all-zero scores: exactly what a tiny initialisation approaches
    assert build_loss("multi_margin")(torch.zeros(4, 10), torch.arange(4)).item() == 9.0


def test_loss_option_reaches_the_trainer_and_validation(tmp_path, captured):
    summary = run_tiny(tmp_path / "run", "trainer.loss=multi_margin", "trainer.epochs=1")
    trainer = captured["trainer"]
    assert isinstance(trainer.loss_fn, MulticlassSVMLoss)
    assert summary["expected_initial_loss"] == 3.0  # 4 classes
    assert 1.5 <= summary["initial_loss"] <= 4.5
    assert summary["history"][0]["val/loss"] >= 0  # the hinge loss, not cross-entropy: still a margin sum


def test_svm_loss_refuses_label_smoothing_and_soft_targets():
    with pytest.raises(CnnlabError, match="trainer.label_smoothing=0.1 is for trainer.loss=cross_entropy"):
        build_loss("multi_margin", 0.1)
    with pytest.raises(CnnlabError, match="mixup and cutmix make soft targets"):
        build_loss("multi_margin")(LECTURE_SCORES, torch.eye(3))


def test_l1_and_elastic_net_penalties_are_added_to_the_data_loss():
    from cnnlab.train.loop import Trainer

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    data_loss = nn.functional.cross_entropy(model(x), y)
    l1 = sum(p.abs().sum() for p in model.parameters())
    l2 = sum(p.pow(2).sum() for p in model.parameters())
    for options, expected in [({"l1_decay": 0.01, "weight_decay": 0.0}, data_loss + 0.01 * l1),
                              ({"l1_decay": 0.01, "weight_decay": 0.1, "weight_decay_mode": "l2"},
                               data_loss + 0.01 * l1 + 0.05 * l2)]:  # elastic net: lambda1 |w| + lambda2/2 w^2
        opt = OPTIMIZERS.build("sgd", {"lr": 0.1, **options}, prefix="optimizer", model=model)
        trainer = Trainer.__new__(Trainer)
        trainer.forward, trainer.loss_fn, trainer.device, trainer.autocast_dtype = model, nn.CrossEntropyLoss(), torch.device("cpu"), None
        trainer.l2, trainer.l1, trainer.penalised = opt.l2_weight_decay, opt.l1_decay, opt.penalised_params
        assert trainer.objective(x, y)[1].item() == pytest.approx(expected.item(), rel=1e-6)


def test_l1_decay_reaches_a_run(tmp_path, captured):
    run_tiny(tmp_path / "run", "optimizer.l1_decay=0.001", "trainer.epochs=1")
    assert captured["trainer"].l1 == 0.001 and captured["trainer"].penalised


# --- activation functions, for every family -------------------------------------------------------

from cnnlab.core.registry import MODELS  # noqa: E402
from cnnlab.models.blocks import DropConnectLinear, Maxout, activation_name  # noqa: E402

ACTIVATIONS = ["relu", "leaky_relu", "prelu", "elu", "gelu", "tanh", "sigmoid", "maxout"]
FEED_FORWARD = ["mlp", "lenet5", "alexnet", "vgg11_bn", "nin", "googlenet"]
RESIDUAL = ["small_resnet", "resnet18", "se_resnet18", "resnext29", "wrn16_4", "tv"]


def build_model(name: str, **options):
    return MODELS.build(name, options, prefix="model", in_channels=3, num_classes=10, input_size=32)


def activations_in(model: nn.Module) -> set[str]:
    return {activation_name(m) for m in model.modules()} - {None}


@pytest.mark.parametrize("name", FEED_FORWARD + RESIDUAL)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_model_activation_reaches_every_activation_of_every_family(name, act):
    if act == "maxout" and name in RESIDUAL:
        with pytest.raises(CnnlabError, match="model.activation=maxout does not fit this model"):
            build_model(name, activation=act)
        return
    model = build_model(name, activation=act).eval()
    found = activations_in(model)
    assert act in found and found <= {act, "sigmoid"}  # sigmoid: squeeze-excitation gates stay gates
    assert not any(isinstance(m, nn.ReLU) for m in model.modules()) or act == "relu"
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_maxout_takes_the_max_of_k_pieces_from_a_widened_layer():
    model = build_model("mlp", hidden=[8], activation="maxout")
    linear, maxout = model[1], model[2]
    assert (linear.out_features, model[3].in_features) == (16, 8) and isinstance(maxout, Maxout)
    x = torch.randn(4, 16)
    assert torch.equal(maxout(x), torch.maximum(x[:, 0::2], x[:, 1::2]))  # channel c: max(2c, 2c + 1)
    vgg = build_model("vgg11_bn", activation="maxout")
    conv, bn = vgg.features[0][0], vgg.features[0][1]
    assert (conv.out_channels, bn.num_features, vgg.features[2][0].in_channels) == (128, 128, 64)


def test_the_lenet_classic_tanh_and_the_default_stay_unless_asked():
    assert activations_in(build_model("lenet5", variant="classic")) == {"tanh"}
    assert activations_in(build_model("lenet5", variant="classic", activation="elu")) == {"elu"}
    assert activations_in(build_model("resnet18")) == {"relu"}


@pytest.mark.parametrize(("act", "gain"), [("relu", math.sqrt(2)), ("tanh", 5 / 3), ("maxout", 1.0), ("sigmoid", 1.0),
                                           ("leaky_relu", math.sqrt(2 / (1 + 0.01 ** 2))),
                                           ("prelu", math.sqrt(2 / (1 + 0.25 ** 2))), ("elu", math.sqrt(2))])
def test_kaiming_init_keeps_the_gain_of_the_models_activation(act, gain):
    from cnnlab.core.registry import INITS

    torch.manual_seed(0)
    model = build_model("mlp", hidden=[2048, 2048], activation=act)
    INITS.build("kaiming_normal", {}, prefix="init", model=model)
    hidden = [m for m in model.modules() if isinstance(m, nn.Linear)][1]  # fan_in 2048 (or 2048 after maxout)
    assert hidden.weight.std().item() == pytest.approx(gain / math.sqrt(hidden.in_features), rel=0.01)
    INITS.build("kaiming_normal", {"nonlinearity": "relu"}, prefix="init", model=model)  # an explicit choice wins
    assert hidden.weight.std().item() == pytest.approx(math.sqrt(2 / hidden.in_features), rel=0.01)


def test_activation_reaches_a_run_and_maxout_on_a_resnet_is_one_line(tmp_path, captured):
    run_tiny(tmp_path / "run", "model=lenet5", "model.activation=prelu", "trainer.epochs=1")
    assert activations_in(captured["trainer"].model) == {"prelu"}
    from tests.conftest import TINY, run_cli

    result = run_cli("train", *[o for o in TINY if not o.startswith("model")], "model=small_resnet",
                     "model.activation=maxout", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "model.activation=maxout does not fit this model" in result.stderr


# --- DropConnect -----------------------------------------------------------------------------------

def test_drop_connect_drops_weights_while_training_and_keeps_their_expectation():
    torch.manual_seed(0)
    layer = DropConnectLinear(64, 8, p=0.5)
    x = torch.randn(16, 64)
    plain = nn.functional.linear(x, layer.weight, layer.bias)
    layer.eval()
    assert torch.equal(layer(x), plain)  # evaluation: the weights as they are
    layer.train()
    layer(x).sum().backward()  # d/dW of sum(x W'^T): zero where a weight was dropped
    dropped = (layer.weight.grad == 0).float().mean().item()
    assert dropped == pytest.approx(0.5, abs=0.03)
    mean = torch.stack([layer(x) for _ in range(2000)]).mean(0)
    assert torch.allclose(mean, plain, atol=0.15)  # inverted scaling: unbiased


def test_drop_connect_reaches_every_fully_connected_layer_of_a_run(tmp_path, captured):
    run_tiny(tmp_path / "run", "model.drop_connect=0.3", "trainer.epochs=1")
    linears = [m for m in captured["trainer"].model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 and all(isinstance(m, DropConnectLinear) and m.p == 0.3 for m in linears)


# --- stochastic depth ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "resnet50", "se_resnet18", "resnext29", "wrn16_4", "small_resnet"])
def test_stochastic_depth_rises_linearly_to_the_final_rate(name):
    from cnnlab.models.resnet import _Residual

    model = build_model(name, stochastic_depth=0.5)
    blocks = [m for m in model.modules() if isinstance(m, _Residual)]
    rates = [b.drop_path.p for b in blocks]
    assert rates == pytest.approx([0.5 * (l + 1) / len(blocks) for l in range(len(blocks))])  # p_l = l / L x p_L
    assert all(isinstance(b.drop_path, nn.Identity) for b in build_model(name).modules() if isinstance(b, _Residual))


def test_a_dropped_residual_branch_leaves_the_shortcut_and_evaluation_keeps_every_block():
    from cnnlab.models.resnet import BasicBlock, use_stochastic_depth

    torch.manual_seed(0)
    block = BasicBlock(4, 4)
    holder = use_stochastic_depth(nn.Sequential(block), 0.5)  # one block: p = 0.5
    x = torch.randn(4000, 4, 3, 3)
    shortcut_only = torch.relu(x)
    block.eval()
    full = block(x)
    assert torch.equal(holder(x), full)  # evaluation: every block, unscaled
    block.train()
    block.body.eval()  # fixed batch-norm statistics: the branch is the same function in both modes
    out = block(x)
    dropped = torch.isclose(out, shortcut_only).flatten(1).all(1).float().mean().item()
    assert dropped == pytest.approx(0.5, abs=0.03)  # per sample, with probability p


def test_stochastic_depth_reaches_a_run(tmp_path, captured):
    run_tiny(tmp_path / "run", "model=small_resnet", "model.widths=[4]", "model.blocks=[2]",
             "model.stochastic_depth=0.2", "trainer.epochs=1")
    from cnnlab.models.resnet import _Residual

    rates = [m.drop_path.p for m in captured["trainer"].model.modules() if isinstance(m, _Residual)]
    assert rates == pytest.approx([0.1, 0.2])


# --- babysitting: update/weight ratios and dead units ----------------------------------------------

from cnnlab.train.babysit import UpdateRatio, dead_unit_fractions  # noqa: E402
from tests.test_train import read_events  # noqa: E402


def test_update_ratio_is_the_norm_of_the_update_over_the_norm_of_the_weights():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    watch = UpdateRatio(model)
    assert list(watch.weights) == ["0.weight", "2.weight"]  # weight matrices; biases aside
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))  # ||W|| = 5
        model[2].weight.fill_(1.0)
    watch.snapshot()
    with torch.no_grad():
        model[0].weight[0, 0] += 0.005  # ||dW|| = 0.005: ratio 1e-3
    assert watch.ratios() == pytest.approx({"0.weight": 1e-3, "2.weight": 0.0}, rel=1e-4)  # float32


def test_an_epoch_far_from_1e_3_warns_once_per_direction():
    watch = UpdateRatio(nn.Linear(2, 2))
    watch.medians = [1e-3, 2e-3, 5e-4]
    assert watch.judge(1) is None
    watch.medians = [0.5, 0.2, 1e-3]  # median 0.2
    assert watch.judge(2) == ("update/weight ratio 2.0e-01 in epoch 2 (median over the logged steps and layers) is "
                              "far from the lectures' ~1e-3: the learning rate is probably too high")
    watch.medians = [0.5]
    assert watch.judge(3) is None  # said once
    watch.medians = [1e-6]
    assert "probably too low" in watch.judge(4)


def test_dead_units_are_the_relus_never_positive_on_the_batch():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Unflatten(1, (4, 1, 1)), nn.Conv2d(4, 2, 1), nn.ReLU())
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([-1.0, -1.0, -1.0, 1.0]))  # 3 of 4 units never fire
        model[3].weight.fill_(1.0)
        model[3].bias.copy_(torch.tensor([0.0, -5.0]))  # channel 1 never fires
    assert dead_unit_fractions(model, torch.randn(16, 2)) == {"1": 0.75, "4": 0.5}
    assert model.training  # the mode is given back


def test_babysitting_reaches_tensorboard_and_the_console(tmp_path):
    import io

    from rich.console import Console

    from cnnlab.tasks import train
    from tests.conftest import compose_config, tiny_plus

    out = io.StringIO()
    train(compose_config(*tiny_plus("trainer.epochs=2", "trainer.log_every_n_steps=2", "optimizer.lr=1e-9",
                                    "scheduler=constant")), tmp_path / "run", console=Console(file=out, width=300))
    ea = read_events(tmp_path / "run")
    ratio = ea.Scalars("update_ratio/1.weight")
    assert [e.step for e in ratio] == list(range(2, 19, 2)) and all(e.value < 1e-4 for e in ratio)  # 9 steps an epoch
    assert [e.step for e in ea.Scalars("dead_units/2")] == [9, 18]  # the mlp's ReLU, once an epoch
    assert out.getvalue().count("learning rate is probably too low") == 1
    train(compose_config(*tiny_plus("trainer.epochs=1", "trainer.log_update_ratio=false", "trainer.log_dead_units=false")),
          tmp_path / "off", console=Console(file=io.StringIO()))
    tags = read_events(tmp_path / "off").Tags()["scalars"]
    assert not [t for t in tags if t.startswith(("update_ratio/", "dead_units/"))]
