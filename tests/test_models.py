"""Models adapt to the dataset, and each option reaches the module it configures."""

import pytest
import torch
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.models.blocks import SqueezeExcite, WithAux
from cnnlab.models.measure import measure
from cnnlab.models.mlp import FourierFeatures
from cnnlab.models.resnet import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck
from cnnlab.core.registry import INITS, MODELS


def build(name, shape=(1, 28), classes=10, **options):
    return MODELS.build(name, options, prefix="model", in_channels=shape[0], num_classes=classes, input_size=shape[1])


def build_meta(name, shape=(1, 28), classes=10, **options):
    """The model on PyTorch's meta device: its structure and shapes, without allocating or initialising."""
    with torch.device("meta"):
        return build(name, shape, classes, **options)


def count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


# CIFAR-only designs keep full resolution through their first stage; at 224x224 they cost
# 40-260 GFLOPs per image, too slow for a CPU test suite (their 224 shapes are checked on the meta device).
CIFAR_ONLY = {"resnext29", "wrn", "wrn28_10"}


# Grayscale 28x28 with 4 classes: test_config.py's test_every_entry_composes_and_builds runs every model forward.
@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize(("shape", "classes"), [((3, 32), 100)])
def test_forward_and_backward_on_small_inputs(name, shape, classes):
    model = build(name, shape, classes)
    x = torch.randn(2, shape[0], shape[1], shape[1])
    if getattr(model, "memorises", False):  # k-NN: no gradients; it answers from what it remembers
        model.memorise(torch.randn(8, *x.shape[1:]), torch.arange(8) % classes)
        assert model(x).shape == (2, classes)
        return
    out = model(x)
    assert out.shape == (2, classes)
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("name", [n for n in MODELS.names() if n not in CIFAR_ONLY])
def test_forward_on_imagenet_sized_inputs(name):  # shapes only: the small inputs above check the numbers
    model = build_meta(name, (3, 224), 1000).eval()
    if getattr(model, "memorises", False):
        model.memorise(torch.zeros(2, 3, 224, 224, device="meta"), torch.tensor([0, 999], device="meta"))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224, device="meta")).shape == (1, 1000)


@pytest.mark.parametrize("name", sorted(CIFAR_ONLY))
def test_cifar_only_models_still_shape_check_at_224(name):
    params, flops = measure(name, 3, 224, 1000)
    assert params > 0 and flops > 0


# --- public facts --------------------------------------------------------------------------------

def test_published_parameter_counts():
    assert measure("alexnet", 3, 224, 1000)[0] == 61_100_840  # the lecture's figures
    assert measure("vgg19", 3, 224, 1000)[0] == 143_667_240
    assert measure("resnet18", 3, 32, 10)[0] == pytest.approx(11.17e6, rel=0.001)  # CIFAR stem
    assert measure("resnext29", 3, 32, 10)[0] == pytest.approx(34.4e6, rel=0.01)  # 8x64d (Xie et al., Table 7)
    assert measure("wrn28_10", 3, 32, 10)[0] == pytest.approx(36.5e6, rel=0.01)   # Zagoruyko & Komodakis
    assert measure("wrn16_4", 3, 32, 10)[0] == pytest.approx(2.7e6, rel=0.03)


@pytest.mark.parametrize(("name", "gmacs"), [("resnet18", 1.8), ("resnet34", 3.6), ("resnet50", 3.8),
                                             ("resnet101", 7.6), ("resnet152", 11.3)])
def test_resnet_multiply_adds_match_the_paper(name, gmacs):
    # He et al. 2016, Table 1; the paper's ResNets put the bottleneck stride in the 1x1 (v1)
    _, flops = measure(name, 3, 224, 1000, {"variant": "v1"})
    assert flops / 2 / 1e9 == pytest.approx(gmacs, rel=0.05)


def test_v1_5_costs_more_than_v1_only_in_downsampling_bottlenecks():
    v1 = measure("resnet50", 3, 224, 1000, {"variant": "v1"})
    v15 = measure("resnet50", 3, 224, 1000, {"variant": "v1_5"})
    assert v1[0] == v15[0] and v15[1] > v1[1]  # same weights, the 3x3 runs at full resolution


# --- block facts -----------------------------------------------------------------------------------

def strides(block):
    return [m.stride[0] for m in block.body if isinstance(m, nn.Conv2d)]


def test_v1_and_v1_5_differ_exactly_where_the_stride_sits():
    v1 = Bottleneck(256, 128, stride=2, variant="v1")
    v15 = Bottleneck(256, 128, stride=2, variant="v1_5")
    assert strides(v1) == [2, 1, 1] and strides(v15) == [1, 2, 1]
    assert [c.kernel_size for c in v1.body if isinstance(c, nn.Conv2d)] == [(1, 1), (3, 3), (1, 1)]
    assert v1.shortcut[0].stride == v15.shortcut[0].stride == (2, 2)
    for a, b in zip(v1.state_dict().values(), v15.state_dict().values()):
        assert a.shape == b.shape  # the same weights, only the stride moved


def test_preactivation_block_order_is_bn_relu_conv():
    block = PreActBasicBlock(16, 16)
    order = [type(m) for m in [*block.pre, *block.body]]
    assert order == [nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    model = build("resnet18", (3, 32), variant="v2")
    assert count(model, PreActBasicBlock) == 8 and count(model, BasicBlock) == 0
    assert isinstance(model.final[0], nn.BatchNorm2d)  # the last block's output is normalised before pooling
    assert count(build("resnet50", (3, 32), variant="v2"), PreActBottleneck) == 16


def test_squeeze_excite_scales_its_input_by_a_per_channel_sigmoid_gate():
    se = SqueezeExcite(8, reduction=4)
    x = torch.randn(2, 8, 5, 5)
    gate = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean(dim=(2, 3), keepdim=True)))))
    assert gate.shape == (2, 8, 1, 1) and ((gate > 0) & (gate < 1)).all()
    assert torch.allclose(se(x), x * gate, atol=1e-6)
    assert se.fc1.out_channels == 2


def test_a_1x1_convolution_is_a_per_pixel_linear_layer():
    conv = nn.Conv2d(6, 4, 1)
    linear = nn.Linear(6, 4)
    linear.weight.data = conv.weight.data.view(4, 6)
    linear.bias.data = conv.bias.data
    x = torch.randn(2, 6, 5, 7)
    assert torch.allclose(conv(x), linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), atol=1e-6)


# --- each option reaches the module ----------------------------------------------------------------

def options_of(name):
    return MODELS.get(name).options


@pytest.mark.parametrize("name", [n for n in MODELS.names() if "dropout" in options_of(n)])
def test_dropout_option_reaches_every_dropout_layer(name):
    model = build(name, (3, 32), dropout=0.3)
    rates = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    assert rates == {0.3}


@pytest.mark.parametrize("name", [n for n in MODELS.names() if "batch_norm" in options_of(n)])
def test_batch_norm_switch(name):
    bn = (nn.BatchNorm1d, nn.BatchNorm2d)
    assert count(build_meta(name, (3, 32), batch_norm=True), bn) > 0
    assert count(build_meta(name, (3, 32), batch_norm=False), bn) == 0


def first_conv(model):
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", [n for n in MODELS.names() if "stem" in options_of(n) and not n.startswith("vgg")])
def test_stem_option_picks_the_small_or_original_stem(name):
    small, large = first_conv(build_meta(name, (3, 64), stem="small")), first_conv(build_meta(name, (3, 64), stem="large"))
    assert small.stride == (1, 1) and small.kernel_size[0] <= 5
    assert large.stride[0] >= 2 and large.kernel_size[0] >= 7
    auto_small, auto_large = first_conv(build_meta(name, (3, 32))), first_conv(build_meta(name, (3, 224)))
    assert auto_small.stride == (1, 1) and auto_large.stride[0] >= 2  # auto follows the input size


def test_vgg_stem_and_classifier_options():
    cifar = build("vgg16", (3, 32))
    imagenet = build("vgg16", (3, 224), 1000)
    assert [m.out_features for m in cifar.classifier if isinstance(m, nn.Linear)] == [512, 512, 10]
    assert [m.out_features for m in imagenet.classifier if isinstance(m, nn.Linear)] == [4096, 4096, 1000]
    assert [m.out_features for m in build("vgg16", (3, 64), stem="large").classifier if isinstance(m, nn.Linear)][0] == 4096
    gap = build("vgg16", (3, 32), classifier="gap")
    assert count(gap.classifier, nn.Linear) == 1 and isinstance(gap.classifier[0], nn.AdaptiveAvgPool2d)
    assert count(build("vgg13", (3, 32)), nn.Conv2d) == 10 and count(build("vgg19_bn", (3, 32)), nn.BatchNorm2d) == 16


def test_resnet_zero_init_residual_zeroes_each_blocks_last_norm():
    model = build("resnet50", (3, 32), zero_init_residual=True)
    lasts = [m.last_norm().weight for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(lasts) == 16 and all((w == 0).all() for w in lasts)
    assert all((m.last_norm().weight != 0).any() for m in build("resnet50", (3, 32)).modules() if isinstance(m, Bottleneck))
    preact = build("resnet18", (3, 32), variant="v2", zero_init_residual=True)
    assert all((m.last_norm().weight == 0).all() for m in preact.modules() if isinstance(m, PreActBasicBlock))


def test_se_reduction_reaches_every_block():
    model = build("se_resnet18", (3, 32), se_reduction=8)
    gates = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert len(gates) == 8 and all(g.fc1.out_channels == g.fc1.in_channels // 8 for g in gates)
    assert count(build("resnet18", (3, 32)), SqueezeExcite) == 0


def test_resnext_cardinality_and_width():
    model = build("resnext29", (3, 32), cardinality=32, width=4)
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert {m.groups for m in grouped} == {32}
    assert [m.out_channels for m in grouped][::3] == [128, 256, 512]  # C x d x stage multiplier
    r50 = [m for m in build("resnext50_32x4d", (3, 224)).modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert r50[0].groups == 32 and r50[0].out_channels == 128


def test_wide_resnet_depth_and_widen():
    model = build("wrn", (3, 32), depth=16, widen=2)
    blocks = [m for m in model.modules() if isinstance(m, PreActBasicBlock)]
    assert len(blocks) == 6 and [b.body[0].out_channels for b in blocks][::2] == [32, 64, 128]
    with pytest.raises(CnnlabError, match="6n \\+ 4"):
        build("wrn", (3, 32), depth=20)
    assert [m.p for m in build("wrn16_4", (3, 32), dropout=0.3).modules() if isinstance(m, nn.Dropout)] == [0.3] * 6


def test_googlenet_auxiliary_classifiers():
    model = build("googlenet", (3, 32), aux_classifiers=True, aux_weight=0.5)
    out = model.train()(torch.randn(2, 3, 32, 32))
    assert isinstance(out, WithAux) and len(out.aux) == 2 and out.aux_weight == 0.5
    assert all(a.shape == (2, 10) for a in out.aux) and out.logits.shape == (2, 10)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # evaluation sees plain logits
    plain = build("googlenet", (3, 32))
    assert plain.aux is None and isinstance(plain.train()(torch.randn(2, 3, 32, 32)), torch.Tensor)
    widths = [m.out_channels for m in plain.inception.values()]
    assert widths == [256, 480, 512, 512, 512, 528, 832, 832, 1024]  # Table 1's output depths


def test_trainer_adds_weighted_auxiliary_losses():
    from cnnlab.training.loop import Trainer

    logits, aux = torch.randn(4, 3), [torch.randn(4, 3), torch.randn(4, 3)]
    y = torch.tensor([0, 1, 2, 0])
    trainer = Trainer.__new__(Trainer)
    trainer.loss_fn = nn.CrossEntropyLoss()
    out_logits, loss = trainer.loss(WithAux(logits, aux, 0.3), y)
    ce = nn.functional.cross_entropy
    assert out_logits is logits and torch.allclose(loss, ce(logits, y) + 0.3 * (ce(aux[0], y) + ce(aux[1], y)))


def test_alexnet_fc_width_and_forms():
    assert [m.out_features for m in build("alexnet", (3, 32), fc_width=256).classifier if isinstance(m, nn.Linear)] == [256, 256, 10]
    assert first_conv(build("alexnet", (3, 224))).kernel_size == (11, 11)
    assert all(m.kernel_size == 3 and m.stride == 2 for m in build("alexnet", (3, 32)).modules() if isinstance(m, nn.MaxPool2d))


def test_nin_uses_1x1_convs_and_global_average_pooling():
    model = build("nin", (3, 32))
    kernels = [m.kernel_size for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert kernels.count((1, 1)) == 6 and count(model, nn.Linear) == 0
    assert all(m.ceil_mode for m in model.modules() if isinstance(m, nn.MaxPool2d))


def test_fourier_mlp_frequencies_and_scale():
    torch.manual_seed(0)
    model = MODELS.build("fourier_mlp", {"num_frequencies": 512, "sigma": 3.0, "hidden": [32]}, prefix="model",
                         in_channels=2, num_classes=3, input_size=1)
    features = next(m for m in model.modules() if isinstance(m, FourierFeatures))
    assert features.B.shape == (512, 2) and features.B.std().item() == pytest.approx(3.0, rel=0.1)
    v = torch.rand(5, 2)
    gamma = features(v)
    assert gamma.shape == (5, 1024) and torch.allclose(gamma[:, :512] ** 2 + gamma[:, 512:] ** 2, torch.ones(5, 512))
    assert model(v).shape == (5, 3)
    assert "1.B" in model.state_dict()  # the frequencies are saved with the weights
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [(1024, 32), (32, 3)]  # hidden=[32] after 2 x 512 features
    tanh = MODELS.build("fourier_mlp", {"activation": "tanh", "hidden": [8, 8]}, prefix="model",
                        in_channels=2, num_classes=3, input_size=1)
    assert count(tanh, nn.Tanh) == 2 and count(tanh, nn.ReLU) == 0


def test_torchvision_passthrough_arch_and_channels():
    model = build("tv", (1, 32), arch="resnet18")
    assert type(model).__name__ == "ResNet" and model.conv1.in_channels == 1 and model.fc.out_features == 10
    assert type(build("tv", (3, 32), arch="mobilenet_v2")).__name__ == "MobileNetV2"
    with pytest.raises(CnnlabError, match="unknown torchvision architecture 'resnet19'"):
        build("tv", arch="resnet19")


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
    block = BasicBlock(4, 4)
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
