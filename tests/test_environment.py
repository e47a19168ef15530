"""Every run says where it came from: versions, hardware, host, command line, the git state of the working
directory (a dirty tree with a hash of its diff) and its plugins, in summary.json, trial.json and
TensorBoard's `environment` text; no git, or no repository, is a null and no warning."""

import json
import platform
import subprocess
import warnings

import torch
import torchvision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnnlab.runtime.environment import environment, git_state
from tests.conftest import TINY, run_cli


def git(folder, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_a_run_and_a_trial_record_a_dirty_tree_and_their_versions(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "train.py").write_text("print('v1')\n")
    git(tmp_path, "add", "train.py")
    git(tmp_path, "commit", "-qm", "v1")
    (tmp_path / "train.py").write_text("print('v2')\n")  # an uncommitted change
    result = run_cli("train", *TINY, "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "summary.json").read_text())["environment"]
    assert record["git"]["commit"] == git(tmp_path, "rev-parse", "HEAD") and record["git"]["dirty"] is True
    diff_hash = record["git"]["diff_sha256"]
    assert len(diff_hash) == 16
    assert (record["torch"], record["torchvision"], record["python"]) == (
        torch.__version__, torchvision.__version__, platform.python_version())
    assert "trainer.epochs=1" in record["command"] and record["threads"] >= 1 and record["cpu"] and record["host"]
    assert record["gpus"] == [] and record["cuda"] is None  # this machine has no GPU
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert "environment/text_summary" in events.Tags()["tensors"]
    (tmp_path / "train.py").write_text("print('v3')\n")  # another change: another hash
    result = run_cli("train", "-m", *TINY, "trainer.epochs=1", "optimizer.lr=0.1", f"hydra.sweep.dir={tmp_path / 'sw'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trial = json.loads((tmp_path / "sw" / "0" / "trial.json").read_text())["environment"]
    assert trial == json.loads((tmp_path / "sw" / "0" / "summary.json").read_text())["environment"]
    assert trial["git"]["dirty"] and trial["git"]["diff_sha256"] not in (None, diff_hash)


def test_no_repository_or_no_git_is_a_null_and_no_warning(tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert git_state(tmp_path) is None  # not a repository
        git(tmp_path, "init", "-q")
        assert git_state(tmp_path) == {"commit": None, "dirty": False, "diff_sha256": None}  # no commit yet
        monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
        assert git_state(tmp_path) is None  # no git at all
        assert environment(["json"])["plugins"] == {"json": json.__file__}  # a module of no distribution: its file
