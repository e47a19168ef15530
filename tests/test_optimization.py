"""The optimisation toolbox: optimizers, weight decay, schedules, inits, training options, babysitting."""

import math

import pytest
import torch
from torch import nn

from cnnlab.core.errors import CnnlabError
from cnnlab.models.blocks import LeCunTanh
from cnnlab.optim.optimizers import Lookahead
from cnnlab.core.registry import INITS, MODELS, OPTIMIZERS, SCHEDULERS
from cnnlab.runtime.checkpoint import load_checkpoint
from cnnlab.training.state import selected_weights
from tests.conftest import lr_values, quiet_console, run_tiny


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def optimizer(name, **options):
    return OPTIMIZERS.build(name, options, prefix="optimizer", model=small_model())


# --- every optimizer option reaches the optimizer ----------------------------------------------------

@pytest.mark.parametrize(
    ("name", "options", "group_values", "cls"),
    [
        ("adagrad", {"lr": 0.05, "lr_decay": 0.01, "eps": 1e-8, "initial_accumulator_value": 0.1, "weight_decay": 0.001},
         {"lr": 0.05, "lr_decay": 0.01, "eps": 1e-8, "initial_accumulator_value": 0.1, "weight_decay": 0.001}, torch.optim.Adagrad),
        ("rmsprop", {"lr": 0.002, "alpha": 0.9, "eps": 1e-6, "momentum": 0.5, "centered": True, "weight_decay": 0.01},
         {"lr": 0.002, "alpha": 0.9, "eps": 1e-6, "momentum": 0.5, "centered": True, "weight_decay": 0.01}, torch.optim.RMSprop),
        ("adam", {"amsgrad": True}, {"amsgrad": True}, torch.optim.Adam),
        ("adamw", {"amsgrad": True}, {"amsgrad": True}, torch.optim.AdamW),
        ("amsgrad", {"lr": 0.003, "betas": (0.8, 0.9), "eps": 1e-7, "weight_decay": 0.02},
         {"amsgrad": True, "lr": 0.003, "betas": (0.8, 0.9), "eps": 1e-7, "weight_decay": 0.02}, torch.optim.AdamW),
        ("amsgrad", {"decoupled": False}, {"amsgrad": True}, torch.optim.Adam),
        ("lbfgs", {"lr": 0.5, "max_iter": 7, "history_size": 9, "line_search": "strong_wolfe"},
         {"lr": 0.5, "max_iter": 7, "history_size": 9, "line_search_fn": "strong_wolfe"}, torch.optim.LBFGS),
        ("lbfgs", {"line_search": "none"}, {"line_search_fn": None}, torch.optim.LBFGS),
    ],
)
def test_optimizer_options_reach_the_optimizer(name, options, group_values, cls):
    opt = optimizer(name, **options)
    assert type(opt) is cls
    for key, value in group_values.items():
        assert opt.param_groups[0][key] == value, key


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_defaults_of_a_bare_build_are_the_builders_own(name):
    own = OPTIMIZERS.get(name).options["weight_decay"].default
    opt = optimizer(name)
    if name == "lbfgs":  # no weight decay of its own: it goes into the loss
        assert opt.l2_weight_decay == own
    else:
        assert opt.param_groups[0]["weight_decay"] == own and opt.l2_weight_decay == 0.0
        assert optimizer(name, weight_decay_mode="l2").l2_weight_decay == own
    assert not isinstance(opt, Lookahead)


def test_weight_decay_modes():
    opt = optimizer("adamw", weight_decay=0.1, weight_decay_mode="l2")
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.l2_weight_decay == 0.1
    opt = optimizer("adamw", weight_decay=0.1)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.l2_weight_decay == 0.0
    assert optimizer("lbfgs", weight_decay=0.2).l2_weight_decay == 0.2  # L-BFGS: always through the loss


def test_no_decay_on_norm_layers_and_biases():
    model = small_model()
    opt = OPTIMIZERS.build("sgd", {"weight_decay": 0.01, "no_decay_norm_bias": True}, prefix="optimizer", model=model)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[3].bias)}
    assert len(optimizer("sgd", weight_decay=0.01).param_groups) == 1


def test_lookahead_option_wraps_the_optimizer():
    opt = optimizer("sgd", lookahead_steps=5, lookahead_alpha=0.3)
    assert isinstance(opt, Lookahead) and (opt.k, opt.alpha) == (5, 0.3)
    assert opt.param_groups is opt.inner.param_groups  # schedulers drive the inner optimizer's lr


def train_weights(opt_name, steps=20, **options):
    torch.manual_seed(1)
    model = nn.Linear(5, 1)
    opt = OPTIMIZERS.build(opt_name, {"lr": 0.05, **options}, prefix="optimizer", model=model)
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        if opt.l2_weight_decay:
            loss = loss + 0.5 * opt.l2_weight_decay * sum(p.pow(2).sum() for p in opt.penalised_params)
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_for_sgd_l2_in_the_loss_and_weight_decay_coincide():
    own = train_weights("sgd", weight_decay=0.1, momentum=0.9, nesterov=False)
    l2 = train_weights("sgd", weight_decay=0.1, momentum=0.9, nesterov=False, weight_decay_mode="l2")
    assert torch.allclose(own, l2, atol=1e-6)


def test_for_adam_l2_in_the_loss_and_decoupled_decay_differ():
    decoupled = train_weights("adamw", weight_decay=0.5)
    l2 = train_weights("adamw", weight_decay=0.5, weight_decay_mode="l2")
    coupled = train_weights("adam", weight_decay=0.5)  # torch's Adam adds the decay to the gradient: L2
    assert not torch.allclose(decoupled, l2, atol=1e-4)
    assert torch.allclose(l2, coupled, atol=1e-5)


def test_lookahead_pulls_the_fast_weights_back_every_k_steps():
    plain = train_weights("sgd", steps=6, momentum=0.0, nesterov=False, weight_decay=0.0)
    wrapped = train_weights("sgd", steps=6, momentum=0.0, nesterov=False, weight_decay=0.0, lookahead_steps=3)
    assert not torch.allclose(plain, wrapped)
    # after k=3 steps: slow = start + alpha (fast_3 - start); the fast weights restart from it
    torch.manual_seed(1)
    start = torch.cat([p.detach().flatten() for p in nn.Linear(5, 1).parameters()])
    fast3 = train_weights("sgd", steps=3, momentum=0.0, nesterov=False, weight_decay=0.0)
    after3 = train_weights("sgd", steps=3, momentum=0.0, nesterov=False, weight_decay=0.0, lookahead_steps=3, lookahead_alpha=0.5)
    assert torch.allclose(after3, start + 0.5 * (fast3 - start), atol=1e-6)


def test_lbfgs_trains_a_small_problem(tmp_path):
    summary = run_tiny(tmp_path / "run", "optimizer=lbfgs", "data.batch_size=144", "trainer.epochs=4",
                       "scheduler=constant", "model.hidden=[32]")
    history = summary["history"]
    assert history[-1]["train/loss"] < 0.5 * history[0]["train/loss"]
    assert summary["selected"]["test"]["acc"] > 0.9


def test_lookahead_changes_the_training_trajectory(tmp_path):
    a = run_tiny(tmp_path / "a", "trainer.epochs=1")
    b = run_tiny(tmp_path / "b", "trainer.epochs=1", "optimizer.lookahead_steps=3")
    wa = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["status"] == b["status"] == "completed"


# --- schedules: closed forms -----------------------------------------------------------------------

def lr_curve(name, steps_per_epoch=10, epochs=8, **options):
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = SCHEDULERS.build(name, options, prefix="scheduler", optimizer=opt, steps_per_epoch=steps_per_epoch, epochs=epochs)
    return lr_values(opt, sched, steps_per_epoch * epochs)


def at_epoch(curve, e, steps_per_epoch=10):
    return curve[int(e * steps_per_epoch)]


@pytest.mark.parametrize(
    ("name", "options", "closed_form"),
    [
        ("multistep", {"milestones": [2, 5], "gamma": 0.5}, lambda t: 0.5 ** ((t >= 2) + (t >= 5))),
        ("exponential", {"gamma": 0.8}, lambda t: 0.8 ** math.floor(t)),
        ("inverse_time", {"decay": 0.5}, lambda t: 1 / (1 + 0.5 * math.floor(t))),
        ("inverse_sqrt", {"decay": 2.0}, lambda t: 1 / math.sqrt(1 + 2.0 * t)),
        ("linear", {"end_factor": 0.2}, lambda t: 1 - 0.8 * t / 8),
        # SGDR cycles [0, 2), [2, 6), [6, 14): T_0 = 2, T_mult = 2
        ("cosine_restarts", {"T_0": 2, "T_mult": 2, "eta_min": 0.1},
         lambda t: 0.1 + 0.45 * (1 + math.cos(math.pi * (t / 2 if t < 2 else (t - 2) / 4 if t < 6 else (t - 6) / 8)))),
    ],
)
def test_schedule_matches_its_closed_form(name, options, closed_form):
    curve = lr_curve(name, **options)
    for step in (0, 7, 15, 23, 38, 52, 66, 79):
        assert curve[step] == pytest.approx(closed_form(step / 10), rel=1e-6), step


@pytest.mark.parametrize("name", [n for n in SCHEDULERS.names() if "warmup_epochs" in SCHEDULERS.get(n).options])
def test_every_schedule_takes_a_linear_warmup(name):
    warm = lr_curve(name, warmup_epochs=1)
    assert warm[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # then the schedule starts at lr
    assert warm[10] == pytest.approx(1.0)


@pytest.mark.parametrize("name", [n for n in SCHEDULERS.names() if "interval" in SCHEDULERS.get(n).options])
def test_every_schedule_steps_per_epoch_or_per_update(name):
    per_epoch = lr_curve(name, interval="epoch")
    for e in range(8):
        assert len(set(per_epoch[e * 10:(e + 1) * 10])) == 1, (name, e)  # held within each epoch
    if name not in ("constant", "step", "multistep"):  # the others change continuously
        per_step = lr_curve(name, interval="step")
        assert len(set(per_step[10:20])) > 1  # moves every update


def test_plateau_reduces_after_patience_epochs_of_no_improvement():
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    sched = SCHEDULERS.build("plateau", {"factor": 0.5, "patience": 1, "min_lr": 0.2}, prefix="scheduler",
                             optimizer=opt, steps_per_epoch=2, epochs=10)
    lrs = []
    for val_loss in [1.0, 0.9, 0.95, 0.95, 0.8, 0.85, 0.9, 0.99, 0.99, 0.99]:
        for _ in range(2):
            opt.step()
            sched.step()
        sched.observe(val_loss)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2])
    state = sched.state_dict()
    fresh = SCHEDULERS.build("plateau", {"factor": 0.5, "patience": 1}, prefix="scheduler",
                             optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0), steps_per_epoch=2, epochs=10)
    fresh.load_state_dict(state)
    assert (fresh.reductions, fresh.best) == (sched.reductions, sched.best)


def test_plateau_reaches_the_run_through_the_validation_loss(tmp_path):
    summary = run_tiny(tmp_path / "run", "scheduler=plateau", "scheduler.patience=0", "scheduler.factor=0.5",
                       "trainer.epochs=4", "optimizer.lr=0.001", "optimizer=adam")
    lrs = [r["lr"] for r in summary["history"]]
    assert lrs[0] == 0.001 and all(b <= a for a, b in zip(lrs, lrs[1:]))


# --- init schemes ----------------------------------------------------------------------------------

def big_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1000, 800), nn.Conv2d(64, 128, 3))


@pytest.mark.parametrize(
    ("scheme", "options", "variance"),
    [
        ("lecun_normal", {}, lambda fi, fo: 1 / fi),
        ("xavier_normal", {"gain": 1.5}, lambda fi, fo: 1.5 ** 2 * 2 / (fi + fo)),
        ("kaiming_uniform", {}, lambda fi, fo: 2 / fi),
        ("kaiming_uniform", {"mode": "fan_out", "nonlinearity": "tanh"}, lambda fi, fo: (5 / 3) ** 2 / fo),
        ("normal", {"std": 0.02}, lambda fi, fo: 0.02 ** 2),
    ],
)
def test_init_variance_matches_the_formula(scheme, options, variance):
    model = big_layers()
    INITS.build(scheme, options, prefix="init", model=model)
    assert model[0].weight.var().item() == pytest.approx(variance(1000, 800), rel=0.05)
    assert model[1].weight.var().item() == pytest.approx(variance(64 * 9, 128 * 9), rel=0.05)  # C * k1 * k2


def test_orthogonal_init_gives_orthonormal_rows():
    model = big_layers()
    INITS.build("orthogonal", {"gain": 2.0}, prefix="init", model=model)
    w = model[0].weight  # 800 x 1000: rows orthogonal, norm = gain
    assert torch.allclose(w @ w.T, 4.0 * torch.eye(800), atol=1e-3)


def tanh_activation_variances(scheme, options):
    torch.manual_seed(0)
    model = MODELS.build("mlp", {"hidden": [512] * 19, "activation": "lecun_tanh"}, prefix="model",
                         in_channels=512, num_classes=512, input_size=1)
    INITS.build(scheme, options, prefix="init", model=model)
    a, variances, saturated = torch.randn(1000, 512), [], 0.0
    for layer in model[1:]:
        a = layer(a)
        if isinstance(layer, LeCunTanh):
            variances.append(a.var().item())
            saturated = (a.abs() > 0.99 * 1.7159).float().mean().item()
    return variances, saturated


def test_activations_through_20_tanh_layers():
    lecun, lecun_sat = tanh_activation_variances("lecun_normal", {})
    big, big_sat = tanh_activation_variances("normal", {"std": 1.0})
    small, _ = tanh_activation_variances("normal", {"std": 0.01})
    assert 0.25 < lecun[-1] and lecun[-1] > 0.4 * lecun[0] and lecun_sat < 0.01  # stays in the working range
    assert big_sat > 0.8  # N(0, 1): saturated
    assert small[-1] < 1e-6  # N(0, 0.01^2): collapsed


# --- regularisation and training options -----------------------------------------------------------

@pytest.mark.parametrize(("mode", "clip"), [("norm", 0.01), ("value", 0.001)])
def test_gradient_clipping(tmp_path, captured, mode, clip):
    seen = captured
    run_tiny(tmp_path / "run", "trainer.epochs=1", f"trainer.grad_clip={clip}", f"trainer.grad_clip_mode={mode}")
    grads = [p.grad for p in seen["trainer"].model.parameters()]
    if mode == "norm":
        assert torch.norm(torch.stack([g.norm() for g in grads])).item() <= clip * 1.001
    else:
        assert max(g.abs().max().item() for g in grads) <= clip * (1 + 1e-6)  # float32


def test_gradient_accumulation_equals_one_big_batch():
    from cnnlab.core.config import TrainerSettings
    from cnnlab.training.loop import Trainer

    def weights_after(batches, accumulate):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        trainer = Trainer(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                          settings=TrainerSettings(accumulate_steps=accumulate), device=torch.device("cpu"),
                          num_classes=3, reporter=None, checkpoint_dir=None, autocast_dtype=None, generators={},
                          checkpoint_extra={})
        for i, (x, y) in enumerate(batches):
            trainer.train_step(x, y, first=i % accumulate == 0, update=(i + 1) % accumulate == 0)
        return model[1].weight.detach().clone(), trainer.scheduler.last_epoch

    torch.manual_seed(1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    big, updates_big = weights_after([(x, y)], 1)
    small, updates_small = weights_after([(x[:8], y[:8]), (x[8:], y[8:])], 2)
    assert torch.allclose(big, small, atol=1e-6) and updates_big == updates_small == 1


def test_accumulate_steps_reaches_the_run(tmp_path, captured):
    seen = captured
    summary = run_tiny(tmp_path / "run", "trainer.epochs=1", "trainer.accumulate_steps=4")
    assert seen["trainer"].scheduler.last_epoch == math.ceil(9 / 4)  # 9 batches -> 3 optimizer updates
    assert summary["history"][0]["step"] == 9


def test_ema_weights_are_evaluated_kept_and_selected(tmp_path, captured):
    seen = captured
    summary = run_tiny(tmp_path / "run", "trainer.epochs=2", "trainer.ema_decay=0.9")
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["selected"] == "ema" and summary["selected_weights"] == "ema"
    assert not all(torch.equal(best["ema"][k], best["model"][k]) for k in best["model"])
    final = seen["trainer"].model.state_dict()  # the weights tested at the end
    assert all(torch.equal(final[k], selected_weights(best)[k]) for k in final)
    assert seen["trainer"].ema.multi_avg_fn is not None


def test_early_stopping_keeps_the_best_weights(tmp_path):
    summary = run_tiny(tmp_path / "run", "trainer.epochs=10", "trainer.early_stopping_patience=2",
                       "optimizer.lr=1e-9", "optimizer.momentum=0", "optimizer.nesterov=false", "scheduler=constant")
    assert summary["status"] == "early_stopped" and len(summary["history"]) == 3  # best at 1, then 2 without
    assert summary["best_epoch"] == 1
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["epoch"] == 1


def test_overfit_batches_drives_the_loss_to_about_zero(tmp_path):
    summary = run_tiny(tmp_path / "run", "trainer.overfit_batches=1", "trainer.epochs=60", "model.hidden=[64]",
                       "optimizer=adam", "optimizer.lr=0.01", "scheduler=constant", "dataset.noise=1.0")
    assert summary["history"][-1]["train/loss"] < 0.05
    assert summary["history"][-1]["val/acc"] == 1.0  # validated on the same fixed batch


def test_divergence_guard_stops_the_run_and_records_it(tmp_path):
    summary = run_tiny(tmp_path / "run", "optimizer.lr=1000", "optimizer.momentum=0.9", "trainer.epochs=3",
                       "scheduler=constant", "init=normal", "init.std=1.0")
    assert summary["status"] == "diverged" and summary["diverged_at_step"] >= 1
    assert summary["selected"] == {}  # no test evaluation for a diverged run
    on_disk = (tmp_path / "run" / "summary.json").read_text()
    assert '"status": "diverged"' in on_disk


def test_divergence_factor_null_turns_the_guard_off(tmp_path):
    summary = run_tiny(tmp_path / "run", "optimizer.lr=1000", "trainer.epochs=1", "scheduler=constant",
                       "trainer.divergence_factor=null")
    assert summary["status"] == "completed"


def test_initial_loss_is_checked_against_ln_classes(tmp_path):
    from tests.conftest import train
    from tests.conftest import compose_config, tiny_plus

    summary = run_tiny(tmp_path / "ok", "trainer.epochs=1")
    assert summary["expected_initial_loss"] == pytest.approx(math.log(4))
    assert abs(summary["initial_loss"] - math.log(4)) < 0.5
    console = quiet_console()
    train(compose_config(*tiny_plus("trainer.epochs=1", "init=normal", "init.std=3.0")), tmp_path / "bad", console=console)
    assert "initial loss" in console.file.getvalue() and "far from ln(4)" in console.file.getvalue()
    silent = quiet_console()
    train(compose_config(*tiny_plus("trainer.epochs=1", "init=normal", "init.std=3.0", "trainer.initial_loss_check=false")),
          tmp_path / "off", console=silent)
    assert "far from ln(4)" not in silent.file.getvalue()


def test_parameter_logging_writes_gradient_norms_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_tiny(tmp_path / "run", "trainer.epochs=1", "trainer.log_params_every_n_steps=3")
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    norms = [t for t in ea.Tags()["scalars"] if t.startswith("grad_norm/")]
    assert "grad_norm/1.weight" in norms and len(ea.Scalars("grad_norm/1.weight")) == 3  # steps 3, 6, 9
    assert "weights/1.weight" in ea.Tags()["histograms"]


def test_accumulation_with_lbfgs_is_refused():
    from tests.conftest import compose_config, tiny_plus
    from tests.conftest import train

    with pytest.raises(CnnlabError, match="accumulate_steps"):
        train(compose_config(*tiny_plus("optimizer=lbfgs", "trainer.accumulate_steps=2")), None, console=quiet_console())


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "adagrad"])
@pytest.mark.parametrize("kernel", ["fused", "foreach", "for_loop"])
def test_step_kernel_reaches_the_optimizer_and_gives_the_same_steps(name, kernel):
    """optimizer.step_kernel picks torch's implementation of the update; the weights after three steps are those
    of torch's default one (to float32 rounding)."""
    built = optimizer(name, step_kernel=kernel)
    group = built.param_groups[0]
    assert group["fused"] is (kernel == "fused") and group["foreach"] is (kernel == "foreach")
    assert optimizer(name).param_groups[0]["fused"] in (None, False)  # auto on the CPU: torch's own choice

    def trained(opt):
        torch.manual_seed(1)
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        model = small_model()
        rebuilt = OPTIMIZERS.build(name, opt, prefix="optimizer", model=model)
        for _ in range(3):
            rebuilt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            rebuilt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.testing.assert_close(trained({"step_kernel": kernel}), trained({}), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, kernel", [("rmsprop", "fused"), ("lbfgs", "foreach")])
def test_a_step_kernel_torch_does_not_offer_is_one_line(name, kernel):
    with pytest.raises(CnnlabError, match=rf"optimizer.step_kernel={kernel}: torch has no {kernel} "):
        optimizer(name, step_kernel=kernel)
