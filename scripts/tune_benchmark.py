#!/usr/bin/env python
"""`cnnlab tune` against the searches people use instead, at the same budget of epochs, on Fashion-MNIST.

Every method trains the same model (the default run's, at its trainer.epochs) on the same data and split,
spends at most --budget epochs, chooses on validation and scores the test split once:

- tune:        cnnlab tune tune.budget_epochs=B (the gate's steps count in the budget)
- random_asha: cnnlab train -m, random sampler, ASHA, hydra.sweeper.budget_epochs=B, then cnnlab report --test-best
- tpe_asha:    the same with TPE
- pbt:         hydra.sweeper.scheduler=pbt with B / trainer.epochs members
- ray_asha:    Ray Tune's ASHAScheduler over a small hand-written trainable (cnnlab's model, data and split,
               a plain loop), stopped once its trials have trained B epochs; `pip install "ray[tune]"` first

The sweeps search conf/tune/space/sgd.yaml (the tune's own default space). Each method runs once per seed;
the table gives the medians and each method's wall time against the fastest's.

    python scripts/tune_benchmark.py                                  # budget 40, seeds 0 1 2, every method
    python scripts/tune_benchmark.py --seeds 0 --methods tune pbt -- trainer.limit_train_batches=100
    python scripts/tune_benchmark.py --budget 400 --budget-s 300 --pack 8   # both budgets: epochs and seconds

The table gives, for each method, the epochs it spent and its wall time: with --budget-s the clock may end a search
before its epochs do, and a pack (--pack) buys more trials inside the same seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("tune", "random_asha", "tpe_asha", "pbt", "ray_asha")


@dataclass
class Result:
    test_acc: float
    val: float
    epochs: float
    wall_s: float


def cnnlab(args: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode not in (0, 3):
        sys.exit(f"cnnlab {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done


def space() -> list[str]:
    return [f"{k}={v}" for k, v in yaml.safe_load((ROOT / "conf/tune/space/sgd.yaml").read_text()).items()]


def tune(work: Path, seed: int, a) -> Result:
    wall, _ = cnnlab(["tune", f"seed={seed}", f"trainer.epochs={a.epochs}", f"tune.budget_epochs={a.budget}",
                      *([f"tune.budget_s={a.budget_s}"] if a.budget_s else []),
                      *([f"tune.pack={a.pack}"] if a.pack > 1 else []),
                      f"tune.dir={work}", *a.tune_args, *a.extra], work.parent)
    record = json.loads((work / "tune.json").read_text())
    return Result(record["test"]["acc"], record["chosen"]["mean"], record["epochs_spent"], wall)


def scored_sweep(work: Path, args: list[str]) -> tuple[float, float]:
    """(wall seconds, epochs trained) of a sweep, then its chosen trial tested once (report --test-best)."""
    wall, _ = cnnlab(["train", "-m", *args, f"hydra.sweep.dir={work}"], work.parent)
    more, _ = cnnlab(["report", str(work), "--test-best"], work.parent)
    return wall + more, sum(trained_epochs(json.loads(p.read_text())) for p in work.glob("[0-9]*/summary.json"))


def trained_epochs(summary: dict) -> int:
    """As the budget counts them: the epochs a trial finished, and the one a diverged trial stopped in."""
    return len(summary.get("history") or []) + (summary.get("status") == "diverged")


def sweep(sampler: str):
    def run(work: Path, seed: int, a) -> Result:
        wall, epochs = scored_sweep(work, [
            f"seed={seed}", f"trainer.epochs={a.epochs}", f"hydra/sweeper/sampler={sampler}", *space(),
            "hydra.sweeper.pruner=asha", f"hydra.sweeper.budget_epochs={a.budget}",
            *([f"hydra.sweeper.budget_s={a.budget_s}"] if a.budget_s else []),
            *([f"hydra.sweeper.pack={a.pack}"] if a.pack > 1 else []), *a.extra])
        return Result(*tested(work), epochs, wall)
    return run


def pbt(work: Path, seed: int, a) -> Result:
    members = a.budget // a.epochs
    wall, _ = scored_sweep(work, [
        f"seed={seed}", f"trainer.epochs={a.epochs}", "hydra/sweeper/sampler=random", *space(),
        "hydra.sweeper.scheduler=pbt", f"hydra.sweeper.pbt.population={members}", *a.extra])
    return Result(*tested(work), members * a.epochs, wall)  # a member's history holds what it inherited too


def tested(work: Path) -> tuple[float, float]:
    test = json.loads((work / "test_best.json").read_text())
    chosen = json.loads((work / test["trial"] / "summary.json").read_text())
    return test["acc"], chosen["best_value"]


def ray_asha(work: Path, seed: int, a) -> Result:
    try:
        from ray import tune as ray_tune
    except ImportError:
        sys.exit('ray_asha needs Ray Tune: pip install "ray[tune]"')
    import ray
    from ray.tune.schedulers import ASHAScheduler

    import cnnlab

    overrides = [f"seed={seed}", f"trainer.epochs={a.epochs}", "trainer.device=cpu", *a.extra]
    search = {"optimizer.lr": ray_tune.loguniform(1e-3, 1.0), "optimizer.weight_decay": ray_tune.loguniform(1e-6, 1e-2),
              "optimizer.momentum": ray_tune.uniform(0.8, 0.99)}

    class Budget(ray_tune.Stopper):
        """Every result is one epoch; one trial at a time (all the CPUs each), so none passes the budget."""

        def __init__(self):
            self.epochs = 0

        def __call__(self, trial_id, result):
            self.epochs += 1
            return False

        def stop_all(self):
            return self.epochs >= a.budget

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    tuner = ray_tune.Tuner(
        ray_tune.with_resources(ray_tune.with_parameters(ray_trainable, overrides=overrides, epochs=a.epochs,
                                                         weights=str(work / "weights")), {"cpu": os.cpu_count()}),
        param_space=search,
        tune_config=ray_tune.TuneConfig(metric="val_acc", mode="max", num_samples=a.budget,
                                        scheduler=ASHAScheduler(max_t=a.epochs, grace_period=1, reduction_factor=3),
                                        search_alg=None, reuse_actors=True),
        run_config=ray_tune.RunConfig(storage_path=str(work), name="ray", stop=Budget(), verbose=0))
    results = tuner.fit()
    best = results.get_best_result(metric="val_acc", mode="max", scope="all")
    state = torch.load(work / "weights" / f"{best.metrics['trial_id']}.pt", weights_only=True)
    run = cnnlab.compose(overrides + [f"{k}={v}" for k, v in best.config.items()])
    test_acc = hand_written_test(run, state)
    ray.shutdown()
    epochs = sum(len(r.metrics_dataframe) for r in results if r.metrics_dataframe is not None)
    return Result(test_acc, float(best.metrics_dataframe["val_acc"].max()), epochs, time.perf_counter() - start)


def ray_trainable(config: dict, overrides: list[str], epochs: int, weights: str) -> None:
    """A hand-written loop over cnnlab's parts: the model, optimizer, data and split `cnnlab train` builds."""
    from ray import tune as ray_tune

    import cnnlab
    from cnnlab.training.assemble import setup

    run = cnnlab.compose(overrides + [f"{k}={v}" for k, v in config.items()])
    s = setup(run)
    train = s.loader("train", s.train_idx, train=True)
    val = s.loader("train", s.val_idx, train=False)
    batches = min(len(train), run.trainer.limit_train_batches or len(train))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(s.optimizer, max_lr=config["optimizer.lr"], epochs=epochs,
                                                    steps_per_epoch=batches)
    best = 0.0
    for _ in range(epochs):
        s.model.train()
        for _, (x, y) in zip(range(batches), train.iterate(0)):
            s.optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(s.model(x), y).backward()
            s.optimizer.step()
            scheduler.step()
        acc = accuracy(s.model, val)
        if acc > best:
            best = acc
            Path(weights).mkdir(parents=True, exist_ok=True)  # the trial's own folder is Ray's staging copy
            torch.save(s.model.state_dict(), Path(weights) / f"{ray_tune.get_context().get_trial_id()}.pt")
        ray_tune.report({"val_acc": acc})


def accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader.iterate(0):
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return right / total


def hand_written_test(run, state: dict) -> float:
    from cnnlab.training.assemble import setup

    s = setup(run)
    s.model.load_state_dict(state)
    return accuracy(s.model, s.loader("test", train=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=40, help="epochs every method may spend")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="also a wall-clock budget (tune.budget_s, hydra.sweeper.budget_s) for tune and the sweeps")
    parser.add_argument("--pack", type=int, default=1, help="tune.pack and hydra.sweeper.pack for tune and the sweeps")
    parser.add_argument("--epochs", type=int, default=4, help="trainer.epochs: a full trial's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--workdir", default="outputs/tune_benchmark")
    parser.add_argument("--tune-args", nargs="*", default=["tune.top_k=2", "tune.seeds=2"],
                        help="tune.* settings of the tune (default: 2 configurations x 2 seeds, which fit 40 epochs)")
    parser.add_argument("extra", nargs="*", help="overrides for every method's runs (after --)")
    a = parser.parse_args()
    runners = {"tune": tune, "random_asha": sweep("random"), "tpe_asha": sweep("tpe"), "pbt": pbt, "ray_asha": ray_asha}
    results: dict[str, list[Result]] = {m: [] for m in a.methods}
    for seed in a.seeds:  # every method once a seed, so a stopped benchmark still compares them all
        for method in a.methods:
            work = (Path(a.workdir) / f"{method}-seed{seed}").resolve()
            work.parent.mkdir(parents=True, exist_ok=True)
            r = runners[method](work, seed, a)
            print(f"{method} seed {seed}: test {r.test_acc:.4f}, val {r.val:.4f}, {r.epochs:.1f} epochs, {r.wall_s:.0f} s",
                  flush=True)
            results[method].append(r)
            (Path(a.workdir) / "results.json").write_text(json.dumps(
                {m: [vars(x) for x in rs] for m, rs in results.items()}, indent=1))
    print_table(results, a)


def print_table(results: dict[str, list[Result]], a) -> None:
    median = {m: Result(*(statistics.median(getattr(r, f) for r in rs) for f in ("test_acc", "val", "epochs", "wall_s")))
              for m, rs in results.items()}
    fastest = min(r.wall_s for r in median.values())
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"budget {a.budget} epochs, trainer.epochs={a.epochs}, seeds {a.seeds}, overrides {a.extra or 'none'}")
    print("| method | test acc (median) | each seed | val (median) | epochs spent | wall (median) | vs fastest |")
    print("|---|---|---|---|---|---|---|")
    for m, r in median.items():
        seeds = ", ".join(f"{x.test_acc:.4f}" for x in results[m])
        print(f"| {m} | {r.test_acc:.4f} | {seeds} | {r.val:.4f} | {r.epochs:.1f} | {r.wall_s:.0f} s | "
              f"{r.wall_s / fastest:.2f}x |")


if __name__ == "__main__":
    main()
