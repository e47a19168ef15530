"""Seeing inside: what training writes for viz (TensorBoard and the record) and `cnnlab viz`'s PNGs."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnnlab.core.registry import MODELS
from cnnlab.runtime.checkpoint import load_checkpoint
from cnnlab.analysis.viz import Record, first_layer_filters, log_spaced
from tests.conftest import compose_config, run_tiny, tiny_plus

CNN = ("model=small_resnet", "model.widths=[4,8]", "augment=crop_flip", "optimizer.lr=0.001")  # weak: it errs
VIZ_OFF = ("viz.every_n_epochs=0", "viz.augment_samples=0", "viz.misclassified=0")


def images(run_dir):
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    ea.Reload()
    return {tag: [e.step for e in ea.Images(tag)] for tag in ea.Tags()["images"]}


@pytest.fixture(scope="module")
def viz_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("viz") / "run"
    run_tiny(run_dir, *CNN, "trainer.epochs=4", "viz.misclassified=5", "viz.augment_samples=12")
    return run_dir, Record.load(run_dir / "viz")


def test_training_logs_filters_feature_maps_and_augmented_samples(viz_run):
    run_dir, record = viz_run
    tags = images(run_dir)
    steps = [0, 9, 18, 27, 36]  # at initialisation and after each of 4 epochs of 9 batches
    assert tags["viz/first_layer_filters"] == steps
    assert tags["viz/features/00_features.0"] == steps and tags["viz/features/02_features.4"] == steps
    assert tags["viz/augmented_samples"] == [0]
    assert sorted(record.filters) == [0, 1, 2, 4]  # log-spaced snapshots
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    assert torch.equal(record.filters[4], last["features.0.0.weight"].half())
    assert record.features_epoch == 4 and [m.shape[1:] for m in record.features.values()] == [(8, 8), (4, 4), (2, 2)]
    assert record.augmented.shape == (12, 1, 8, 8) and record.augmented.dtype == torch.uint8
    assert record.sample.shape == (1, 8, 8) and len(record.classes) == 4


def test_most_confidently_misclassified_are_test_images_sorted_by_confidence(viz_run):
    run_dir, record = viz_run
    m = record.misclassified
    assert 0 < len(m["images"]) <= 5 and (m["true"] != m["predicted"]).all()
    assert (m["confidence"][:-1] >= m["confidence"][1:]).all()
    from cnnlab.core.config import parse_run_config

    test_images = parse_run_config(compose_config(*tiny_plus(*CNN))).components["dataset"].build().test_images
    assert torch.equal(m["images"], test_images[m["index"]])
    assert "test/misclassified" in images(run_dir)


def test_visualising_does_not_change_training(tmp_path):
    with_viz = run_tiny(tmp_path / "on", *CNN, "trainer.epochs=2")
    without = run_tiny(tmp_path / "off", *CNN, "trainer.epochs=2", *VIZ_OFF)
    a = load_checkpoint(tmp_path / "on" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "off" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val/loss"] for h in with_viz["history"]] == [h["val/loss"] for h in without["history"]]
    assert not (tmp_path / "off" / "viz").exists()


def test_every_n_epochs_and_the_per_image_path(tmp_path):
    run_tiny(tmp_path / "run", *CNN, "trainer.epochs=4", "viz.every_n_epochs=2", "viz.misclassified=0",
             "data.in_memory=false", "data.num_workers=0")
    assert images(tmp_path / "run")["viz/first_layer_filters"] == [0, 18, 36]
    record = Record.load(tmp_path / "run" / "viz")
    assert record.misclassified is None and record.augmented.shape == (32, 1, 8, 8)


def test_an_mlps_first_layer_is_drawn_as_images():
    mlp = MODELS.build("mlp", {"hidden": [100]}, prefix="model", in_channels=3, num_classes=10, input_size=8)
    filters = first_layer_filters(mlp, 3, 8)
    assert filters.shape == (64, 3, 8, 8) and torch.equal(filters[5].flatten(), mlp[1].weight[5].detach())
    fourier = MODELS.build("fourier_mlp", {}, prefix="model", in_channels=2, num_classes=3, input_size=1)
    assert first_layer_filters(fourier, 2, 1) is None
    assert [e for e in range(20) if log_spaced(e)] == [0, 1, 2, 4, 8, 16]


def cnnlab(capsys, *args):
    """The `cnnlab` command in this process: (exit status, stdout, stderr)."""
    from cnnlab.cli.commands import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_cnnlab_viz_writes_pngs_and_refuses_what_is_not_a_run(tmp_path, viz_run, capsys):
    run_dir, _ = viz_run
    code, out, err = cnnlab(capsys, "viz", str(run_dir))
    assert code == 0, err
    written = out.split()
    assert [p.rsplit("/", 1)[1] for p in written] == [
        "filters.png", "features.png", "augmented.png", "misclassified.png", "confusion.png"]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in written)
    code, _, err = cnnlab(capsys, "viz", str(tmp_path / "nowhere"))
    assert code == 2 and err.strip().endswith("(outputs/runs/<date>/<time>-<name>)")
    code, _, err = cnnlab(capsys, "viz", str(tmp_path))
    assert code == 2 and "has no viz/record.pt" in err and len(err.splitlines()) == 1
    (tmp_path / "viz").mkdir()
    (tmp_path / "viz" / "record.pt").write_bytes(b"junk")
    code, _, err = cnnlab(capsys, "viz", str(tmp_path))
    assert code == 2 and "record.pt is unreadable or corrupt" in err and len(err.splitlines()) == 1
