"""A user's own image folder, end to end (#36): one preprocessing for eval, load, predict and export; files of
every mode; size=auto; the smoothed divergence guard; a diverged run's exit status."""

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import cnnlab
from cnnlab.core.errors import CnnlabError
from cnnlab.data.folder import imagefolder
from cnnlab.data.images import ImageTransform, read_image
from cnnlab.data.statistics import Preprocessing
from cnnlab.training.watchers import DivergenceGuard
from tests.conftest import run_cli, run_tiny

FOLDER = ["dataset=imagefolder", "model=mlp", "model.hidden=[16]", "data.num_workers=0", "trainer.device=cpu",
          "trainer.epochs=2", "data.batch_size=8", "optimizer=adam", "optimizer.lr=0.01"]


def write_classes(root, per_class=10, sizes=((12, 12), (12, 16), (16, 12))):
    """3 classes told apart by brightness, JPEG and PNG, 12 px on the shorter side."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("ant", "bee", "cat")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            pixels = np.clip(rng.normal(50 + 70 * c, 15, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}{'.png' if i % 2 else '.jpg'}")
    return root


def write_mixed(folder):
    """One file of each kind a user's folder holds; returns {kind: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    grey = Image.fromarray(np.full((12, 12), 90, np.uint8), "L")
    files["grey_png"] = folder / "grey.png"
    grey.save(files["grey_png"])
    rgba = Image.fromarray(np.dstack([np.full((12, 12), v, np.uint8) for v in (200, 100, 50, 128)]), "RGBA")
    files["rgba_png"] = folder / "rgba.png"
    rgba.save(files["rgba_png"])
    palette = Image.fromarray(np.full((12, 12, 3), 120, np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    files["palette_gif"] = folder / "palette.gif"
    palette.save(files["palette_gif"], transparency=0)
    files["sixteen_png"] = folder / "sixteen.png"
    Image.fromarray(np.full((12, 12), 65535, np.uint16)).save(files["sixteen_png"])
    files["cmyk_jpg"] = folder / "cmyk.jpg"
    Image.fromarray(np.full((12, 12, 3), 150, np.uint8)).convert("CMYK").save(files["cmyk_jpg"])
    rotated = Image.fromarray(np.zeros((12, 20, 3), np.uint8))  # stored 20 wide, 12 high; shown upright 12 x 20
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    files["exif_jpg"] = folder / "exif.jpg"
    rotated.save(files["exif_jpg"], exif=exif)
    files["truncated_jpg"] = folder / "truncated.jpg"
    whole = io.BytesIO()
    Image.fromarray(np.full((12, 12, 3), 70, np.uint8)).save(whole, "JPEG")
    files["truncated_jpg"].write_bytes(whole.getvalue()[:len(whole.getvalue()) // 2])
    files["not_an_image"] = folder / "notes.txt"
    files["not_an_image"].write_text("a note, not an image")
    return files


# --- decoding ---------------------------------------------------------------------------------------------

def test_every_kind_of_image_file_decodes_as_training_reads_it(tmp_path, recwarn):
    files = write_mixed(tmp_path / "mixed")
    assert read_image(files["grey_png"], 3).shape == (3, 12, 12)
    assert read_image(files["rgba_png"], 3)[:, 0, 0].tolist() == [200, 100, 50]  # alpha dropped
    assert read_image(files["palette_gif"], 1).shape == (1, 12, 12)
    assert read_image(files["sixteen_png"], 1).unique().tolist() == [255]  # scaled, not clipped from 65535
    assert read_image(files["cmyk_jpg"], 3).shape == (3, 12, 12)
    assert read_image(files["exif_jpg"], 3).shape == (3, 20, 12)  # upright: the rotation tag applied
    with pytest.raises(CnnlabError, match=r"truncated.jpg is not a readable image"):
        read_image(files["truncated_jpg"], 3)
    assert not [w for w in recwarn if "Palette" in str(w.message)]  # transparency resolved through RGBA


def test_the_transform_takes_paths_pil_arrays_and_tensors_of_any_size_alike(tmp_path):
    path = tmp_path / "a.png"
    pixels = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    transform = ImageTransform(16, 18, 3, Preprocessing.per_channel([0.5] * 3, [0.25] * 3))
    from_path = transform(path)
    assert from_path.shape == (1, 3, 16, 16)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)
    for same in (transform(Image.open(path)), transform(pixels), transform(tensor), transform([str(path)])):
        assert torch.equal(same, from_path)
    as_float = transform(tensor.float() / 255)  # float in [0, 1]: resized in float, so close, not equal
    assert (as_float - from_path).abs().max() < 0.05
    assert transform([path, path, tensor]).shape == (3, 3, 16, 16)
    grey = ImageTransform(16, None, 1, Preprocessing.per_channel([0.5], [0.25]))
    assert grey(path).shape == (1, 1, 16, 16) and grey(tensor[None]).shape == (1, 1, 16, 16)


# --- size=auto --------------------------------------------------------------------------------------------

def test_size_auto_is_the_images_own_and_a_large_upscale_warns(tmp_path):
    root = write_classes(tmp_path / "tree")
    data = imagefolder(root=str(root))
    assert (data.input_size, data.resize) == (12, 12)
    assert data.size_note.startswith("dataset.size=auto: 12 px, the median shorter side of") and not data.warnings
    big = imagefolder(root=str(root), size=64)
    assert (big.input_size, big.resize) == (64, round(64 * 256 / 224))
    assert big.warnings == ["dataset.size=64 upscales these images 6.1x (their median shorter side is 12 px), which "
                            "costs about 28x the work of training at their size; dataset.size=auto trains at the "
                            "images' own size"]
    assert imagefolder(root=str(root), size=20).warnings == []  # under 2x: no warning


def test_the_default_run_trains_at_the_images_size_and_says_so(tmp_path):
    root = write_classes(tmp_path / "tree")
    result = run_cli("train", f"dataset.root={root}", *FOLDER, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dataset.size=auto: 12 px" in result.stdout and "3x12x12" in result.stdout
    data_warnings = [line for line in result.stdout.splitlines()
                     if line.startswith("warning:") and "update/weight ratio" not in line]
    assert data_warnings == []  # the images at their own size: nothing to warn of


# --- one preprocessing: eval, load, predict, export --------------------------------------------------------

def test_eval_load_predict_and_onnx_agree_on_every_image_of_a_folder_run(tmp_path):
    pytest.importorskip("onnxruntime")
    write_classes(tmp_path / "tree" / "train", per_class=12)
    write_classes(tmp_path / "tree" / "val", per_class=6, sizes=((14, 20), (20, 14), (12, 12)))
    result = run_cli("train", f"dataset.root={tmp_path / 'tree'}", *FOLDER, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = next((tmp_path / "outputs" / "runs").glob("*/*"))
    evaluated = run_cli("eval", str(run), "--splits", "test", "--predictions", str(tmp_path / "eval.csv"), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    by_eval = {r["file"]: r for r in csv.DictReader((tmp_path / "eval.csv").open())}
    assert len(by_eval) == 18 and all(r["split"] == "test" for r in by_eval.values())

    loaded = cnnlab.load(run)
    files = sorted(by_eval)
    with torch.no_grad():
        probs = loaded.model(loaded.preprocess(files)).softmax(1)
    by_load = {f: (loaded.classes[i], p) for f, i, p in zip(files, probs.argmax(1).tolist(), probs.max(1).values.tolist())}

    predicted = run_cli("predict", str(run), str(tmp_path / "tree" / "val"), "--csv", "--top-k", "2", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    by_predict = {r["file"]: r for r in csv.DictReader(io.StringIO(predicted.stdout))}

    exported = run_cli("export", str(run), "--format", "onnx", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    meta = json.loads((run / "model.onnx.json").read_text())
    assert meta["input_shape"] == ["N", 3, 12, 12] and meta["resize"] == 12 and meta["classes"] == ["ant", "bee", "cat"]
    onnx = run_cli("predict", str(run / "model.onnx"), str(tmp_path / "tree" / "val"), "--json", cwd=tmp_path)
    assert onnx.returncode == 0, onnx.stderr
    by_onnx = {r["file"]: r for r in json.loads(onnx.stdout)}

    for f in files:
        assert by_load[f][0] == by_eval[f]["predicted"] == by_predict[f]["class_1"] == by_onnx[f]["class"], f
        for prob in (by_load[f][1], float(by_predict[f]["prob_1"]), by_onnx[f]["prob"]):
            assert prob == pytest.approx(float(by_eval[f]["prob"]), abs=1e-4)


def test_a_folder_of_mixed_files_trains_predicts_and_exports_naming_what_it_skips(tmp_path):
    pytest.importorskip("onnxruntime")
    root = write_classes(tmp_path / "tree", per_class=12)
    mixed = write_mixed(root / "cat")
    result = run_cli("train", f"dataset.root={root}", *FOLDER, "dataset.test_fraction=0.4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    warned = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert any(str(mixed["not_an_image"]) in line and "not an image file" in line for line in warned)
    truncated = [line for line in warned if str(mixed["truncated_jpg"]) in line]
    assert len(truncated) <= 1 and all("is not a readable image" in line for line in truncated)
    run = next((tmp_path / "outputs" / "runs").glob("*/*"))

    predicted = run_cli("predict", str(run), str(root / "cat"), "--csv", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    rows = {r["file"] for r in csv.DictReader(io.StringIO(predicted.stdout))}
    usable = {str(p) for k, p in mixed.items() if k not in ("truncated_jpg", "not_an_image")}
    assert usable <= rows and str(mixed["truncated_jpg"]) not in rows
    errors = predicted.stderr.splitlines()
    named = [line for line in errors if "truncated.jpg" in line]
    assert len(named) == 1 and named[0].startswith(f"warning: {mixed['truncated_jpg']} is not a readable image (")
    assert len([line for line in errors if "notes.txt" in line]) == 1 and "Traceback" not in predicted.stderr

    exported = run_cli("export", str(run), "--format", "onnx", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr


def test_predict_takes_globs_reports_top_k_and_averages_the_mirror_image_with_tta_flip(tmp_path):
    root = write_classes(tmp_path / "tree")
    result = run_tiny(tmp_path / "run", f"dataset.root={root}", *FOLDER)
    assert result["status"] == "completed"
    glob = str(root / "*" / "00[0-2].*")
    plain = run_cli("predict", str(tmp_path / "run"), glob, str(tmp_path / "missing.png"), "--json", "--top-k", "3",
                    cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    rows = json.loads(plain.stdout)
    assert len(rows) == 9 and all(len(r["top"]) == 3 for r in rows)
    assert all(sum(t["prob"] for t in r["top"]) == pytest.approx(1, abs=1e-5) for r in rows)
    assert f"warning: skipped {tmp_path / 'missing.png'}: no such file, folder or match" in plain.stderr
    flipped = json.loads(run_cli("predict", str(tmp_path / "run"), glob, "--json", "--tta-flip", cwd=tmp_path).stdout)
    assert [r["file"] for r in flipped] == [r["file"] for r in rows]
    loaded = cnnlab.load(tmp_path / "run")
    x = loaded.preprocess([r["file"] for r in rows])
    with torch.no_grad():
        expected = (loaded.model(x).softmax(1) + loaded.model(x.flip(3)).softmax(1)) / 2
    assert [r["prob"] for r in flipped] == pytest.approx(expected.max(1).values.tolist(), abs=1e-5)
    table = run_cli("predict", str(tmp_path / "run"), str(root / "ant" / "000.jpg"), cwd=tmp_path)
    assert "ant/000.jpg" in table.stdout and "%" in table.stdout
    nothing = run_cli("predict", str(tmp_path / "run"), str(tmp_path / "missing.png"), cwd=tmp_path)
    assert nothing.returncode == 2 and nothing.stderr.strip().splitlines()[-1].startswith("error: cnnlab predict: no image")


def test_load_and_train_return_the_class_names_and_an_older_checkpoint_still_loads_and_exports(tmp_path):
    from cnnlab.runtime.checkpoint import load_checkpoint, save_checkpoint

    root = write_classes(tmp_path / "tree")
    result = cnnlab.train([f"dataset.root={root}", *FOLDER], **{"paths.output_dir": str(tmp_path / "out")})
    assert result.classes == ["ant", "bee", "cat"] and cnnlab.load(result.run_dir).classes == result.classes
    model, preprocess = cnnlab.load(result.run_dir)  # still unpacks as a pair
    assert preprocess.input_shape == (3, 12, 12)
    best = result.run_dir / "checkpoints" / "best.pt"
    older = {k: v for k, v in load_checkpoint(best).items() if k != "resize"}  # before the geometry was recorded
    older["config"] = {**older["config"], "dataset": {**older["config"]["dataset"], "size": 12}}  # before size=auto
    save_checkpoint(best, older)
    assert cnnlab.load(result.run_dir).preprocess.resize == round(12 * 256 / 224)  # the 256/224 rule of its day
    pytest.importorskip("onnxruntime")
    exported = run_cli("export", str(result.run_dir), "--format", "onnx", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert json.loads((result.run_dir / "model.onnx.json").read_text())["resize"] == round(12 * 256 / 224)


# --- the divergence guard -----------------------------------------------------------------------------------

def guard_over(losses, factor=3.0):
    guard = DivergenceGuard(factor, torch.device("cpu"))
    for step, loss in enumerate(losses, start=1):
        guard.watch(torch.tensor(loss), step)
    return guard


def test_a_spike_in_the_first_steps_that_recovers_does_not_stop_the_run():
    # what lr 0.01 did on 48-px JPEGs (issue #36): loss 43 at step 3, back under ln(5) by step 8
    assert guard_over([1.6, 9.0, 43.0, 20.0, 6.0, 2.5, 1.9, 1.5] + [1.4] * 30).tripped_at() is None
    # and lr 0.03 of a random sweep there: up for 7 steps, down by step 11, 76% validation accuracy later
    spike = [1.72, 2.89, 20.69, 40.7, 43.29, 81.25, 37.47, 39.97, 37.94, 7.12, 2.31, 1.9, 1.7]
    assert guard_over(spike).tripped_at() is None


def test_a_loss_that_stays_up_or_goes_nan_stops_it():
    assert guard_over([1.6] * 12 + [2.0, 6.0, 9.0, 12.0, 15.0, 18.0]).tripped_at() == 18  # 5 steps above 4.8
    assert guard_over([1.6, 30.0, 40.0] + [20.0] * 10).tripped_at() == 11  # up through the warm-up, and after
    assert guard_over([1.6, 2.0, math.nan, 1.5]).tripped_at() == 3  # NaN: at once, warm-up or not
    assert guard_over([1.6, 2.0, math.inf]).tripped_at() == 3
    assert guard_over([1.6] * 3 + [1e6] * 30, factor=None).tripped_at() is None  # off


def test_the_guard_resumes_where_it_was():
    before = guard_over([1.6] * 12 + [6.0, 7.0])
    after = DivergenceGuard(3.0, torch.device("cpu"))
    after.load_state(before.state(), initial_loss=None)
    assert after.tripped_at() is None  # the last 5: [1.6, 1.6, 1.6, 6, 7]
    for step, loss in enumerate([8.0, 9.0, 9.0], start=15):
        after.watch(torch.tensor(loss), step)
    assert after.tripped_at() == 17  # [6, 7, 8, 9, 9]: each over 3 x 1.6


def test_a_diverged_single_run_exits_4_and_says_so(tmp_path):
    result = run_cli("train", "dataset=synthetic", "dataset.size=8", "dataset.channels=1", "model=mlp",
                     "trainer.device=cpu", "optimizer.lr=1e6", "scheduler=constant", "init=normal", "init.std=1.0",
                     "trainer.epochs=2", "dataset.train_size=200", "data.batch_size=16", cwd=tmp_path)
    assert result.returncode == 4, result.stderr[-2000:]
    assert "loss diverged at step" in result.stdout and "status: diverged" in result.stdout


def test_the_epoch_line_the_table_and_the_summary_give_one_val_loss(tmp_path):
    summary = run_tiny(tmp_path / "run", "trainer.epochs=3", "optimizer.lr=0.5")  # confident: the old clamp showed
    chosen = summary["history"][summary["best_epoch"] - 1]
    assert summary["selected"]["val"]["loss"] == pytest.approx(chosen["val/loss"], rel=1e-5)


def test_log_every_n_steps_auto_gives_a_short_run_at_least_20_points(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cnnlab.training.loop import log_interval

    assert [log_interval("auto", n) for n in (10, 48, 400, 100_000)] == [1, 2, 20, 50] and log_interval(7, 48) == 7
    summary = run_tiny(tmp_path / "run", "trainer.log_every_n_steps=auto", "trainer.epochs=4")  # 4 x 9 steps
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    ea.Reload()
    assert len(ea.Scalars("train/step_loss")) >= 20 and summary["status"] == "completed"


def test_predict_s_weights_batch_size_and_workers_reach_what_they_set(tmp_path, monkeypatch):
    import cnnlab.analysis.inference as inference

    root = write_classes(tmp_path / "tree")
    run_tiny(tmp_path / "run", f"dataset.root={root}", *FOLDER)
    assert inference.open_predictor(str(tmp_path / "run"), "last").path.name == "last.pt"
    assert inference.open_predictor(str(tmp_path / "run")).path.name == "best.pt"
    made = []
    real = inference.DataLoader
    monkeypatch.setattr(inference, "DataLoader", lambda *a, **kw: made.append(kw) or real(*a, **kw))
    files, _ = inference.image_files([str(root)])
    rows = list(inference.predictions(inference.open_predictor(str(tmp_path / "run")), files, batch_size=5,
                                      workers=0, top_k=2, warn=print))
    assert made == [{"batch_size": 5, "num_workers": 0, "collate_fn": inference.collate_readable}]
    assert len(rows) == 30 and all(len(r["top"]) == 2 for r in rows)
