"""scripts/gpu_acceptance.sh and scripts/gpu_bundle.sh, which must work the first time a GPU is lent: the
acceptance checks run on the CPU at a tiny scale (--smoke), and the bundle carries what the GPU machine lacks."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_data import write_mnist_files

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_acceptance.sh"


def load_bundle_module():
    spec = importlib.util.spec_from_file_location("gpu_bundle", REPO / "scripts" / "gpu_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def acceptance(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def table_rows(path: Path) -> list[list[str]]:
    """The check table's rows (after the header table), each as its cells."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| # |"))
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[start + 2:] if line.startswith("|")]


@pytest.mark.integration
def test_the_smoke_run_makes_every_check_on_the_cpu(tmp_path):
    write_mnist_files(tmp_path / "data" / "FashionMNIST" / "raw", n_train=160, n_test=32)
    table, work = tmp_path / "gpu_acceptance.md", tmp_path / "work"
    done = acceptance("--smoke", "--data-dir", str(tmp_path / "data"), "--table", str(table), "--workdir", str(work))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table_rows(table)
    checks = {row[0] for row in rows}
    assert checks == {"1a", "1c", "1a+", "1b", "2", "2b", "3", "4", "5", "6", "7", "8"}, rows
    assert all(row[3] == "not a GPU" for row in rows)  # no GPU target is claimed for a CPU run
    assert all(row[4] in ("ran", "met") for row in rows), rows
    by_check = {row[0]: row for row in rows}
    assert by_check["5"][2] == "bit-identical" and by_check["5"][4] == "met"  # deterministic: the check itself ran
    assert "losses finite" in by_check["4"][2]
    assert "compile" in by_check["1b"][2] and "aot_eager" in by_check["1b"][1]
    assert "img/s" in by_check["1a"][2] and by_check["1c"][2].endswith("%")
    assert {row[1].rsplit(": ", 1)[-1] for row in rows if row[0] == "6"} == {
        "(c) cnnlab, none", "(c) cnnlab, crop_flip", "(c) cnnlab, channels_last=false, none"}
    assert "packed 2 against one at a time" in by_check["7"][1] and "trials/min" in by_check["7"][2]
    assert "sweep: 2 trials (2 completed)" in by_check["8"][2]
    # fmnist_fast (one seed in the smoke), its wide variant, and fmnist_best: each a real run with its summary
    for name in ("fmnist_fast_seed0", "fmnist_wide_seed0", "fmnist_best"):
        assert (work / name / "summary.json").is_file()
    assert "Self CPU" in (work / "profile_resnet18_eager.txt").read_text()
    header = table.read_text()
    assert "| hardware |" in header and "| software | torch " in header and "--smoke" in header


def test_without_a_gpu_the_full_run_is_one_line(tmp_path):
    done = acceptance("--table", str(tmp_path / "t.md"), "--workdir", str(tmp_path / "w"))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "no CUDA device" in done.stderr and not (tmp_path / "t.md").exists()


def test_a_missing_or_stale_bundle_is_refused_before_anything_runs(tmp_path):
    done = acceptance("--bundle", str(tmp_path / "nowhere"), "--table", str(tmp_path / "t.md"))
    assert done.returncode == 2 and "no bundle folder" in done.stderr
    stale = tmp_path / "bundle"
    (stale / "wheels").mkdir(parents=True)
    (stale / "wheels" / "cnnlab-0.1.0-py3-none-any.whl").write_bytes(b"")
    (stale / "SOURCE").write_text("0" * 64 + "\n")
    done = acceptance("--bundle", str(stale), "--table", str(tmp_path / "t.md"), "--workdir", str(tmp_path / "w"))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "built from other cnnlab source" in done.stderr
    assert not (tmp_path / "t.md").exists() and not (tmp_path / "w").exists()


def test_the_bundle_carries_every_requirement_the_gpu_machine_lacks():
    bundle = load_bundle_module()
    carried = {name for name, _ in bundle.plan()}
    # the three the device README names, and the sweeper's Optuna with its database layer
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime", "optuna", "sqlalchemy", "alembic"} <= carried
    assert not carried & {"torch", "torchvision", "numpy", "rich", "tensorboard", "pyyaml"}  # the machine has them
    device = bundle.device_packages()
    needed = bundle.closure(bundle.project_requirements(), bundle.device_env("3.12"), stop=device)
    assert set(needed) <= device | carried
    assert bundle.unmet() == []  # this environment meets every requirement: the check the GPU machine runs


def test_the_source_digest_follows_every_source_file(tmp_path):
    bundle = load_bundle_module()
    (tmp_path / "cnnlab").mkdir()
    (tmp_path / "conf").mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "cnnlab" / "a.py").write_text("x = 1\n")
    (tmp_path / "conf" / "b.yaml").write_text("y: 1\n")
    first = bundle.source_digest(tmp_path)
    (tmp_path / "conf" / "b.yaml").write_text("y: 2\n")
    second = bundle.source_digest(tmp_path)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "c.py").write_text("z = 1\n")  # scripts travel as they are: not in the wheel
    assert first != second == bundle.source_digest(tmp_path)
