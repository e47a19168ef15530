"""task=image_fit: the coordinate MLP fits one image; PSNR, reconstruction and every task option."""

import math

import pytest
import torch
from torchvision.io import encode_png

from cnnlab.core.errors import CnnlabError
from cnnlab.tasks.image_fit import load_image, procedural_image, psnr
from cnnlab.core.registry import MODELS
from cnnlab.runtime.checkpoint import load_checkpoint
from tests.conftest import train
from tests.conftest import compose_config, quiet_console

SMALL = ("task=image_fit", "task.size=16", "model.hidden=[32]", "data.batch_size=64", "trainer.device=cpu")


def fit(run_dir, *overrides):
    return train(compose_config(*SMALL, *overrides), run_dir, console=quiet_console())


def test_the_bundled_image_is_drawn_not_downloaded():
    image = procedural_image(64)
    assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
    assert torch.equal(image, procedural_image(64))
    edges = (image[:, :, 1:] - image[:, :, :-1]).abs()
    assert (edges > 0.5).float().mean() > 0.02  # sharp edges and fine texture: what a plain MLP blurs


def test_an_image_file_is_cropped_to_a_square_and_resized(tmp_path):
    pixels = torch.zeros(3, 20, 40, dtype=torch.uint8)
    pixels[0, :, 10:30] = 255  # the centre 20x20 square is red
    (tmp_path / "wide.png").write_bytes(encode_png(pixels).numpy().tobytes())
    image = load_image(str(tmp_path / "wide.png"), 10)
    assert image.shape == (3, 10, 10) and torch.allclose(image[0], torch.ones(10, 10)) and image[1:].max() == 0
    with pytest.raises(CnnlabError, match="task.image: .*missing.png does not exist"):
        load_image(str(tmp_path / "missing.png"), 10)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(CnnlabError, match="task.image: .*broken.png is not a readable image"):
        load_image(str(tmp_path / "broken.png"), 10)


def test_a_fit_logs_psnr_and_the_reconstruction_and_its_psnr_is_real(tmp_path):
    summary = fit(tmp_path / "run", "trainer.epochs=3", "model.num_frequencies=16", "model.sigma=3")
    run_dir = tmp_path / "run"
    assert [h["step"] for h in summary["history"]] == [4, 8, 12]  # 256 pixels in batches of 64
    assert summary["size"] == 16 and summary["image"] == "procedural" and summary["model"] == "fourier_mlp"
    assert (run_dir / "reconstruction.png").read_bytes()[:4] == b"\x89PNG" and (run_dir / "target.png").is_file()
    model = MODELS.build("fourier_mlp", {"num_frequencies": 16, "sigma": 3.0, "hidden": [32]}, prefix="model",
                         in_channels=2, num_classes=3, input_size=1)
    model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"])
    t = (torch.arange(16) + 0.5) / 16
    coords = torch.stack(torch.meshgrid(t, t, indexing="ij")[::-1], dim=-1).reshape(-1, 2)
    with torch.no_grad():
        recon = torch.sigmoid(model(coords)).reshape(16, 16, 3).permute(2, 0, 1)
    mse = torch.mean((recon - procedural_image(16)) ** 2).item()
    assert summary["final_psnr"] == pytest.approx(psnr(mse), abs=1e-4)
    assert model[1].B.std().item() == pytest.approx(3.0, rel=0.3)  # model.sigma reached the frequencies

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Images("image_fit/reconstruction")] == [4, 8, 12]
    assert [round(e.value, 4) for e in ea.Scalars("image_fit/psnr")] == [round(h["psnr"], 4) for h in summary["history"]]


def test_task_options_reach_the_fit(tmp_path):
    pixels = (torch.rand(3, 12, 12) * 255).to(torch.uint8)
    (tmp_path / "photo.png").write_bytes(encode_png(pixels).numpy().tobytes())
    summary = fit(tmp_path / "plain", "model=mlp", f"task.image={tmp_path / 'photo.png'}", "task.size=8",
                  "trainer.epochs=1", "data.batch_size=16", "optimizer.lr=0.01")
    assert summary["image"] == str(tmp_path / "photo.png") and summary["size"] == 8 and summary["model"] == "mlp"
    assert summary["history"][0]["step"] == 4 and summary["history"][0]["lr"] == 0.01  # 64 pixels in batches of 16
    assert 0 < summary["final_psnr"] < 60 and math.isfinite(summary["best_value"])


def test_a_cnn_is_refused_in_one_line(tmp_path):
    with pytest.raises(CnnlabError, match="task=image_fit trains a coordinate MLP: model=fourier_mlp or model=mlp, not model=lenet5"):
        train(compose_config("task=image_fit", "model=lenet5"), tmp_path / "run", console=quiet_console())


def test_a_sweep_ranks_image_fits_by_psnr():
    from cnnlab.sweep.trials import direction_of
    from cnnlab.tasks import monitor_of

    assert monitor_of(compose_config("task=image_fit")) == "psnr"
    assert monitor_of(compose_config("trainer.monitor=val/loss")) == "val/loss"
    assert direction_of(compose_config("task=image_fit", "trainer.monitor=val/loss")) == "maximize"  # PSNR
    assert direction_of(compose_config("trainer.monitor=val/loss")) == "minimize"
