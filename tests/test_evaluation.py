"""Test-time augmentation, ensembles, the confusion matrix, `cnnlab eval` and `cnnlab lr-find`."""

import json
import shlex

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from cnnlab.core.config import parse_run_config
from cnnlab.core.errors import CnnlabError
from cnnlab.analysis.evaluation import confusion_matrix, evaluate_runs, metrics_from_log_probs, predict, tta_views
from cnnlab.analysis.lr_find import lr_range_test, suggest
from tests.conftest import compose_config, quiet_console, run_cli, run_tiny, tiny_plus


def test_tta_views_are_mirror_and_shifts():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = tta_views(x, flip=True, shift=1)
    assert len(views) == 6 and torch.equal(views[0], x) and torch.equal(views[1], x.flip(3))
    down = views[2]  # content moved by one row, the gap filled with zeros (the mean after normalisation)
    assert torch.equal(down[0, 0, :3], x[0, 0, 1:]) and (down[0, 0, 3] == 0).all()
    assert len(tta_views(x, flip=False, shift=0)) == 1


class Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits[: len(x)]


def test_ensemble_averages_softmax_outputs():
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 3.0], [0.0, 2.0]])
    loader = [(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]))]
    log_probs, labels = predict([Fixed(a), Fixed(b)], loader)
    probs = (a.softmax(1) + b.softmax(1)) / 2
    assert torch.allclose(log_probs.exp(), probs)
    m = metrics_from_log_probs(log_probs, labels)
    assert m.loss == pytest.approx(-(probs[0, 0].log() + probs[1, 1].log()).item() / 2, rel=1e-5)


def test_one_model_s_loss_is_the_cross_entropy_of_its_logits_however_confident():
    """The epoch line (cross-entropy of the logits) and the table and eval (NLL of the averaged probabilities)
    are one number, even where a softmax underflows: 600632.5 against 21.44 was the same weights before."""
    logits = torch.tensor([[0.0, 900.0], [1000.0, 0.0], [2.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    log_probs, _ = predict([Fixed(logits)], [(torch.zeros(3, 1, 2, 2), labels)])
    m = metrics_from_log_probs(log_probs, labels)
    assert m.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert m.loss > 600  # not capped at -log(1e-12) = 27.6


def test_tta_averages_over_views():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.randn(4, 1, 4, 4)
    loader = [(x, torch.zeros(4, dtype=torch.long))]
    log_probs, _ = predict([model], loader, tta_flip=True)
    expected = (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2
    assert torch.allclose(log_probs.exp(), expected, atol=1e-6)


def test_confusion_matrix_counts_true_by_predicted():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 1, 1, 2])
    assert confusion_matrix(probs, labels, 3).tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_a_run_records_its_confusion_matrix_and_tta(tmp_path):
    summary = run_tiny(tmp_path / "run", "trainer.epochs=2", "trainer.tta_flip=true", "trainer.tta_shift=1")
    matrix = torch.tensor(summary["confusion_matrix"])
    assert matrix.shape == (4, 4) and matrix.sum() == 40 and summary["tta_views"] == 6
    assert matrix.trace().item() / 40 == pytest.approx(summary["selected"]["test"]["acc"])
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    ea.Reload()
    assert "test/confusion_matrix" in ea.Tags()["images"]


def test_eval_of_one_run_reproduces_its_summary(tmp_path):
    summary = run_tiny(tmp_path / "run", "trainer.epochs=2")
    report = evaluate_runs([str(tmp_path / "run")], splits=["val", "test"], tta_flip=False, tta_shift=0,
                           device="cpu", data_dir=None, console=quiet_console())
    for split in ("val", "test"):
        assert report["splits"][split]["acc"] == pytest.approx(summary["selected"][split]["acc"])
        assert report["splits"][split]["loss"] == pytest.approx(summary["selected"][split]["loss"], rel=1e-4)


def test_eval_of_an_ensemble_averages_its_members(tmp_path):
    run_tiny(tmp_path / "a", "trainer.epochs=1", "seed=1")
    run_tiny(tmp_path / "b", "trainer.epochs=1", "seed=2", "model.hidden=[24]")  # members may differ in model
    report = evaluate_runs([str(tmp_path / "a"), str(tmp_path / "b" / "checkpoints" / "best.pt")], splits=["test"],
                           tta_flip=True, tta_shift=0, device="cpu", data_dir=None, console=quiet_console())
    assert len(report["members"]) == 2 and report["tta_views"] == 2 and 0 <= report["splits"]["test"]["acc"] <= 1


def test_ensemble_members_must_share_data(tmp_path):
    run_tiny(tmp_path / "a", "trainer.epochs=1")
    run_tiny(tmp_path / "b", "trainer.epochs=1", "data.split_seed=5")
    with pytest.raises(CnnlabError, match="another validation split"):
        evaluate_runs([str(tmp_path / "a"), str(tmp_path / "b")], splits=["test"], tta_flip=False, tta_shift=0,
                      device="cpu", data_dir=None, console=quiet_console())
    with pytest.raises(CnnlabError, match="no checkpoint"):
        evaluate_runs([str(tmp_path / "nothing")], splits=["test"], tta_flip=False, tta_shift=0, device="cpu",
                      data_dir=None, console=quiet_console())


def test_eval_command_prints_the_report_and_writes_json(tmp_path):
    run_tiny(tmp_path / "run", "trainer.epochs=1")
    result = run_cli("eval", str(tmp_path / "run"), "--splits", "test", "--tta-shift", "1", "--json", "--out",
                     str(tmp_path / "report.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test" in result.stdout and "TTA, 5 views" in result.stdout
    assert json.loads((tmp_path / "report.json").read_text())["splits"]["test"]["count"] == 40
    # --json alone: the report as JSON on stdout, the table on stderr; --csv: one row a metric
    printed = run_cli("eval", str(tmp_path / "run"), "--splits", "test", "--json", cwd=tmp_path)
    assert json.loads(printed.stdout)["splits"]["test"]["count"] == 40 and "test" in printed.stderr
    rows = run_cli("eval", str(tmp_path / "run"), "--splits", "test", "--csv", cwd=tmp_path).stdout.splitlines()
    assert rows[0] == "split,metric,value" and "test,count,40" in rows
    # the old spelling, --json FILE, still writes the file for one release, after a line naming the new one
    old = run_cli("eval", str(tmp_path / "run"), "--splits", "test", "--json", str(tmp_path / "old.json"), cwd=tmp_path)
    assert old.returncode == 0 and json.loads((tmp_path / "old.json").read_text())["splits"]["test"]["count"] == 40
    assert old.stderr.strip().splitlines()[0] == (f"warning: cnnlab eval --json {tmp_path / 'old.json'} is deprecated "
                                                  f"and goes in the next release: use cnnlab eval --json --out "
                                                  f"{tmp_path / 'old.json'}")
    bad = run_cli("eval", str(tmp_path / "run"), "--splits", "tset", cwd=tmp_path)
    assert bad.returncode == 2 and "--splits takes train, val and test" in bad.stderr


# --- lr-find ---------------------------------------------------------------------------------------

def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = [10 ** (i / 10 - 4) for i in range(40)]
    loss = [2.0] * 10 + [2.0 - 0.05 * i for i in range(1, 11)] + [1.5 - 0.3 * i for i in range(1, 3)] + [1.0] * 18
    assert suggest(lrs, loss) == pytest.approx(lrs[20], rel=1e-6)


def test_lr_range_test_writes_curve_plot_and_suggestion(tmp_path):
    result = lr_range_test(parse_run_config(compose_config(*tiny_plus("optimizer.momentum=0", "optimizer.nesterov=false"))),
                           tmp_path, min_lr=1e-4, max_lr=1e3, steps=60, console=quiet_console())
    assert result["stopped_early"]  # lr 1000 makes the loss explode before step 60
    lrs = result["lr"]
    assert lrs[0] == pytest.approx(1e-4) and all(b > a for a, b in zip(lrs, lrs[1:]))
    assert lrs[1] / lrs[0] == pytest.approx((1e3 / 1e-4) ** (1 / 59))
    assert 1e-4 <= result["suggested_lr"] <= lrs[-1]
    assert (tmp_path / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "lr_find.json").read_text())["suggested_lr"] == result["suggested_lr"]
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert len(ea.Scalars("lr_find/loss")) == len(lrs)


def test_lr_find_command(tmp_path):
    from tests.conftest import TINY

    result = run_cli("lr-find", "--steps", "20", "--max-lr", "1", *TINY, "optimizer.lr=0.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "suggested optimizer.lr=" in result.stdout
    tried = next(line for line in result.stdout.splitlines() if line.startswith("try:"))
    assert tried.startswith("try:  cnnlab train " + shlex.join(TINY) + " optimizer.lr=")
    assert "optimizer.lr=0.5" not in tried  # the user's own lr gives way to the suggestion
    assert "20 steps, from" in result.stdout or "of 20 steps, stopped where" in result.stdout
    assert list((tmp_path / "outputs" / "lr_find").glob("*/*/lr_find.png"))
    bad = run_cli("lr-find", "--min-lr", "1", "--max-lr", "0.1", *TINY, cwd=tmp_path)
    assert bad.returncode == 2 and "0 < --min-lr < --max-lr" in bad.stderr
    typo = run_cli("lr-find", "--steps", "many", *TINY, cwd=tmp_path)
    assert typo.returncode == 2 and typo.stderr.strip().startswith("error: cnnlab lr-find: argument --steps")
    assert len(typo.stderr.strip().splitlines()) == 1
