"""Whole runs on tiny synthetic data: what a run writes, how it selects, and every trainer/data option."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

import cnnlab.training.loop as loop_module
import cnnlab.tasks.classify as classify_module
import cnnlab.training.assemble as assemble_module
from cnnlab.core.config import flatten
from cnnlab.core.errors import CnnlabError
from cnnlab.runtime.checkpoint import load_checkpoint
from tests.conftest import compose_config, quiet_console, run_tiny, tiny_plus


def read_events(run_dir):
    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1  # one event file per run: no add_hparams sub-runs
    ea = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def hparams_of(ea):
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"]).session_end_info
    values = {}
    for key, value in start.hparams.items():
        kind = value.WhichOneof("kind")
        values[key] = getattr(value, kind)
    return values, end.status, set(content)


def test_run_writes_summary_checkpoints_and_tensorboard(tmp_path):
    run_dir = tmp_path / "run"
    summary = run_tiny(run_dir, "trainer.epochs=2", "optimizer.lr=0.05")

    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["best_epoch"] in (1, 2)
    assert set(on_disk["selected"]) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        m = on_disk["selected"][split]
        assert 0 <= m["acc"] <= 1 and m["error"] == pytest.approx(1 - m["acc"]) and m["loss"] > 0
    assert on_disk["sizes"] == {"train": 144, "val": 16, "test": 40}
    assert len(on_disk["history"]) == 2 and on_disk["history"][-1]["step"] == 2 * 9
    assert on_disk == json.loads(json.dumps(summary))

    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert last["epoch"] == 2 and best["epoch"] == on_disk["best_epoch"]
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "config", "version", "history", "best"):
        assert key in last, key
    assert {"python", "numpy", "torch", "data_order", "augment"} <= set(last["rng"])
    assert last["config"]["optimizer"]["lr"] == 0.05

    ea = read_events(run_dir)
    scalars = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "train/step_loss", "train/lr", "test/acc", "test/loss"} <= scalars
    assert [e.step for e in ea.Scalars("val/acc")] == [9, 18]
    assert ea.Scalars("val/acc")[-1].value == pytest.approx(on_disk["history"][-1]["val/acc"])
    assert ea.Scalars("test/acc")[0].value == pytest.approx(on_disk["selected"]["test"]["acc"])
    assert len(ea.Scalars("train/step_loss")) == 18  # log_every_n_steps=1
    values, status, tags = hparams_of(ea)
    assert "_hparams_/experiment" not in tags  # the plugin builds the experiment from all runs' sessions
    assert status == api_pb2.STATUS_SUCCESS
    expected_keys = set(flatten({k: v for k, v in last["config"].items() if k != "paths"}))
    assert set(values) == expected_keys | {"status"} and values["status"] == "completed"
    assert values["optimizer.lr"] == 0.05 and values["model.name"] == "mlp" and values["model.hidden"] == "[16]"
    assert "config" in ea.Tags()["tensors"] or ea.PluginTagToContent("text")


def test_training_learns_the_synthetic_task(tmp_path):
    summary = run_tiny(tmp_path / "run", "trainer.epochs=5", "model.hidden=[64]", "optimizer.lr=0.05")
    assert summary["selected"]["test"]["acc"] > 0.9
    assert summary["history"][-1]["train/loss"] < summary["history"][0]["train/loss"]


def test_selection_uses_validation_and_the_test_set_is_evaluated_once_at_the_end(tmp_path, monkeypatch):
    calls = []

    def spy(original):
        def evaluate(model, loader, **kwargs):
            calls.append(loader.num_samples)
            return original(model, loader, **kwargs)
        return evaluate

    def predict_spy(original):
        def predict(models, loader, **kwargs):
            calls.append(loader.num_samples)
            return original(models, loader, **kwargs)
        return predict

    monkeypatch.setattr(loop_module, "evaluate", spy(loop_module.evaluate))
    monkeypatch.setattr(classify_module, "predict", predict_spy(classify_module.predict))
    summary = run_tiny(tmp_path / "run", "trainer.epochs=4", "dataset.test_size=41")
    assert calls.count(41) == 1 and calls[-1] == 41  # the test split: once, last
    assert calls[:4] == [16, 16, 16, 16]  # validation after every epoch
    val_acc = [r["val/acc"] for r in summary["history"]]
    assert summary["best_epoch"] == val_acc.index(max(val_acc)) + 1
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["epoch"] == summary["best_epoch"]
    assert summary["selected"]["val"]["acc"] == pytest.approx(max(val_acc))


def test_monitor_val_loss_selects_the_lowest_validation_loss(tmp_path):
    summary = run_tiny(tmp_path / "run", "trainer.epochs=4", "trainer.monitor=val/loss", "optimizer.lr=0.5")
    val_loss = [r["val/loss"] for r in summary["history"]]
    assert summary["monitor"] == "val/loss" and summary["best_epoch"] == val_loss.index(min(val_loss)) + 1
    assert summary["selected"]["val"]["loss"] == pytest.approx(min(val_loss))


def test_best_tracker_directions():
    up, down = loop_module.BestTracker("val/acc"), loop_module.BestTracker("val/loss")
    assert [up.update({"val/acc": v}, e) for e, v in enumerate([0.5, 0.7, 0.6], 1)] == [True, True, False]
    assert [down.update({"val/loss": v}, e) for e, v in enumerate([0.5, 0.7, 0.4], 1)] == [True, False, True]
    assert (up.epoch, down.epoch) == (2, 3)


@pytest.mark.parametrize("fold_elements", [1, 7 * 10, 1 << 20])  # every step, every 7 steps, at the read
@pytest.mark.parametrize("top5", [False, True])
def test_metric_sums_counted_in_folds_equal_the_per_batch_arithmetic(monkeypatch, fold_elements, top5):
    """A step keeps its logits; the hits are counted many steps at once. The totals are those of
    counting each batch as it comes, with soft targets (mixup) counted by their dominant class."""
    monkeypatch.setattr(loop_module.MetricSums, "FOLD_ELEMENTS", fold_elements)
    g = torch.Generator().manual_seed(0)
    sums = loop_module.MetricSums(torch.device("cpu"), top5=top5)
    loss_n = top1 = top5_hits = count = 0.0
    for step in range(23):
        n = 10 if step < 22 else 3  # a short last batch
        logits = torch.randn(n, 10, generator=g, requires_grad=True)
        labels = torch.randint(0, 10, (n,), generator=g)
        if step % 4 == 0:  # soft targets
            labels = torch.nn.functional.one_hot(labels, 10).float() * 0.7 + 0.03
        loss = torch.rand((), generator=g)
        sums.add(logits * 1, labels, loss)
        hard = labels.argmax(1) if labels.ndim == 2 else labels
        ranked = logits.detach().argsort(1, descending=True)
        top1 += (ranked[:, 0] == hard).sum().item()
        top5_hits += (ranked[:, :5] == hard[:, None]).any(1).sum().item()
        loss_n, count = loss_n + loss.item() * n, count + n
        assert len(sums.pending) * 10 < max(fold_elements, 10) + 10  # never more than a fold's worth kept
    sums.add(torch.randn(0, 10), torch.zeros(0, dtype=torch.long), torch.tensor(0.0))  # an empty share: nothing
    result = sums.result()
    assert result.count == count == 223
    assert result.loss == pytest.approx(loss_n / count, rel=1e-12)
    assert result.acc == top1 / count
    assert result.top5 == (top5_hits / count if top5 else None)


def test_trainer_options_reach_the_trainer(tmp_path, captured):
    summary = run_tiny(tmp_path / "run", "trainer.epochs=3", "trainer.label_smoothing=0.2", "trainer.limit_train_batches=2",
                       "trainer.log_every_n_steps=2", "trainer.eval_train_at_end=false", "trainer.channels_last=true")
    trainer = captured["trainer"]
    assert len(summary["history"]) == 3 and [r["step"] for r in summary["history"]] == [2, 4, 6]
    assert trainer.loss_fn.label_smoothing == 0.2
    assert "train" not in summary["selected"]
    assert len(read_events(tmp_path / "run").Scalars("train/step_loss")) == 3  # steps 2, 4, 6
    assert trainer.forward is trainer.model  # compile=false


def test_channels_last_reaches_model_and_batches(tmp_path, captured):
    run_tiny(tmp_path / "a", "model=small_resnet", "model.widths=[4]", "model.blocks=[1]", "trainer.epochs=1",
             "trainer.channels_last=true", "dataset.channels=3")
    conv = next(m for m in captured["trainer"].model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    x, _ = next(iter(captured["loaders"][0]))
    assert x.is_contiguous(memory_format=torch.channels_last)
    run_tiny(tmp_path / "b", "model=small_resnet", "model.widths=[4]", "model.blocks=[1]", "trainer.epochs=1",
             "trainer.channels_last=false", "dataset.channels=3")
    conv = next(m for m in captured["trainer"].model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()


def test_limit_eval_batches_and_eval_batch_size(tmp_path):
    summary = run_tiny(tmp_path / "run", "trainer.epochs=1", "trainer.limit_eval_batches=1", "data.eval_batch_size=8")
    assert summary["history"][0]["val/loss"] > 0
    assert summary["selected"]["val"]["count"] == 8 and summary["selected"]["test"]["count"] == 8


def test_data_options_reach_the_split_and_loaders(tmp_path, captured):
    summary = run_tiny(tmp_path / "run", "trainer.epochs=1", "data.batch_size=20", "data.val_fraction=0.25",
                       "data.split_seed=7", "data.eval_batch_size=13")
    assert captured["split"] == (0.25, 7)
    assert summary["sizes"]["val"] == 40 and summary["sizes"]["train"] == 120
    assert summary["history"][0]["step"] == 120 // 20
    train_loader, val_loader = captured["loaders"][:2]
    assert train_loader.batch_size == 20 and val_loader.batch_size == 13
    assert isinstance(train_loader, assemble_module.InMemoryLoader)


def test_streaming_loader_path_with_workers(tmp_path, captured):
    summary = run_tiny(tmp_path / "run", "trainer.epochs=1", "data.in_memory=false", "data.num_workers=1")
    loader = captured["loaders"][0]
    assert isinstance(loader, assemble_module.StreamingLoader) and loader.loader.num_workers == 1
    assert summary["status"] == "completed" and summary["sizes"]["train"] == 144


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    def weights(name, seed):
        run_tiny(tmp_path / name, "trainer.epochs=1", f"seed={seed}", "augment=crop_flip")
        return load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["model"]

    a, b, c = weights("a", 3), weights("b", 3), weights("c", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_augment_pipeline_reaches_the_training_batches_only(tmp_path, captured):
    run_tiny(tmp_path / "run", "trainer.epochs=1", "augment=crop_flip", "augment.ops.random_crop.padding=3",
             "augment.ops.hflip.p=1.0")
    train_pipe = captured["loaders"][0].transform
    val_pipe = captured["loaders"][1].transform
    assert len(train_pipe.ops) == 2 and val_pipe.ops == []
    x = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8)
    flipped_only = assemble_module.BatchPipeline(train_pipe.ops[1:], [0.0], [1 / 255], torch.device("cpu"), 0)
    assert torch.allclose(flipped_only(x), x.flip(3).float())


def test_precision_and_device(tmp_path):
    assert assemble_module.resolve_precision("auto", torch.device("cpu")) is None
    assert assemble_module.resolve_precision("auto", torch.device("cuda")) is torch.bfloat16
    assert assemble_module.resolve_precision("fp16", torch.device("cuda")) is torch.float16
    with pytest.raises(CnnlabError, match="fp16 needs a CUDA device"):
        assemble_module.resolve_precision("fp16", torch.device("cpu"))
    summary = run_tiny(tmp_path / "bf16", "trainer.epochs=1", "trainer.precision=bf16")
    assert summary["precision"] == "bfloat16" and summary["device"] == "cpu"
    assert run_tiny(tmp_path / "fp32", "trainer.epochs=1", "trainer.precision=fp32")["precision"] == "float32"
    assert assemble_module.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert assemble_module.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(CnnlabError, match="trainer.device=cuda but this machine has 0 CUDA devices"):
            assemble_module.resolve_device("cuda")


def test_compile_wraps_the_model(tmp_path, monkeypatch):
    # A spy, not the real torch.compile: importing the compiler alone takes ~20 s on 2 cores.
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or ("compiled", module))
    cfg = compose_config("trainer.compile=true")
    from cnnlab.core.config import parse_run_config

    settings = parse_run_config(cfg).trainer
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = loop_module.Trainer(
        model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), settings=settings,
        device=torch.device("cpu"), num_classes=2, reporter=None, checkpoint_dir=tmp_path,
        autocast_dtype=None, generators={}, checkpoint_extra={},
    )
    assert compiled == [model] and trainer.forward == ("compiled", model)


def test_cuda_graphs_compiles_the_step_in_reduce_overhead_mode_and_is_refused_off_cuda(tmp_path, monkeypatch):
    # A spy again; the capture itself is measured on a GPU (scripts/gpu_acceptance.sh, docs/performance.md).
    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: modes.append(mode) or ("compiled", module))
    from cnnlab.core.config import parse_run_config

    settings = parse_run_config(compose_config("trainer.cuda_graphs=true")).trainer
    model = torch.nn.Linear(2, 2)
    assert loop_module.compiled(model, settings) == ("compiled", model) and modes == ["reduce-overhead"]
    with pytest.raises(CnnlabError, match=r"^trainer.cuda_graphs=true replays the step on a CUDA device; this run's "
                                          r"device is cpu: leave it false here$"):
        run_tiny(tmp_path / "run", "trainer.cuda_graphs=true", "trainer.device=cpu")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_compile_time_is_reported_apart_from_training_time(tmp_path, monkeypatch):
    import time

    def slow_first_call(module):  # stands in for torch.compile: the first call pays the compile
        calls = []

        def forward(x):
            if not calls:
                time.sleep(0.5)
            calls.append(1)
            return module(x)

        return forward

    monkeypatch.setattr(torch, "compile", slow_first_call)
    summary = run_tiny(tmp_path / "run", "trainer.epochs=1", "trainer.compile=true")
    assert summary["compile_time_s"] >= 0.5
    assert summary["history"][0]["train_time_s"] < 0.5  # the compile is not counted as training
    assert run_tiny(tmp_path / "plain", "trainer.epochs=1")["compile_time_s"] is None


def test_console_prints_plain_lines_when_not_a_terminal(tmp_path):
    console = quiet_console()
    from tests.conftest import train

    train(compose_config(*tiny_plus("trainer.epochs=1", "trainer.log_every_n_steps=3")), tmp_path / "run", console=console)
    out = console.file.getvalue()
    assert "cnnlab train" in out and "epoch 1/1 step 3/9 loss" in out and "img/s" in out
    assert "selected model: epoch 1" in out and "test" in out
