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
from tests.conftest import train
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
    "resume=": (["train", "{root}/resume_run"], "checkpoint {root}/resume_run/checkpoints/last.pt was refused"),
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


# --- a run directory from someone else runs nothing -----------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run with checkpoints, trained through the real CLI: resume= can continue it."""
    root = tmp_path_factory.mktemp("foreign")
    run_dir = root / "run"
    done = run_cli("train", *TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=root)
    assert done.returncode == 0, done.stderr
    return run_dir


FOREIGN_LINES = {  # an overrides.yaml entry -> what the one line says
    "+hydra.callbacks.x._target_=shutil.copyfile": "is not a cnnlab setting",
    "hydra/launcher=slurm": "is not a cnnlab setting",
    "+evil.key=1": "is not a cnnlab setting",
    "model._target_=os.system": "names a package or a private key",
    "model@foo=mlp": "names a package or a private key",
    "optimizer.lr=${oc.env:HOME}": "calls a resolver",
    "optimizer.lr=0.1,0.2": "is a sweep",
    "model=../../../tmp/evil": "is not the name of a model config",
    "plugins=[planted]": "pass plugins=[planted] on the command line yourself",
    "paths.tensorboard=/tmp/elsewhere": "a run directory lends no path",  # TensorBoard's events went there
    "dataset.root=/tmp/elsewhere": "a run directory lends no path",
}


@pytest.mark.parametrize("line", list(FOREIGN_LINES))
def test_resume_reapplies_only_cnnlab_settings_from_the_run_directory(stopped_run, tmp_path, line):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_run, run_dir)
    record = run_dir / ".hydra" / "overrides.yaml"
    entries = record.read_text().splitlines()
    # the attack the issue reports: copyfile run as a Hydra callback on resume
    planted = [f"- '{line}'", f"- +hydra.callbacks.x.src={record}", f"- +hydra.callbacks.x.dst={tmp_path / 'PWNED'}"]
    record.write_text("\n".join(entries + planted) + "\n")
    (tmp_path / "planted.py").write_text(f"open({str(tmp_path / 'IMPORTED')!r}, 'w').close()\n")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    done = run_cli("train", f"{run_dir}", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"{record} line {len(entries) + 1}" in done.stderr and FOREIGN_LINES[line] in done.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "IMPORTED").exists()
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # refused: nothing written


def test_resume_imports_a_plugin_only_when_typed_again(tmp_path):
    (tmp_path / "planted.py").write_text(f"open({str(tmp_path / 'IMPORTED')!r}, 'w').close()\n")
    run_dir = tmp_path / "run"
    done = run_cli("train", *TINY, "trainer.epochs=1", "plugins=[planted]", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "IMPORTED").exists(), done.stderr
    (tmp_path / "IMPORTED").unlink()
    refused = run_cli("train", f"{run_dir}", "trainer.epochs=2", cwd=tmp_path)
    assert refused.returncode == 2 and "the run was trained with plugins=[planted]" in refused.stderr
    assert not (tmp_path / "IMPORTED").exists()
    done = run_cli("train", f"{run_dir}", "plugins=[planted]", "trainer.epochs=2", cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "IMPORTED").exists(), done.stderr  # the user typed it


@pytest.mark.parametrize("text, expected", [("[unclosed\n", "is not valid YAML (line 2)"),
                                            ("a: b\n", "line 1: expected a list of overrides"),
                                            ("- [1, 2]\n", "line 1: expected an override")])
def test_a_garbage_overrides_file_is_one_line(stopped_run, tmp_path, text, expected):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_run, run_dir)
    (run_dir / ".hydra" / "overrides.yaml").write_text(text)
    done = run_cli("train", f"{run_dir}", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr


def test_eval_imports_no_plugin_a_checkpoint_names(tmp_path):
    plugin = tmp_path / "tinyplug.py"
    plugin.write_text(
        "import torch\nfrom torch import nn\nfrom cnnlab.core.registry import MODELS\n"
        f"open({str(tmp_path / 'IMPORTED')!r}, 'a').write('x')\n"
        "@MODELS.register(family='mine')\n"
        "def tinyplug_net(*, in_channels: int, num_classes: int, input_size: int) -> nn.Module:\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size ** 2, num_classes))\n")
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "tinyplug_net.yaml").write_text("name: tinyplug_net\n")
    trained = run_cli("train", "--config-dir", str(tmp_path / "configs"), *tiny_plus("model=tinyplug_net"),
                      "trainer.epochs=1", "plugins=[tinyplug]", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    (tmp_path / "IMPORTED").unlink()
    for command in (["eval", str(tmp_path / "run")], ["eval", str(tmp_path / "run"), "--splits", "test"]):
        refused = run_cli(*command, cwd=tmp_path)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1
        assert "was trained with plugin tinyplug; pass --plugin tinyplug to load it" in refused.stderr
        assert not (tmp_path / "IMPORTED").exists()
    scored = run_cli("eval", str(tmp_path / "run"), "--splits", "test", "--plugin", "tinyplug", cwd=tmp_path)
    assert scored.returncode == 0 and (tmp_path / "IMPORTED").exists(), scored.stderr


@pytest.mark.parametrize("name", ["../../../../tmp/x", "/abs/path", "a/b", "..", "bell\x07"])
def test_a_run_name_is_one_path_component(tmp_path, name):
    done = run_cli("train", *TINY, f"name='{name}'", cwd=tmp_path)  # quoted: Hydra's grammar takes it
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "must be one path component" in done.stderr
    assert not any(tmp_path.rglob("*")), list(tmp_path.rglob("*"))  # nothing written, here or anywhere below


def test_a_refused_train_writes_nothing(tmp_path):
    done = run_cli("train", *TINY, "trainer.epochs=0", cwd=tmp_path)
    assert done.returncode == 2 and "trainer.epochs must be an integer >= 1" in done.stderr
    assert not (tmp_path / "outputs").exists()
    (tmp_path / "outputs" / "runs").mkdir(parents=True)  # folders that were there stay
    done = run_cli("train", *TINY, "dataset.train_size=0", cwd=tmp_path)
    assert done.returncode == 2 and [p.name for p in (tmp_path / "outputs").rglob("*")] == ["runs"]
