"""Batched augmentation: per-sample randomness, seeds, label alignment, torchvision v2 equivalence, mixing."""


import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from cnnlab.augment.batched import BatchPipeline, adjust, affine_matrices, build_ops
from cnnlab.core.config import CONF_DIR
from cnnlab.core.registry import AUGMENTS

# Ops with a batched version (the policies AutoAugment etc. exist only per image: test_per_image.py).
BATCHED = [n for n in AUGMENTS.names() if not AUGMENTS.get(n).meta.get("per_image_only")]
IMAGE_OPS = [n for n in BATCHED if n not in ("mixup", "cutmix")]
ALWAYS = {"hflip": {"p": 1.0}, "vflip": {"p": 1.0}, "random_crop": {"padding": 3}, "random_affine": {},
          "random_resized_crop": {"scale_min": 0.2, "scale_max": 0.6},
          "color_jitter": {}, "pca_lighting": {"alphastd": 0.1}, "cutout": {"size": 4}, "random_erasing": {"p": 1.0}, "mixup": {}, "cutmix": {}}


def pipeline(ops: dict, seed=0, num_classes=10):
    return BatchPipeline(build_ops(ops), [0.0, 0.0, 0.0], [1 / 255] * 3, torch.device("cpu"), seed, num_classes=num_classes)


def test_every_op_has_a_test_configuration():
    assert set(ALWAYS) == set(BATCHED)


@pytest.mark.parametrize("name", BATCHED)
def test_shape_dtype_and_reproducibility(name):
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    y = torch.arange(16) % 10
    out_a, ya = pipeline({name: ALWAYS[name]}, seed=3).apply(x, y)
    out_b, yb = pipeline({name: ALWAYS[name]}, seed=3).apply(x, y)
    out_c, _ = pipeline({name: ALWAYS[name]}, seed=4).apply(x, y)
    assert out_a.shape == x.shape and out_a.dtype == torch.float32
    assert torch.equal(out_a, out_b) and torch.equal(ya, yb)  # a fixed seed reproduces the batch
    if name not in ("hflip", "vflip"):  # flips with p=1 are deterministic
        assert not torch.equal(out_a, out_c)


@pytest.mark.parametrize("name", [n for n in IMAGE_OPS if n not in ("hflip", "vflip")])
def test_randomness_is_per_sample(name):
    x = torch.randint(0, 256, (1, 3, 12, 12), dtype=torch.uint8).repeat(8, 1, 1, 1)  # 8 identical images
    out, _ = pipeline({name: ALWAYS[name]}).apply(x, torch.zeros(8, dtype=torch.long))
    assert len({tuple(o.flatten().tolist()) for o in out}) > 1


def test_flip_probability_is_per_sample():
    x = torch.randint(0, 256, (1, 3, 6, 6), dtype=torch.uint8).repeat(400, 1, 1, 1)
    out, _ = pipeline({"vflip": {"p": 0.5}}).apply(x, torch.zeros(400, dtype=torch.long))
    flipped = sum(torch.allclose(o, x[0].flip(1).float(), atol=1e-3) for o in out)
    assert 150 < flipped < 250


@pytest.mark.parametrize("name", ["hflip", "vflip", "random_crop", "random_affine", "cutout", "random_erasing"])
def test_labels_stay_with_their_images(name):
    # image i is constant at value i; geometric and erasing ops only move it or fill with 0
    values = torch.arange(1, 17, dtype=torch.uint8) * 10
    x = values.view(16, 1, 1, 1).expand(16, 3, 10, 10).contiguous()
    y = torch.arange(16)
    out, out_y = pipeline({name: ALWAYS[name]}).apply(x, y)
    assert torch.equal(out_y, y)
    for i in range(16):
        assert out[i].max().item() == pytest.approx(values[i].item(), abs=1e-3)


# --- equal to torchvision.transforms.v2 for fixed parameters -----------------------------------------

def test_flips_equal_torchvision():
    x = torch.rand(4, 3, 7, 9)
    g = torch.Generator()
    assert torch.equal(build_ops({"hflip": {"p": 1.0}})[0](x, g), TF.horizontal_flip(x))
    assert torch.equal(build_ops({"vflip": {"p": 1.0}})[0](x, g), TF.vertical_flip(x))


@pytest.mark.parametrize("fill", ["zero", "reflect"])
def test_random_crop_equals_torchvision_pad_and_crop_at_the_drawn_offsets(fill):
    x = torch.rand(5, 3, 8, 8)
    g = torch.Generator().manual_seed(7)
    replay = torch.Generator().manual_seed(7)
    out = build_ops({"random_crop": {"padding": 2, "fill": fill}})[0](x, g)
    dy = torch.randint(0, 5, (5,), generator=replay)
    dx = torch.randint(0, 5, (5,), generator=replay)
    padded = TF.pad(x, [2], padding_mode="constant" if fill == "zero" else "reflect")
    for i in range(5):
        assert torch.equal(out[i], TF.crop(padded[i], int(dy[i]), int(dx[i]), 8, 8))


@pytest.mark.parametrize(("angle", "translate", "scale", "shear"),
                         [(30.0, (0, 0), 1.0, 0.0), (-12.0, (3, -2), 0.8, 0.0), (25.0, (2, 1), 1.1, 10.0)])
def test_affine_equals_torchvision(angle, translate, scale, shear):
    x = torch.rand(1, 3, 16, 20)
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    theta = affine_matrices(t(angle), t(translate[0]), t(translate[1]), t(scale), t(shear), 16, 20)
    ours = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    ref = TF.affine(x, angle=angle, translate=list(translate), scale=scale, shear=[shear, 0.0],
                    interpolation=InterpolationMode.BILINEAR)
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_color_adjustments_equal_torchvision(channels):
    x = torch.rand(3, channels, 6, 6)
    b, c, s = torch.tensor([0.7, 1.0, 1.3]), torch.tensor([1.2, 0.6, 1.0]), torch.tensor([0.5, 1.4, 1.0])
    ours = adjust(x, b, c, s)
    for i in range(3):
        ref = TF.adjust_brightness(x[i], float(b[i]))
        ref = TF.adjust_contrast(ref, float(c[i]))
        if channels == 3:
            ref = TF.adjust_saturation(ref, float(s[i]))
        assert torch.allclose(ours[i], ref, atol=1e-5)


def test_erasing_equals_torchvision_erase_for_the_same_box():
    from cnnlab.augment.batched import _boxes_mask

    x = torch.rand(1, 3, 10, 10)
    mask = _boxes_mask(x, torch.tensor([2]), torch.tensor([3]), torch.tensor([4]), torch.tensor([5]))
    ours = torch.where(mask, torch.zeros_like(x), x)
    assert torch.equal(ours[0], TF.erase(x[0], 2, 3, 4, 5, torch.zeros(1)))


def test_cutout_and_erasing_sizes():
    x = torch.ones(200, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    cut = build_ops({"cutout": {"size": 6}})[0](x, g)
    zeros = (cut == 0).flatten(1).sum(1)
    assert zeros.max() == 36 and zeros.min() >= 9  # a 6x6 square, clipped at the edges down to 3x3
    erased = build_ops({"random_erasing": {"p": 1.0, "scale_min": 0.1, "scale_max": 0.2}})[0](x, g)
    frac = (erased == 0).flatten(1).float().mean(1)
    assert 0.05 < frac.min() and frac.max() < 0.3


# --- mixup and cutmix ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_soft_targets_sum_to_one(name):
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    _, y = pipeline({name: {}}).apply(x, torch.arange(32) % 10)
    assert y.shape == (32, 10) and torch.allclose(y.sum(1), torch.ones(32)) and (y >= 0).all()


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_weight_follows_beta(alpha):
    n = 4000
    x = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    labels = torch.arange(n)  # one class per image: the soft target shows lam directly
    _, y = BatchPipeline(build_ops({"mixup": {"alpha": alpha}}), [0.0], [1.0], torch.device("cpu"), 0,
                         num_classes=n).apply(x, labels)
    own = y[torch.arange(n), labels]
    lam = own[own < 1]  # images paired with themselves keep weight 1
    assert lam.mean().item() == pytest.approx(0.5, abs=0.02)
    assert lam.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)  # Var of Beta(a, a)


def test_mixup_mixes_images_with_the_same_weight_as_targets():
    x = torch.tensor([0, 200], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous()
    out, y = BatchPipeline(build_ops({"mixup": {"alpha": 1.0}}), [0.0], [1 / 255], torch.device("cpu"), 1,
                           num_classes=2).apply(x, torch.tensor([0, 1]))
    for i in range(2):  # pixel value = 200 x (weight of class 1)
        assert out[i].mean().item() == pytest.approx(200 * y[i, 1].item(), abs=1e-3)


def test_cutmix_target_weight_is_the_pasted_area():
    n = 64
    values = torch.arange(n, dtype=torch.uint8) + 1
    x = values.view(n, 1, 1, 1).expand(n, 1, 16, 16).contiguous()
    out, y = BatchPipeline(build_ops({"cutmix": {"alpha": 1.0}}), [0.0], [1 / 255], torch.device("cpu"), 0,
                           num_classes=n).apply(x, torch.arange(n))
    for i in range(n):
        own = torch.isclose(out[i], values[i].float(), atol=1e-3).float().mean().item()
        assert y[i, i].item() == pytest.approx(own, abs=1e-6) or own == 1.0


def test_mixing_probability():
    x = torch.zeros(1000, 1, 2, 2, dtype=torch.uint8)
    _, y = BatchPipeline(build_ops({"mixup": {"p": 0.3}}), [0.0], [1.0], torch.device("cpu"), 0,
                         num_classes=1000).apply(x, torch.arange(1000))
    untouched = (y[torch.arange(1000), torch.arange(1000)] == 1).float().mean().item()
    assert 0.62 < untouched < 0.78  # 70% untouched, plus the few paired with themselves


# --- pipelines -------------------------------------------------------------------------------------

def test_named_pipelines_build_in_order():
    import yaml

    names = sorted(p.stem for p in (CONF_DIR / "augment").glob("*.yaml"))
    assert {"none", "flip", "crop_flip", "standard_cifar", "cutout", "mixup", "cutmix", "affine"} <= set(names)
    for name in names:
        spec = yaml.safe_load((CONF_DIR / "augment" / f"{name}.yaml").read_text())
        ops = build_ops(spec["ops"] or {})
        assert len(ops) == len(spec["ops"] or {})


def test_mixup_pipeline_trains_on_soft_targets(tmp_path):
    from tests.conftest import run_tiny

    summary = run_tiny(tmp_path / "run", "augment=mixup", "trainer.epochs=3", "dataset.channels=3")
    assert summary["status"] == "completed" and 0 <= summary["history"][-1]["train/acc"] <= 1
    assert summary["selected"]["test"]["acc"] > 0.5
