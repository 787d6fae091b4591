"""The simulator's cost per gradient against a plain PyTorch minibatch-SGD loop, measured in one run.

Both sides compute the same gradients: the same model, batch and synthetic images, the same keyed minibatch sampler
and normalization. Cases: resnet20 and lenet (batch 64 of 32×32×3) at K = 16 and 64, the quickstart MLP (batch 32 of
8×8×1, 50,826 parameters) and an 11M-parameter MLP (two hidden layers of 2816 and 1024 on 32×32×3, batch 64), both
at K = 16. Everything runs on one torch thread and is timed on the process's CPU time, so a loaded machine slows
both sides alike. The plain loop is what a user would write: sample, forward,
backward, ``torch.optim.SGD(momentum=0.9).step()``. The simulator side is ``ormo.experiment.TrainProblem`` driven by
the OrMo rule with K simulated workers: per message it also loads the worker's snapshot into the flat model, keeps
each worker's BatchNorm statistics, applies the ordered update, copies the new parameters for the worker (or, as
``ormo train`` does for large parameter tensors, computes the worker's next message from the server's parameters
before they move: ``compute_ahead`` in run.json) and logs the event. As ``ormo train`` runs on a CPU
(``train.deferred_checks = "auto"``), the NaN/Inf checks are made on the state at each read-out (each evaluation and
checkpoint), not per message: each block pays for one read-out in proportion to its share of a CIFAR-10 epoch (782
messages).

Blocks of ``--steps`` gradients alternate between the two (which goes first alternates too) after a warm-up, and the
ratio is the median over pairs of adjacent blocks, so the shared machine's load hits both sides alike. Goal: ≤ 1.05.

    python benchmarks/sim_overhead.py [--quick] [--models mlp,mlp-11m] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ormo.data import load_dataset
from ormo.data.augment import normalize
from ormo.data.sampler import minibatch_indices
from ormo.engine import Simulator
from ormo.experiment import load_config
from ormo.experiment.problem import TrainProblem
from ormo.experiment.run import resolve_ahead
from ormo.models import build_model, register_model
from ormo.models.mlp import MLP

#: messages between two read-outs of a run: a CIFAR-10 epoch at batch 64 (50,000 / 64)
READOUT_EVERY = 782


@register_model("mlp-11m")
def _mlp_11m(*, num_classes: int, in_channels: int, image_size: int) -> MLP:
    """11,548,426 parameters on 32×32×3: where a message's own allocations would show."""
    return MLP(in_features=in_channels * image_size * image_size, num_classes=num_classes, hidden=(2816, 1024))


def plain_loop(model_name: str, dataset, steps_per_block: int, batch: int):
    """A generator: each next() runs one block of plain SGD steps and yields its CPU time per gradient."""
    c, side, _ = dataset.image_shape
    model = build_model(model_name, num_classes=dataset.num_classes, in_channels=c, image_size=side, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n, step = dataset.train_size, 0
    model.train()
    while True:
        t0 = time.process_time()
        for _ in range(steps_per_block):
            idx = minibatch_indices(n, batch, seed=0, worker=step % 16, index=step, step=0)
            x = normalize(dataset.train_x[idx], dataset.mean, dataset.std)
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(model(x), dataset.train_y[idx]).backward()
            opt.step()
            step += 1
        yield (time.process_time() - t0) / steps_per_block


def simulator_loop(model_name: str, dataset, num_workers: int, steps_per_block: int, batch: int,
                   checks: bool | str = "state"):
    cfg = load_config(None, [f'model.name="{model_name}"', f"data.batch_size={batch}",
                             f"train.num_workers={num_workers}", "method.lr=0.01", "method.momentum=0.9"])
    problem = TrainProblem(cfg, dataset=dataset)
    # as `ormo train` runs it on a CPU (train.deferred_checks = "auto"): nothing checked per message, the state at
    # each read-out; a run reads it at each evaluation and checkpoint (an epoch apart by default), so each block pays
    # the time of one read-out times its share of a CIFAR-10 epoch
    rule = cfg.method.build()
    # and as `ormo train` decides whether to compute each message ahead (large parameter tensors: the 11M MLP)
    ahead = resolve_ahead(problem, rule, batched=False, defer_checks=checks)["on"]
    sim = Simulator(rule, problem.params0, problem.grad_fn, num_workers=num_workers,
                    num_iterations=10**9, timing=cfg.timing.build(), seed=0, defer_checks=checks, ahead=ahead,
                    on_ahead=problem.stash_message, on_consume=problem.select_message)
    while True:
        t0 = time.process_time()
        for _ in range(steps_per_block):
            sim.step()
            problem.commit_message()
        spent = time.process_time() - t0
        t0 = time.process_time()
        sim.flush_checks()
        spent += (time.process_time() - t0) * steps_per_block / READOUT_EVERY
        yield spent / steps_per_block


def measure(model_name: str, num_workers: int, *, steps: int, pairs: int, dataset, batch: int = 64) -> dict:
    plain = plain_loop(model_name, dataset, steps, batch)
    sim = simulator_loop(model_name, dataset, num_workers, steps, batch)
    next(plain), next(sim)  # warm-up (allocator, first-call costs)
    ratios, p_times, s_times = [], [], []
    for i in range(pairs):
        if i % 2 == 0:
            p, s = next(plain), next(sim)
        else:
            s, p = next(sim), next(plain)
        p_times.append(p)
        s_times.append(s)
        ratios.append(s / p)
    return {"model": model_name, "num_workers": num_workers, "batch": batch,
            "plain_ms": 1e3 * statistics.median(p_times),
            "sim_ms": 1e3 * statistics.median(s_times), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "pairs": pairs, "steps_per_block": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter blocks")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--models", help="only these cases, comma-separated (resnet20,lenet,mlp,mlp-11m)")
    args = parser.parse_args()
    # a line per case as it finishes, even through a pipe (`make bench | tee`): a resnet20 case takes ~20 s
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(1)
    images = load_dataset("synthetic", train_size=2048, test_size=64, image_shape=(3, 32, 32), seed=0)
    digits = load_dataset("synthetic", train_size=2048, test_size=64, image_shape=(1, 8, 8), seed=0)
    # (model, K, dataset, batch, steps per block, pairs)
    plan = [(m, k, images, 64, *steps) for m, steps in
            (("resnet20", (4, 5) if args.quick else (8, 7)), ("lenet", (40, 5) if args.quick else (100, 9)))
            for k in (16, 64)]
    plan += [("mlp", 16, digits, 32, *((200, 5) if args.quick else (500, 9))),
             ("mlp-11m", 16, images, 64, *((4, 5) if args.quick else (10, 9)))]
    if args.models is not None:
        known = {case[0] for case in plan}
        wanted = {m.strip() for m in args.models.split(",") if m.strip()}
        if not wanted or wanted - known:
            parser.error(f"--models {args.models!r}: expected comma-separated names among {', '.join(sorted(known))}")
        plan = [case for case in plan if case[0] in wanted]
    print(f"torch {torch.__version__}, 1 thread, CPU time; OrMo, K workers")
    print(f"{'model':10s} {'K':>3s} {'batch':>5s} {'plain ms/grad':>14s} {'sim ms/grad':>12s} "
          f"{'ratio (min-max)':>22s}  goal <= 1.05")
    results = []
    for model_name, k, dataset, batch, steps, pairs in plan:
        if sys.stdout.isatty():  # what is being measured; its row overwrites this
            print(f"{model_name:10s} {k:3d} ...", end="\r", flush=True)
        r = measure(model_name, k, steps=steps, pairs=pairs, dataset=dataset, batch=batch)
        results.append(r)
        ok = "yes" if r["ratio"] <= 1.05 else "no"
        print(f"{model_name:10s} {k:3d} {batch:5d} {r['plain_ms']:14.3f} {r['sim_ms']:12.3f} "
              f"{r['ratio']:8.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})  {ok}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
