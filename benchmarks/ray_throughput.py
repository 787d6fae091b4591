"""Throughput of the Ray runtime, measured in one run on one local Ray instance.

1. **Scaling**: updates/s with K = 2, 4, 8 workers whose compute time per message is fixed by a sleep of ``c``
   seconds (plus a real MLP gradient on digits), against the ideal K / w, where w is the workers' own measured time
   per message (the gradient plus the sleep, as they report it): what is lost is the runtime's. Goal ≥ 0.9.
2. **Against a hand-written Ray parameter server**: the usual ``ray.wait`` loop through the driver (written below:
   the driver waits for any worker's gradient, sends it to a PS actor, and hands that worker the new weights), on the
   same model, data and K; with the sleep, and without it (then the runtimes' own costs dominate). Goal: ormo's
   updates/s ≥ 1.0× theirs.
3. **Server cost per update**: the Ray server's time per message (validation, update, the reply's copy) against the
   simulator's time per iteration for the same rule and model with a precomputed gradient.
4. **Heterogeneous pool**: K = 8, 25 % of the workers 4× slower; wall-clock time for OrMo and SSGDm to reach a test
   accuracy on digits, as a ratio (the papers report about 2× for OrMo over SSGDm).

Rates are measured on the server's clock between the K-th and the last update (the start-up, while workers import
torch, is excluded). Run: ``python benchmarks/ray_throughput.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from ormo.engine import Simulator
from ormo.engine.ray_runtime import start_ray, stop_ray
from ormo.experiment import load_config, train
from ormo.experiment.metrics import read_metrics
from ormo.experiment.problem import TrainProblem

BASE = ["model.name=mlp", "data.batch_size=16", "method.lr=0.01", "method.momentum=0.9", "timing.jitter=none"]


def _rate(run_dir: Path, k: int) -> tuple[float, int]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()[1:]
    times = [json.loads(line)["sim_time"] for line in lines]
    steady = times[k:]
    return (len(steady) - 1) / (steady[-1] - steady[0]), len(times)


def ormo_rate(k: int, sleep_s: float, messages_per_worker: int, out: Path) -> dict:
    epochs = messages_per_worker * k * 16 / 1438
    cfg = load_config(None, [*BASE, "method.name=ormo", f"train.num_workers={k}", f"train.epochs={epochs}",
                             f"train.eval_every={epochs}", f"train.checkpoint_every={epochs}",
                             f"ray.time_scale={sleep_s}"])
    res = train(cfg, out, engine="ray", progress=False)
    rate, n = _rate(out, k)
    summary = json.loads((out / "run.json").read_text())["summary"]
    per_message = summary["worker_time_per_message_s"]
    return {"k": k, "updates_per_s": rate, "ideal": k / per_message, "worker_ms_per_message": 1e3 * per_message,
            "iterations": n, "server_ms_per_update": 1e3 * summary["server_busy_s"] / n,
            "final_acc": res.final["test_acc"]}


# -- the usual hand-written Ray parameter server (driver-side ray.wait loop) ------------------------------------


@ray.remote
class _PlainPS:
    def __init__(self, w0: np.ndarray, lr: float) -> None:
        self.w, self.lr = w0.copy(), lr

    def apply(self, g: np.ndarray) -> np.ndarray:
        self.w -= self.lr * g
        return self.w


@ray.remote
class _PlainWorker:
    def __init__(self, overrides: list[str], sleep_s: float) -> None:
        torch.set_num_threads(1)
        self.problem = TrainProblem(load_config(None, overrides))
        self.sleep_s = sleep_s

    def grad(self, w: np.ndarray, k: int, i: int) -> np.ndarray:
        g = self.problem.grad_fn(torch.from_numpy(np.array(w)), k, i, 0)
        time.sleep(self.sleep_s)
        return g.numpy()


def plain_rate(k: int, sleep_s: float, messages_per_worker: int) -> float:
    overrides = [*BASE, f"train.num_workers={k}"]
    w0 = TrainProblem(load_config(None, overrides)).params0.numpy()
    ps = _PlainPS.remote(w0, 0.01)
    workers = [_PlainWorker.remote(overrides, sleep_s) for _ in range(k)]
    ray.get([w.grad.remote(w0, j, 0) for j, w in enumerate(workers)])  # warm up: every worker ready
    refs = {w.grad.remote(w0, j, 0): j for j, w in enumerate(workers)}
    total, times = messages_per_worker * k, []
    for i in range(total):
        ready, _ = ray.wait(list(refs), num_returns=1)
        j = refs.pop(ready[0])
        new_w = ps.apply.remote(ready[0])
        refs[workers[j].grad.remote(new_w, j, i)] = j
        times.append(time.perf_counter())
    ray.get(list(refs))
    for actor in [ps, *workers]:
        ray.kill(actor)
    steady = times[k:]
    return (len(steady) - 1) / (steady[-1] - steady[0])


def simulator_ms_per_iteration(k: int, iterations: int = 2000) -> float:
    cfg = load_config(None, [*BASE, "method.name=ormo", f"train.num_workers={k}"])
    problem = TrainProblem(cfg)
    g = torch.randn_like(problem.params0) * 1e-3
    sim = Simulator(cfg.method.build(), problem.params0, lambda p, *a: g, num_workers=k, num_iterations=10**9)
    sim.run(200)
    t0 = time.perf_counter()
    sim.run(200 + iterations)
    return 1e3 * (time.perf_counter() - t0) / iterations


def time_to_accuracy(method: str, target: float, sleep_s: float, epochs: float, out: Path) -> dict:
    cfg = load_config(None, [*BASE, f"method.name={method}", "train.num_workers=8", f"train.epochs={epochs}",
                             "train.eval_every=0.5", f"train.checkpoint_every={epochs}", "timing.model=slow_fraction",
                             "timing.fraction=0.25", "timing.slowdown=4.0", f"ray.time_scale={sleep_s}"])
    train(cfg, out, engine="ray", progress=False)
    rows = read_metrics(out)
    hit = next((r for r in rows if r["test_acc"] >= target), None)
    return {"method": method, "seconds_to_target": hit["sim_time_s"] if hit else float("inf"),
            "epochs_to_target": hit["epoch"] if hit else float("inf"), "final_acc": rows[-1]["test_acc"],
            "wall_s": rows[-1]["sim_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    # a line per case as it finishes, even through a pipe: the full run takes several minutes
    sys.stdout.reconfigure(line_buffering=True)
    print("starting a local Ray instance ...")
    per_worker = 15 if args.quick else 40
    sleep_s = 0.04
    start_ray(None, num_cpus=16)
    results: dict = {"scaling": [], "plain": [], "simulator": [], "heterogeneous": []}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"1-3. updates/s; workers sleep {sleep_s * 1e3:.0f} ms per message after an MLP gradient; "
              f"ideal = K / (worker time per message)")
        print(f"{'K':>3s} {'worker ms':>10s} {'ormo':>8s} {'ideal':>8s} {'ratio':>6s} {'plain PS':>9s} "
              f"{'ormo/plain':>10s} {'no sleep: ormo':>15s} {'plain':>7s} {'ratio':>6s} {'server ms/upd':>14s} "
              f"{'sim ms/iter':>12s}")
        for k in (2, 4, 8):
            if sys.stdout.isatty():  # what is being measured; its row overwrites this
                print(f"{k:3d} ...", end="\r", flush=True)
            r = ormo_rate(k, sleep_s, per_worker, Path(tmp) / f"scale{k}")
            plain = plain_rate(k, sleep_s, per_worker)
            fast = ormo_rate(k, 0.0, per_worker * 2, Path(tmp) / f"fast{k}")
            plain_fast = plain_rate(k, 0.0, per_worker * 2)
            sim_ms = simulator_ms_per_iteration(k)
            results["scaling"].append(r)
            results["plain"].append({"k": k, "updates_per_s": plain, "no_sleep": plain_fast,
                                     "ormo_no_sleep": fast["updates_per_s"]})
            results["simulator"].append({"k": k, "ms_per_iteration": sim_ms})
            print(f"{k:3d} {r['worker_ms_per_message']:10.1f} {r['updates_per_s']:8.1f} {r['ideal']:8.1f} "
                  f"{r['updates_per_s'] / r['ideal']:6.3f} {plain:9.1f} {r['updates_per_s'] / plain:10.3f} "
                  f"{fast['updates_per_s']:15.1f} {plain_fast:7.1f} {fast['updates_per_s'] / plain_fast:6.3f} "
                  f"{fast['server_ms_per_update']:14.3f} {sim_ms:12.3f}", flush=True)
        target, epochs = (85.0, 4.0) if args.quick else (93.0, 12.0)
        print(f"4. K = 8, 25 % of workers 4x slower, sleep 20 ms per step: wall-clock to {target:.0f} % test accuracy")
        for method in ("ormo", "ssgdm"):
            r = time_to_accuracy(method, target, 0.02, epochs, Path(tmp) / f"het-{method}")
            results["heterogeneous"].append(r)
            print(f"   {method:6s} {r['seconds_to_target']:7.2f} s ({r['epochs_to_target']:.1f} epochs; final "
                  f"{r['final_acc']:.1f} % after {r['wall_s']:.1f} s)", flush=True)
        het = {r["method"]: r for r in results["heterogeneous"]}
        speedup = het["ssgdm"]["seconds_to_target"] / het["ormo"]["seconds_to_target"]
        results["speedup_ormo_over_ssgdm"] = speedup
        print(f"   SSGDm / OrMo wall-clock to target: {speedup:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    stop_ray()


if __name__ == "__main__":
    main()
