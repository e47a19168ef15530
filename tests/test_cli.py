"""The real `cnnlab` command, in subprocesses, as a user runs it."""

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from cnnlab.core.errors import CnnlabError
from tests.conftest import TINY, run_cli

ONE_EPOCH = [*TINY, "trainer.epochs=1"]


def test_train_writes_a_complete_run_directory(tmp_path):
    out = tmp_path / "elsewhere"
    result = run_cli("train", *ONE_EPOCH, "name=tiny", f"paths.output_dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = out.glob("runs/*/*-tiny")  # outputs/runs/<date>/<time>-<name>/
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "summary.json", "train.log",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert "epoch 1/1" in (run_dir / "train.log").read_text()
    # not a terminal: plain progress lines, then the final table
    assert "epoch 1/1 step 1/9 loss" in result.stdout and "selected model" in result.stdout
    assert not (tmp_path / "outputs").exists()  # paths.output_dir was obeyed


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=lenet"], "unknown model 'lenet' (did you mean: lenet5?); see all with: cnnlab list models"),
        (["model.hiden=[8]"], "model 'mlp' has no option 'hiden' (did you mean: hidden?); it takes: hidden, activation, dropout, batch_norm"),
        (["optimizer.lr=-1"], "optimizer.lr must be a number > 0, got -1"),
        (["trainer.epochs=many"], "trainer.epochs must be an integer, got 'many'"),
        (["augment=flipp"], "unknown augment 'flipp' (did you mean: flip?)"),
        (["optimizer.lr=[1"], "cannot parse override 'optimizer.lr=[1'"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, expected):
    result = run_cli("train", *TINY, *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {expected}" or result.stderr.strip().startswith(f"error: {expected}")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_missing_dataset_fails_with_instructions(tmp_path):
    result = run_cli("train", "dataset=cifar10", "dataset.download=false", f"paths.data_dir={tmp_path / 'nodata'}",
                     cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "CIFAR-10 not found" in result.stderr and "dataset.download=true" in result.stderr


def test_unusable_output_directory_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli("train", *ONE_EPOCH, f"paths.output_dir={blocker}/outputs", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: cannot use {blocker}") and len(result.stderr.strip().splitlines()) == 1


def test_multirun_makes_runs_with_distinct_hparams_under_one_parent(tmp_path):
    result = run_cli("train", "-m", "optimizer.lr=0.01,0.1", *ONE_EPOCH, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (sweep_dir,) = (tmp_path / "outputs" / "sweeps").glob("*/*")  # one parent: sweeps/<date>/<time>/
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert [j.name for j in jobs] == ["0", "1"]
    lrs, key_sets = [], []
    for job in jobs:
        ea = EventAccumulator(json.loads((job / "summary.json").read_text())["tensorboard"])
        ea.Reload()
        content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        lrs.append(hparams["optimizer.lr"].number_value)
        key_sets.append(set(hparams))
    assert lrs == [0.01, 0.1] and key_sets[0] == key_sets[1]


def test_cfg_job_prints_the_resolved_config(tmp_path):
    result = run_cli("train", "model=lenet5", "optimizer.lr=0.3", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0
    assert "name: lenet5" in result.stdout and "lr: 0.3" in result.stdout
    assert not (tmp_path / "outputs").exists()  # printing the config trains nothing


def test_list_shows_registry_entries_with_wildcards(tmp_path):
    result = run_cli("list", "models", cwd=tmp_path)
    assert result.returncode == 0
    for name in ("mlp", "lenet5", "small_resnet"):
        assert name in result.stdout
    assert "default dataset fashion_mnist" in result.stdout  # counted for 1x28x28
    only = run_cli("list", "models", "l*", cwd=tmp_path)
    assert "lenet5" in only.stdout and "small_resnet" not in only.stdout
    one = run_cli("list", "models", "resnet18", "--input", "3x224x224", cwd=tmp_path)
    assert "11.69M" in one.stdout and "3.63G" in one.stdout  # 1.81 G multiply-adds
    assert "variant" in one.stdout and "zero_init_residual" in one.stdout  # a single match shows its options
    knn = run_cli("list", "models", "knn", "--input", "3x48x48", cwd=tmp_path)
    assert "13.82k x train images" in knn.stdout and "needs >=" not in knn.stdout  # k-NN takes any size
    bad_input = run_cli("list", "models", "--input", "224", cwd=tmp_path)
    assert bad_input.returncode == 2 and "--input must be CxHxW" in bad_input.stderr
    for kind in ("datasets", "optimizers", "schedulers", "inits", "augments"):
        assert run_cli("list", kind, cwd=tmp_path).returncode == 0
    bad = run_cli("list", "modles", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown kind 'modles' (did you mean: models?)")


def test_unknown_command_and_version(tmp_path):
    bad = run_cli("trian", cwd=tmp_path)
    assert bad.returncode == 2 and "did you mean: train?" in bad.stderr
    assert run_cli("--version", cwd=tmp_path).stdout.startswith("cnnlab ")


@pytest.mark.parametrize(("command", "expected"), [
    ("eval", "--tta-shift N"), ("report", "--test-best"), ("viz", "RUN"), ("list", "--plugin MODULE"),
    ("lr-find", "--min-lr MIN_LR"), ("tune", "tune.budget_epochs=N"),
])
def test_every_subcommand_has_its_own_help(command, expected, capsys):
    from cnnlab.cli import main

    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as stopped:
            main([command, flag])
        assert stopped.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: cnnlab {command}") and expected in out


def test_tune_help_lists_its_settings_and_train_help_only_the_parts_of_a_run(tmp_path):
    tune = run_cli("tune", "--help", cwd=tmp_path)
    assert tune.returncode == 0 and "budget_epochs: null" in tune.stdout and "coarse_share: 0.5" in tune.stdout
    train = run_cli("train", "--help", cwd=tmp_path)
    groups = train.stdout.split("== Config groups", 1)[1].split("== Defaults", 1)[0]
    assert "\nmodel: alexnet, " in groups and "\noptimizer: adagrad, " in groups
    assert "tune" not in groups and "hydra" not in groups  # conf/tune/ is `cnnlab tune`'s, not a part of a run


def test_records_are_one_line_each_off_a_terminal(tmp_path):
    """COLUMNS=40 (run_cli): progress and epoch records still come one per line, however long."""
    result = run_cli("train", *ONE_EPOCH, "trainer.log_every_n_steps=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("epoch 1/1 step ")]
    assert steps and all(" loss " in line and " lr " in line and line.endswith("s") and "img/s eta" in line
                         for line in steps)
    (record,) = [line for line in result.stdout.splitlines() if line.startswith("epoch 1/1  train loss")]
    assert " val loss " in record and " lr " in record and record.rstrip().endswith("img/s  *best")


# --- one grammar: the table ----------------------------------------------------------------------

def test_every_command_comes_from_the_table_with_its_shared_groups(capsys, tmp_path):
    """Walks the table: the top-level usage names every command with its example; each command's --help is its
    table entry's, with every flag of each shared group it declares; no command spells a shared meaning its own way."""
    from cnnlab.cli import main
    from cnnlab.cli.table import COMMANDS, GROUPS

    shared = {a.flags[0] for group in GROUPS.values() for a in group}
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for command in COMMANDS:
        assert f"  {command.name} " in top and command.example in top
        assert not {a.flags[0] for a in command.args} & (shared - {"--out"}), command.name  # export's --out: its file
        if command.overrides:  # Hydra's help follows the table's: in a process of its own, as Hydra leaves state
            done = run_cli(command.name, "--help", cwd=tmp_path)
            code, out = done.returncode, done.stdout
        else:
            with pytest.raises(SystemExit) as stopped:
                main([command.name, "--help"])
            code, out = stopped.value.code, capsys.readouterr().out
        assert code == 0 and out.startswith(f"usage: cnnlab {command.name}"), command.name
        for group in command.groups:
            for a in GROUPS[group]:
                assert a.flags[0] in out, (command.name, a.flags[0])
        for a in command.args:
            assert a.flags[0].lstrip("-") in out or a.options.get("metavar", "") in out, (command.name, a.flags)


def test_train_and_tune_take_the_shared_flags_and_a_run_as_the_overrides_they_stand_for(capsys):
    from cnnlab.cli.arguments import hydra_arguments
    from cnnlab.cli.table import BY_NAME

    _, overrides = hydra_arguments(BY_NAME["train"], ["--device", "cpu", "--plugin", "a.b", "--plugin", "c",
                                                      "--data-dir", "/d", "outputs/runs/x", "-m", "--cfg", "job",
                                                      "model=lenet5"])
    assert overrides == ["resume=outputs/runs/x", "-m", "--cfg", "job", "model=lenet5", "plugins=[a.b,c]",
                         "paths.data_dir=/d", "trainer.device=cpu"]
    assert hydra_arguments(BY_NAME["tune"], ["tunes/t1", "tune.budget_epochs=8"])[1] == [
        "tune.dir=tunes/t1", "tune.budget_epochs=8"]
    assert capsys.readouterr().err == ""
    # the old spellings work for one release, after one line naming the new one
    assert hydra_arguments(BY_NAME["train"], ["resume=r1"])[1] == ["resume=r1"]
    assert capsys.readouterr().err == ("warning: resume=r1 is deprecated and goes in the next release: "
                                       "use cnnlab train r1\n")
    with pytest.raises(CnnlabError, match="give the run once: r2 or resume=r1"):
        hydra_arguments(BY_NAME["train"], ["r2", "resume=r1"])
    with pytest.raises(CnnlabError, match="'b' is neither key=value nor a flag"):
        hydra_arguments(BY_NAME["train"], ["a", "b"])


def test_a_sweep_or_tune_directory_stands_for_its_trials_in_their_order(tmp_path):
    from cnnlab.cli.handlers import run_paths

    for trial in ("0", "2", "10"):
        (tmp_path / "sweep" / trial).mkdir(parents=True)
        (tmp_path / "sweep" / trial / "trial.json").write_text("{}")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "best.pt").write_bytes(b"")
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    assert run_paths([str(tmp_path / "sweep"), str(tmp_path / "run"), str(checkpoint)], checkpoints=True) == [
        tmp_path / "sweep" / "0", tmp_path / "sweep" / "2", tmp_path / "sweep" / "10", tmp_path / "run", checkpoint]
    assert run_paths([str(tmp_path / "nowhere")], checkpoints=False) == [tmp_path / "nowhere"]  # its command says why


@pytest.mark.integration
def test_the_docs_site_builds_with_every_warning_an_error_and_its_generated_parts_are_current(tmp_path):
    """docs/ builds with Sphinx (-W -n: a warning, a broken link among them, fails it), and the generated parts (the
    CLI, config and model references, the README's table of commands) are what scripts/docs_reference.py makes now."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    check = subprocess.run([sys.executable, str(repo / "scripts" / "docs_reference.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    built = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html",
                            str(repo / "docs"), str(tmp_path / "html")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "html" / "guides" / "sweeps.html").is_file()
    assert "resnet18" in (tmp_path / "html" / "reference" / "models.html").read_text()


def test_the_shared_output_and_device_flags_reach_what_they_set(tmp_path):
    """--out FILE writes the --json/--csv data (by flag or by suffix), `runs` finds the output folder as train was
    told it (paths.output_dir=), and export's --device reaches the run it loads."""
    import csv

    run = tmp_path / "elsewhere" / "runs" / "one"
    assert run_cli("train", *TINY, "trainer.epochs=1", f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    listed = run_cli("runs", f"paths.output_dir={tmp_path / 'elsewhere'}", "--out", str(tmp_path / "rows.csv"),
                     cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout == "", listed.stderr
    rows = list(csv.DictReader((tmp_path / "rows.csv").open()))
    assert [Path(r["path"]) for r in rows] == [run]
    as_json = run_cli("runs", str(tmp_path / "elsewhere"), "--json", "--out", str(tmp_path / "rows.txt"), cwd=tmp_path)
    assert as_json.returncode == 0 and json.loads((tmp_path / "rows.txt").read_text())[0]["path"] == str(run)
    assert run_cli("runs", "--out", str(tmp_path / "rows.txt"), cwd=tmp_path).returncode == 2  # which format?
    exported = run_cli("export", str(run), "--format", "safetensors", "--device", "cuda:7", cwd=tmp_path)
    assert exported.returncode == 2 and "cuda" in exported.stderr and not (run / "model.safetensors").exists()
