"""Every `cnnlab` command of the guides (the ```bash blocks of docs/start.md and docs/guides/*.md) runs, through
the real CLI, so that a guide cannot drift from the code: a renamed key, group, flag or command fails here.

The guides' commands are written at full size, for the user's data; they run here at a tiny size, by these rules
(the documented fixture):

- **Places.** A placeholder or example path becomes a real one made by the fixture: a run
  (``outputs/runs/...``, ``<run dir>``, ``RUN_A``), its checkpoint (``best.pt``, ``.../checkpoints/best.pt``), a
  sweep (``outputs/sweeps/...``; a brace list of trials becomes its trials 0, 1, 2), and a folder of small JPEGs
  in three classes for every ``~/...`` image folder, glob and ``photo.jpg``. ``hydra.sweep.dir=/shared/...`` moves
  under the test's folder.
- **Size.** train, tune and lr-find get tiny settings after the guide's own: synthetic images shaped like the
  dataset named (1x28x28 for Fashion-MNIST and MNIST, 3x32x32 for the CIFAR-like sets; an image folder stays the
  fixture's folder), 1 epoch of 3 batches of 16, on the CPU; a search runs 2 trials (PBT: 4 members, 2 intervals),
  a tune inside 8 epochs without its sanity gate (tests/test_tune.py runs the gate); an image_fit run fits a 16x16
  image; ``trainer.devices=4`` starts 2 processes. A run continued (``cnnlab train RUN``) is a copy of the
  fixture's run on synthetic images, with its own config, trained on to at most 3 epochs; a PBT member replayed
  keeps its own config.
- **Outcomes.** Each command exits 0, except those in EXPECTED, which end as written there, and why.

Lines of a block that are not `cnnlab` commands run by other means: shell lines that make files (``mkdir``,
``printf``) run in the test's folder; ``bash scripts/setup.sh`` and the test command are .ci/run's; ``sbatch``,
``srun`` and the SLURM launcher run in tests/test_cluster.py against a real cluster; ``torchrun`` and several
processes in tests/test_distributed.py; ``pip`` and ``tensorboard`` are not cnnlab's.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY, cpu_seconds, run_cli
from tests.test_own_images import write_classes

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "docs" / "start.md", *sorted((REPO / "docs" / "guides").glob("*.md"))]
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
PYTHON_FILE = re.compile(r"```python\n# (\w+\.py)[^\n]*\n(.*?)```", re.S)

# Commands that end otherwise, and why: (a part of the command line) -> (exit status, a part of its stderr).
EXPECTED = {
    "model.pretrained=~/weights/resnet18-f37072fd.pth": (2, "resnet18-f37072fd.pth"),  # torchvision's ImageNet file: a download
    "hydra/launcher=slurm": (2, "hydra/launcher=slurm"),  # no SLURM here: one line before any trial (test_cluster runs it)
    "model=resnet18 model.pretrained=best.pt": (2, "best.pt"),  # the guide's best.pt is a ResNet-18's; the fixture's is not
    # the guide continues a stopped run; the fixture's finished (a stopped one continues in tests/test_resume.py)
    "14-03-11-fashion_mnist-small_resnet": (2, "raise trainer.epochs to train on"),
}
NOT_CNNLAB = ("pip ", "tensorboard ", "sbatch ", "srun ", "torchrun ", "bash scripts/", "set -", "head=", "procs=")
DOWNLOADED = {"cifar10": (3, 32), "cifar100": (3, 32), "svhn": (3, 32), "stl10": (3, 32), "mnist": (1, 28),
              "fashion_mnist": (1, 28)}


def commands() -> list[tuple[str, str]]:
    """(page, command line) for every `cnnlab` line of the guides' bash blocks, continuations joined."""
    found = []
    for page in PAGES:
        for block in BLOCK.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()  # a trailing comment
                if line and not line.startswith("#"):
                    found.append((page.name, line))
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("guides")
    photos = root / "photos"
    write_classes(photos, per_class=8)
    places = {"root": root, "photos": photos}
    tiny = [o for o in TINY if not o.startswith(("model", "dataset"))]
    for name, extra in (("run", ["dataset=imagefolder", f"dataset.root={photos}", "model=mlp", "model.hidden=[16]"]),
                        ("run2", ["dataset=imagefolder", f"dataset.root={photos}", "model=mlp", "model.hidden=[8]"]),
                        ("lenet", ["dataset=synthetic", "dataset.channels=1", "dataset.size=28", "dataset.classes=4",
                                   "dataset.train_size=160", "dataset.test_size=40", "model=lenet5"]),
                        ("default", ["dataset=synthetic", "dataset.channels=1", "dataset.size=28", "dataset.classes=4",
                                     "dataset.train_size=160", "dataset.test_size=40"])):
        done = run_cli("train", *tiny, *extra, "trainer.epochs=1", f"hydra.run.dir={root / name}", cwd=root)
        assert done.returncode == 0, done.stderr[-2000:]
        places[name] = root / name
    done = run_cli("train", "-m", *tiny, "dataset=imagefolder", f"dataset.root={photos}", "model=mlp",
                   "model.hidden=[16]", "trainer.epochs=1", "optimizer.lr=0.01,0.05,0.1",
                   f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    places["sweep"] = root / "sweep"
    for page in PAGES:  # the Python files a guide asks you to write (# my_models.py)
        for name, source in PYTHON_FILE.findall(page.read_text()):
            (root / name).write_text(source)
    return places


def placed(line: str, w: dict, state: dict) -> str:
    """The command with the guide's places replaced by the fixture's."""
    run, sweep, photos = str(w["run"]), str(w["sweep"]), str(w["photos"])
    subs = [
        (r"outputs/runs/\S*fashion_mnist-lenet5/checkpoints/best\.pt", str(w["lenet"] / "checkpoints" / "best.pt")),
        (r"outputs/sweeps/\S*/\{[\d,]+\}", f"{sweep}/{{0,1,2}}"),
        (r"replay=outputs/sweeps/\S*/(\d+)", lambda m: f"replay={state.get('pbt', sweep)}/{m.group(1)}"),
        (r"outputs/sweeps/\S+", sweep),
        (r"outputs/runs/2026-12-04/\S+", str(w["run2"])),
        (r"outputs/runs/\S+", run), (r"<run dir>", run), (r"RUN_A RUN_B RUN_C", f"{run} {w['run2']} {run}"),
        (r"(?<![\w/])best\.pt", str(w["default"] / "checkpoints" / "best.pt")),
        (r"'more/\*\.jpg'", f"'{photos}/ant/*.jpg'"), (r"~/(photos|new_photos|new_images|imagenette)", photos),
        (r"(?<![\w/])photo\.jpg", str(w["photos"] / "ant" / "000.jpg")),
        (r"hydra\.sweep\.dir=/shared/\S+", f"hydra.sweep.dir={w['root'] / 'shared'}"),
    ]
    for pattern, new in subs:
        line = re.sub(pattern, new if callable(new) else new.replace("\\", "\\\\"), line)
    return line


def tiny_settings(args: list[str], w: dict, state: dict) -> list[str]:
    """What makes a training command of the guides tiny (the module docstring's rules)."""
    command, rest = args[0], args[1:]
    if command not in ("train", "tune", "lr-find") or "--help" in rest or "--cfg" in rest:
        return []
    if rest and not rest[0].startswith("-") and "=" not in rest[0] or any(a.startswith("replay=") for a in rest):
        # cnnlab train RUN, or a PBT member replayed: the run's own (tiny) config, at most 3 epochs
        return ["trainer.epochs=3"] if any(a.startswith("trainer.epochs=") for a in rest) else []
    extra = ["trainer.epochs=1", "trainer.limit_train_batches=3", "trainer.limit_eval_batches=1", "trainer.device=cpu",
             "data.batch_size=16", "data.eval_batch_size=32", "trainer.log_every_n_steps=1"]
    if "task=image_fit" in rest:
        return ["task.size=16", "trainer.epochs=1", "trainer.device=cpu"]
    named = next((a.split("=", 1)[1] for a in rest if a.startswith("dataset=")), None)
    recipe = next((a.split("=", 1)[1] for a in rest if a.startswith("experiment=")), "")
    if named != "imagefolder":
        channels, size = DOWNLOADED.get(named or ("cifar10" if "cifar" in recipe else "fashion_mnist"), (1, 28))
        extra += ["dataset=synthetic", f"dataset.channels={channels}", f"dataset.size={size}", "dataset.classes=4",
                  "dataset.train_size=160", "dataset.test_size=40"]
    if "-m" in rest:
        state["sweeps"] = state.get("sweeps", 0) + 1
        where = w["root"] / "sweeps" / str(state["sweeps"])
        if "hydra.sweeper.scheduler=pbt" in rest:  # two intervals of two epochs, four members (replay asks for 3)
            state["pbt"] = where
            extra += ["trainer.epochs=4", "hydra.sweeper.pbt.population=4"]
        else:
            extra += ["hydra.sweeper.n_trials=2"]
        if not any(a.startswith("hydra.sweep.dir=") for a in rest):
            extra.append(f"hydra.sweep.dir={where}")
    if command == "tune":
        state["tunes"] = state.get("tunes", 0) + 1
        extra = [e for e in extra if not e.startswith(("trainer.epochs", "trainer.limit_train"))] + [
            "trainer.epochs=2", "tune.budget_epochs=8", "tune.gate=false", "tune.top_k=1", "tune.seeds=1",
            str(w["root"] / "tunes" / str(state["tunes"]))]
    if command == "lr-find":
        extra.append("--steps=10")
    return extra


@pytest.mark.integration
def test_every_cnnlab_command_of_the_guides_runs(world):
    state: dict = {}
    ran, failures = 0, []
    for page, line in commands():
        if line.startswith(NOT_CNNLAB) or line.startswith(".venv/"):
            continue
        if not line.startswith("cnnlab "):  # a shell line that makes a file the next commands use
            subprocess.run(["bash", "-c", line], cwd=world["root"], check=True)
            continue
        text = placed(line, world, state).replace("trainer.devices=4", "trainer.devices=2")
        args = shlex.split(text)[1:]
        redirect = args.index(">") if ">" in args else None
        args = args[:redirect]
        args = [a for part in args for a in (brace(part) if "{" in part and "/" in part else [part])]
        args += tiny_settings(args, world, state)
        if args[0] == "train" and len(args) > 1 and Path(args[1]).is_dir():
            # a run continued: a copy of the fixture's run on synthetic images (a folder run's dataset.root, a path,
            # must be typed again: a run directory lends none)
            copy = world["root"] / f"continued{ran}"
            shutil.copytree(world["default"], copy)
            args[1] = str(copy)
        before = cpu_seconds()
        done = run_cli(*args, cwd=world["root"], timeout=300)
        if os.environ.get("CNNLAB_GUIDES_COST"):  # what each command costs, to keep this test inside the suite's budget
            with open(os.environ["CNNLAB_GUIDES_COST"], "a") as out:
                out.write(f"{cpu_seconds() - before:.1f}\t{shlex.join(args)[:150]}\n")
        ran += 1
        code, says = next((v for k, v in EXPECTED.items() if k in line), (0, ""))
        if done.returncode != code or says not in done.stderr:
            failures.append(f"{page}: {line}\n  ran: cnnlab {shlex.join(args)}\n  exit {done.returncode}: "
                            f"{(done.stderr.strip().splitlines() or [''])[-1][:300]}")
    assert ran >= 60 and not failures, "\n".join(failures)


def brace(part: str) -> list[str]:
    """The shell's brace list: a/{0,1,2} -> a/0 a/1 a/2."""
    head, _, tail = part.partition("{")
    items, _, rest = tail.partition("}")
    return [f"{head}{item}{rest}" for item in items.split(",")]
