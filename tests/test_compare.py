"""`cnnlab compare`: a config-group switch, the values and the environment that differ (equal ones hidden unless
--all), each metric with its change, sparklines, the TensorBoard command and the plot; bad paths in one line."""

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """An mlp and a linear model, the second from a dirty git tree."""
    cwd = tmp_path_factory.mktemp("compare")
    first = run_cli("train", *TINY, "optimizer.lr=0.05", f"hydra.run.dir={cwd / 'mlp'}", cwd=cwd)
    assert first.returncode == 0, first.stderr[-2000:]
    for args in (["init", "-q"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", "-C", str(cwd), *args], check=True)
    (cwd / "edited.py").write_text("x = 1\n")
    linear = [o for o in TINY if not o.startswith("model")] + ["model=linear"]
    second = run_cli("train", *linear, "optimizer.lr=0.1", f"hydra.run.dir={cwd / 'linear'}", cwd=cwd)
    assert second.returncode == 0, second.stderr[-2000:]
    return cwd / "mlp", cwd / "linear"


def test_compare_shows_the_switch_the_differences_and_the_changes(two_runs, tmp_path):
    mlp, linear = two_runs
    result = run_cli("compare", str(mlp), str(linear), "--tensorboard", "--plot", str(tmp_path / "c.png"), cwd=tmp_path,
                     env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    line = next(line for line in out.splitlines() if "│ model " in line)
    assert "mlp" in line and "linear" in line  # the group that switched
    assert "optimizer.lr" in out and "0.05" in out and "0.1" in out
    assert "│ trainer.epochs " not in out  # equal: hidden (the command lines differ, and say so)
    assert "git.dirty" in out  # the environment: a clean tree, then a dirty one
    summaries = [json.loads((run / "summary.json").read_text()) for run in (mlp, linear)]
    change = summaries[1]["selected"]["val"]["loss"] - summaries[0]["selected"]["val"]["loss"]
    assert f"({'+' if change >= 0 else ''}{change:.3g})" in out  # val/loss with its change from the first run
    assert "val/acc by epoch" in out and "→" in out
    (line,) = [line for line in out.splitlines() if line.startswith("tensorboard ")]
    assert shlex.split(line) == ["tensorboard", "--logdir_spec",
                                 f"mlp:{summaries[0]['tensorboard']},linear:{summaries[1]['tensorboard']}"]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    every = run_cli("compare", str(mlp), str(linear), "--all", cwd=tmp_path, env={"COLUMNS": "200"})
    assert "│ trainer.epochs " in every.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["/no/such/run", "."], "error: cnnlab compare: /no/such/run is not a run directory (no such folder)"),
    (["."], "error: cnnlab compare needs two runs or more"),
])
def test_bad_runs_are_one_line(tmp_path, args, message):
    result = run_cli("compare", *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
