"""Models adapt to the dataset, and each option reaches the module it configures."""

import pytest
import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.models.blocks import BasicBlock
from cnnlab.registry import INITS, MODELS


def build(name, shape=(1, 28), classes=10, **options):
    return MODELS.build(name, options, prefix="model", in_channels=shape[0], num_classes=classes, input_size=shape[1])


def count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize(("shape", "classes"), [((1, 28), 10), ((3, 32), 100)])
def test_models_take_channels_size_and_classes_from_the_dataset(name, shape, classes):
    model = build(name, shape, classes)
    x = torch.randn(4, shape[0], shape[1], shape[1])
    assert model(x).shape == (4, classes)


def test_mlp_options():
    model = build("mlp", hidden=[64], activation="tanh", dropout=0.3, batch_norm=True)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 64), (64, 10)]
    assert count(model, nn.Tanh) == 1 and count(model, nn.ReLU) == 0
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3]
    assert count(model, nn.BatchNorm1d) == 1 and linears[0].bias is None
    plain = build("mlp", hidden=[32, 16, 8])
    assert count(plain, nn.Linear) == 4 and count(plain, nn.Dropout) == 0 and count(plain, nn.BatchNorm1d) == 0


def test_lenet5_variants_follow_the_paper():
    classic = build("lenet5", variant="classic")
    modern = build("lenet5", variant="modern")
    assert count(classic, nn.Tanh) == 4 and count(classic, nn.AvgPool2d) == 2 and count(classic, nn.MaxPool2d) == 0
    assert count(modern, nn.ReLU) == 4 and count(modern, nn.MaxPool2d) == 2
    convs = [m for m in classic.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert convs[0].padding == (2, 2)  # 28x28 is padded to the paper's 32x32
    assert build("lenet5", (3, 32)).features[0].padding == (0, 0)
    linears = [m.out_features for m in classic.modules() if isinstance(m, nn.Linear)]
    assert linears == [120, 84, 10]
    assert [m.p for m in build("lenet5", dropout=0.4).modules() if isinstance(m, nn.Dropout)] == [0.4, 0.4]


def test_small_resnet_options():
    model = build("small_resnet", widths=[8, 16, 24], blocks=[1, 0, 2], batch_norm=True, dropout=0.2)
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs if c.in_channels != c.out_channels] == [8, 16, 24]
    assert count(model, BasicBlock) == 3
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.2]
    no_bn = build("small_resnet", batch_norm=False)
    assert count(no_bn, nn.BatchNorm2d) == 0
    assert all(c.bias is not None for c in no_bn.modules() if isinstance(c, nn.Conv2d))
    assert all(c.bias is None for c in build("small_resnet").modules() if isinstance(c, nn.Conv2d))


def test_residual_block_adds_its_input():
    block = BasicBlock(4)
    for p in block.body.parameters():
        nn.init.zeros_(p)  # the body outputs 0 (BN weight 0), so the block is relu(x)
    block.eval()
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(block(x), torch.relu(x))


def test_model_shape_errors_are_clear():
    with pytest.raises(CnnlabError, match="same length"):
        build("small_resnet", widths=[8, 16], blocks=[1])
    with pytest.raises(CnnlabError, match="halve 4x4 inputs to nothing"):
        build("small_resnet", (1, 4), widths=[8, 8, 8], blocks=[0, 0, 0])
    assert build("lenet5", (1, 8))(torch.zeros(1, 1, 8, 8)).shape == (1, 10)  # padded up to the paper's 32x32


# --- init schemes ----------------------------------------------------------------------------------

def big_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1000, 800), nn.Conv2d(64, 128, 3))


def test_xavier_uniform_variance_and_gain():
    model = big_model()
    INITS.build("xavier_uniform", {"gain": 2.0}, prefix="init", model=model)
    lin, conv = model[0].weight, model[1].weight
    assert lin.var().item() == pytest.approx(4 * 2 / (1000 + 800), rel=0.05)
    assert conv.var().item() == pytest.approx(4 * 2 / (64 * 9 + 128 * 9), rel=0.05)  # fan = C * k1 * k2
    assert (model[0].bias == 0).all()


@pytest.mark.parametrize(("mode", "fan"), [("fan_in", 64 * 9), ("fan_out", 128 * 9)])
def test_kaiming_normal_mode_and_nonlinearity(mode, fan):
    model = big_model()
    INITS.build("kaiming_normal", {"mode": mode}, prefix="init", model=model)
    assert model[1].weight.var().item() == pytest.approx(2 / fan, rel=0.05)
    INITS.build("kaiming_normal", {"mode": mode, "nonlinearity": "tanh"}, prefix="init", model=model)
    assert model[1].weight.var().item() == pytest.approx((5 / 3) ** 2 / fan, rel=0.05)


def test_zero_bias_option():
    model = big_model()
    INITS.build("kaiming_normal", {"zero_bias": False}, prefix="init", model=model)
    assert model[0].bias.abs().sum() > 0
    INITS.build("xavier_uniform", {"zero_bias": True}, prefix="init", model=model)
    assert model[0].bias.abs().sum() == 0


def test_default_init_leaves_pytorch_initialisation():
    model = big_model()
    before = [p.clone() for p in model.parameters()]
    INITS.build("default", {}, prefix="init", model=model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
