"""Nothing loaded can run code: a pickle that would create a marker file when unpickled, handed to
every command that loads a file, gives one line and exit 2, and the marker never appears."""

from __future__ import annotations

import io
import os
import shutil

import pytest
import torch

from cnnlab.core.errors import CnnlabError
from cnnlab.runtime.checkpoint import load_checkpoint, safe_load, save_checkpoint
from cnnlab.tasks import train
from tests.conftest import TINY, compose_config, quiet_console, run_cli, run_tiny, tiny_plus


class RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A good run, and copies of it whose files (checkpoints, the viz record) would run code."""
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "MARKER"
    good = root / "good"
    run_tiny(good, "trainer.epochs=1", "viz.every_n_epochs=1")
    evil = RunsCode(marker)
    # A bare .pth for model.pretrained, and cnnlab checkpoints with a valid SHA-256 trailer: anyone can write one.
    torch.save({"fc.weight": evil}, root / "evil.pth")
    for name in ("eval_run", "resume_run", "viz_run"):
        shutil.copytree(good, root / name)
    state = load_checkpoint(good / "checkpoints" / "best.pt")
    save_checkpoint(root / "eval_run" / "checkpoints" / "best.pt", {**state, "history": [evil]})
    save_checkpoint(root / "resume_run" / "checkpoints" / "last.pt", {**state, "rng": evil})
    (root / "resume_run" / "checkpoints" / "previous.pt").unlink(missing_ok=True)
    torch.save({"classes": evil}, root / "viz_run" / "viz" / "record.pt")
    assert not marker.exists()
    return root, marker


CASES = {
    "model.pretrained": (["train", *TINY, "model.pretrained={root}/evil.pth"], "model.pretrained: {root}/evil.pth was refused"),
    "cnnlab eval": (["eval", "{root}/eval_run"], "checkpoint {root}/eval_run/checkpoints/best.pt was refused"),
    "resume=": (["train", "resume={root}/resume_run"], "checkpoint {root}/resume_run/checkpoints/last.pt was refused"),
    "cnnlab viz": (["viz", "{root}/viz_run"], "viz record {root}/viz_run/viz/record.pt was refused"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_file_that_would_run_code_is_refused_in_one_line(hostile, case):
    root, marker = hostile
    args, expected = CASES[case]
    result = run_cli(*(a.format(root=root) for a in args), cwd=root)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert expected.format(root=root) in lines[0] and "posix.system" in lines[0]
    assert not marker.exists()


def test_a_resumed_run_refuses_a_hostile_viz_record(hostile, tmp_path):
    """Training itself reads the record when it continues a run (the record is not fresh then)."""
    root, marker = hostile
    run_dir = tmp_path / "run"
    shutil.copytree(root / "good", run_dir)
    torch.save({"classes": RunsCode(marker)}, run_dir / "viz" / "record.pt")
    result = run_cli("train", *TINY, "viz.every_n_epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # continues it
    assert result.returncode == 2 and "viz record" in result.stderr and "refused" in result.stderr, result.stderr
    assert not marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_data(hostile):
    """Nothing to allow-list: torch's own scan finds no global in a checkpoint cnnlab writes."""
    root, _ = hostile
    for name in ("best.pt", "last.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(root / "good" / "checkpoints" / name)) == []
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(root / "good" / "viz" / "record.pt")) == []


def test_a_checkpoint_of_the_previous_format_still_loads_and_resumes(tmp_path):
    """Before this change numpy's RNG state was saved as numpy's own tuple with a uint32 array; those
    exact numpy types are allow-listed, so older checkpoints resume."""
    import numpy as np

    run_tiny(tmp_path / "run", "trainer.epochs=1")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    np.random.seed(3)
    state["rng"]["numpy"] = np.random.get_state()  # as the previous main wrote it
    save_checkpoint(last, state)
    assert sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(last))) == [
        "numpy._core.multiarray._reconstruct", "numpy.dtype", "numpy.ndarray"]
    restored = load_checkpoint(last)["rng"]["numpy"]
    assert isinstance(restored[1], np.ndarray) and restored[1].dtype == np.uint32
    summary = train(compose_config(*tiny_plus("trainer.epochs=2")), tmp_path / "run", console=quiet_console(), resume=True)
    assert summary["status"] == "completed" and len(summary["history"]) == 2


def test_safe_load_names_what_a_file_would_call(tmp_path):
    buffer = io.BytesIO()
    torch.save({"x": RunsCode(tmp_path / "m")}, buffer)
    with pytest.raises(CnnlabError, match=r"^thing was refused: loading it would call posix.system; cnnlab loads only"):
        safe_load(buffer.getvalue(), "thing")
    with pytest.raises(CnnlabError, match=r"^thing is unreadable or corrupt"):
        safe_load(b"not a torch file", "thing")
    assert not (tmp_path / "m").exists()
