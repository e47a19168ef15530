"""cnnlab's sweeper on Optuna: every sampler and pruner setting reaches Optuna, pruning stops a
trial at an epoch boundary, failures are told as FAIL, a grid and a range run on the study, many
workers share one study (journal file, SQLite), and a SIGKILLed worker's trial is continued."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cnnlab.core.config import CONF_DIR
from cnnlab.core.errors import CnnlabError
from cnnlab.core.plugins import load_components
from cnnlab.sweep.study import build_pruner, build_sampler, check_settings, grid_points, search_space
from cnnlab.core.shown import short_names, trial_label
from cnnlab.sweep.trials import FAILED_EXIT_STATUS
from hydra_plugins.cnnlab_sweeper import CnnlabSweeper
from tests.conftest import TINY, run_cli, start_worker

SWEEP = [o for o in TINY if not o.startswith("model.hidden")] + ["model.hidden=[16]"]


def sweeper_settings(*overrides: str):
    """hydra.sweeper from the composed config, as the sweeper reads it."""
    load_components()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    options = {k: v for k, v in cfg.hydra.sweeper.items() if k != "_target_"}
    settings = CnnlabSweeper(**options).settings(cfg)
    check_settings(settings)
    return settings


SPACE = search_space(["optimizer.lr=tag(log, interval(1e-4, 1))", "model.dropout=interval(0.0, 0.5)"])[0]


def draw(settings, trial_number: int) -> float:
    import optuna

    study = optuna.create_study(sampler=build_sampler(settings, SPACE, trial_number))
    return study.ask(SPACE).params["optimizer.lr"]


# ---- settings reach Optuna --------------------------------------------------------------------

def test_random_sampler_seeds_each_trial_from_the_runs_seed():
    settings = sweeper_settings("hydra/sweeper/sampler=random", "seed=7")
    assert type(build_sampler(settings, SPACE, 0)).__name__ == "RandomSampler" and settings.seed == 7
    assert draw(settings, 3) == draw(settings, 3)  # trial 3's values: seed and number alone
    assert draw(settings, 3) != draw(settings, 4)  # so parallel workers never draw the same
    assert draw(sweeper_settings("hydra/sweeper/sampler=random", "seed=8"), 3) != draw(settings, 3)


def test_trials_draw_from_independent_streams():
    """Seeded `seed + k`, MT19937's first draws clumped (seed 0's 4 lr draws spanned 13% of the log range) and
    seed 1's trials were seed 0's shifted by one."""
    import math

    zero, one = (sweeper_settings("hydra/sweeper/sampler=random", f"seed={s}") for s in (0, 1))
    first = [draw(zero, k) for k in range(8)]
    assert not set(first) & {draw(one, k) for k in range(8)}
    logs = [math.log10(v) for v in first[:4]]  # SPACE: log-uniform over 1e-4 .. 1, 4 decades
    assert (max(logs) - min(logs)) / 4 >= 0.5


@pytest.mark.parametrize(("overrides", "kind", "expected"), [
    (["hydra/sweeper/sampler=tpe", "hydra.sweeper.sampler.n_startup_trials=3", "hydra.sweeper.sampler.multivariate=false",
      "hydra.sweeper.sampler.constant_liar=false"], "TPESampler",
     {"_n_startup_trials": 3, "_multivariate": False, "_constant_liar": False}),
    (["hydra/sweeper/sampler=tpe"], "TPESampler", {"_n_startup_trials": 10, "_multivariate": True, "_constant_liar": True}),
    (["hydra/sweeper/sampler=sobol", "hydra.sweeper.sampler.scramble=false", "seed=5"], "QMCSampler",
     {"_scramble": False, "_seed": 5, "_qmc_type": "sobol"}),
    (["hydra/sweeper/sampler=cmaes", "hydra.sweeper.sampler.n_startup_trials=2",
      "hydra.sweeper.sampler.consider_pruned_trials=true"], "CmaEsSampler",
     {"_n_startup_trials": 2, "_consider_pruned_trials": True}),
])
def test_every_sampler_setting_reaches_optuna(overrides, kind, expected):
    sampler = build_sampler(sweeper_settings(*overrides), SPACE, 0)
    assert type(sampler).__name__ == kind
    assert {k: getattr(sampler, k) for k in expected} == expected


def test_the_grid_sampler_takes_lists_in_order_and_refuses_intervals():
    space = search_space(["optimizer.lr=0.1,0.01", "trainer.epochs=range(1,3)", "model=mlp,lenet5"])[0]
    assert [tuple(p.values()) for p in grid_points(space)][:3] == [(0.1, 1, "mlp"), (0.1, 1, "lenet5"), (0.1, 2, "mlp")]
    sampler = build_sampler(sweeper_settings(), space, 0)
    assert type(sampler).__name__ == "GridSampler" and sampler._search_space["trainer.epochs"] == [1, 2]
    with pytest.raises(CnnlabError, match="the grid sampler takes lists of values, and optimizer.lr is an interval"):
        build_sampler(sweeper_settings(), SPACE, 0)


@pytest.mark.parametrize(("overrides", "kind", "expected"), [
    ([], "NopPruner", {}),
    (["hydra.sweeper.pruner=median", "hydra.sweeper.pruning.warmup_epochs=2", "hydra.sweeper.pruning.startup_trials=3",
      "hydra.sweeper.pruning.interval_epochs=2"], "MedianPruner",
     {"_n_warmup_steps": 2, "_n_startup_trials": 3, "_interval_steps": 2, "_percentile": 50.0}),
    (["hydra.sweeper.pruner=percentile", "hydra.sweeper.pruning.percentile=40"], "PercentilePruner",
     {"_percentile": 40.0, "_n_warmup_steps": 1, "_n_startup_trials": 5}),
    (["hydra.sweeper.pruner=asha", "hydra.sweeper.pruning.min_resource=2", "hydra.sweeper.pruning.reduction_factor=4",
      "hydra.sweeper.pruning.min_early_stopping_rate=1", "hydra.sweeper.pruning.bootstrap_count=1"],
     "SuccessiveHalvingPruner",
     {"_min_resource": 2, "_reduction_factor": 4, "_min_early_stopping_rate": 1, "_bootstrap_count": 1}),
    (["hydra.sweeper.pruner=hyperband", "trainer.epochs=9"], "HyperbandPruner",
     {"_min_resource": 1, "_max_resource": 9, "_reduction_factor": 3}),  # max_resource auto: trainer.epochs
    (["hydra.sweeper.pruner=hyperband", "hydra.sweeper.pruning.max_resource=6", "hydra.sweeper.pruning.min_resource=2",
      "hydra.sweeper.pruning.bootstrap_count=2"], "HyperbandPruner",
     {"_min_resource": 2, "_max_resource": 6, "_bootstrap_count": 2}),
])
def test_every_pruner_setting_reaches_optuna(overrides, kind, expected):
    pruner = build_pruner(sweeper_settings(*overrides))
    assert type(pruner).__name__ == kind
    assert {k: getattr(pruner, k) for k in expected} == expected


@pytest.mark.parametrize(("overrides", "message"), [
    (["hydra.sweeper.pruner=ashaa"], "unknown pruner 'ashaa' (did you mean: asha?)"),
    (["+hydra.sweeper.pruning.min_resorce=2"], "hydra.sweeper.pruning has no setting 'min_resorce' (did you mean: min_resource?)"),
    (["hydra.sweeper.pruner=asha", "hydra.sweeper.pruning.reduction_factor=1"], "hydra.sweeper.pruning.reduction_factor"),
    (["hydra/sweeper/sampler=tpe", "hydra.sweeper.sampler.n_startup_trials=-1"], "hydra.sweeper.sampler.n_startup_trials"),
    (["hydra.sweeper.n_jobs=0"], "hydra.sweeper.n_jobs must be auto or an integer >= 1, got 0"),
    (["hydra.sweeper.budget_s=0"], "hydra.sweeper.budget_s must be a number of seconds > 0, got 0"),
])
def test_bad_sweeper_settings_are_one_line(overrides, message):
    with pytest.raises(CnnlabError, match=re.escape(message)):
        sweeper_settings(*overrides)


def test_the_search_grammar_maps_to_optuna_distributions():
    import optuna.distributions as d

    space = search_space(["a=tag(log, interval(1e-5, 0.1))", "b=interval(0, 4)", "c=interval(0.0, 0.5)",
                          "d=tag(int, interval(1.0, 8.0))", "e=range(2, 8, 2)", "model=mlp,lenet5", "f=1e-3,1e-2"])[0]
    assert space["a"] == d.FloatDistribution(1e-5, 0.1, log=True)
    assert space["b"] == d.FloatDistribution(0, 4) and space["c"] == d.FloatDistribution(0.0, 0.5)  # Hydra: floats
    assert space["d"] == d.IntDistribution(1, 8)
    assert space["e"].choices == (2, 4, 6) and space["model"].choices == ("mlp", "lenet5")
    assert space["f"].choices == (1e-3, 1e-2)  # numbers stay numbers
    with pytest.raises(CnnlabError, match="a: a log-scale interval needs a lower end > 0"):
        search_space(["a=tag(log, interval(0, 1))"])


def test_trials_are_named_by_what_they_vary():
    assert short_names(["optimizer.lr", "optimizer.weight_decay", "model.dropout"]) == {
        "optimizer.lr": "lr", "optimizer.weight_decay": "wd", "model.dropout": "dropout"}
    assert short_names(["model.lr", "optimizer.lr"]) == {"model.lr": "model.lr", "optimizer.lr": "optimizer.lr"}
    label = trial_label(["trainer.epochs=2", "optimizer.lr=0.012345678", "optimizer.weight_decay=0.0001", "model=mlp"],
                        ["optimizer.lr", "optimizer.weight_decay", "model"], "3")
    assert label == "lr=0.0123 wd=0.0001 model=mlp #3"


# ---- through the CLI ----------------------------------------------------------------------------

def sweep_dir(cwd: Path) -> Path:
    (found,) = (cwd / "outputs" / "sweeps").glob("*/*")
    return found


def load_study(folder: Path, storage: str = "sqlite"):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    target = (JournalStorage(JournalFileBackend(str(folder / "optuna.journal"))) if storage == "journal"
              else f"sqlite:///{folder / 'optuna.db'}")
    return optuna.load_study(study_name="synthetic-mlp", storage=target)


def test_a_pruned_trial_stops_at_an_epoch_boundary_keeps_its_checkpoint_and_says_pruned(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from cnnlab.runtime.checkpoint import load_checkpoint

    result = run_cli("train", "-m", "sweep=random_lr_wd", "hydra.sweeper.n_trials=6", "hydra.sweeper.pruner=asha",
                     *SWEEP, "trainer.epochs=4", cwd=tmp_path)
    assert result.returncode in (0, FAILED_EXIT_STATUS), result.stderr[-2000:]
    folder = sweep_dir(tmp_path)
    study = load_study(folder)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned and len(study.trials) == 6, [t.state.name for t in study.trials]
    for t in pruned:
        summary = json.loads((folder / str(t.number) / "summary.json").read_text())
        epochs = len(summary["history"])
        assert summary["status"] == "pruned" and 1 <= epochs < 4 and t.user_attrs["epochs"] == epochs
        assert sorted(t.intermediate_values) == list(range(1, epochs + 1))  # reported after every epoch
        assert t.intermediate_values[epochs] == summary["history"][-1]["val/acc"]
        assert load_checkpoint(folder / str(t.number) / "checkpoints" / "last.pt")["epoch"] == epochs
        events = EventAccumulator(summary["tensorboard"], size_guidance={"tensors": 0})
        events.Reload()
        content = events.summary_metadata["_hparams_/session_start_info"].plugin_data.content
        assert plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams["status"].string_value == "pruned"
    assert "pruned" in result.stdout.strip().splitlines()[-1]

    from cnnlab.sweep.report import report
    from tests.conftest import quiet_console

    console = quiet_console()
    summary = report(str(folder), plot=True, console=console)
    epochs = [len(json.loads((folder / str(k) / "summary.json").read_text())["history"]) for k in range(6)]
    assert summary["pruned"] == len(pruned) and summary["epochs"] == sum(epochs) and summary["unpruned_epochs"] == 24
    assert [e for e, _ in summary["best_so_far"]] == [sum(epochs[:k + 1]) for k in range(6)]
    values = [b for _, b in summary["best_so_far"]]
    assert values == sorted(values) and values[-1] == max(t.value for t in study.trials if t.value is not None)
    text = console.file.getvalue()
    assert f"epochs trained: {sum(epochs)} of the 24 an unpruned search would have spent" in text
    assert f"study: optuna-dashboard sqlite:///{folder.resolve() / 'optuna.db'}" in text
    assert (folder / "report.png").stat().st_size > 1000


def test_a_grid_and_a_range_run_on_the_study_in_order(tmp_path):
    result = run_cli("train", "-m", *SWEEP, "trainer.epochs=range(1,3)", "optimizer.lr=0.05,0.1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = sweep_dir(tmp_path)
    study = load_study(folder)
    assert [t.params for t in study.trials] == [{"trainer.epochs": e, "optimizer.lr": lr} for e in (1, 2) for lr in (0.05, 0.1)]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert [len(json.loads((folder / str(k) / "summary.json").read_text())["history"]) for k in range(4)] == [1, 1, 2, 2]
    # run again into the same folder: the study is complete, nothing runs twice
    again = run_cli("train", "-m", *SWEEP, "trainer.epochs=range(1,3)", "optimizer.lr=0.05,0.1",
                    f"hydra.sweep.dir={folder}", cwd=tmp_path)
    assert again.returncode == 0 and len(load_study(folder).trials) == 4 and "Launching" not in again.stdout + again.stderr


TRIALS = 8
WORKER = ["sweep=random_lr_wd", f"hydra.sweeper.n_trials={TRIALS}", *SWEEP, "dataset.train_size=480", "trainer.epochs=1"]


def check_distinct_trials(folder: Path, storage: str) -> set[int]:
    study = load_study(folder, storage)
    assert len(study.trials) == TRIALS and all(t.state.is_finished() for t in study.trials)
    assert sorted(t.user_attrs["job"] for t in study.trials) == list(range(TRIALS))
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == TRIALS
    assert sorted(int(p.name) for p in folder.glob("[0-9]*")) == list(range(TRIALS))
    pids = {json.loads((folder / str(k) / "trial.json").read_text())["pid"] for k in range(TRIALS)}
    return pids


@pytest.mark.integration
def test_four_worker_commands_share_one_journal_study(tmp_path):
    folder = tmp_path / "shared"
    workers = [start_worker(tmp_path, *WORKER, "hydra.sweeper.storage=journal", f"hydra.sweep.dir={folder}")
               for _ in range(4)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert all(w.returncode in (0, FAILED_EXIT_STATUS) for w in workers), [o[1][-1500:] for o in outputs]
    pids = check_distinct_trials(folder, "journal")
    assert pids <= {w.pid for w in workers} and len(pids) > 1  # they shared the work
    assert all("Traceback" not in err for _, err in outputs)


@pytest.mark.integration
def test_n_jobs_workers_share_one_sqlite_study(tmp_path):
    worker = start_worker(tmp_path, *WORKER, "hydra.sweeper.n_jobs=3", f"hydra.sweep.dir={tmp_path / 'sw'}")
    out, err = worker.communicate(timeout=300)
    assert worker.returncode in (0, FAILED_EXIT_STATUS), err[-2000:]
    pids = check_distinct_trials(tmp_path / "sw", "sqlite")
    assert len(list((tmp_path / "sw" / "workers").glob("*.log"))) == 2 and worker.pid in pids
    assert out.strip().splitlines()[-1].startswith(f"sweep: {TRIALS} trials")


@pytest.mark.integration
def test_n_jobs_starts_no_more_workers_than_trials_and_says_when_it_exceeds_the_cores(tmp_path):
    result = run_cli("train", "-m", *SWEEP, "optimizer.lr=0.05,0.1", "hydra.sweeper.n_jobs=1000",
                     f"hydra.sweep.dir={tmp_path / 'sw'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "sw" / "workers").glob("*.log"))) == 1  # one helper beside the command: 2 trials
    assert "2 at a time" in result.stdout
    assert (f"warning: hydra.sweeper.n_jobs=1000 is more than this machine's {os.cpu_count()} CPU cores; 2 workers "
            "start (2 trials)") in result.stderr


def test_max_failure_rate_stops_starting_trials_and_direction_reaches_the_study(tmp_path):
    result = run_cli("train", "-m", *SWEEP, "optimizer.lr=-1,-2,0.1,0.2", "hydra.sweeper.max_failure_rate=0.5",
                     "hydra.sweeper.direction=minimize", "hydra.sweeper.study_name=mine", cwd=tmp_path)
    assert result.returncode == FAILED_EXIT_STATUS, result.stderr[-2000:]
    import optuna

    study = optuna.load_study(study_name="mine", storage=f"sqlite:///{sweep_dir(tmp_path) / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL"]  # 1 of 1 failed > 0.5: no second trial
    assert study.direction.name == "MINIMIZE"


def test_paths_tensorboard_reaches_the_runs_event_writer(tmp_path):
    from cnnlab.training.tensorboard_log import events_dir

    assert events_dir({"paths": {"tensorboard": str(tmp_path / "tb")}}, tmp_path / "run") == tmp_path / "tb"
    assert events_dir({"paths": {"tensorboard": None}}, tmp_path / "run") == tmp_path / "run" / "tensorboard"
    from tests.conftest import run_tiny

    summary = run_tiny(tmp_path / "run", f"paths.tensorboard={tmp_path / 'tb'}")
    assert summary["tensorboard"] == str(tmp_path / "tb") and list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert not (tmp_path / "run" / "tensorboard").exists()


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie has stopped; its reaper may be slow in a container


@pytest.mark.integration
def test_helpers_stop_with_their_worker_and_a_rerun_continues_both_trials(tmp_path):
    folder = tmp_path / "sw"
    args = [*SWEEP, "dataset.train_size=3000", "trainer.log_every_n_steps=50", "trainer.epochs=3",
            "trainer.checkpoint_every_n_steps=20",
            "optimizer.lr=0.05,0.1,0.2", "hydra.sweeper.n_jobs=2", f"hydra.sweep.dir={folder}"]
    parent = start_worker(tmp_path, *args)
    deadline = time.monotonic() + 180

    def trainer(trial: Path) -> int | None:  # the pid training ``trial``, once it has checkpointed
        done = (trial / "checkpoints" / "last.pt").is_file() and not (trial / "summary.json").exists()
        return json.loads((trial / "trial.json").read_text())["pid"] if done else None

    while trainer(folder / "0") is None:
        assert parent.poll() is None and time.monotonic() < deadline, parent.communicate()[1][-2000:]
        time.sleep(0.01)
    parent.send_signal(signal.SIGSTOP)  # a start barrier: it cannot finish its trial before the helper is in one
    try:
        while not {trainer(t) for t in folder.glob("[0-9]")} - {None, parent.pid}:
            assert time.monotonic() < deadline, "the helper never trained"
            time.sleep(0.05)
    finally:
        parent.send_signal(signal.SIGCONT)
    pids = {json.loads(p.read_text())["pid"] for p in folder.glob("[0-9]/trial.json")}
    (helper,) = pids - {parent.pid}
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60
    while not _gone(helper):  # told SIGTERM by the kernel as its parent died: it checkpoints and stops
        assert time.monotonic() < deadline, "the helper outlived its worker"
        time.sleep(0.1)

    assert not list(folder.glob("[0-9]/summary.json"))  # both trials were cut off

    result = run_cli("train", "-m", *[a for a in args if a != "hydra.sweeper.n_jobs=2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("resumed from") == 2  # each cut-off trial went on from its checkpoint, in its folder
    assert result.stdout.strip().splitlines()[-1].startswith("sweep: 3 trials (3 completed), 0 failed")
    assert sorted(p.name for p in folder.glob("[0-9]*")) == ["0", "1", "2"]
    study = load_study(folder)
    states = sorted((t.state.name, t.user_attrs.get("job"), t.user_attrs.get("retry_of") is not None) for t in study.trials)
    assert states == [("COMPLETE", 0, True), ("COMPLETE", 1, True), ("COMPLETE", 2, False), ("FAIL", 0, False),
                      ("FAIL", 1, False)]
    assert all("cut off" in t.user_attrs["cut_off"] for t in study.trials if t.state.name == "FAIL")
    for job in (0, 1):
        history = json.loads((folder / str(job) / "summary.json").read_text())["history"]
        assert [r["epoch"] for r in history] == [1, 2, 3]


@pytest.mark.parametrize(("args", "message"), [
    (["hydra.sweeper.pruner=ashaa", "optimizer.lr=0.1,0.2"], "error: unknown pruner 'ashaa' (did you mean: asha?)"),
    (["optimizer.lr=interval(0.01, 0.1)"], "error: the grid sampler takes lists of values, and optimizer.lr is an interval"),
    (["hydra/sweeper/sampler=tpee", "optimizer.lr=0.1"], "error: unknown hydra/sweeper/sampler 'tpee' (did you mean: tpe?)"),
    (["hydra.sweeper.storage_retry_s=-1", "optimizer.lr=0.1"],
     "error: hydra.sweeper.storage_retry_s must be a number of seconds >= 0, got -1"),
])
def test_a_bad_sweep_is_one_line_and_writes_nothing(tmp_path, args, message):
    result = run_cli("train", "-m", *SWEEP, *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()


def test_a_slurm_job_waits_storage_retry_s_for_a_storage_it_cannot_reach_then_stops_with_75(tmp_path):
    """In a batch job nobody reads a fast line: a server that is not there yet is waited for as an outage is.
    (A command typed at a terminal says so at once: test_cluster's wrong-port case.)"""
    url = "postgresql://cnnlab:pw@127.0.0.1:9/cnnlab"  # nothing listens on port 9: connection refused
    started = time.monotonic()
    result = run_cli("train", "-m", *SWEEP, "optimizer.lr=0.1,0.2", f"hydra.sweeper.storage={url}",
                     "hydra.sweeper.storage_retry_s=1.5", cwd=tmp_path, env={"SLURM_JOB_ID": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 75 and time.monotonic() - started >= 1.5, result.stderr
    assert lines[0].startswith("warning: the study's storage postgresql") and "retrying for up to 1.5 s" in lines[0]
    assert lines[-1].startswith("error: the study's storage postgresql") and "***@127.0.0.1:9" in lines[-1]
    assert "could not be reached for 2 s (hydra.sweeper.storage_retry_s=1.5)" in lines[-1] and len(lines) == 2
    assert not (tmp_path / "outputs").exists()  # nothing was written


@pytest.mark.parametrize("url", ["postgresql+psycopg://cnnlab:s3cr%40t@127.0.0.1:55432/cnnlab",
                                 "mysql://me:pw@db.example/optuna"])
def test_the_dashboard_line_runs_as_printed_without_showing_the_password(url):
    from sqlalchemy.engine import make_url

    from cnnlab.sweep.storage import dashboard_command

    line = dashboard_command(url)
    password = url.split(":")[2].split("@")[0]
    assert password not in line and "CNNLAB_DB_PASSWORD" in line
    command = line.split("  (export")[0]
    expanded = subprocess.run(["bash", "-c", f"CNNLAB_DB_PASSWORD='{password}'; echo {command}"], capture_output=True,
                              text=True, check=True).stdout.split()
    assert expanded[0] == "optuna-dashboard" and make_url(expanded[1]) == make_url(url)  # the shell fills it in


def test_budget_epochs_stops_starting_trials_before_the_sweep_would_pass_it(tmp_path):
    result = run_cli("train", "-m", *[o for o in SWEEP if not o.startswith("trainer.epochs")], "trainer.epochs=3",
                     "hydra/sweeper/sampler=random", "optimizer.lr=tag(log, interval(0.01, 0.5))",
                     "hydra.sweeper.budget_epochs=10", "hydra.sweeper.pruner=asha", f"hydra.sweep.dir={tmp_path / 'sw'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "10 trials inside budget_epochs=10" in result.stdout
    spent = [len(json.loads((p / "summary.json").read_text())["history"]) for p in (tmp_path / "sw").glob("[0-9]*")]
    assert sum(spent) <= 10 and 10 - sum(spent) < 3  # no trial of 3 more epochs fitted
    result = run_cli("train", "-m", *SWEEP, "hydra/sweeper/sampler=random", "optimizer.lr=interval(0.01, 0.5)",
                     "hydra.sweeper.budget_epochs=1", cwd=tmp_path)
    assert result.returncode == 2 and "hydra.sweeper.budget_epochs must be a number of epochs >= one trial's " \
        "trainer.epochs=2, got 1" in result.stderr


@pytest.mark.integration
def test_each_local_worker_sees_its_own_gpu_and_the_sweep_says_which(tmp_path):
    """hydra.sweeper.gpus names two GPUs (this CPU machine has none: the assignment is what is tested, by the
    environment each worker process received, as trial.json records it): n_jobs=auto gives 2 x trials_per_gpu
    workers, each a process that sees one GPU, round-robin; this process only supervises them."""
    result = run_cli("train", "-m", *SWEEP, "optimizer.lr=0.05,0.1", "hydra.sweeper.gpus=[3,5]",
                     f"hydra.sweep.dir={tmp_path / 'sw'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"GPUs: worker 0: GPU 3, worker 1: GPU 5; their logs: {tmp_path / 'sw' / 'workers'}" in result.stdout
    assert "2 at a time" in result.stdout
    trials = [json.loads(p.read_text()) for p in (tmp_path / "sw").glob("*/trial.json")]
    assert len(trials) == 2 and {t["cuda_visible_devices"] for t in trials} <= {"3", "5"}
    by_worker = {}
    for t in trials:
        by_worker.setdefault(t["pid"], set()).add(t["cuda_visible_devices"])
    assert all(len(g) == 1 for g in by_worker.values()) and len(by_worker) <= 2  # a worker keeps its one GPU
    assert len(list((tmp_path / "sw" / "workers").glob("*.log"))) == 2


def test_workers_spread_over_the_gpus_before_sharing_one():
    from cnnlab.runtime.gpus import local_workers, visible_gpus, worker_gpus

    assert local_workers("auto", ["0", "1"], 3, "n_jobs") == 6 and local_workers("auto", [], 3, "n_jobs") == 1
    assert local_workers(5, ["0"], 1, "n_jobs") == 5
    assert worker_gpus(5, ["0", "1"]) == ["0", "1", "0", "1", "0"] and worker_gpus(2, []) == [None, None]
    assert visible_gpus([0, "GPU-5f2a"]) == ["0", "GPU-5f2a"]
    if not torch.cuda.is_available():
        assert visible_gpus("auto") == []


@pytest.mark.parametrize("override, message", [
    ("hydra.sweeper.trials_per_gpu=0", "hydra.sweeper.trials_per_gpu must be an integer >= 1, got 0"),
    ("hydra.sweeper.n_jobs=many", "hydra.sweeper.n_jobs must be auto or an integer >= 1, got 'many'"),
    ("hydra.sweeper.gpus=[0,0]", "hydra.sweeper.gpus lists a GPU twice or an empty id: [0, 0]"),
])
def test_bad_gpu_settings_are_one_line(tmp_path, override, message):
    result = run_cli("train", "-m", *SWEEP, "optimizer.lr=0.05,0.1", override, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {message}", result.stderr[-1500:]
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.json"))


def test_budget_s_stops_starting_trials_once_the_sweep_has_run_that_long(tmp_path):
    """A wall-clock budget bounds a random search with no n_trials: trials start until budget_s has passed since
    the sweep began, then the sweep ends as any sweep ends; the study records when it began."""
    started = time.time()
    result = run_cli("train", "-m", *SWEEP, "hydra/sweeper/sampler=random", "optimizer.lr=interval(0.01, 0.1)",
                     "hydra.sweeper.budget_s=4", f"hydra.sweep.dir={tmp_path / 'sw'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trials until the budget ends inside budget_s=4" in result.stdout
    import optuna

    study = optuna.load_study(study_name="synthetic-mlp", storage=f"sqlite:///{tmp_path / 'sw' / 'optuna.db'}")
    trials = study.get_trials()
    assert 1 <= len(trials) < 50 and all(t.state.name == "COMPLETE" for t in trials)
    begun = study.user_attrs["cnnlab"]["started"]
    # admitted before the clock ran out (asked a moment after, under the claim lock: a loaded machine's second)
    assert started <= begun and all(t.datetime_start.timestamp() < begun + 4 + 1 for t in trials)
    assert result.stdout.strip().splitlines()[-1].startswith(f"sweep: {len(trials)} trials")


def test_a_study_whose_start_time_is_not_a_time_is_one_line(tmp_path):
    """A study's storage may be someone else's: its recorded start (budget_s's clock) is checked, never trusted."""
    import optuna

    folder = tmp_path / "sw"
    folder.mkdir()
    study = optuna.create_study(study_name="synthetic-mlp", storage=f"sqlite:///{folder / 'optuna.db'}",
                                direction="maximize")
    study.set_user_attr("cnnlab", {"sweep_dir": str(folder.resolve()), "space": ["optimizer.lr"], "started": "soon"})
    result = run_cli("train", "-m", *SWEEP, "optimizer.lr=0.05,0.1", f"hydra.sweep.dir={folder}", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: study 'synthetic-mlp' in sqlite:///{folder / 'optuna.db'} records started='soon', not a time; the study's "
        "storage was changed by hand or is not cnnlab's"), result.stderr[-2000:]
