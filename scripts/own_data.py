"""Your own images, end to end: the README's "Your own images" section, run as a new user runs it.

Builds a 5-class folder of 48x48 RGB JPEGs from Fashion-MNIST (train/<class>/ and val/<class>/), then runs
each step as a command: train with the defaults, a 4-trial random sweep, a short tune, predict, export to
ONNX, and eval. It prints per step the exit status, the seconds and the accuracy, then how often eval,
cnnlab.load, predict and the exported ONNX (through onnxruntime) disagree over every test image.

    python scripts/own_data.py [--per-class 300] [--epochs 6] [--out /tmp/own_data] [--skip-tune]

Targets (issue #36): every step exits 0; 0 disagreements; the default run trains at the images' size
(48); the sweep's 4 lr draws span at least half of the log range.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat"]  # Fashion-MNIST's labels 0-4


def build_folder(root: Path, per_class: int, size: int = 48) -> Path:
    """train/<class>/ (per_class each) and val/<class>/ (a fifth of that) as size x size RGB JPEGs."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cnnlab.data.formats import read_idx

    if root.exists():
        shutil.rmtree(root)
    for split, images_file, labels_file, count in (
            ("train", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", per_class),
            ("val", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", per_class // 6)):
        images, labels = read_idx(FASHION / images_file), read_idx(FASHION / labels_file)
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, index in enumerate(np.flatnonzero(labels == label)[:count]):
                grey = Image.fromarray(images[index]).resize((size, size), Image.BICUBIC)
                grey.convert("RGB").save(folder / f"{i:04d}.jpg", quality=90)
    return root


def cnnlab(*args: str, cwd: Path) -> tuple[int, float, str, str]:
    """Exit status, seconds, stdout and stderr of `cnnlab ARGS`."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=cwd, capture_output=True, text=True)
    return result.returncode, time.perf_counter() - start, result.stdout, result.stderr


def newest(folder: Path) -> Path:
    """The newest run directory under ``folder`` (<date>/<time>-<name>)."""
    return max((p for p in folder.glob("*/*") if p.is_dir()), key=lambda p: p.stat().st_mtime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("/tmp/own_data"))
    parser.add_argument("--skip-tune", action="store_true")
    ns = parser.parse_args()
    out = ns.out.resolve()
    images = build_folder(out / "images", ns.per_class)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = ["dataset=imagefolder", f"dataset.root={images}"]
    failures = 0

    def step(name: str, *args: str) -> str:
        """Runs one README step; its stdout."""
        nonlocal failures
        code, seconds, stdout, stderr = cnnlab(*args, cwd=work)
        failures += code != 0
        print(f"{name:<8} exit {code}  {seconds:6.1f} s", flush=True)
        if code != 0:
            print("  " + "\n  ".join((stdout + stderr).strip().splitlines()[-5:]))
        return stdout

    def predicted(stdout: str) -> dict[str, str]:
        return {row["file"]: row["class_1"] for row in csv.DictReader(io.StringIO(stdout))}

    text = step("train", "train", *data, f"trainer.epochs={ns.epochs}")
    run = newest(work / "outputs" / "runs")
    summary = json.loads((run / "summary.json").read_text())
    header = next((line for line in text.splitlines() if "dataset.size=" in line), "")
    print(f"  {header.strip()}\n  test acc {100 * summary['selected']['test']['acc']:.2f}%, "
          f"{summary['train_images_per_s']:.0f} img/s")

    step("sweep", "train", "-m", *data, "trainer.epochs=2", "hydra/sweeper/sampler=random", "hydra.sweeper.n_trials=4",
         "optimizer.lr=tag(log, interval(1e-4, 1e-1))")
    sweeps = list((work / "outputs" / "sweeps").glob("*/*"))
    draws = [json.loads(p.read_text()).get("overrides", []) for s in sweeps for p in s.glob("*/trial.json")]
    lrs = [float(o.split("=")[1]) for d in draws for o in d if o.startswith("optimizer.lr=")]
    span = (math.log(max(lrs)) - math.log(min(lrs))) / math.log(1e-1 / 1e-4) if lrs else 0.0
    print(f"  lr draws {', '.join(f'{v:.3g}' for v in sorted(lrs))}: {100 * span:.0f}% of the log range")
    trials = [json.loads(p.read_text()) for s in sweeps for p in s.glob("*/summary.json")]
    done = [t for t in trials if t.get("best_value") is not None]
    print(f"  {len(done)} of {len(trials)} trials completed"
          + (f", best val acc {100 * max(t['best_value'] for t in done):.2f}%" if done else ""))

    if not ns.skip_tune:
        step("tune", "tune", *data, "tune.budget_epochs=60")
        for record in (work / "outputs" / "tunes").glob("*/*/tune.json"):
            tune = json.loads(record.read_text())
            print(f"  chosen {tune['chosen']['config']}: val acc {100 * tune['chosen']['mean']:.2f}%, "
                  f"test acc {100 * tune['test']['acc']:.2f}%, {tune['epochs_spent']:.1f} of 60 epochs")

    by_predict = predicted(step("predict", "predict", str(run), str(images / "val"), "--csv", "--top-k", "1"))
    step("export", "export", str(run), "--format", "onnx")
    by_onnx = predicted(step("predict", "predict", str(run / "model.onnx"), str(images / "val"), "--csv"))
    step("eval", "eval", str(run), "--splits", "test", "--predictions", str(work / "eval.csv"))
    evaluated = {row["file"]: row["predicted"] for row in csv.DictReader((work / "eval.csv").open())}

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cnnlab as api

    loaded = api.load(run)
    files = sorted(evaluated)
    loaded_classes = {}
    for start in range(0, len(files), 64):
        chunk = files[start:start + 64]
        chosen = loaded.model(loaded.preprocess(chunk)).argmax(1).tolist()
        loaded_classes.update({f: loaded.classes[c] for f, c in zip(chunk, chosen)})
    differ = {name: sum(other.get(f) != evaluated[f] for f in files)
              for name, other in (("load", loaded_classes), ("predict", by_predict), ("onnx", by_onnx))}
    print(f"disagreements with eval over {len(files)} test images: "
          + ", ".join(f"{k} {v}" for k, v in differ.items()))
    ok = failures == 0 and not any(differ.values()) and "dataset.size=auto: 48 px" in header and span >= 0.5
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
