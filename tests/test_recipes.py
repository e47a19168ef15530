"""Every recipe in conf/experiment composes and trains one step on synthetic data."""

import pytest

from cnnlab.core.config import CONF_DIR, parse_run_config
from tests.conftest import train
from tests.conftest import compose_config, quiet_console

# recipe -> (model it trains, augment pipeline, optimizer)
RECIPES = {
    "hw4_mlp": ("mlp", "none", "sgd"),
    "hw4_improved": ("mlp", "crop_flip", "adamw"),
    "lenet5": ("lenet5", "none", "sgd"),
    "alexnet_cifar": ("alexnet", "standard_cifar", "sgd"),
    "vgg13_bn_cifar": ("vgg13_bn", "standard_cifar", "sgd"),
    "nin_cifar": ("nin", "standard_cifar", "sgd"),
    "googlenet_cifar": ("googlenet", "standard_cifar", "sgd"),
    "resnet18_cifar": ("resnet18", "standard_cifar", "sgd"),
    "preact_resnet18": ("resnet18", "standard_cifar", "sgd"),
    "wrn28_10_erasing": ("wrn28_10", "erasing", "sgd"),
    "fmnist_fast": ("small_resnet", "crop_flip", "sgd"),
    "fmnist_best": ("resnet18", "erasing", "sgd"),
}
ONE_STEP = ["dataset=synthetic", "dataset.size=16", "dataset.train_size=200", "dataset.test_size=8",
            "trainer.device=cpu", "trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_eval_batches=1",
            "trainer.eval_train_at_end=false", "data.batch_size=4", "data.eval_batch_size=4"]


def test_every_recipe_of_the_lectures_is_shipped():
    assert sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_composes_and_trains_one_step(recipe, tmp_path):
    cfg = compose_config(f"experiment={recipe}", *ONE_STEP)
    run = parse_run_config(cfg)
    model, augment, optimizer = RECIPES[recipe]
    assert (run.name, run.components["model"].name, run.augment_name, run.components["optimizer"].name) == (
        recipe, model, augment, optimizer)
    summary = train(cfg, tmp_path / "run", console=quiet_console())
    assert summary["status"] == "completed" and summary["history"][-1]["step"] == 1
    assert summary["model"] == model and 0 <= summary["selected"]["test"]["acc"] <= 1


def test_recipes_set_what_their_papers_say():
    preact = parse_run_config(compose_config("experiment=preact_resnet18")).components["model"].options
    assert preact["variant"] == "v2" and preact["stem"] == "small"
    wrn = parse_run_config(compose_config("experiment=wrn28_10_erasing"))
    assert wrn.components["model"].options["dropout"] == 0.3 and "random_erasing" in wrn.augment_ops
    assert wrn.components["scheduler"].options["milestones"] == [60, 120, 160] and wrn.trainer.epochs == 200
    fast = parse_run_config(compose_config("experiment=fmnist_fast"))
    assert fast.trainer.ema_decay == 0.99 and fast.trainer.tta_flip and fast.data.batch_size == 512
    # calm first steps (docs/gpu_acceptance.md)
    assert fast.trainer.grad_clip == 1.0 and fast.trainer.grad_clip_mode == "norm"
    best = parse_run_config(compose_config("experiment=fmnist_best"))
    assert best.components["dataset"].name == "fashion_mnist" and best.components["model"].options["stem"] == "small"
    assert "random_erasing" in best.augment_ops and best.augment_ops["random_crop"]["padding"] == 2
    assert (best.trainer.epochs, best.data.batch_size, best.trainer.ema_decay, best.trainer.tta_flip) == (40, 512, 0.995, True)
    assert best.trainer.grad_clip == 1.0
