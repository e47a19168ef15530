"""A foreign directory is data, never code (docs/security.md): tune and sweep directories, studies, symlinks in
run directories, the working directory, git, printed commands, secrets, and every record read back. Each hostile
case is built here, in the real on-disk formats, and handed to the real command."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import cnnlab

from cnnlab.core.errors import CnnlabError
from cnnlab.core.shown import masked, shell_line
from cnnlab.runtime.checkpoint import load_checkpoint, save_checkpoint
from cnnlab.runtime.distributed import cnnlab_command
from cnnlab.runtime.environment import git_state
from cnnlab.sweep.study import number_attr
from tests.conftest import TINY, run_cli

TUNE = [o for o in TINY if not o.startswith(("trainer.epochs", "trainer.log_every"))] + [
    "trainer.epochs=2", "trainer.log_every_n_steps=5", "tune.gate=false", "tune.top_k=1", "tune.seeds=1",
    "tune.budget_epochs=8"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run with checkpoints and a viz record, trained through the real CLI."""
    root = tmp_path_factory.mktemp("foreign")
    done = run_cli("train", *TINY, "trainer.epochs=1", "viz.every_n_epochs=1", f"hydra.run.dir={root / 'run'}", cwd=root)
    assert done.returncode == 0, done.stderr
    return root / "run"


def one_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    """The refusal: exit 2, one line, no traceback, with each of ``expected`` in it."""
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
    return result.stderr


def copy_run(finished: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir, symlinks=True)
    return run_dir


# ---- code runs ----

def stage_record(space: dict, configs: list | None = None) -> dict:
    import optuna

    return {"name": "coarse", "epochs": 2, "configs": configs or [],
            "space": {k: optuna.distributions.distribution_to_json(d) for k, d in space.items()}}


def _crafted_stages():
    from optuna.distributions import CategoricalDistribution as Choice

    return {
        "a plugin key": ({"plugins": Choice(["[evilplug]"])}, "searches 'plugins'"),
        "a resolver among the choices": ({"optimizer.lr": Choice(["${cnnlab_fresh_dir:/tmp/x}", 0.1])},
                                         "offers values this tune's space does not"),
        "an environment variable among the choices": ({"optimizer.lr": Choice(["${oc.env:CNNLAB_SECRET}"])},
                                                      "offers values this tune's space does not"),
    }


@pytest.mark.parametrize("case", ["a plugin key", "a resolver among the choices", "an environment variable among the choices"])
def test_a_crafted_tune_stage_record_is_refused_and_runs_nothing(tmp_path, case):
    space, expected = _crafted_stages()[case]
    tune = tmp_path / "tune"
    (tune / "coarse").mkdir(parents=True)
    (tune / "coarse" / "stage.json").write_text(json.dumps(stage_record(space)))
    (tmp_path / "evilplug.py").write_text(f"open({str(tmp_path / 'IMPORTED')!r}, 'w').close()\n")
    done = run_cli("tune", *TUNE, "optimizer.lr=tag(log, interval(0.01, 0.3))", f"{tune}", cwd=tmp_path,
                   env={"CNNLAB_SECRET": "s3cr3t"})
    one_line(done, f"stage record {tune / 'coarse' / 'stage.json'}", expected)
    assert not (tmp_path / "IMPORTED").exists()
    assert not [p for p in tune.rglob("*") if p.is_file() and "s3cr3t" in p.read_text(errors="replace")]
    assert not (tune / "coarse" / "0").exists()  # no trial ran


@pytest.mark.parametrize("record, expected", [
    ({"passed": True, "lr_window": "x"}, "initial_loss missing"),
    ({"passed": True, "lr_window": [1.0, 0.1], "initial_loss": 1.0, "expected_initial_loss": 1.0,
      "overfit_accuracy": 1.0, "suggested_lr": 0.1, "lowest_loss_lr": 0.1, "epochs": 0.5}, "lr_window is not two"),
    ([1, 2], "the top level should be an object"),
])
def test_a_crafted_gate_record_is_one_line(tmp_path, record, expected):
    tune = tmp_path / "tune"
    tune.mkdir()
    (tune / "gate.json").write_text(json.dumps(record))
    args = [a for a in TUNE if a not in ("tune.gate=false", "tune.budget_epochs=8")] + [
        "tune.budget_epochs=12", "tune.gate_steps=10", "tune.lr_find_steps=10", f"{tune}"]
    one_line(run_cli("tune", *args, cwd=tmp_path), f"gate record {tune / 'gate.json'}", expected)


def test_a_stage_whose_trials_all_fail_stops_the_tune_in_one_line(tmp_path):
    done = run_cli("tune", *TUNE, "model.dropout=1.5,2.0", cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    *trials, line = done.stderr.strip().splitlines()  # a line for each failed trial as it ends, then the stop
    assert len(trials) == 3 and all(t.startswith(f"trial {k} failed: model.dropout") for k, t in enumerate(trials))
    assert line.startswith("error: tune stopped: the 3 trials of stage coarse all failed; the first") and "dropout" in line
    (tune,) = (tmp_path / "outputs" / "tunes").glob("*/*")
    assert len([p for p in (tune / "coarse").iterdir() if p.name.isdigit()]) == 3


@pytest.mark.parametrize("value", ["/tmp/elsewhere", "../up", 10**30, -1, True, 1.5])
def test_a_study_attribute_used_in_a_path_is_a_whole_number_or_one_line(value):
    import optuna

    trial = optuna.trial.create_trial(value=1.0, user_attrs={"job": value})
    with pytest.raises(CnnlabError, match="not a whole number"):
        number_attr(trial, "job")
    assert number_attr(optuna.trial.create_trial(value=1.0, user_attrs={"job": 7}), "job") == 7


def test_study_attributes_of_the_wrong_kind_are_one_line():
    """A PBT member's lineage and a trial's epochs, read from a study that may be someone else's."""
    import optuna

    from cnnlab.sweep.pbt import LINEAGE, lineage_of
    from cnnlab.sweep.study import trial_epochs

    with pytest.raises(CnnlabError, match="not a list of intervals"):
        lineage_of(optuna.trial.create_trial(value=1.0, user_attrs={LINEAGE: 5}))
    with pytest.raises(CnnlabError, match="epochs='x', not a whole number"):
        trial_epochs(optuna.trial.create_trial(value=1.0, user_attrs={"epochs": "x"}))
    assert trial_epochs(optuna.trial.create_trial(value=1.0, user_attrs={"epochs": 3})) == 3


@pytest.mark.integration
def test_helpers_start_without_the_working_directory_on_the_import_path(tmp_path):
    """n_jobs >= 2 and trainer.devices start their processes with cnnlab_command: Hydra would import a
    hydra_plugins/ in the working directory if `python -m` put it on the path."""
    plugin = tmp_path / "hydra_plugins" / "planted"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text(f"open({str(tmp_path / 'IMPORTED')!r}, 'w').close()\n")
    env = {**os.environ, "PYTHONPATH": ""}
    helper = subprocess.run([*cnnlab_command("train", *TINY, "--cfg", "job")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert helper.returncode == 0 and "model:" in helper.stdout, helper.stderr
    assert not (tmp_path / "IMPORTED").exists()  # `python -m cnnlab` (what a helper was) imports it: Hydra scans sys.path


def git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b", "GIT_COMMITTER_NAME": "a",
                        "GIT_COMMITTER_EMAIL": "a@b"})


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_environment_record_runs_no_program_a_repository_names(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / ".gitattributes").write_text("*.txt filter=planted diff=planted\n")
    (repo / "a.txt").write_text("one\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "x")
    for key, marker in (("core.fsmonitor", "FSMONITOR"), ("filter.planted.clean", "CLEAN"),
                        ("diff.planted.textconv", "TEXTCONV"), ("diff.external", "EXTERNAL")):
        git(repo, "config", key, f"touch {tmp_path / marker}; cat")
    (repo / "a.txt").write_text("two\n")
    state = git_state(repo)
    assert state is not None and state["dirty"] and len(state["commit"]) == 40
    assert not list(tmp_path.glob("[A-Z]*"))  # no marker: nothing the repository's config names ran
    subprocess.run(["git", "-C", str(repo), "status"], capture_output=True)  # plain git would have run one
    assert (tmp_path / "FSMONITOR").exists() or (tmp_path / "CLEAN").exists()


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("git") is None, reason="needs root to give a folder away")
def test_another_users_repository_is_not_read(tmp_path):
    repo = tmp_path / "theirs"
    repo.mkdir()
    git(repo, "init", "-q")
    os.chown(repo, 65534, 65534)
    os.chown(repo / ".git", 65534, 65534)
    assert git_state(repo) is None


# ---- printed commands ----

def crafted_sweep(folder: Path, task_overrides: list[str]) -> None:
    """A sweep directory as `cnnlab train -m` leaves it: two trials of optimizer.lr, and its record."""
    for job, lr, value in ((0, 0.01, 0.5), (1, 0.1, 0.9)):
        (folder / str(job)).mkdir(parents=True)
        (folder / str(job) / "trial.json").write_text(json.dumps({"overrides": [f"optimizer.lr={lr}"]}))
        (folder / str(job) / "summary.json").write_text(json.dumps({
            "status": "completed", "best_value": value, "history": [{"val/acc": value, "val/loss": 1 - value}]}))
    (folder / "sweep.json").write_text(json.dumps({"monitor": "val/acc", "task_overrides": task_overrides}))


def test_report_prints_a_next_search_only_from_overrides_a_record_may_lend(tmp_path):
    sweep = tmp_path / "sweep"
    hostile = ["+hydra.callbacks.x._target_=shutil.copyfile", "model.hidden=[${oc.env:HOME}]", "plugins=[evilplug]"]
    crafted_sweep(sweep, ["optimizer.lr=0.01,0.1", "name='$(touch PWNED)'", *hostile])
    done = run_cli("report", str(sweep), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    commands = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith("cnnlab train -m")]
    assert commands, done.stdout
    for command in commands:
        words = shlex.split(command)
        assert "name='$(touch PWNED)'" in words and not any("hydra" in w or "oc.env" in w or "plugins" in w for w in words)
    assert "not repeated from" in done.stdout and all(h in done.stdout for h in hostile)
    assert commands[0] in (sweep / "report.md").read_text()


def summary_run(folder: Path, **summary) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"status": "completed", "best_value": 0.5, **summary}))
    return folder


def test_compare_prints_a_tensorboard_command_that_pastes_as_it_reads(tmp_path):
    evil = "/x'; touch PWNED; echo '"
    runs = [summary_run(tmp_path / "a", tensorboard=evil), summary_run(tmp_path / "b", name="[evilplug]")]
    done = run_cli("compare", *map(str, runs), "--tensorboard", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("tensorboard")]
    assert shlex.split(line) == ["tensorboard", "--logdir_spec", f"a:{evil},b:{tmp_path / 'b' / 'tensorboard'}"]


def test_terminal_output_shows_markup_and_control_characters_from_records_as_text(tmp_path):
    root = tmp_path / "outputs"
    summary_run(root / "one", name="[evilplug] \x1b[31mred", model="mlp")
    summary_run(root / "two", name="plain", model="[bold]x[/bold]")
    done = run_cli("runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[evilplug]" in done.stdout and "[bold]x[/bold]" in done.stdout
    assert "\x1b" not in done.stdout and "\\x1b[31mred" in done.stdout


# ---- writes stay inside ----

def test_a_symlinked_train_log_is_refused_before_anything_is_written(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    target = tmp_path / "outside.txt"
    target.write_text("theirs\n")
    (run_dir / "train.log").unlink(missing_ok=True)
    (run_dir / "train.log").symlink_to(target)
    done = run_cli("train", f"{run_dir}", "trainer.epochs=2", cwd=tmp_path)
    one_line(done, f"cannot write {run_dir / 'train.log'}: it is a symbolic link")
    assert target.read_text() == "theirs\n"


@pytest.mark.parametrize("folder, command", [
    ("checkpoints", ["train", *TINY, "trainer.epochs=2", "hydra.run.dir={run}"]),  # continues the run
    (".hydra", ["train", *TINY, "trainer.epochs=2", "hydra.run.dir={run}"]),
    ("tensorboard", ["train", *TINY, "trainer.epochs=2", "hydra.run.dir={run}"]),
    ("viz", ["viz", "{run}"]),
])
def test_a_symlinked_folder_inside_a_run_is_not_written_through(finished, tmp_path, folder, command):
    run_dir = copy_run(finished, tmp_path)
    outside = tmp_path / "outside"
    shutil.move(run_dir / folder, outside)
    (run_dir / folder).symlink_to(outside)
    def files(folder: Path) -> dict:
        return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}

    before, inside = files(outside), files(run_dir)
    done = run_cli(*(c.format(run=run_dir) for c in command), cwd=tmp_path)
    one_line(done, f"is a symbolic link inside {run_dir}")
    assert files(run_dir) == inside  # refused before anything was written
    assert files(outside) == before


def test_a_run_inside_a_tune_directory_that_links_out_of_it_is_refused(tmp_path):
    tune, outside = tmp_path / "tune", tmp_path / "outside"
    (tune / "gate").mkdir(parents=True)
    outside.mkdir()
    (tune / "gate" / "overfit").symlink_to(outside)  # where the gate's first run trains
    args = [a for a in TUNE if a not in ("tune.gate=false", "tune.budget_epochs=8")] + [
        "tune.budget_epochs=12", "tune.gate_steps=10", "tune.lr_find_steps=10"]  # the gate: 2 of its 12 epochs
    one_line(run_cli("tune", *args, f"{tune}", cwd=tmp_path), f"is a symbolic link inside {tune}")
    assert not list(outside.iterdir())


def test_a_fresh_log_in_a_linked_folder_is_refused_before_the_file_it_points_to_is_touched(tmp_path):
    """The tune's LR range test starts its console.log afresh: inside a tune directory whose gate/lr_find links out,
    neither the file there nor its folder is emptied or made."""
    from cnnlab.runtime import files

    tune, outside = tmp_path / "tune", tmp_path / "outside"
    (tune / "gate").mkdir(parents=True)
    outside.mkdir()
    (outside / "console.log").write_text("theirs\n")
    (tune / "gate" / "lr_find").symlink_to(outside)
    files.confine(tune)
    try:
        with pytest.raises(CnnlabError, match="is a symbolic link inside"):
            files.open_append(tune / "gate" / "lr_find" / "console.log", fresh=True)
    finally:
        files._ROOTS.discard(os.path.realpath(tune))  # this process's confined folders, as the test found them
    assert (outside / "console.log").read_text() == "theirs\n"


def test_report_and_export_replace_a_symlink_instead_of_writing_through_it(finished, tmp_path):
    sweep = tmp_path / "sweep"
    crafted_sweep(sweep, ["optimizer.lr=0.01,0.1"])
    run_dir = copy_run(finished, tmp_path)
    target = tmp_path / "precious.txt"
    target.write_text("theirs\n")
    for link in (sweep / "report.md", sweep / "report.csv", run_dir / "model.pt"):
        link.symlink_to(target)
    assert run_cli("report", str(sweep), cwd=tmp_path).returncode == 0
    done = run_cli("export", str(run_dir), "--format", "torchscript", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert target.read_text() == "theirs\n"
    assert not any(p.is_symlink() for p in (sweep / "report.md", sweep / "report.csv", run_dir / "model.pt"))


# ---- what a stored config may do ----

def test_a_checkpoints_stored_dataset_root_creates_no_folder_and_downloads_nothing(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    path = run_dir / "checkpoints" / "best.pt"
    state = load_checkpoint(path)
    elsewhere = tmp_path / "elsewhere" / "data"
    state["config"] = {**state["config"], "dataset": {"name": "cifar10", "root": str(elsewhere), "download": True}}
    save_checkpoint(path, state)
    done = run_cli("eval", str(run_dir), cwd=tmp_path)
    one_line(done, "CIFAR-10")
    assert not (tmp_path / "elsewhere").exists()


# ---- secrets ----

def test_secrets_are_masked_in_lines_and_records():
    assert masked("hydra.sweeper.storage=postgresql+psycopg://u:S3CRET@db:5432/x") == \
        "hydra.sweeper.storage=postgresql+psycopg://u:***@db:5432/x"
    assert masked("WANDB_API_KEY=abc db.password: hunter2 attn.key_dim=8 KEY=PATTERN") == \
        "WANDB_API_KEY=*** db.password: *** attn.key_dim=8 KEY=PATTERN"
    assert shell_line(["cnnlab", "train", "x=$(id)", "token=abc"]) == "cnnlab train 'x=$(id)' token=***"


@pytest.mark.parametrize("url", ["postgresql://u:S3CRET@127.0.0.1:notaport/x",  # the storage's own error
                                 "postgresql://u:S3CRET@[::1/x"])  # Hydra's: not an override it can parse
def test_the_storage_password_is_masked_on_the_error_line(tmp_path, url):
    done = run_cli("train", "-m", *TINY, "optimizer.lr=0.1,0.2", f"hydra.sweeper.storage={url}",
                   "hydra.sweeper.storage_retry_s=0", cwd=tmp_path)
    one_line(done, "u:***@")
    assert "S3CRET" not in done.stderr + done.stdout


# ---- hangs and memory ----

def test_a_billion_laughs_config_and_a_doubling_interpolation_chain_are_cheap(tmp_path):
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))
    chain = "v0: ha\n" + "".join(f"v{i + 1}: ${{v{i}}}${{v{i}}}\n" for i in range(60)) + "e: ${oc.env:HOME}\n"
    runs = [summary_run(tmp_path / "laughs"), summary_run(tmp_path / "chain"), summary_run(tmp_path / "plain")]
    (runs[0] / ".hydra" / "config.yaml").write_text(laughs)
    (runs[1] / ".hydra" / "config.yaml").write_text(chain)
    (runs[2] / ".hydra" / "config.yaml").write_text("v0: ha\n")
    one_line(run_cli("compare", str(runs[0]), str(runs[2]), cwd=tmp_path, timeout=60), "an alias (*a)")
    done = run_cli("compare", str(runs[1]), str(runs[2]), cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "${oc.env:HOME}" in done.stdout and os.environ["HOME"] + " " not in done.stdout  # no resolver ran


def test_a_fifo_is_refused_at_once_where_a_checkpoint_or_record_is_read(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    for name in ("checkpoints/best.pt", "summary.json"):
        (run_dir / name).unlink()
        os.mkfifo(run_dir / name)
    with pytest.raises(CnnlabError, match="is not a plain file"):  # at once: a FIFO is opened without waiting
        cnnlab.load(run_dir)
    one_line(run_cli("compare", str(run_dir), str(finished), cwd=tmp_path, timeout=60), "is a FIFO")


# ---- tracebacks from crafted records ----

def crafted(finished: Path, tmp_path: Path, name: str, text: str | None = None, data=None) -> Path:
    run_dir = copy_run(finished, tmp_path)
    path = run_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        torch.save(data, path)
    else:
        path.write_text(text)
    return run_dir


DEEP = "[" * 5000 + "]" * 5000
LOCKS = {"a list": "[1, 2]", "a string since": '{"pid": 1, "since": "yesterday"}', "a huge since": '{"since": 1e300}',
         "deep nesting": DEEP, "a 5,000-digit pid": '{"pid": ' + "9" * 5000 + "}"}


@pytest.mark.parametrize("case", list(LOCKS))
def test_a_crafted_lock_is_judged_by_its_age_not_a_traceback(finished, tmp_path, case):
    run_dir = crafted(finished, tmp_path, ".cnnlab.lock", LOCKS[case])
    (run_dir / "summary.json").unlink()  # unfinished: `runs` asks its lock whether it runs
    done = run_cli("runs", str(run_dir.parent), "--json", cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    busy = run_cli("train", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert busy.returncode == 2 and "is in use by" in busy.stderr and "Traceback" not in busy.stderr, busy.stderr


RECORDS = {  # (file in a run directory, its text, the command, what the one line says)
    "pbt.json nested deep": ("pbt.json", DEEP, ["train", "replay={run}"], "is not valid JSON"),
    "pbt.json with a 5,000-digit epoch": ("pbt.json", '{"schedule": [{"epochs": [0, ' + "9" * 5000 + "]}]}",
                                          ["train", "replay={run}"], "is not valid JSON"),
    "compare: an environment that is a list": ("summary.json", '{"environment": [1]}', ["compare", "{run}", "{run}"],
                                               "environment should be an object"),
    "compare: a history of strings": ("summary.json", '{"history": ["x"]}', ["compare", "{run}", "{run}"],
                                      "history[0] should be an object"),
    "eval: a checkpoint whose config is a list": None,
}


@pytest.mark.parametrize("case", [c for c in RECORDS if RECORDS[c]])
def test_a_crafted_record_is_one_line_naming_its_file(finished, tmp_path, case):
    name, text, command, expected = RECORDS[case]
    run_dir = crafted(finished, tmp_path, name, text)
    done = run_cli(*(c.format(run=run_dir) for c in command), cwd=tmp_path)
    one_line(done, str(run_dir / name), expected)


CHECKPOINTS = {  # how a checkpoint's contents are changed -> what the one line says
    "no trainer in its config": (lambda s: {**s, "config": {k: v for k, v in s["config"].items() if k != "trainer"}}, None),
    "a config that is a list": (lambda s: {**s, "config": [1]}, "has no config"),
    "the EMA selected, none held": (lambda s: {**s, "selected": "ema", "ema": None}, "selected the EMA weights"),
    "no preprocessing mean": (lambda s: {**s, "preprocess": {k: v for k, v in s["preprocess"].items() if k != "mean"}},
                              "preprocess.mean missing"),
    "a preprocessing tensor of the wrong shape": (lambda s: {**s, "preprocess": {**s["preprocess"], "mean": torch.zeros(7)}},
                                                  "preprocess.mean has shape (7,)"),
    "classes that are a number": (lambda s: {**s, "classes": 5}, "classes should be"),
    "an input shape of two numbers": (lambda s: {**s, "input_shape": [1, 8]}, "input_shape should be"),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_a_crafted_checkpoint_is_one_line_in_eval_export_and_load(finished, tmp_path, case):
    change, expected = CHECKPOINTS[case]
    run_dir = copy_run(finished, tmp_path)
    path = run_dir / "checkpoints" / "best.pt"
    save_checkpoint(path, change(load_checkpoint(path)))
    for command in (["eval", str(run_dir)], ["export", str(run_dir), "--format", "torchscript"]):
        done = run_cli(*command, cwd=tmp_path)
        if expected is None:  # a config without trainer settings takes their defaults
            assert done.returncode == 0, done.stderr
        else:
            one_line(done, str(path), expected)
    if expected is None:
        model, _ = cnnlab.load(run_dir)
        assert not model.training
    else:
        with pytest.raises(CnnlabError, match=re.escape(expected)):  # the API's one line: a CnnlabError
            cnnlab.load(run_dir)


@pytest.mark.parametrize("change, expected", [
    (lambda r: {**r, "filters": {0: torch.zeros(3)}}, "filters.0 should be first-layer weights"),
    (lambda r: {**r, "misclassified": {**r["misclassified"], "true": torch.full_like(r["misclassified"]["true"], 99)}},
     "misclassified.true should be class numbers below 4"),
    (lambda r: {**r, "mean": [0.5, 0.5]}, "mean and std should be one number per channel"),
])
def test_a_crafted_viz_record_is_one_line(finished, tmp_path, change, expected):
    from cnnlab.runtime.checkpoint import safe_load

    run_dir = copy_run(finished, tmp_path)
    record = run_dir / "viz" / "record.pt"
    state = safe_load(record.read_bytes(), "viz record")  # not memory-mapped: the file is rewritten in place below
    if state.get("misclassified") is None or not len(state["misclassified"]["images"]):
        state["misclassified"] = {"images": torch.zeros(1, 1, 8, 8, dtype=torch.uint8), "true": torch.tensor([0]),
                                  "predicted": torch.tensor([1]), "confidence": torch.tensor([0.9])}
    torch.save(change(state), record)
    one_line(run_cli("viz", str(run_dir), cwd=tmp_path), f"viz record {record}", expected)


def test_runs_lists_a_crafted_summary_or_overrides_file_as_unreadable(finished, tmp_path):
    root = tmp_path / "outputs"
    one = copy_run(finished, root)
    (one / "summary.json").write_text('{"selected": [1], "history": 5}')
    two = root / "two"
    shutil.copytree(finished, two)
    (two / ".hydra" / "overrides.yaml").write_text('- "\\q"\n- [1]\n- 7\n')
    done = run_cli("runs", "--json", cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    rows = {Path(r["path"]).name: r for r in json.loads(done.stdout)}
    assert rows["run"]["status"] == "unreadable" and rows["two"]["status"] == "completed"
    assert f"run summary {one / 'summary.json'} is not a valid record" in done.stderr


def test_a_sweep_summary_with_a_loss_that_is_not_finite_is_one_line(tmp_path):
    """JSON's reader takes NaN and Infinity; a report ranks on validation losses, so it refuses them."""
    from cnnlab.sweep.report import read_record

    path = tmp_path / "summary.json"
    path.write_text('{"status": "completed", "best_value": 0.5, "history": [{"val/loss": NaN}]}')
    with pytest.raises(CnnlabError, match=r"history\[0\]\.val/loss should be a finite number or null, got NaN"):
        read_record(path)
    path.write_text('{"status": "completed", "best_value": NaN, "history": [{"val/loss": 0.5}]}')  # a diverged run's
    assert read_record(path)["history"] == [{"val/loss": 0.5}]
