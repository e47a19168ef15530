"""`cnnlab runs`: every run and sweep trial in one table, with what varies among them; running, cut-off,
crashed and unreadable runs say so; filters, sorting, limits, CSV and JSON; a cache that follows changes;
bad paths and filters in one line."""

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from cnnlab.records import runs
from cnnlab.runtime import lock
from tests.conftest import TINY, run_cli


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """Two runs (lr 0.05 and 0.1, the second with model=linear), a 2-trial sweep, and four runs that did not
    finish: one running (its lock held here), a cut-off trial, a crashed run, an unreadable summary."""
    cwd = tmp_path_factory.mktemp("runs")
    out = cwd / "outputs"
    for args in (["optimizer.lr=0.05"], ["optimizer.lr=0.1", "model=linear"]):
        overrides = [o for o in TINY if not (args[-1].startswith("model=") and o.startswith("model."))]
        result = run_cli("train", *overrides, *args, "trainer.epochs=1", cwd=cwd)
        assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli("train", "-m", *TINY, "trainer.epochs=1", "optimizer.lr=0.01,0.02",
                     f"hydra.sweep.dir={out / 'sweeps' / 'sw'}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    (first,) = [p for p in (out / "runs").glob("*/*") if "optimizer.lr=0.05" in (p / ".hydra" / "overrides.yaml").read_text()]
    for name in ("running", "crashed", "unreadable"):
        shutil.copytree(first, out / "odd" / name)
    for name in ("running", "crashed"):
        (out / "odd" / name / "summary.json").unlink()
    (out / "odd" / "unreadable" / "summary.json").write_text("{not json")
    shutil.copytree(out / "sweeps" / "sw" / "1", out / "sweeps" / "sw" / "2")
    (out / "sweeps" / "sw" / "2" / "summary.json").unlink()  # a trial whose worker is gone
    return out


def listing(out: Path, *args: str):
    result = run_cli("runs", *args, cwd=out.parent)
    return result


def records(out: Path, *args: str) -> list[dict]:
    result = listing(out, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_run_and_trial_is_a_row_and_unfinished_ones_say_why(outputs):
    lock.acquire(outputs / "odd" / "running")
    try:
        rows = records(outputs)
        result = listing(outputs)
    finally:
        lock.release(outputs / "odd" / "running")
    by_path = {Path(r["path"]).relative_to(outputs).as_posix(): r for r in rows}
    assert len(rows) == 8
    assert by_path["odd/running"]["status"] == "running" and by_path["odd/crashed"]["status"] == "crashed"
    assert by_path["sweeps/sw/2"]["status"] == "cut off" and by_path["odd/unreadable"]["status"] == "unreadable"
    assert f"warning: run summary {outputs / 'odd' / 'unreadable' / 'summary.json'} is not valid JSON" in result.stderr
    single = [r for r in rows if r["path"].startswith(str(outputs / "runs"))]
    assert sorted((r["model"], r["optimizer.lr"]) for r in single) == [("linear", "0.1"), ("mlp", "0.05")]
    assert all(r["test/acc"] is not None for r in single)  # a run tests once; a sweep's trials leave it to the report
    trials = [r for r in rows if r["path"].startswith(str(outputs / "sweeps")) and r["status"] == "completed"]
    assert sorted(r["optimizer.lr"] for r in trials) == ["0.01", "0.02"] and all(r["test/acc"] is None for r in trials)
    assert all(r["epochs"] == 1 and r["best"] is not None for r in single + trials)
    assert "optimizer.lr" in result.stdout and "8 of 8 runs" in result.stdout  # what varies is a column
    assert [r["date"] for r in rows] == sorted((r["date"] for r in rows), reverse=True)  # newest first


def test_where_sort_limit_csv(outputs):
    assert {r["model"] for r in records(outputs, "--where", "model=lin*")} == {"linear"}
    assert {r["optimizer.lr"] for r in records(outputs, "--where", "optimizer.lr=0.0?")} == {"0.05", "0.01", "0.02"}
    done = records(outputs, "--where", "status=completed", "--where", "val/acc>=0", "--sort=-best")
    assert len(done) == 4 and [r["best"] for r in done] == sorted((r["best"] for r in done), reverse=True)
    # no lock held now: the run whose summary is missing crashed, as the other one did
    assert sorted(r["status"] for r in records(outputs, "--where", "status!=completed")) == [
        "crashed", "crashed", "cut off", "unreadable"]
    assert len(records(outputs, "--sort", "epochs", "--limit", "2")) == 2
    result = listing(outputs, "--csv", "--where", "test/acc>0")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 2 and {"date", "status", "val/acc", "test/acc", "path"} <= set(rows[0])


def test_the_cache_follows_a_changed_and_a_new_run(outputs, tmp_path):
    outputs = Path(shutil.copytree(outputs, tmp_path / "outputs"))  # changed here: the others' rows stay as built
    records(outputs)
    assert runs.cache_file(outputs).is_file() and not list(outputs.glob(".cnnlab-runs*"))  # the user's, not the folder's
    (trial,) = [p for p in (outputs / "sweeps" / "sw").glob("0")]
    before, text = (trial / "summary.json").stat(), (trial / "summary.json").read_text()
    old = json.dumps(json.loads(text)["best_value"])
    new = "0." + "9" * (len(old) - 2)  # the same length: the file keeps its size, and its times are put back
    (trial / "summary.json").write_text(text.replace(f'"best_value": {old}', f'"best_value": {new}'))
    os.utime(trial / "summary.json", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (trial / "summary.json").stat().st_size == before.st_size
    shutil.copytree(trial, outputs / "sweeps" / "sw" / "9")
    rows = {Path(r["path"]).name: r for r in records(outputs) if "sweeps" in r["path"]}
    assert rows["0"]["best"] == float(new) and rows["9"]["best"] == float(new)


def test_a_cache_in_the_listed_folder_is_not_read(outputs, tmp_path):
    """A folder from someone else may hold a cache file of the old kind, with rows of runs that never happened."""
    root = tmp_path / "outputs"
    shutil.copytree(outputs / "runs", root)
    (folder,) = [p for p in root.glob("*/*") if "model=linear" in (p / ".hydra" / "overrides.yaml").read_text()]
    fake = {"version": 1, "runs": {str(folder): {"key": [1, 2], "row": {"path": str(folder), "values": {},
                                                                         "name": "fake", "best": 0.999}}}}
    (root / ".cnnlab-runs.json").write_text(json.dumps(fake))
    names = {r["name"] for r in records(root)}
    assert "fake" not in names and len(names) == 2


@pytest.mark.parametrize(("args", "message"), [
    (["/no/such/folder"], "error: cnnlab runs: /no/such/folder is not a folder"),
    (["--where", "val/acc~0.9"], "error: cnnlab runs: --where 'val/acc~0.9' is not KEY=PATTERN or METRIC>=NUMBER"),
    (["--where", "modle=mlp"], "error: cnnlab runs: --where 'modle=mlp': no run has 'modle' (did you mean: model?)"),
    (["--where", "val/acc>=high"], "error: cnnlab runs: --where 'val/acc>=high': val/acc >= needs a number, got 'high'"),
    (["--sort=-bset"], "error: cnnlab runs: --sort '-bset': no run has 'bset' (did you mean: best?)"),
    (["--limit", "0"], "error: cnnlab runs: --limit must be >= 1, got 0"),
])
def test_bad_paths_and_filters_are_one_line(outputs, args, message):
    result = listing(outputs, *args)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_trials_are_named_by_what_they_vary_with_a_path_column_and_no_lr_find_row(outputs, tmp_path):
    out = tmp_path / "outputs"
    shutil.copytree(outputs / "sweeps", out / "sweeps")
    shutil.copytree(outputs / "runs", out / "runs")
    finder = out / "lr_find" / "2026-01-01" / "10-00-00-synthetic-mlp"  # what `cnnlab lr-find` leaves
    shutil.copytree(next((outputs / "runs").glob("*/*")) / ".hydra", finder / ".hydra")
    (finder / "lr_find.json").write_text("{}")
    gate = out / "tunes" / "t" / "gate" / "lr_find"  # and a tune's gate
    shutil.copytree(finder, gate)
    rows = json.loads(run_cli("runs", str(out), "--json", cwd=tmp_path).stdout)
    assert not any("lr_find" in row["path"] for row in rows) and len(rows) == 5
    trials = sorted(row["name"] for row in rows if "/sweeps/" in row["path"])
    assert trials == ["lr=0.01 #0", "lr=0.02 #1", "lr=0.02 #2"]
    assert {row["where"] for row in rows if "/sweeps/" in row["path"]} == {"sweeps/sw/0", "sweeps/sw/1", "sweeps/sw/2"}
    table = run_cli("runs", str(out), cwd=tmp_path).stdout
    header = next(line for line in table.splitlines() if "status" in line)
    assert header.split().count("name") == 1 and "path" in header and "sweeps/sw/1" in table
    shown = [c for c in (h.strip() for h in header.split("┃")) if c]
    as_csv = next(csv.reader(io.StringIO(run_cli("runs", str(out), "--csv", cwd=tmp_path).stdout)))
    missing = {c.replace("best val/acc", "best") for c in shown} - set(as_csv) - {"path"}
    assert not missing and "where" in as_csv  # every column of the table (path as "where", relative)
