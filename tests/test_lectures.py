"""The remaining lecture knobs (issue 17): each reaches the object it configures, checked against a
closed form or a published value where there is one."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import OPTIMIZERS
from cnnlab.training.losses import MulticlassSVMLoss, build_loss, expected_initial_loss
from tests.conftest import train
from tests.conftest import compose_config, quiet_console, run_tiny, tiny_plus

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
    from cnnlab.training.loop import Trainer

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


@pytest.mark.parametrize("penalty", [["optimizer.l1_decay=0.05"],
                                     ["optimizer.weight_decay=5", "optimizer.weight_decay_mode=l2"]])
def test_the_initial_loss_check_judges_the_loss_without_its_penalties(tmp_path, penalty):
    """An L1 or L2 term in the loss is not the data's loss: the first loss checked against ln(C) leaves it out."""
    plain = run_tiny(tmp_path / "plain", "trainer.epochs=1", "seed=3")["initial_loss"]
    console = quiet_console()
    summary = train(compose_config(*tiny_plus("trainer.epochs=1", "seed=3", *penalty)), tmp_path / "run", console=console)
    assert summary["initial_loss"] == pytest.approx(plain, rel=1e-6)  # the same first forward pass
    assert "initial loss" not in console.file.getvalue()


# --- activation functions, for every family -------------------------------------------------------

from cnnlab.core.registry import MODELS  # noqa: E402
from cnnlab.models.blocks import DropConnectLinear, Maxout, activation_name  # noqa: E402

ACTIVATIONS = ["relu", "leaky_relu", "prelu", "elu", "gelu", "tanh", "sigmoid", "maxout"]
FEED_FORWARD = ["mlp", "lenet5", "alexnet", "vgg11_bn", "nin", "googlenet"]
RESIDUAL = ["small_resnet", "resnet18", "se_resnet18", "resnext29", "wrn16_4", "tv"]


def build_model(name: str, input_size: int = 32, **options):
    return MODELS.build(name, options, prefix="model", in_channels=3, num_classes=10, input_size=input_size)


def activations_in(model: nn.Module) -> set[str]:
    return {activation_name(m) for m in model.modules()} - {None}


@pytest.mark.parametrize("name", FEED_FORWARD + RESIDUAL)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_model_activation_reaches_every_activation_of_every_family(name, act):
    if act == "maxout" and name in RESIDUAL:
        with pytest.raises(CnnlabError, match="model.activation=maxout does not fit this model"):
            build_model(name, activation=act)
        return
    model = build_model(name, input_size=16, activation=act).eval()  # 16x16, which every family takes
    found = activations_in(model)
    assert act in found and found <= {act, "sigmoid"}  # sigmoid: squeeze-excitation gates stay gates
    assert not any(isinstance(m, nn.ReLU) for m in model.modules()) or act == "relu"
    out = model(torch.randn(2, 3, 16, 16))
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

from cnnlab.training.babysit import UpdateRatio, dead_unit_fractions  # noqa: E402
from tests.test_train import read_events  # noqa: E402


def test_update_ratio_is_the_norm_of_the_update_over_the_norm_of_the_weights():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    watch = UpdateRatio(model)
    assert list(watch.weights) == ["0.weight", "2.weight"]  # weight matrices; biases aside
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))  # ||W|| = 5
        model[2].weight.fill_(1.0)
    watch.snapshot(lr=0.1)
    with torch.no_grad():
        model[0].weight[0, 0] += 0.005  # ||dW|| = 0.005: ratio 1e-3
    assert watch.ratios() == pytest.approx({"0.weight": 1e-3, "2.weight": 0.0}, rel=1e-4)  # float32


def logged_step(watch: UpdateRatio, lr: float, delta: dict[str, float]) -> None:
    """One logged update at rate ``lr`` that moves each named layer by ``delta`` of its norm."""
    watch.snapshot(lr)
    with torch.no_grad():
        for name, p in watch.weights.items():
            p.mul_(1 + delta.get(name, 1e-3))


def test_a_layer_far_from_1e_3_after_warm_up_warns_once_per_direction_naming_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    watch = UpdateRatio(model)
    for lr in (0.01, 0.05, 0.1):  # warm-up: the rate rises; a fresh network's big updates are not judged
        logged_step(watch, lr, {"2.weight": 0.5})
        watch.ratios()
    assert watch.judge(1) is None
    for lr in (0.1, 0.09, 0.08):  # at the peak and after it: the head moves 20% a step
        logged_step(watch, lr, {"2.weight": 0.2})
        watch.ratios()
    assert watch.judge(2) == ("update/weight ratio of 2.weight is 2.0e-01 in epoch 2 (median over the logged steps "
                              "after warm-up), far from the lectures' ~1e-3: the learning rate is probably too high")
    logged_step(watch, 0.07, {"2.weight": 0.2})
    watch.ratios()
    assert watch.judge(3) is None  # said once
    for lr in (0.04, 0.001):  # annealed below half the peak: low ratios there are by design
        logged_step(watch, lr, {"0.weight": 1e-7, "2.weight": 1e-7})
        watch.ratios()
    assert watch.judge(4) is None
    constant = UpdateRatio(model)
    for _ in range(3):  # a constant rate: every logged step after the first is judged
        logged_step(constant, 0.1, {"0.weight": 2e-5, "2.weight": 1e-5})
        constant.ratios()
    assert constant.judge(1).startswith("update/weight ratio of 2.weight is 1.0e-05 in epoch 1 (median over the "
                                        "logged steps after warm-up; 1 more of 2 layers too)")


def test_a_healthy_rate_is_silent_and_30_times_it_warns_naming_the_layer(tmp_path):
    """The default schedule (one-cycle) on the same data: lr 0.1 trains without the warning, lr 3 (30x) gets it
    after warm-up, naming a layer (the divergence guard off so that both runs train their 3 epochs)."""
    said = {}
    for lr in ("0.1", "3.0"):
        console = quiet_console()
        train(compose_config(*tiny_plus("trainer.epochs=3", "trainer.log_every_n_steps=2", "dataset.train_size=640",
                                        f"optimizer.lr={lr}", "trainer.divergence_factor=null")),
              tmp_path / lr, console=console)
        said[lr] = " ".join(console.file.getvalue().split())  # the console wraps long lines
    assert "update/weight ratio" not in said["0.1"]
    assert said["3.0"].count("update/weight ratio") == 1
    assert "update/weight ratio of 1.weight is" in said["3.0"] and "in epoch 1" in said["3.0"]
    assert "probably too high" in said["3.0"]


def test_the_debug_preset_judges_nothing_five_steps_cannot_tell(tmp_path):
    """debug=fast on the models the default run and the CIFAR recipes use: no divergence stop and no warning from
    a one-cycle schedule squeezed into 5 steps (the whole zoo: docs/performance.md)."""
    for model in ("small_resnet", "resnet18"):
        console = quiet_console()
        summary = train(compose_config("debug=fast", f"model={model}", "dataset=synthetic", "dataset.size=16",
                                       "dataset.train_size=96", "dataset.test_size=16", "data.batch_size=16",
                                       "trainer.device=cpu"), tmp_path / model, console=console)
        assert summary["status"] == "completed" and summary["history"][-1]["step"] == 5
        assert "warning" not in console.file.getvalue()


@pytest.mark.parametrize("activation", ["prelu", "elu", "maxout"])
def test_dead_units_say_once_when_the_activation_kills_no_unit(tmp_path, activation):
    console = quiet_console()
    train(compose_config(*tiny_plus("trainer.epochs=1", f"model.activation={activation}")), tmp_path / "run",
          console=console)
    said = " ".join(console.file.getvalue().split())
    assert said.count("dead units: not counted: the model has no ReLU") == 1
    assert not [t for t in read_events(tmp_path / "run").Tags()["scalars"] if t.startswith("dead_units/")]


def test_the_default_whitening_whitens_the_real_fashion_mnist(tmp_path):
    """data.whiten_eps's default, judged on the real data: the training split's covariance after ZCA whitening has
    most eigenvalues near 1 (with 0.01, the median was 0.39 and 56 of 784 were above 0.9)."""
    from cnnlab.core.config import DataSettings
    from cnnlab.core.registry import DATASETS
    from cnnlab.data.datasets import SYSTEM_DIRS
    from cnnlab.data.statistics import Preprocessing, pixel_moments

    if not any(Path(d).is_dir() for d in SYSTEM_DIRS["fashion_mnist"]):
        if os.environ.get("CI") == "true":
            pytest.fail("Debian's dataset-fashion-mnist is not installed (scripts/setup.sh installs it)")
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    data = DATASETS.build("fashion_mnist", {"root": str(tmp_path), "download": False}, prefix="dataset")
    train_images = data.train_images[:54000]
    zca = Preprocessing.fit("zca_whiten", train_images, data.mean, data.std, DataSettings().whiten_eps)
    covariance = pixel_moments(train_images, covariance=True)[1]  # of the split it was fitted on, in [0, 1]
    matrix = zca.matrix.double()
    eigenvalues = torch.linalg.eigvalsh(matrix.T @ covariance.double() @ matrix)  # the whitened data's covariance
    assert eigenvalues.median() > 0.95 and (eigenvalues > 0.9).float().mean() > 0.85, eigenvalues.quantile(
        torch.tensor([0.1, 0.5], dtype=torch.float64))


def test_a_diverged_run_logs_the_selection_metrics_of_the_epochs_it_finished(tmp_path):
    summary = run_tiny(tmp_path / "run", "trainer.epochs=4", "scheduler=constant", "scheduler.warmup_epochs=4",
                       "optimizer.lr=5")
    assert summary["status"] == "diverged" and summary["best_epoch"] == 1  # diverged in epoch 2
    ea = read_events(tmp_path / "run")
    assert [e.value for e in ea.Scalars("best/val_acc")] == pytest.approx([summary["best_value"]])
    assert [e.value for e in ea.Scalars("selected/val_loss")] == pytest.approx([summary["history"][0]["val/loss"]])


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

    from tests.conftest import train
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


# --- data preprocessing and PCA colour augmentation ------------------------------------------------

from cnnlab.data.statistics import Preprocessing, color_pca  # noqa: E402


def correlated_images(n: int = 4000, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, 4, 4) images whose 48 values are strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 4, 4, generator=g)
    mix = torch.rand(n, 3, 4, 4, generator=g) * 0.3
    return ((0.6 * base + mix) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("kind", ["pca_whiten", "zca_whiten"])
def test_whitened_training_data_has_identity_covariance(kind):
    images = correlated_images()
    pre = Preprocessing.fit(kind, images, [0.5] * 3, [0.25] * 3, eps=1e-6)
    out = pre(images.float() / 255).flatten(1).double()
    assert out.mean(0).abs().max() < 1e-4  # centred on the training mean
    covariance = out.T @ out / len(out)
    assert torch.allclose(covariance, torch.eye(48, dtype=torch.float64), atol=2e-3)
    if kind == "zca_whiten":  # ZCA's matrix is symmetric: the whitened image closest to the input
        assert torch.allclose(pre.matrix, pre.matrix.T, atol=1e-5)
    else:  # PCA's columns are the components, largest variance last (eigh's order), scaled to unit variance
        assert not torch.allclose(pre.matrix, pre.matrix.T, atol=1e-3)


def test_pixel_preprocessing_subtracts_the_mean_image_and_channel_keeps_the_datasets_statistics():
    images = correlated_images()
    pre = Preprocessing.fit("pixel", images, [0.5] * 3, [0.25] * 3)
    assert pre.mean.shape == (3, 4, 4) and pre.matrix is None
    assert pre(images.float() / 255).mean(0).abs().max() < 1e-5  # every pixel centred over the training images
    channel = Preprocessing.fit("channel", images, [0.1, 0.2, 0.3], [0.5] * 3)
    assert channel(torch.full((1, 3, 1, 1), 0.6)).flatten().tolist() == pytest.approx([1.0, 0.8, 0.6])


def test_preprocessing_is_fitted_on_the_training_split_only_and_recorded_in_the_checkpoint(tmp_path, captured):
    from cnnlab.analysis.evaluation import evaluate_runs
    from cnnlab.runtime.checkpoint import load_checkpoint
    from tests.conftest import quiet_console

    run_tiny(tmp_path / "run", "data.preprocess=zca_whiten", "trainer.epochs=1")
    recorded = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["preprocess"]
    assert recorded["kind"] == "zca_whiten" and recorded["matrix"].shape == (64, 64)
    from cnnlab.core.registry import DATASETS

    data = DATASETS.build("synthetic", {"channels": 1, "size": 8, "classes": 4, "train_size": 160, "test_size": 40},
                          prefix="dataset")
    from cnnlab.data.split import stratified_split

    train_idx, _ = stratified_split(data.train_labels, 0.1, 0)
    refit = Preprocessing.fit("zca_whiten", data.train_images[train_idx], data.mean, data.std, 1e-4)  # the default data.whiten_eps
    assert torch.allclose(recorded["matrix"], refit.matrix) and torch.allclose(recorded["mean"], refit.mean)
    run_tiny(tmp_path / "eps", "data.preprocess=zca_whiten", "data.whiten_eps=0.5", "trainer.epochs=1")
    eps = load_checkpoint(tmp_path / "eps" / "checkpoints" / "best.pt")["preprocess"]["matrix"]
    assert torch.allclose(eps, Preprocessing.fit("zca_whiten", data.train_images[train_idx], data.mean, data.std, 0.5).matrix)
    everything = Preprocessing.fit("zca_whiten", data.train_images, data.mean, data.std, 1e-4)
    assert not torch.allclose(recorded["mean"], everything.mean)  # the validation images were left out
    report = evaluate_runs([str(tmp_path / "run")], splits=["test"], tta_flip=False, tta_shift=0, device="cpu",
                           data_dir=None, console=quiet_console())
    summary = __import__("json").loads((tmp_path / "run" / "summary.json").read_text())
    assert report["splits"]["test"]["acc"] == pytest.approx(summary["selected"]["test"]["acc"])  # evaluation repeats it


def test_whitening_a_folder_dataset_or_large_images_is_one_line():
    with pytest.raises(CnnlabError, match="data.preprocess=zca_whiten whitens images of at most 4096 values"):
        Preprocessing.fit("zca_whiten", torch.zeros(2, 3, 64, 64, dtype=torch.uint8), [0.5] * 3, [0.25] * 3)


def test_pca_colour_eigenvectors_and_the_lighting_op():
    from cnnlab.augment.batched import build_ops

    g = torch.Generator().manual_seed(0)
    gray = torch.rand(500, 1, 4, 4, generator=g).expand(500, 3, 4, 4)  # colours along (1, 1, 1) only
    values, vectors = color_pca((gray * 255).round().to(torch.uint8))
    assert values[:2].max() < 1e-6 and values[2] == pytest.approx(3 * (gray[:, 0].var(unbiased=False)).item(), rel=0.01)
    assert vectors[:, 2].abs().tolist() == pytest.approx([3 ** -0.5] * 3, abs=1e-4)  # the gray axis
    (op,) = build_ops({"pca_lighting": {"alphastd": 0.1}})
    op.fit_colours(values, vectors)
    x = torch.full((20000, 3, 2, 2), 0.5)
    shift = (op(x, torch.Generator().manual_seed(1)) - x)[:, :, 0, 0]
    assert torch.allclose(shift[:, 0], shift[:, 1], atol=1e-6) and torch.allclose(shift[:, 1], shift[:, 2], atol=1e-6)
    # a ~ N(0, 0.1^2) per image: the shift along p3 is a * lambda3, so each channel's std is 0.1 * lambda3 / sqrt(3)
    assert shift[:, 0].std().item() == pytest.approx(0.1 * values[2].item() / 3 ** 0.5, rel=0.03)
    assert op(x[:4], torch.Generator().manual_seed(2))[:, 0, 0, 0].unique().numel() == 4  # a draw per image


def test_the_lighting_pipeline_reaches_a_run(tmp_path, captured):
    from cnnlab.core.registry import DATASETS
    from cnnlab.data.split import stratified_split

    run_tiny(tmp_path / "run", "augment=lighting", "dataset.channels=3", "trainer.epochs=1")
    train_pipe = captured["loaders"][0].transform
    (lighting,) = [op for op in train_pipe.ops if hasattr(op, "fit_colours")]
    data = DATASETS.build("synthetic", {"channels": 3, "size": 8, "classes": 4, "train_size": 160, "test_size": 40},
                          prefix="dataset")
    train_idx, _ = stratified_split(data.train_labels, 0.1, 0)
    values, _ = color_pca(data.train_images[train_idx])  # the training split's, not all 160 images'
    x = torch.full((3, 3, 1, 1), 0.5)
    g = torch.Generator().manual_seed(0)
    alpha = torch.randn(3, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    shifted = lighting(x, g) - x
    _, vectors = color_pca(data.train_images[train_idx])
    assert torch.allclose(shifted[:, :, 0, 0], (alpha * values) @ vectors.T, atol=1e-6)


# --- fractional max-pooling ------------------------------------------------------------------------

from cnnlab.models.blocks import FractionalMaxPool  # noqa: E402


@pytest.mark.parametrize("name", ["lenet5", "small_resnet", "vgg11_bn"])
def test_fractional_pool_replaces_every_2x2_max_pool(name):
    plain, fractional = build_model(name), build_model(name, fractional_pool=True)
    pools = [m for m in plain.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools and len([m for m in fractional.modules() if isinstance(m, FractionalMaxPool)]) == len(pools)
    assert not any(isinstance(m, nn.MaxPool2d) for m in fractional.modules())
    assert fractional.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_fractional_pooling_shrinks_by_one_over_root_two_randomly_in_training_only():
    pool = FractionalMaxPool()
    x = torch.randn(2, 3, 32, 32)
    assert pool(x).shape == (2, 3, 22, 22)  # floor(32 / sqrt(2)): Graham's alpha = sqrt(2), not 2
    assert not torch.equal(pool(x), pool(x))  # random pooling regions while training
    pool.eval()
    assert torch.equal(pool(x), pool(x))  # fixed regions when evaluating
    # each output is the max of one of the input's regions
    assert set(pool(x).flatten().tolist()) <= set(x.flatten().tolist())


def test_fractional_pool_reaches_a_run(tmp_path, captured):
    run_tiny(tmp_path / "run", "model=lenet5", "model.fractional_pool=true", "trainer.epochs=1")
    assert sum(isinstance(m, FractionalMaxPool) for m in captured["trainer"].model.modules()) == 2  # S2, S4


# --- any timm model --------------------------------------------------------------------------------

TIMM_ARCHS = ["resnet18", "convnext_atto", "efficientnet_b0", "vit_tiny_patch16_224"]


@pytest.mark.parametrize("arch", TIMM_ARCHS)
def test_a_timm_architecture_takes_the_datasets_shape_and_trains_a_step(arch):
    torch.manual_seed(0)
    model = build_model("timm", arch=arch)  # 3x32x32, 10 classes
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert model(x).shape == (4, 10) and math.isfinite(loss.item())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the step changed weights


def test_timm_options_reach_the_model_and_its_stages():
    import timm

    from cnnlab.training.finetune import stages

    model = build_model("timm", arch="convnext_atto", drop_rate=0.3, drop_path_rate=0.2)
    assert isinstance(model, timm.models.ConvNeXt) and model.drop_rate == 0.3
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)  # timm's own linear rule up to drop_path_rate
    assert model.stem[0].in_channels == 3 and model.get_classifier().out_features == 10
    assert [s.name for s in stages(model)] == ["stem", "stages.0.blocks", "stages.1", "stages.2", "stages.3", "head"]
    grey = MODELS.build("timm", {"arch": "resnet18"}, prefix="model", in_channels=1, num_classes=7, input_size=28)
    assert grey.conv1.in_channels == 1 and grey.fc.out_features == 7
    assert [s.name for s in stages(grey)] == ["conv1+bn1", "layer1", "layer2", "layer3", "layer4", "fc"]


def test_an_unknown_timm_arch_or_no_timm_is_one_line(monkeypatch):
    with pytest.raises(CnnlabError, match=r"unknown timm architecture 'convnxt_atto' \(did you mean: convnext_atto"):
        build_model("timm", arch="convnxt_atto")
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # as if not installed
    with pytest.raises(CnnlabError, match=r"model=timm needs timm: pip install 'cnnlab\[timm\]'"):
        build_model("timm")


def test_a_timm_model_fine_tunes_from_a_local_file_and_lists_its_flops(tmp_path, captured):
    from cnnlab.cli.listing import list_command
    from cnnlab.cli.table import BY_NAME
    from tests.conftest import quiet_console

    source = MODELS.build("timm", {"arch": "resnet18"}, prefix="model", in_channels=1, num_classes=4, input_size=8)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    run_tiny(tmp_path / "run", "model=timm", "model.arch=resnet18", f"model.pretrained={tmp_path / 'weights.pt'}",
             "finetune.mode=linear_probe", "trainer.epochs=1")
    model = captured["trainer"].model
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)  # frozen, as loaded
    assert not model.layer1[0].conv1.weight.requires_grad and model.fc.weight.requires_grad
    console = quiet_console()
    assert list_command(BY_NAME["list"].parser().parse_args(["models", "timm", "--arch", "convnext_atto", "--input", "3x32x32", "--classes", "10"]),
                        console=console) == 0
    assert "3.38M" in console.file.getvalue()  # ConvNeXt-atto's parameters with a 10-class head


# --- the image-classification lecture's baselines --------------------------------------------------

from cnnlab.models.baselines import NearestNeighbours  # noqa: E402


def pairs(*rows):
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 1, 2)  # 2-pixel "images"


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_knn_follows_the_lectures_distances(distance):
    knn = MODELS.build("knn", {"k": 1, "distance": distance}, prefix="model", in_channels=1, num_classes=2,
                       input_size=1)
    knn.memorise(pairs([0.0, 0.0], [1.0, 2.0]), torch.tensor([0, 1]))
    # (2.2, 0.3): L1 distances 2.5 and 1.2 + 1.7 = 2.9 -> label 0; L2 2.220 and sqrt(1.44 + 2.89) = 2.081 -> label 1
    assert knn(pairs([2.2, 0.3])).argmax(1).item() == (0 if distance == "l1" else 1)
    assert knn(pairs([1.5, 0.9])).argmax(1).item() == 1  # nearer the second in both


def test_knn_majority_vote_and_its_scores():
    knn = MODELS.build("knn", {"k": 3, "distance": "l2"}, prefix="model", in_channels=1, num_classes=3, input_size=1)
    knn.memorise(pairs([0, 0], [0, 1], [5, 5], [9, 9]), torch.tensor([2, 1, 1, 0]))
    scores = knn(pairs([0, 0]))  # nearest three: labels 2, 1, 1 -> class 1 by 2 votes to 1
    assert scores.argmax(1).item() == 1
    assert scores.softmax(1)[0].tolist() == pytest.approx([0.0, 2 / 3, 1 / 3], abs=1e-3)  # the vote shares
    knn = MODELS.build("knn", {"k": 2, "distance": "l2"}, prefix="model", in_channels=1, num_classes=3, input_size=1)
    knn.memorise(pairs([0, 0], [0, 1]), torch.tensor([2, 1]))
    assert knn(pairs([0, 0.4])).argmax(1).item() == 2  # a 1-1 tie goes to the nearest


def test_a_knn_sweep_over_k_and_the_linear_classifier_run_through_cnnlab_train(tmp_path, captured):
    from tests.conftest import TINY, run_cli

    console = quiet_console()
    summary = train(compose_config(*tiny_plus("model=knn", "model.k=3")), tmp_path / "knn", console=console)
    knn = captured["trainer"].model
    assert isinstance(knn, NearestNeighbours) and knn.k == 3 and knn.p == 1.0
    assert len(knn.labels) == summary["sizes"]["train"] == 144  # every training image, once (no drop_last)
    assert summary["history"][0]["train/loss"] is None and summary["selected"]["test"]["acc"] > 0.5
    assert "train" not in summary["selected"]  # its own images at distance 0: not scored
    said = " ".join(console.file.getvalue().split())
    assert "learns: by remembering the 144 training images in one pass (k=3, L1 distance)" in said
    assert "optimizer:" not in said and "scheduler:" not in said
    assert "scoring val: 1/1 batches" in said and "scoring test: 2/2 batches" in said, said  # progress while it compares
    from cnnlab.runtime.checkpoint import load_checkpoint

    memory = load_checkpoint(tmp_path / "knn" / "checkpoints" / "best.pt")["model"]
    assert memory["labels"].shape == (144,) and memory["images"].dtype == torch.uint8  # raw pixels, a quarter the size
    assert memory["images"].shape == (144, 1, 8, 8)
    from cnnlab.analysis.evaluation import evaluate_runs

    again = evaluate_runs([str(tmp_path / "knn")], splits=["test"], tta_flip=False, tta_shift=0, device="cpu",
                          data_dir=None, console=quiet_console())  # a fresh k-NN takes the checkpoint's memory
    assert again["splits"]["test"]["acc"] == pytest.approx(summary["selected"]["test"]["acc"])
    summary = run_tiny(tmp_path / "linear", "model=linear", "trainer.loss=multi_margin")
    model = captured["trainer"].model
    assert [type(m) for m in model] == [nn.Flatten, nn.Linear] and model[1].weight.shape == (4, 64)
    result = run_cli("train", "-m", *[o for o in TINY if not o.startswith("model")], "model=knn", "model.k=1,3",
                     "hydra.sweeper.sampler=grid", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("sweep: 2 trials (2 completed)")
    report = run_cli("report", str(next((tmp_path / "outputs" / "sweeps").glob("*/*"))), cwd=tmp_path)
    assert report.returncode == 0 and "model.k" in report.stdout


# --- cross-validation ------------------------------------------------------------------------------

def test_stratified_folds_validate_every_image_once_in_class_proportion():
    from cnnlab.data.split import stratified_folds

    labels = torch.tensor([0] * 30 + [1] * 12 + [2] * 7)
    folds = stratified_folds(labels, 3, seed=0)
    vals = torch.cat([v for _, v in folds])
    assert sorted(vals.tolist()) == list(range(len(labels)))  # each image validates exactly once
    for train_idx, val_idx in folds:
        assert set(train_idx.tolist()).isdisjoint(val_idx.tolist()) and len(train_idx) + len(val_idx) == len(labels)
        assert torch.bincount(labels[val_idx], minlength=3).tolist()[:2] == [10, 4]  # 30/3 and 12/3
    assert sorted(len(v) for _, v in folds) == [16, 16, 17]
    with pytest.raises(CnnlabError, match="data.folds=5 leaves a fold without images"):
        stratified_folds(torch.tensor([0, 1, 0]), 5, seed=0)


def test_cross_validation_reports_the_folds_mean_and_tests_the_best_fold_once(tmp_path, monkeypatch):
    import json
    import statistics

    from cnnlab.analysis.evaluation import evaluate_runs
    from cnnlab.core.registry import DATASETS
    from tests.conftest import quiet_console

    original, built = DATASETS._entries["synthetic"], []

    def counted(**options):
        built.append(options)
        return original.fn(**options)

    monkeypatch.setitem(DATASETS._entries, "synthetic", dataclasses.replace(original, fn=counted))
    summary = run_tiny(tmp_path / "cv", "data.folds=3", "trainer.epochs=2")
    assert len(built) == 2  # the three folds share one dataset; the test split's one score reads it once more
    folds = [json.loads((tmp_path / "cv" / f"fold{i}" / "summary.json").read_text()) for i in range(3)]
    values = [f["best_value"] for f in folds]
    assert summary["cv"] == {"k": 3, "mean": pytest.approx(statistics.fmean(values)),
                             "std": pytest.approx(statistics.stdev(values)), "values": values}
    assert summary["best_value"] == pytest.approx(statistics.fmean(values))  # what a sweep selects on
    assert [f["sizes"]["val"] for f in folds] == [54, 53, 53] and sum(f["sizes"]["val"] for f in folds) == 160
    assert all("test" not in f["selected"] for f in folds)  # the folds never see the test split
    chosen = summary["chosen_fold"]
    assert values[chosen] == max(values)
    again = evaluate_runs([str(tmp_path / "cv" / f"fold{chosen}")], splits=["test"], tta_flip=False, tta_shift=0,
                          device="cpu", data_dir=None, console=quiet_console())
    assert summary["selected"]["test"]["acc"] == pytest.approx(again["splits"]["test"]["acc"])


def test_a_sweep_selects_on_the_cross_validated_mean(tmp_path):
    import json

    from tests.conftest import run_cli
    from tests.test_search import SWEEP

    result = run_cli("train", "-m", *SWEEP, "data.folds=2", "trainer.epochs=1", "optimizer.lr=0.05,0.2",
                     "hydra.sweeper.sampler=grid", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = (tmp_path / "outputs" / "sweeps").glob("*/*")
    import optuna

    study = optuna.load_study(study_name="synthetic-mlp", storage=f"sqlite:///{sweep / 'optuna.db'}")
    for trial in study.trials:
        summary = json.loads((sweep / str(trial.user_attrs["job"]) / "summary.json").read_text())
        assert trial.value == pytest.approx(summary["cv"]["mean"]) and len(summary["folds"]) == 2
        assert "test" not in summary["selected"]  # a trial leaves the test split alone
