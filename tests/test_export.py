"""`cnnlab export`: lenet5, small_resnet and a timm model to ONNX (and one to TorchScript), the preprocessing
baked in or written beside, a dynamic batch, parity with torch checked on the validation images; a model
ONNX cannot express, and a bad path, in one line with nothing written."""

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from tests.conftest import TINY, run_cli

MODELS = {
    "lenet5": ["model=lenet5", "dataset.size=28"],
    "small_resnet": ["model=small_resnet", "model.widths=[8,8]", "dataset.size=16", "data.preprocess=zca_whiten",
                     "optimizer.lr=0.01"],
    "timm": ["model=timm", "model.arch=resnet10t", "dataset.size=16"],
}


def tiny_run(cwd: Path, name: str, extra: list[str]) -> Path:
    base = [o for o in TINY if not o.startswith(("model", "dataset.size"))]
    result = run_cli("train", *base, *extra, "trainer.epochs=1", f"hydra.run.dir={cwd / name}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return cwd / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    cwd = tmp_path_factory.mktemp("export")
    return {name: tiny_run(cwd, name, extra) for name, extra in MODELS.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_zoo_model_exports_to_onnx_with_its_preprocessing_baked_in_and_parity_checked(runs, name):
    run = runs[name]
    result = run_cli("export", str(run), "--format", "onnx", "--bake-preprocessing", cwd=run.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    diff = float(re.search(r"max \|logit difference\| (\S+) \(at most 0.0001\)", result.stdout).group(1))
    assert diff <= 1e-4 and "accuracy torch" in result.stdout
    meta = json.loads((run / "model.onnx.json").read_text())
    assert meta["preprocessing_baked_in"] and meta["parity"]["max_abs_diff"] == pytest.approx(diff, rel=0.01, abs=1e-9)
    assert meta["parity"]["torch_acc"] == meta["parity"]["exported_acc"] and len(meta["classes"]) == 4
    channels, size = meta["input_shape"][1], meta["input_shape"][2]
    session = onnxruntime.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch dimension is dynamic
        images = np.random.default_rng(0).random((batch, channels, size, size), dtype=np.float32)
        (logits,) = session.run(None, {"images": images})
        assert logits.shape == (batch, 4)


def test_torchscript_takes_preprocessed_images_and_says_how_to_prepare_them(runs):
    run = runs["small_resnet"]  # zca whitening: a matrix, not only a mean and std
    result = run_cli("export", str(run), "--format", "torchscript", "--out", str(run / "m.pt"), cwd=run.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FutureWarning" not in result.stderr  # torch's deprecation of TorchScript is not the user's to read
    meta = json.loads((run / "m.pt.json").read_text())
    assert not meta["preprocessing_baked_in"] and meta["preprocessing"]["kind"] == "zca_whiten"
    matrix = torch.tensor(meta["preprocessing"]["matrix"])
    assert matrix.shape == (16 * 16, 16 * 16) and meta["parity"]["max_abs_diff"] <= 1e-4
    with pytest.warns(FutureWarning):  # torch deprecates TorchScript; C++ apps load it all the same
        module = torch.jit.load(str(run / "m.pt"))
    images = torch.rand(3, 1, 16, 16)
    mean = torch.tensor(meta["preprocessing"]["mean"]).view(1, 1, 16, 16)
    x = ((images - mean) / torch.tensor(meta["preprocessing"]["std"]).view(1, -1, 1, 1)).flatten(1) @ matrix
    import cnnlab

    model, preprocess = cnnlab.load(run)  # the in-Python way: the same logits
    assert torch.allclose(module(x.view(3, 1, 16, 16)), model(preprocess(images)), atol=1e-4)


def test_a_model_onnx_cannot_express_and_a_bad_path_are_one_line(tmp_path):
    run = tiny_run(tmp_path, "fractional", ["model=small_resnet", "model.widths=[8,8]", "dataset.size=16",
                                            "model.fractional_pool=true", "optimizer.lr=0.01"])
    result = run_cli("export", str(run), "--format", "onnx", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: cnnlab export: model=small_resnet cannot be exported as onnx: the op "
                                    "aten.fractional_max_pool2d has no ONNX form"), result.stderr
    assert not (run / "model.onnx").exists() and not (run / "model.onnx.json").exists()
    result = run_cli("export", str(tmp_path / "nothing"), "--format", "onnx", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: cnnlab export: {tmp_path / 'nothing'} is not a run directory with checkpoints/best.pt")


def test_safetensors_export_holds_the_weights_and_predict_load_and_pretrained_read_it(tmp_path):
    """cnnlab export --format safetensors: the selected weights with a .json naming the model, its options, input,
    classes and preprocessing; predict, cnnlab.load and model.pretrained read it and give the run's own answers."""
    import csv
    import io

    import cnnlab
    from safetensors.torch import load_file
    from tests.test_own_images import FOLDER, write_classes

    write_classes(tmp_path / "tree" / "train", per_class=12)
    write_classes(tmp_path / "tree" / "val", per_class=4)
    assert run_cli("train", f"dataset.root={tmp_path / 'tree'}", *FOLDER, cwd=tmp_path).returncode == 0
    run = next((tmp_path / "outputs" / "runs").glob("*/*"))
    done = run_cli("export", str(run), "--format", "safetensors", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    file, meta = run / "model.safetensors", json.loads((run / "model.safetensors.json").read_text())
    assert meta["format"] == "safetensors" and meta["model"] == {"name": "mlp", "options": {
        "hidden": [16], "activation": "relu", "dropout": 0.0, "batch_norm": False, "drop_connect": 0.0}}
    assert meta["classes"] == ["ant", "bee", "cat"] and meta["input_shape"] == ["N", 3, 12, 12]
    assert meta["parity"]["max_abs_diff"] == 0.0  # the same weights in the same model
    loaded = cnnlab.load(run)
    assert set(load_file(str(file))) == set(loaded.model.state_dict())
    # predict and cnnlab.load read the file as the run
    answers = [run_cli("predict", str(target), str(tmp_path / "tree" / "val"), "--csv", cwd=tmp_path)
               for target in (run, file)]
    rows = [list(csv.DictReader(io.StringIO(a.stdout))) for a in answers]
    assert all(a.returncode == 0 for a in answers) and rows[0] == rows[1] and len(rows[0]) == 12
    from_file = cnnlab.load(file)
    images = sorted((tmp_path / "tree" / "val").rglob("*.*"))
    with torch.no_grad():
        assert torch.equal(from_file.model(from_file.preprocess(images)), loaded.model(loaded.preprocess(images)))
    assert from_file.classes == loaded.classes
    # model.pretrained= starts a run from it
    tuned = run_cli("train", f"dataset.root={tmp_path / 'tree'}", *FOLDER, f"model.pretrained={file}",
                    "finetune.mode=linear_probe", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'tuned'}", cwd=tmp_path)
    assert tuned.returncode == 0 and f"weights from {file}" in tuned.stdout, tuned.stderr[-1000:]
    # weights only: no preprocessing baked in; a damaged file is one line
    baked = run_cli("export", str(run), "--format", "safetensors", "--bake-preprocessing", cwd=tmp_path)
    assert baked.returncode == 2 and "a safetensors file holds weights only" in baked.stderr
    file.write_bytes(b"\x00" * 40)
    damaged = run_cli("predict", str(file), str(tmp_path / "tree" / "val"), cwd=tmp_path)
    assert damaged.returncode == 2 and damaged.stderr.count("\n") == 1 and f"{file} is not a safetensors file" in damaged.stderr
