"""cnnlab installed anywhere and extended without forking: the built wheel runs from an empty
directory (its configs ship inside it), and a user's package, module and config folder add models,
datasets and recipes through plugins=, the cnnlab.plugins entry point and Hydra's --config-dir."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent

PARTS = '''
"""A user's components: one model and one dataset, registered into cnnlab's registries."""
import torch
from torch import nn

from cnnlab.core.registry import DATASETS, MODELS
from cnnlab.core.validation import PositiveInt
from cnnlab.data.datasets import ImageData


@MODELS.register(family="{family}")
def {model}(*, in_channels: int, num_classes: int, input_size: int, width: PositiveInt = 8) -> nn.Module:
    """A user's tiny network: one conv, global pooling, a linear head."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, num_classes))
'''

DATASET = '''

@DATASETS.register(family="stripes", input_shape=(1, 8, 8), num_classes=2)
def stripes(*, train_size: PositiveInt = 64, test_size: PositiveInt = 32) -> ImageData:
    """Horizontal against vertical stripes, 8x8 grey."""
    def make(n):
        labels = torch.arange(n) % 2
        rows = (torch.arange(8) % 2).view(1, 8, 1).expand(n, 8, 8)
        images = torch.where(labels.view(-1, 1, 1) == 0, rows, rows.transpose(1, 2))
        return (images * 255).to(torch.uint8).unsqueeze(1), labels
    (train_x, train_y), (test_x, test_y) = make(train_size), make(test_size)
    return ImageData("stripes", train_x, train_y, test_x, test_y, ["horizontal", "vertical"], (0.5,), (0.5,))
'''

QUICK = ["trainer.epochs=1", "trainer.device=cpu", "data.batch_size=16", "data.eval_batch_size=32",
         "viz.every_n_epochs=0", "viz.augment_samples=0", "viz.misclassified=0"]


def pip(*args: str, cwd: Path = REPO) -> None:
    # --no-build-isolation: build with the setuptools already installed (nothing downloaded)
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], cwd=cwd, check=True,
                   capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel of this checkout and a user's plugin package, installed into a folder of their own."""
    root = tmp_path_factory.mktemp("installed")
    wheels, target, source = root / "wheels", root / "site", root / "source"
    # The source as a fresh clone has it (a build writes build/ beside it, so not in this checkout).
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "cnnlab", "conf", "hydra_plugins"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source))
    ext = root / "ext"
    (ext / "cnnlab_ext").mkdir(parents=True)
    (ext / "cnnlab_ext" / "__init__.py").write_text("")
    (ext / "cnnlab_ext" / "parts.py").write_text(PARTS.format(family="ext", model="ext_net") + DATASET)
    (ext / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "cnnlab-ext"
        version = "0.1"
        [project.entry-points."cnnlab.plugins"]
        parts = "cnnlab_ext.parts"
        [tool.setuptools]
        packages = ["cnnlab_ext"]
    '''))
    wheel = next(wheels.glob("cnnlab-*.whl"))
    pip("install", "--no-deps", "--no-build-isolation", "--target", str(target), str(wheel), str(ext))
    return root, target, wheel


def cnnlab(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed `cnnlab` script, from ``cwd``; only the install folder (and the test environment's
    dependencies) on the path, not this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("CNNLAB_OUTPUT_DIR", "CNNLAB_DATA_DIR")}
    env.update(PYTHONPATH=str(target), OMP_NUM_THREADS="1", COLUMNS="300")
    return subprocess.run([str(target / "bin" / "cnnlab"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_wheel_holds_the_configs_and_every_package():
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in REPO.glob("cnnlab/**/__init__.py")}
    folders |= {".".join(p.parent.relative_to(REPO).parts) for p in REPO.glob("hydra_plugins/**/__init__.py")}
    assert set(listed) == folders | {"cnnlab.conf", "hydra_plugins"}  # hydra_plugins: a namespace package


@pytest.mark.integration
def test_the_installed_wheel_trains_and_lists_from_an_empty_directory(installed, tmp_path):
    root, target, wheel = installed
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "cnnlab/conf/train.yaml" in names and "cnnlab/conf/model/lenet5.yaml" in names
    where = subprocess.run([sys.executable, "-c", "import cnnlab, cnnlab.conf; print(cnnlab.__file__, cnnlab.conf.__file__)"],
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert where.stdout.split() == [str(target / "cnnlab" / "__init__.py"), str(target / "cnnlab" / "conf" / "__init__.py")]

    empty = tmp_path / "empty"
    empty.mkdir()
    result = cnnlab(target, empty, "train", "dataset=synthetic", "debug=fast", "model=lenet5", "trainer.device=cpu")
    assert result.returncode == 0, result.stderr
    summaries = list((empty / "outputs" / "runs").glob("*/*/summary.json"))
    assert len(summaries) == 1 and '"status": "completed"' in summaries[0].read_text()

    listing = cnnlab(target, empty, "list", "models", "[el]*")  # lenet5 (ours) and ext_net (the entry point's)
    assert listing.returncode == 0, listing.stderr
    assert "lenet5" in listing.stdout and "ext_net" in listing.stdout and "cnnlab-ext (entry point)" in listing.stdout


@pytest.mark.integration
def test_an_installed_plugin_package_trains_with_its_own_configs(installed, tmp_path):
    """The entry point registers ext_net and stripes; the user's YAMLs (--config-dir) select them,
    and a YAML of theirs overrides one of ours (optimizer/sgd.yaml)."""
    _, target, _ = installed
    conf = tmp_path / "my_conf"
    for group, text in (("model/ext_net.yaml", "name: ext_net\nwidth: 4\n"),
                        ("dataset/stripes.yaml", "name: stripes\ntrain_size: 64\ntest_size: 32\n"),
                        ("optimizer/sgd.yaml", "name: sgd\nlr: 0.0123\nmomentum: 0.9\nnesterov: true\ndampening: 0.0\n"
                         "weight_decay: 0.0\nweight_decay_mode: optimizer\nno_decay_norm_bias: false\n"
                         "lookahead_steps: 0\nlookahead_alpha: 0.5\n")):
        (conf / group).parent.mkdir(parents=True, exist_ok=True)
        (conf / group).write_text(text)
    result = cnnlab(target, tmp_path, "train", "--config-dir", str(conf), "model=ext_net", "dataset=stripes",
                    *QUICK, "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr
    config = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    assert "name: ext_net" in config and "width: 4" in config and "lr: 0.0123" in config
    assert "ext_net: 50 parameters" in result.stdout  # conv 1*4*9+4, head 4*2+2
    assert "stripes: 58 train / 6 val / 32 test" in result.stdout

    searchpath = cnnlab(target, tmp_path, "train", f"hydra.searchpath=[file://{conf}]", "model=ext_net",
                        "dataset=stripes", *QUICK, "--cfg", "job")  # composed from the user's YAMLs, not run
    assert searchpath.returncode == 0, searchpath.stderr
    assert "name: ext_net" in searchpath.stdout and "width: 4" in searchpath.stdout and "name: stripes" in searchpath.stdout

    unknown = cnnlab(target, tmp_path, "train", "--config-dir", str(conf), "model=ext_nte", *QUICK)
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines() == [
        "error: unknown model 'ext_nte' (did you mean: ext_net?); see all with: cnnlab list models"], unknown.stderr


@pytest.mark.integration
def test_a_module_of_the_users_through_plugins_in_runs_and_sweeps(installed, tmp_path):
    _, target, _ = installed
    (tmp_path / "my_parts.py").write_text(PARTS.format(family="mine", model="my_net"))
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "my_net.yaml").write_text("name: my_net\nwidth: 8\n")
    sweep = cnnlab(target, tmp_path, "train", "-m", "--config-dir", "conf", "plugins=[my_parts]", "model=my_net",
                   "model.width=2,3", "dataset=synthetic", "dataset.size=8", "dataset.train_size=64",
                   "dataset.test_size=16", *QUICK, "hydra.sweep.dir=sweep")
    assert sweep.returncode == 0, sweep.stderr
    assert "sweep: 2 trials (2 completed), 0 failed" in sweep.stdout
    listing = cnnlab(target, tmp_path, "list", "models", "my_*", "--plugin", "my_parts")
    assert "my_net" in listing.stdout and "plugin my_parts" in listing.stdout and "width" in listing.stdout


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("missing_mod", None, "error: plugins: no module named 'missing_mod' (looked in {cwd} and the installed packages)"),
    ("broken_mod", "raise RuntimeError('boom')\n", "error: plugin broken_mod failed to import: RuntimeError: boom"),
    ("dup_mod", "from cnnlab.core.registry import MODELS\n@MODELS.register\ndef resnet18(*, in_channels: int, "
     "num_classes: int, input_size: int):\n    pass\n",
     "error: plugin dup_mod: model 'resnet18' is already registered (by cnnlab)"),
    ("exit_mod", "import sys\nsys.exit(5)\n", "error: plugin exit_mod called sys.exit(5) while being imported"),
    ("interrupt_mod", "raise KeyboardInterrupt\n", "error: plugin interrupt_mod raised KeyboardInterrupt while being imported"),
])
def test_a_plugin_that_fails_is_one_line_naming_the_module(tmp_path, module, source, expected):
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)
    result = run_cli("train", f"plugins=[{module}]", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [expected.format(cwd=tmp_path)], result.stderr
