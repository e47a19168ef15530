"""The bad-input corpus (#7): every mistake a user can type or leave on disk, through the real
`cnnlab` command. Each ends in exactly one line on stderr that names the culprit, a non-zero
exit, no traceback, and no half-written file."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab.data.formats import write_cifar_batch, write_idx
from cnnlab.runtime.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import TINY, run_cnnlab

RUN = ["train", *TINY, "trainer.epochs=1"]
MNIST = ["train", *[o for o in TINY if not o.startswith(("dataset", "model"))], "model=mlp", "model.hidden=[8]",
         "dataset=mnist", "dataset.download=false", "trainer.epochs=1"]
CIFAR = [*[o if o != "dataset=mnist" else "dataset=cifar10" for o in MNIST]]
FOLDER = ["train", *[o for o in TINY if not o.startswith(("dataset", "model"))], "model=mlp", "model.hidden=[8]",
          "dataset=imagefolder", "dataset.size=8", "dataset.channels=1", "data.num_workers=0", "trainer.epochs=1"]

# (case id, command line with {root} for the corpus folder, what the one line must contain)
CASES = [
    # config keys and names
    ("unknown top-level key", [*RUN, "+colour=red"], "unknown config key 'colour'"),
    ("unknown trainer key", [*RUN, "trainer.epoch=3"], "trainer has no option 'epoch' (did you mean: epochs?)"),
    ("unknown data key", [*RUN, "data.batchsize=3"], "data has no option 'batchsize' (did you mean: batch_size?)"),
    ("unknown model option", [*RUN, "model.hiden=[8]"], "model 'mlp' has no option 'hiden' (did you mean: hidden?)"),
    ("unknown model", [*RUN, "model=lenet"], "unknown model 'lenet' (did you mean: lenet5?)"),
    ("unknown optimizer", [*RUN, "optimizer=adamm"], "unknown optimizer 'adamm' (did you mean: adam"),
    ("unknown scheduler", [*RUN, "scheduler=cosin"], "unknown scheduler 'cosin' (did you mean: cosine"),
    ("unknown init", [*RUN, "init=kaimin"], "unknown init scheme 'kaimin' (did you mean: kaiming_normal?)"),
    ("unknown augment", [*RUN, "augment=flipp"], "unknown augment 'flipp' (did you mean: flip?)"),
    ("unknown dataset", [*RUN, "dataset=cifar100x"], "unknown dataset 'cifar100x' (did you mean: cifar100"),
    ("unknown command", ["trian"], "unknown command 'trian' (did you mean: train?)"),
    ("unknown list kind", ["list", "modelz"], "modelz"),
    # wrong types
    ("epochs not a number", [*RUN, "trainer.epochs=many"], "trainer.epochs must be an integer, got 'many'"),
    ("bool not a bool", [*RUN, "trainer.deterministic=maybe"], "trainer.deterministic"),
    ("list not a list", [*RUN, "model.hidden=abc"], "model.hidden"),
    ("seed not a number", [*RUN, "seed=abc"], "seed must be an integer"),
    ("precision not a choice", [*RUN, "trainer.precision=fp8"], "trainer.precision"),
    ("monitor a test metric", [*RUN, "trainer.monitor=test/acc"], "trainer.monitor"),
    ("unparseable override", [*RUN, "optimizer.lr=[1"], "cannot parse override 'optimizer.lr=[1'"),
    # zero, negative and non-finite numbers
    ("zero epochs", [*RUN, "trainer.epochs=0"], "trainer.epochs must be an integer >= 1, got 0"),
    ("negative epochs", [*RUN, "trainer.epochs=-1"], "trainer.epochs must be an integer >= 1, got -1"),
    ("zero batch", [*RUN, "data.batch_size=0"], "data.batch_size must be an integer >= 1, got 0"),
    ("negative batch", [*RUN, "data.batch_size=-8"], "data.batch_size must be an integer >= 1, got -8"),
    ("val fraction above 1", [*RUN, "data.val_fraction=1.5"], "data.val_fraction"),
    ("lr nan", [*RUN, "optimizer.lr=nan"], "optimizer.lr"),
    ("lr inf", [*RUN, "optimizer.lr=inf"], "optimizer.lr"),
    ("lr negative", [*RUN, "optimizer.lr=-1"], "optimizer.lr must be a number > 0, got -1"),
    ("negative workers", [*RUN, "data.num_workers=-1"], "data.num_workers"),
    ("zero image size", [*RUN, "dataset.size=0"], "dataset.size"),
    ("device absent", [*RUN, "trainer.device=cuda"], "trainer.device=cuda but this machine has 0 CUDA devices"),
    ("device unknown", [*RUN, "trainer.device=tpu"], "trainer.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("lr-find steps", ["lr-find", "--steps", "1", *RUN[1:]], "lr-find needs"),
    # data on disk
    ("missing data root", [*MNIST, "paths.data_dir={root}/nothing"], "{root}/nothing"),
    ("truncated IDX", [*MNIST, "paths.data_dir={root}/mnist_truncated"], "mnist_truncated/"),
    ("truncated gzip", [*MNIST, "paths.data_dir={root}/mnist_cut_gzip"], "corrupt gzip file {root}/mnist_cut_gzip/"),
    ("corrupt IDX header", [*MNIST, "paths.data_dir={root}/mnist_bad_magic"], "mnist_bad_magic/"),
    ("IDX images and labels disagree", [*MNIST, "paths.data_dir={root}/mnist_mismatch"], "mnist_mismatch/"),
    ("unreadable IDX (a folder)", [*MNIST, "paths.data_dir={root}/mnist_folder"], "mnist_folder/"),
    ("corrupt CIFAR batch", [*CIFAR, "paths.data_dir={root}/cifar_corrupt"], "cifar_corrupt/"),
    ("CIFAR batch without data", [*CIFAR, "paths.data_dir={root}/cifar_no_data"], "cifar_no_data/"),
    # a non-image or undecodable file in a folder is skipped with a warning (tests/test_own_images.py)
    ("image size neither a number nor auto", [*FOLDER, "dataset.root={root}/folder_text", "dataset.size=big"],
     "dataset.size"),
    ("predict from no run", ["predict", "{root}/no_such_run", "{root}/folder_text"], "no_such_run: no checkpoint"),
    ("predict from an ONNX file with no metadata", ["predict", "{root}/bare.onnx", "{root}/folder_text"],
     "bare.onnx: no bare.onnx.json beside it"),
    ("predict from a damaged ONNX file", ["predict", "{root}/damaged.onnx", "{root}/folder_text"],
     "damaged.onnx is not an ONNX model onnxruntime can load"),
    ("empty class folder", [*FOLDER, "dataset.root={root}/folder_empty"], "folder_empty/"),
    ("image folder root missing", [*FOLDER, "dataset.root={root}/no_such_folder"], "no_such_folder"),
    # checkpoints and runs
    ("eval of a missing run", ["eval", "{root}/no_run"], "{root}/no_run"),
    ("eval of a corrupt checkpoint", ["eval", "{root}/run_corrupt"], "run_corrupt/checkpoints/best.pt is corrupt"),
    ("eval of another architecture", ["eval", "{root}/run_other_arch"], "does not fit the configured model"),
    ("resume with other classes", ["train", "{root}/run_ok", "dataset.classes=5"], "dataset.classes: 4 -> 5"),
    ("resume of an empty folder", ["train", "{root}/no_run"], "no checkpoint there"),
    ("resume of a sweep", ["train", "-m", "{root}/run_ok"], "continues one run"),
    ("report of a missing sweep", ["report", "{root}/no_sweep"], "no_sweep"),
    ("viz of a folder that is no run", ["viz", "{root}/cifar_no_data"], "cifar_no_data has no viz/record.pt"),
    # transfer learning and image_fit
    ("pretrained file missing", [*RUN, "model.pretrained={root}/nothing.pt"], "{root}/nothing.pt does not exist"),
    ("pretrained of another architecture", [*RUN, "model.hidden=[32]", "model.pretrained={root}/run_ok/checkpoints/best.pt"],
     "run_ok/checkpoints/best.pt does not fit the configured model: 1.weight"),
    ("pretrained checkpoint corrupt", [*RUN, "model.pretrained={root}/run_corrupt/checkpoints/best.pt"],
     "run_corrupt/checkpoints/best.pt is corrupt"),
    ("unknown finetune mode", [*RUN, "finetune.mode=probe"], "finetune.mode must be one of full, last_k, linear_probe"),
    ("image_fit image missing", ["train", "task=image_fit", "trainer.device=cpu", "task.image={root}/nothing.png"],
     "task.image: {root}/nothing.png does not exist"),
    ("image_fit image not an image", ["train", "task=image_fit", "trainer.device=cpu", "task.image={root}/a_file"],
     "task.image: {root}/a_file is not a readable image"),
    # where outputs go
    ("output dir inside a file", [*RUN, "paths.output_dir={root}/a_file/out"], "a_file"),
    ("run dir inside a file", [*RUN, "hydra.run.dir={root}/a_file/run"], "a_file"),
    # #24: the last inputs that reached a traceback
    ("sweep interval upside down", ["train", "-m", *RUN[1:], "optimizer.lr=interval(1,0.1)"],
     "optimizer.lr=interval(1.0, 0.1): the lower end must come first"),
    ("eval shift larger than the images", ["eval", "{root}/run_ok", "--tta-shift", "100000"],
     "--tta-shift=100000: shifts must be smaller than the images (8 pixels)"),
    ("train shift larger than the images", [*RUN, "trainer.tta_shift=8"], "trainer.tta_shift=8: shifts must be smaller"),
    ("eval json where no file can be made", ["eval", "{root}/run_ok", "--json", "--out", "/proc/x.json"],
     "--out /proc/x.json: cannot write there"),
    ("eval json a folder", ["eval", "{root}/run_ok", "--json", "--out", "{root}"], "is a folder; give a file name"),
    ("report of a trial record that is a list", ["report", "{root}/sweep_list"], "trial record {root}/sweep_list/0/trial.json is not a valid record: the top level should be an object"),
    ("report of a summary of the wrong types", ["report", "{root}/sweep_types"],
     "sweep_types/0/summary.json is not a valid record: best_value should be a number or null, got \"high\""),
    ("report of a summary history of the wrong types", ["report", "{root}/sweep_history"],
     "sweep_history/0/summary.json is not a valid record: history[0] should be an object, got 1"),
    ("report of a corrupt sweep record", ["report", "{root}/sweep_corrupt"], "sweep record {root}/sweep_corrupt/sweep.json is not valid JSON"),
    ("epochs of 20,000 digits", [*RUN, "trainer.epochs=" + "9" * 20000], "trainer.epochs: a number of 20,000 digits"),
    ("seed beyond every generator", [*RUN, "seed=99999999999999999999"], "seed must be an integer >= 0 and <= 4294967295"),
    ("split seed negative", [*RUN, "data.split_seed=-1"], "data.split_seed must be an integer >= 0"),
    ("a model its images are too small for", ["train", *[o for o in RUN[1:] if not o.startswith("model")], "model=timm",
                                              "model.arch=convnext_atto"],
     "model=timm model.arch=convnext_atto does not take 1x8x8 images: its feature maps shrink below a kernel; "
     "the smallest input it takes is 1x32x32"),
]


def build_corpus(root: Path) -> None:
    rng = np.random.default_rng(0)

    def mnist(folder: Path, n_labels: int = 30) -> Path:
        folder.mkdir(parents=True)
        for prefix, n in (("train", 30), ("t10k", 10)):
            write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
            write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz",
                      (np.arange(n_labels if prefix == "train" else n) % 10).astype(np.uint8))
        return folder

    images = mnist(root / "mnist_truncated") / "train-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:500]))
    images = mnist(root / "mnist_cut_gzip") / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:100])
    images = mnist(root / "mnist_bad_magic") / "train-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(b"\x12\x34\x56\x78" + gzip.decompress(images.read_bytes())[4:]))
    mnist(root / "mnist_mismatch", n_labels=29)
    images = mnist(root / "mnist_folder") / "train-images-idx3-ubyte.gz"
    images.unlink()
    images.mkdir()

    for name, corrupt in (("cifar_corrupt", lambda p: p.write_bytes(b"not a pickle at all" * 10)),
                          ("cifar_no_data", lambda p: p.write_bytes(pickle.dumps({"labels": [1, 2]})))):
        folder = root / name / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            write_cifar_batch(folder / batch, rng.integers(0, 256, (6, 3072), dtype=np.uint8), np.arange(6) % 10, "labels")
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
        corrupt(folder / "data_batch_1")

    from PIL import Image

    for name in ("folder_text", "folder_empty"):
        for cls in ("ant", "bee"):
            (root / name / cls).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / name / cls / f"{i}.png")
    (root / "folder_text" / "bee" / "notes.txt").write_text("not an image")
    shutil.rmtree(root / "folder_empty" / "bee")
    (root / "folder_empty" / "bee").mkdir()

    (root / "a_file").write_text("a file where a folder is expected")
    for name in ("bare.onnx", "damaged.onnx"):
        (root / name).write_bytes(b"\x08\x07 not a model" * 10)
    (root / "damaged.onnx.json").write_text(json.dumps({
        "format": "onnx", "input_shape": ["N", 1, 8, 8], "resize": None, "classes": ["ant", "bee"],
        "preprocessing_baked_in": False,
        "preprocessing": {"kind": "channel", "mean": [0.5], "std": [0.25], "matrix": None}}))

    def sweep(name: str, trial: object, summary: object, record: str = "{}") -> None:
        (root / name / "0").mkdir(parents=True)
        (root / name / "0" / "trial.json").write_text(json.dumps(trial))
        (root / name / "0" / "summary.json").write_text(json.dumps(summary))
        (root / name / "sweep.json").write_text(record)

    good = {"overrides": ["optimizer.lr=0.1"]}
    sweep("sweep_list", [1, 2, 3], {"status": "completed"})
    sweep("sweep_types", good, {"status": "completed", "best_value": "high", "history": []})
    sweep("sweep_history", good, {"status": "completed", "best_value": 0.5, "history": [1]})
    sweep("sweep_corrupt", good, {"status": "completed", "best_value": 0.5, "history": []}, record="{not json")

    env = {**os.environ, "CNNLAB_OUTPUT_DIR": str(root / "outputs")}
    assert run_cnnlab([*RUN, f"hydra.run.dir={root / 'run_ok'}"], root, env, timeout=300).returncode == 0
    shutil.copytree(root / "run_ok", root / "run_corrupt")
    best = root / "run_corrupt" / "checkpoints" / "best.pt"
    data = bytearray(best.read_bytes())
    data[len(data) // 3] ^= 0x01
    best.write_bytes(bytes(data))
    shutil.copytree(root / "run_ok", root / "run_other_arch")
    best = root / "run_other_arch" / "checkpoints" / "best.pt"
    state = load_checkpoint(best)
    state["config"]["model"]["hidden"] = [32]  # weights of an MLP with 16 hidden units, said to have 32
    save_checkpoint(best, state)


def run(args: list[str], root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CNNLAB_OUTPUT_DIR": str(root / "outputs"), "COLUMNS": "40", "OMP_NUM_THREADS": "1"}
    return run_cnnlab([a.format(root=root) for a in args], root, env, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    root = tmp_path_factory.mktemp("corpus")
    build_corpus(root)
    with ThreadPoolExecutor(max_workers=3) as pool:  # each case is a process; most fail within a second
        done = dict(zip([c[0] for c in CASES], pool.map(lambda case: run(case[1], root), CASES)))
    return root, done


def test_the_corpus_has_at_least_40_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("case", "args", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit(results, case, args, expected):
    root, done = results
    result = done[case]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected.format(root=root) in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not list(root.rglob("*.tmp")) and not list((root / "outputs").rglob("summary.json"))


def test_listing_a_model_at_an_input_too_small_names_the_smallest_it_takes(tmp_path):
    done = run_cnnlab(["list", "models", "timm", "--arch", "convnext_atto"], tmp_path,
                      {**os.environ, "COLUMNS": "250"}, timeout=120)
    assert done.returncode == 0 and "needs >= 1x32x32" in done.stdout, done.stdout + done.stderr
