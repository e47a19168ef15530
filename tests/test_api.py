"""The Python API (cnnlab/api.py): cnnlab.train, cnnlab.compose and cnnlab.load, called as a notebook or
a script would call them: twice in one process, in a subprocess with no terminal, and from a real Jupyter
kernel."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

import cnnlab
from tests.conftest import TINY, quiet_console, run_cli


def test_train_twice_in_one_process_composes_as_the_cli_and_returns_the_selected_model(tmp_path):
    out = {"paths.output_dir": str(tmp_path)}
    logger = logging.getLogger("cnnlab")
    found = (list(logger.handlers), logger.propagate, logger.isEnabledFor(logging.INFO))  # as earlier tests left it
    first = cnnlab.train(TINY, console=quiet_console(), seed=3, optimizer__lr=0.05, **out)
    second = cnnlab.train(TINY, console=quiet_console(), seed=3, **{"optimizer.lr": 0.05}, **out)
    assert first.run_dir != second.run_dir and first.status == second.status == "completed"
    losses = [[r["train/loss"] for r in result.summary["history"]] for result in (first, second)]
    assert losses[0] == losses[1]  # the same seed, the same run: nothing carried over from the first call
    assert json.loads((first.run_dir / "summary.json").read_text())["best_value"] == first.best_value
    overrides = (first.run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "seed=3" in overrides and "optimizer.lr=0.05" in overrides  # recorded as the CLI records them
    assert not GlobalHydra.instance().is_initialized() and HydraConfig.instance().cfg is None  # nothing left behind
    # the run's log went to its train.log; the process's logging is as it was
    assert (list(logger.handlers), logger.propagate, logger.isEnabledFor(logging.INFO)) == found
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    logits = first.model(first.preprocess(images))
    assert logits.shape == (5, 4) and not first.model.training
    # the run's own evaluation: the selected weights and preprocessing score validation as summary.json says
    model, preprocess = cnnlab.load(first.run_dir)
    assert torch.equal(model(preprocess(images)), logits)
    assert torch.allclose(preprocess(images.float() / 255), preprocess(images), atol=1e-6)  # uint8 or [0, 1]


def test_compose_checks_the_config_without_training_and_reads_config_dirs(tmp_path):
    folder = tmp_path / "conf" / "model"
    folder.mkdir(parents=True)
    (folder / "tiny_mlp.yaml").write_text("name: mlp\nhidden: [7]\n")
    run = cnnlab.compose(["model=tiny_mlp"], config_dirs=[tmp_path / "conf"], trainer__epochs=5)
    assert run.components["model"].name == "mlp" and run.components["model"].options["hidden"] == [7]
    assert run.trainer.epochs == 5 and not (tmp_path / "outputs").exists()
    with pytest.raises(cnnlab.CnnlabError, match="unknown model 'tiny_mlp'"):  # the folder was this call's only
        cnnlab.compose(["model=tiny_mlp"])


@pytest.mark.parametrize("args", [["model=lenett"], ["trainer.epochs=0"], ["name=../x"], ["optimizer.lr=0.1,0.2", "-m"]])
def test_a_mistake_raises_cnnlab_error_with_the_line_the_cli_prints(tmp_path, args):
    with pytest.raises(cnnlab.CnnlabError) as raised:
        cnnlab.train([*TINY, *args], **{"paths.output_dir": str(tmp_path / "api")})
    assert not (tmp_path / "api").exists()  # a refused run writes nothing
    if args[-1] != "-m":
        cli = run_cli("train", *TINY, *args, cwd=tmp_path)
        assert cli.returncode == 2 and cli.stderr.strip() == f"error: {raised.value}"
    else:
        assert str(raised.value) == "cnnlab.train runs one training; a sweep runs with `cnnlab train -m`"


def test_load_refuses_a_wrong_choice_or_shape_in_one_line(tmp_path):
    result = cnnlab.train([*TINY, "trainer.epochs=1"], console=quiet_console(), **{"paths.output_dir": str(tmp_path)})
    last, _ = cnnlab.load(result.run_dir / "checkpoints" / "last.pt")
    assert isinstance(last, torch.nn.Module)
    with pytest.raises(cnnlab.CnnlabError, match="weights='first': choose best or last"):
        cnnlab.load(result.run_dir, weights="first")
    with pytest.raises(cnnlab.CnnlabError, match="images with 5 channels cannot be given to a model of 1"):
        result.preprocess(torch.zeros(2, 5, 8, 8))
    with pytest.raises(cnnlab.CnnlabError, match=r"preprocess: expected images \(C, H, W\) or \(N, C, H, W\)"):
        result.preprocess(torch.zeros(1, 2, 1, 8, 8))
    with pytest.raises(cnnlab.CnnlabError, match="should be uint8 .* or float"):
        result.preprocess(torch.zeros(2, 1, 8, 8, dtype=torch.int64))


def test_a_script_with_no_terminal_trains_and_exits_0(tmp_path):
    script = textwrap.dedent(f"""
        import cnnlab
        result = cnnlab.train({TINY!r}, trainer__epochs=1)
        print("status", result.status, result.run_dir.name)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("status completed ")
    assert "\x1b[" not in done.stdout  # not a terminal: no escape codes, no live progress bar
    # TINY's learning rate draws the babysitter's update/weight warning: once on the screen, and in train.log
    # as `cnnlab train` writes it (not a second time through Python's last-resort logging handler)
    assert (done.stdout + done.stderr).count("update/weight ratio") == 1, done.stdout + done.stderr
    log = (tmp_path / "outputs" / "runs").glob("*/*/train.log")
    assert "WARNING cnnlab: update/weight ratio" in next(log).read_text()


@pytest.mark.integration
def test_a_jupyter_kernel_trains_twice(tmp_path):
    jupyter_client = pytest.importorskip("jupyter_client", reason="ipykernel and jupyter_client: pip install cnnlab[dev]")
    manager, client = jupyter_client.manager.start_new_kernel(kernel_name="python3", cwd=str(tmp_path),
                                                             env={**os.environ, "PYTHONPATH": ":".join(sys.path)})
    try:
        outputs = []
        code = (f"import cnnlab\nruns = [cnnlab.train({TINY!r}, trainer__epochs=1, seed=s) for s in (0, 0)]\n"
                "print([r.status for r in runs], runs[0].summary['history'][0]['train/loss'] == "
                "runs[1].summary['history'][0]['train/loss'])")
        reply = client.execute_interactive(code, timeout=240, output_hook=lambda m: outputs.append(m))
        assert reply["content"]["status"] == "ok", reply["content"]
        printed = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        assert "['completed', 'completed'] True" in printed
        # the whole tune too, in the same kernel: its result, and the kernel still able to train after it
        tiny = [o for o in TINY if not o.startswith(("trainer.epochs", "dataset.train_size"))] + [
            "trainer.epochs=2", "dataset.train_size=320", "tune.gate=false", "tune.top_k=1", "tune.seeds=1"]
        outputs.clear()
        code = (f"search = cnnlab.tune({tiny!r}, tune__budget_epochs=10)\n"
                "after = cnnlab.train(%r, trainer__epochs=1)\n"
                "print('tuned', search.best['path'] == search.record['chosen']['run'], len(search.trials) > 2, "
                "after.status)" % (TINY,))
        reply = client.execute_interactive(code, timeout=240, output_hook=lambda m: outputs.append(m))
        assert reply["content"]["status"] == "ok", reply["content"]
        printed = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        assert "tuned True True completed" in printed, printed[-2000:]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_tune_from_python_twice_returns_its_trials_and_choice_and_leaves_nothing_behind(tmp_path):
    """cnnlab.tune runs `cnnlab tune` in this process: each call its own tune directory, every trial a row, the
    chosen trial's row, tune.json; Hydra's global state and the process's logging as they were."""
    tiny = [o for o in TINY if not o.startswith(("trainer.epochs", "dataset.train_size"))] + [
        "trainer.epochs=2", "dataset.train_size=320", "tune.gate=false", "tune.top_k=1", "tune.seeds=1"]
    logger = logging.getLogger("cnnlab")
    found = (list(logger.handlers), logger.propagate)
    hydra_found = (GlobalHydra.instance().is_initialized(), HydraConfig.instance().cfg)  # as earlier tests left it
    results = [cnnlab.tune(tiny, console=quiet_console(), tune__budget_epochs=10,
                           **{"tune.dir": tmp_path / f"tune{k}", "paths.output_dir": str(tmp_path)}) for k in (1, 2)]
    for k, result in enumerate(results, 1):
        assert result.dir == tmp_path / f"tune{k}" and result.record["dir"] == str(result.dir)
        rows = result.trials if isinstance(result.trials, list) else result.trials.to_dict("records")
        stages = {Path(r["path"]).relative_to(result.dir).parts[0] for r in rows}
        assert stages >= {"coarse", "final"} and "gate" not in stages
        assert result.best is not None and result.best["path"] == result.record["chosen"]["run"]
        assert result.record["test"]["acc"] >= 0 and result.record["epochs_spent"] <= 10
    assert (GlobalHydra.instance().is_initialized(), HydraConfig.instance().cfg) == hydra_found
    assert (list(logger.handlers), logger.propagate) == found
    with pytest.raises(cnnlab.CnnlabError, match="tune.budget_epochs"):
        cnnlab.tune(tiny, console=quiet_console(), tune__budget_epochs=0, **{"tune.dir": tmp_path / "refused"})
    assert not (tmp_path / "refused").exists()  # a refused tune writes nothing
