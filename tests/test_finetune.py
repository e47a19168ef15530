"""Transfer learning: model.pretrained, finetune.mode, and the backbone/head learning rates."""

import pytest
import torch
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.training.finetune import freeze, load_pretrained, stages
from cnnlab.core.registry import MODELS
from cnnlab.runtime.checkpoint import load_checkpoint
from tests.conftest import setup
from tests.conftest import compose_config, run_tiny, tiny_plus

CNN = ("model=small_resnet", "model.widths=[4,8]", "model.blocks=[0,1]")  # stages: features.0, .2, .4, head.2


def build(name, **options):
    return MODELS.build(name, options, prefix="model", in_channels=1, num_classes=10, input_size=28)


def test_stages_read_like_the_architecture():
    assert [s.name for s in stages(build("lenet5"))] == [
        "features.0", "features.3", "classifier.1", "classifier.4", "classifier.7"]  # C1, C3, C5, F6, output
    resnet = stages(build("resnet18", variant="v2"))
    assert [s.name for s in resnet] == ["stem.0", "stages.0", "stages.1", "stages.2", "stages.3", "fc"]
    assert isinstance(resnet[4].modules[-1], nn.BatchNorm2d)  # v2's final BN belongs to the last stage
    assert [s.name for s in stages(build("vgg11_bn"))][-4:] == [
        "features.11", "classifier.2", "classifier.5", "classifier.8"]  # 8 conv-BN-ReLU layers, 3 FC
    assert [s.name for s in stages(build("googlenet"))][:3] == ["stem.0", "inception.3a", "inception.3b"]
    assert [s.name for s in stages(build("tv", arch="resnet18"))] == [
        "conv1", "layer1", "layer2", "layer3", "layer4", "fc"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    run_tiny(run_dir, *CNN, "trainer.epochs=1")
    path = run_dir / "checkpoints" / "best.pt"
    return path, load_checkpoint(path)["model"]


def finetuned(run_dir, pretrained_path, *overrides):
    run_tiny(run_dir, *CNN, f"model.pretrained={pretrained_path}", "trainer.epochs=2", "optimizer.lr=0.2", *overrides)
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_linear_probe_leaves_every_backbone_weight_unchanged(tmp_path, pretrained):
    path, start = pretrained
    after = finetuned(tmp_path / "probe", path, "finetune.mode=linear_probe")
    assert changed(start, after) == {"head.2.weight", "head.2.bias"}  # batch-norm statistics included


def test_last_k_trains_the_last_stages_and_the_head(tmp_path, pretrained):
    path, start = pretrained
    after = finetuned(tmp_path / "last1", path, "finetune.mode=last_k", "finetune.k=1")
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in changed(start, after)} == {"features.4", "head.2"}
    after = finetuned(tmp_path / "last2", path, "finetune.mode=last_k", "finetune.k=2")
    assert {".".join(k.split(".")[:2]) for k in changed(start, after)} == {"features.2", "features.4", "head.2"}


def test_full_finetuning_starts_from_the_pretrained_weights(tmp_path, pretrained):
    path, start = pretrained
    s = setup(compose_config(*tiny_plus(*CNN, f"model.pretrained={path}")))
    now = s.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in start.items())
    assert all(p.requires_grad for p in s.model.parameters())
    assert s.transfer == f"weights from {path}"


def test_frozen_stages_stay_in_eval_mode_and_report_what_trains(pretrained):
    s = setup(compose_config(*tiny_plus(*CNN, "finetune.mode=last_k", "finetune.k=1")))
    s.model.train()
    bns = [m for m in s.model.features[:4].modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert s.model.features[4].training and s.model.head.training
    trainable = sum(p.numel() for p in s.model.parameters() if p.requires_grad)
    assert s.transfer.startswith("last_k trains features.4, head.2 (") and f"{trainable:,} of" in s.transfer


def test_head_and_backbone_learning_rates_reach_the_optimizer():
    s = setup(compose_config(*tiny_plus(*CNN, "finetune.head_lr=0.5", "finetune.backbone_lr=0.01",
                                        "optimizer=sgd", "optimizer.no_decay_norm_bias=true")))
    head = {id(p) for p in s.model.head.parameters()}
    groups = [(g["lr"], g["weight_decay"], all(id(p) in head for p in g["params"])) for g in s.optimizer.param_groups]
    assert sorted(groups) == sorted([(0.01, 5e-4, False), (0.5, 5e-4, True), (0.01, 0.0, False), (0.5, 0.0, True)])
    assert sum(len(g["params"]) for g in s.optimizer.param_groups) == len(list(s.model.parameters()))
    only_head = setup(compose_config(*tiny_plus(*CNN, "finetune.head_lr=0.5", "optimizer.lr=0.03")))
    assert sorted(g["lr"] for g in only_head.optimizer.param_groups) == [0.03, 0.5]


def test_torchvision_weights_fit_grey_inputs_and_a_new_head(tmp_path):
    source = MODELS.build("tv", {"arch": "resnet18"}, prefix="model", in_channels=3, num_classes=1000, input_size=32)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    target = build("tv", arch="resnet18")
    kept = load_pretrained(target, str(tmp_path / "resnet18.pth"))
    assert kept == ["fc.weight", "fc.bias"]
    assert torch.allclose(target.conv1.weight, source.conv1.weight.sum(1, keepdim=True))  # R = G = B for grey
    assert torch.equal(target.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert target.fc.out_features == 10


def test_bad_pretrained_and_finetune_settings_are_one_line(tmp_path, pretrained):
    path, _ = pretrained
    with pytest.raises(CnnlabError, match="does not exist .weights are never downloaded"):
        load_pretrained(build("lenet5"), str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CnnlabError, match="junk.pt is unreadable or corrupt"):
        load_pretrained(build("lenet5"), str(tmp_path / "junk.pt"))
    with pytest.raises(CnnlabError, match=r"does not fit the configured model: features.2.body.0.weight \(missing\)"):
        setup(compose_config(*tiny_plus("model=small_resnet", "model.widths=[4,8]", "model.blocks=[1,1]",
                                        f"model.pretrained={path}")))
    with pytest.raises(CnnlabError, match=r"features.0.0.weight \(\(4, 1, 3, 3\) there, \(6, 1, 3, 3\) here\)"):
        setup(compose_config(*tiny_plus("model=small_resnet", "model.widths=[6,8]", f"model.pretrained={path}")))
    with pytest.raises(CnnlabError, match="finetune.k=4, but the model has 3 stages before its head"):
        setup(compose_config(*tiny_plus(*CNN, "finetune.mode=last_k", "finetune.k=4")))
    with pytest.raises(CnnlabError, match="optimizer=lbfgs has one learning rate"):
        setup(compose_config(*tiny_plus(*CNN, "optimizer=lbfgs", "finetune.head_lr=0.1")))
    with pytest.raises(CnnlabError, match="finetune.mode must be one of full, last_k, linear_probe, got 'probe'"):
        setup(compose_config(*tiny_plus(*CNN, "finetune.mode=probe")))
    with pytest.raises(CnnlabError, match="model.pretrained must be a string"):
        setup(compose_config(*tiny_plus(*CNN, "model.pretrained=3")))


def test_freeze_full_freezes_nothing():
    model = build("lenet5")
    assert len(freeze(model, "full", 1)) == 5 and all(p.requires_grad for p in model.parameters())
