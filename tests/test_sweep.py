"""Sweeps through the real CLI: failing trials are recorded and the sweep goes on, Optuna's random
search, resume, the report's ranking and coarse-to-fine advice, and one test of the chosen trial."""

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from cnnlab.core.validation import Range
from cnnlab.sweep.report import Searched, option_range, refine, report, searched_parameters
from cnnlab.sweep.trials import FAILED_EXIT_STATUS
from cnnlab.runtime.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import TINY, quiet_console, run_cli

SWEEP = [o for o in TINY if not o.startswith("model.hidden")] + ["model.hidden=[16]"]


def sweep_dir(cwd: Path) -> Path:
    (found,) = (cwd / "outputs" / "sweeps").glob("*/*")
    return found


def summaries(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*/summary.json")}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """4 trials: two train, lr=50 diverges, lr=-1 raises (an invalid value inside the trial)."""
    cwd = tmp_path_factory.mktemp("grid")
    result = run_cli("train", "-m", *SWEEP, "optimizer.lr=0.01,0.3,50,-1", cwd=cwd)
    return cwd, result


def test_failing_trials_are_recorded_and_the_sweep_finishes(grid):
    cwd, result = grid
    folder = sweep_dir(cwd)
    assert result.returncode == FAILED_EXIT_STATUS, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("sweep: 4 trials (2 completed, 1 diverged, 1 failed), 2 failed")
    s = summaries(folder)
    assert [s[k]["status"] for k in "0123"] == ["completed", "completed", "diverged", "failed"]
    assert s["2"]["error"].startswith("loss diverged at step") and len(s["2"]["history"]) <= 1  # in epoch 1 or 2
    assert s["3"]["error"] == "optimizer.lr must be a number > 0, got -1"
    assert "Traceback" not in result.stderr


def test_trials_are_not_tested_unless_asked(grid):
    cwd, _ = grid
    for summary in summaries(sweep_dir(cwd)).values():
        assert "test" not in (summary.get("selected") or {})


def test_every_trial_is_in_the_hparams_dashboard_named_by_its_values_with_its_status(grid):
    cwd, _ = grid
    folder = sweep_dir(cwd)
    keys, statuses = [], {}
    for job, label in enumerate(["lr=0.01 #0", "lr=0.3 #1", "lr=50 #2", "lr=-1 #3"]):
        trial = folder / "tensorboard" / label
        if job < 2:
            assert json.loads((folder / str(job) / "summary.json").read_text())["tensorboard"] == str(trial)
        events = EventAccumulator(str(trial), size_guidance={"tensors": 0})
        events.Reload()
        content = events.summary_metadata["_hparams_/session_start_info"].plugin_data.content
        info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        keys.append(set(info.hparams))
        statuses[label] = info.hparams["status"].string_value
        if job < 2:  # finished trials end with their selected metrics
            assert events.Scalars("selected/val_acc")
    assert len(keys) == 4 and all(k == keys[0] for k in keys) and "optimizer.lr" in keys[0]
    assert list(statuses.values()) == ["completed", "completed", "diverged", "failed"]
    assert not list(folder.glob("[0-9]*/tensorboard"))  # one folder per trial, named, in <sweep>/tensorboard


def test_report_ranks_on_validation_and_puts_failures_last(grid):
    cwd, _ = grid
    folder = sweep_dir(cwd)
    result = report(str(folder), console=quiet_console())
    s = summaries(folder)
    finished = sorted(["0", "1"], key=lambda k: -s[k]["best_value"])
    assert result["ranking"][:2] == finished and set(result["ranking"][2:]) == {"2", "3"}
    assert result["best"] == finished[0] and result["failed"] == 2
    csv_rows = (folder / "report.csv").read_text().splitlines()
    assert csv_rows[0].startswith("best,trial,optimizer.lr,status") and csv_rows[1].startswith(f"*,{finished[0]},")
    assert "| * |" in (folder / "report.md").read_text()


def test_test_best_scores_exactly_one_checkpoint_on_test(grid, monkeypatch):
    cwd, _ = grid
    folder = sweep_dir(cwd)
    import cnnlab.analysis.evaluation as evaluation

    calls = []
    original = evaluation.evaluate_runs

    def counting(targets, **kwargs):
        calls.append((list(targets), kwargs["splits"]))
        return original(targets, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_runs", counting)
    result = report(str(folder), test_best=True, device="cpu", console=quiet_console())
    assert calls == [([str(folder / result["best"])], ["test"])]
    written = json.loads((folder / "test_best.json").read_text())
    assert written["trial"] == result["best"] and 0 <= written["acc"] <= 1


def test_report_of_a_folder_without_trials_is_one_clear_error(tmp_path):
    result = run_cli("report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "holds no trials" in result.stderr and "Traceback" not in result.stderr


# --- Optuna --------------------------------------------------------------------------------------

def test_optuna_random_sweep_samples_log_uniform_lrs_and_keeps_its_study(tmp_path):
    # up to 0.1: SGD at 0.7 diverges on this tiny MLP, and every trial here should complete
    result = run_cli("train", "-m", "sweep=random_lr_wd", "hydra.sweeper.n_trials=4", *SWEEP,
                     "optimizer.lr=tag(log, interval(0.0001, 0.1))", cwd=tmp_path)
    assert result.returncode in (0, FAILED_EXIT_STATUS), result.stderr[-2000:]
    folder = sweep_dir(tmp_path)
    lrs = [dict(o.split("=", 1) for o in json.loads((folder / str(i) / "trial.json").read_text())["overrides"]
                if o.startswith("optimizer."))["optimizer.lr"] for i in range(4)]
    assert all(1e-4 <= float(lr) <= 0.1 for lr in lrs) and len(set(lrs)) == 4
    import optuna

    study = optuna.load_study(study_name="synthetic-mlp", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert len(study.trials) == 4 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert study.direction.name == "MAXIMIZE"  # from trainer.monitor=val/acc
    record = json.loads((folder / "sweep.json").read_text())
    (searched,) = [s for s in searched_parameters(record) if s.key == "optimizer.lr"]
    assert (searched.low, searched.high, searched.log) == (1e-4, 0.1, True)


def test_the_log_tag_samples_uniformly_in_log_space():
    import optuna

    from cnnlab.sweep.study import search_space

    (distribution,) = search_space(["optimizer.lr=tag(log, interval(0.0001, 1.0))"])[0].values()
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    exponents = torch.tensor([math.log10(sampler.sample_independent(study, None, "lr", distribution))
                              for _ in range(4000)])
    assert -4 <= exponents.min() and exponents.max() <= 0
    # uniform on [-4, 0]: each decade holds a quarter of the draws
    counts = torch.histc(exponents, bins=4, min=-4, max=0) / 4000
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.03)


# --- resume -------------------------------------------------------------------------------------

def test_an_interrupted_basic_sweep_resumes_skipping_finished_trials(tmp_path):
    """Hydra's basic sweeper (no study): sweep.resume=true finds the trials by their overrides."""
    args = ["train", "-m", "hydra/sweeper=basic", *SWEEP, "trainer.epochs=2", "optimizer.lr=0.03,0.1,0.3"]
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    folder = sweep_dir(tmp_path)
    finished_before = (folder / "0" / "summary.json").read_text()
    # trial 1 was cut off after its first epoch: summary gone, checkpoint rolled back to epoch 1
    state = load_checkpoint(folder / "1" / "checkpoints" / "last.pt")
    first_epoch = state["history"][0]
    state.update(epoch=1, step=first_epoch["step"], history=[first_epoch])
    save_checkpoint(folder / "1" / "checkpoints" / "last.pt", state)
    (folder / "1" / "summary.json").unlink()
    # trial 2 never started
    import shutil

    shutil.rmtree(folder / "2")

    result = run_cli(*args, f"hydra.sweep.dir={folder}", "sweep.resume=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (folder / "0" / "summary.json").read_text() == finished_before  # skipped, not retrained
    assert "resumed from" in result.stdout and "after epoch 1" in result.stdout
    resumed = json.loads((folder / "1" / "summary.json").read_text())
    assert [r["epoch"] for r in resumed["history"]] == [1, 2] and resumed["history"][0] == first_epoch
    assert json.loads((folder / "2" / "summary.json").read_text())["status"] == "completed"
    assert result.stdout.strip().splitlines()[-1].startswith("sweep: 3 trials (3 completed), 0 failed")


# --- parallel trials --------------------------------------------------------------------------------

def test_joblib_launcher_runs_a_basic_sweeps_trials_in_parallel_processes(tmp_path):
    result = run_cli("train", "-m", "hydra/sweeper=basic", *SWEEP, "trainer.epochs=1", "optimizer.lr=0.03,0.1",
                     "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = sweep_dir(tmp_path)
    pids = {json.loads((folder / n / "trial.json").read_text())["pid"] for n in ("0", "1")}
    for pid in pids:  # loky keeps its idle workers for 300 s after the sweep (700 MB each): this test's, stopped now
        with contextlib.suppress(OSError):
            if b"loky" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGTERM)
    assert len(pids) == 2
    assert {s["status"] for s in summaries(folder).values()} == {"completed"}


# --- coarse to fine -------------------------------------------------------------------------------

@pytest.mark.parametrize(("item", "best", "where", "syntax"), [
    (Searched("optimizer.lr", values=[0.001, 0.01, 0.1], log=True), 0.1, "on the edge", "0.01,0.1,1"),
    (Searched("optimizer.lr", values=[0.001, 0.01, 0.1], log=True), 0.001, "on the edge", "0.0001,0.001,0.01"),
    (Searched("model.dropout", values=[0.0, 0.2, 0.4]), 0.4, "on the edge", "0.2,0.4,0.6"),
    (Searched("optimizer.lr", values=[0.001, 0.01, 0.1], log=True), 0.01, "inside", "0.00316228,0.01,0.0316228"),
    (Searched("optimizer.lr", low=1e-4, high=1.0, log=True), 0.9, "on the edge", "tag(log, interval(0.009, 90))"),
    (Searched("optimizer.lr", low=1e-4, high=1.0, log=True), 0.01, "inside", "tag(log, interval(0.001, 0.1))"),
    (Searched("model.dropout", low=0.0, high=0.5), 0.02, "on the edge", "interval(0, 0.27)"),
])
def test_refine_moves_the_window_off_an_edge_and_narrows_inside(item, best, where, syntax):
    assert refine(item, best) == (where, syntax)


def test_report_flags_an_edge_best_and_prints_the_command(tmp_path):
    folder = tmp_path / "sweep"
    record = {"task_overrides": ["model=mlp", "optimizer.lr=0.001,0.01,0.1"], "sweeper_params": {},
              "monitor": "val/loss"}
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps(record))
    for i, (lr, loss) in enumerate([(0.001, 0.9), (0.01, 0.5), (0.1, 0.3)]):
        (folder / str(i)).mkdir()
        (folder / str(i) / "trial.json").write_text(json.dumps({"overrides": ["model=mlp", f"optimizer.lr={lr}"]}))
        history = [{"epoch": 1, "val/loss": loss, "val/acc": 1 - loss}]
        (folder / str(i) / "summary.json").write_text(json.dumps(
            {"status": "completed", "best_value": loss, "history": history, "wall_time_s": 1.0}))
    result = report(str(folder), plot=True, console=quiet_console())
    assert result["ranking"] == ["2", "1", "0"]  # val/loss: lower is better
    (advice,) = result["advice"]
    assert advice["where"] == "on the edge" and advice["command"] == "cnnlab train -m model=mlp optimizer.lr=0.01,0.1,1"
    assert (folder / "report.png").stat().st_size > 1000
    # --plot FILE, as compare takes it: the plot there, through the command
    from tests.conftest import run_cli

    done = run_cli("report", str(folder), "--plot", str(tmp_path / "mine.png"), cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "mine.png").stat().st_size > 1000, done.stderr


def _proposed(syntax: str) -> list[float]:
    inner = syntax.removeprefix("tag(log, ").removesuffix(")")
    inner = inner.removeprefix("interval(").removesuffix(")")
    return [float(v) for v in inner.replace(" ", "").split(",")]


@pytest.mark.parametrize(("key", "valid"), [
    ("optimizer.lr", Range(gt=0)), ("model.dropout", Range(ge=0, lt=1)), ("optimizer.momentum", Range(ge=0, le=1)),
    ("trainer.label_smoothing", Range(ge=0, lt=1)), ("augment.ops.cutout.size", Range(ge=1)),
])
def test_refine_never_proposes_a_value_outside_the_options_range(key, valid):
    """Log-spaced, uneven and edge grids and intervals, with the best anywhere, in 2,000 draws."""
    rng = random.Random(0)
    low = valid.gt if valid.gt is not None else valid.ge
    high = valid.lt if valid.lt is not None else (valid.le if valid.le is not None else 10.0)
    proposals = 0
    for _ in range(2000):
        draw = sorted({round(rng.uniform(low, high), 4) for _ in range(rng.randint(2, 5))})
        draw = [v for v in draw if valid.contains(v)]
        if len(draw) < 2:
            continue
        log = draw[0] > 0 and rng.random() < 0.5
        best = rng.choice(draw + [draw[0], draw[-1]])  # edges often
        for item in (Searched(key, values=draw, log=log, valid=valid),
                     Searched(key, low=draw[0], high=draw[-1], log=log, valid=valid)):
            refined = refine(item, best if item.values else min(max(best, draw[0]), draw[-1]))
            if refined is None:
                continue
            proposals += 1
            assert all(valid.contains(v) for v in _proposed(refined[1])), (item, best, refined)
    assert proposals > 2000


def test_a_grid_over_decades_is_refined_in_log_space_and_stays_positive(tmp_path):
    """The issue's case: after optimizer.lr=0.01,0.05,1e6 the report proposed -250000,0.05,250000."""
    result = run_cli("train", "-m", *TINY, "trainer.epochs=1", "optimizer.lr=0.01,0.05,1e6",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 3, result.stderr  # lr 1e6 diverges
    report_run = run_cli("report", str(tmp_path / "sweep"), cwd=tmp_path)
    assert report_run.returncode == 0, report_run.stderr
    (advice,) = [line for line in report_run.stdout.splitlines() if line.strip().startswith("cnnlab train -m")]
    value = advice.split("optimizer.lr=")[1].strip("'")
    proposed = [float(v) for v in value.split(",")]
    assert all(v > 0 for v in proposed) and len(proposed) == 3
    ratios = [b / a for a, b in zip(proposed, proposed[1:])]
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-4) and ratios[0] > 1.5  # geometric


def test_rates_and_decays_are_searched_in_log_space_and_ranges_come_from_annotations():
    items = {s.key: s for s in searched_parameters({"task_overrides": [
        "optimizer.lr=0.02,0.04,0.06", "optimizer.weight_decay=1e-4,2e-4,3e-4", "model.dropout=0.1,0.2,0.3"]})}
    assert items["optimizer.lr"].log and items["optimizer.weight_decay"].log and not items["model.dropout"].log
    config = {"optimizer": {"name": "sgd"}, "model": {"name": "mlp"}}
    assert option_range(config, "optimizer.lr") == Range(gt=0)
    assert option_range(config, "optimizer.momentum") == Range(ge=0, le=1)
    assert option_range(config, "trainer.label_smoothing") == Range(ge=0, lt=1)
    assert option_range(config, "augment.ops.cutout.size") == Range(ge=1)
    assert option_range(config, "model.nonexistent") is None


# --- live views: optuna-dashboard and TensorBoard, real servers on 127.0.0.1 -----------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(command: list[str], url: str, timeout: float = 90):
    """Start a server, wait until ``url`` answers; returns the process (the caller stops it)."""
    import subprocess
    import time
    import urllib.request

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"{command[0]} did not serve {url}: {process.stderr.read()[-2000:]}")
            time.sleep(0.3)


def _json(url: str, body: dict | None = None):
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def test_the_study_is_told_failures_as_fail_with_their_reason(grid):
    import optuna

    folder = sweep_dir(grid[0])
    study = optuna.load_study(study_name="synthetic-mlp", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    assert [t.value for t in study.trials[2:]] == [None, None]  # no fake ±inf for the samplers
    assert study.trials[2].user_attrs["fail_reason"].startswith("loss diverged at step")
    assert study.trials[3].user_attrs["fail_reason"] == "optimizer.lr must be a number > 0, got -1"
    assert study.trials[0].value == json.loads((folder / "0" / "summary.json").read_text())["best_value"]


def test_optuna_dashboard_serves_the_sweeps_study(grid):
    import shutil

    folder = sweep_dir(grid[0])
    port = _free_port()
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    process = _serve([dashboard, f"sqlite:///{folder / 'optuna.db'}", "--host", "127.0.0.1", "--port", str(port)],
                     f"http://127.0.0.1:{port}/api/meta")
    try:
        (summary,) = _json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert summary["study_name"] == "synthetic-mlp" and summary["directions"] == ["maximize"]
        study = _json(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}")
        assert [t["state"] for t in study["trials"]] == ["Complete", "Complete", "Fail", "Fail"]
        assert [t["params"][0]["param_external_value"] for t in study["trials"]] == ["0.01", "0.3", "50", "-1"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_tensorboard_opens_the_sweep_on_what_it_searched(grid):
    folder = sweep_dir(grid[0])
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    process = _serve([sys.executable, "-m", "tensorboard.main", "--logdir", str(folder), "--host", "127.0.0.1",
                      "--port", str(port)], f"{base}/data/runs")
    try:
        deadline = time.monotonic() + 60
        while len(_json(f"{base}/data/runs")) < 5:  # the experiment record and 4 trials
            assert time.monotonic() < deadline
            time.sleep(0.5)
        experiment = _json(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        infos = experiment["hparamInfos"]
        # only what the sweep varied, and the status: TensorBoard ticks the first five columns listed
        assert [(i["name"], i.get("differs")) for i in infos] == [("optimizer.lr", True), ("status", True)]
        assert [m["name"]["tag"] for m in experiment["metricInfos"]] == ["best/val_acc", "selected/val_acc",
                                                                        "selected/val_loss"]
        groups = _json(f"{base}/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]})["sessionGroups"]
        seen = {g["name"]: (g["hparams"]["status"], g["sessions"][0]["status"]) for g in groups}
        assert seen == {"tensorboard/lr=0.01 #0": ("completed", "STATUS_SUCCESS"),
                        "tensorboard/lr=0.3 #1": ("completed", "STATUS_SUCCESS"),
                        "tensorboard/lr=50 #2": ("diverged", "STATUS_FAILURE"),
                        "tensorboard/lr=-1 #3": ("failed", "STATUS_FAILURE")}
    finally:
        process.terminate()
        process.wait(timeout=30)
