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
