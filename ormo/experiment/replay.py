"""``ormo replay RUN_DIR``: rerun a recorded run (a Ray run, or a simulated one) in the simulator.

The simulator follows the run's event log: the same arrival order, the same parameter indices, the same
re-dispatches (restarted workers, rejected messages, late joiners: the worker then starts again from fresh worker
state and its model's initial BatchNorm statistics, as the Ray worker does), and, because minibatches are keyed by
(seed, worker, index, step), the same data. Each worker's message is recomputed from the parameters the simulator's
server sent it. With the workers' torch thread count (recorded in the log) and the same kind of CPU, the arithmetic
is the same and the final parameters are bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..engine import EventLog, Replay, Simulator
from .config import load_config
from .problem import TrainProblem


def replay(run_dir: str | Path, *, write: bool = True) -> dict[str, Any]:
    """Replay ``run_dir`` and compare with its ``final.pt``; returns (and writes ``replay.json``) the comparison."""
    run_dir = Path(run_dir)
    for name in ("config.toml", "events.jsonl", "final.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"cannot replay {run_dir}: {name} is missing (is the run finished?)")
    cfg = load_config(run_dir / "config.toml")
    log = EventLog.load(run_dir / "events.jsonl")
    threads = log.meta.get("worker_threads")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        problem = TrainProblem(cfg)
        rule = cfg.method.build()
        messages_per_epoch = problem.train_size / (cfg.data.batch_size * rule.local_steps)
        sim = Simulator(rule, problem.params0, problem.grad_fn, num_workers=cfg.train.num_workers,
                        timing=Replay(log), seed=cfg.train.seed,
                        lr_schedule=lambda t: cfg.schedule.factor(t / messages_per_epoch),
                        on_redispatch=problem.reset_worker)
        result = sim.run().result()
    finally:
        torch.set_num_threads(previous_threads)
    recorded = torch.load(run_dir / "final.pt", weights_only=False)["params"]
    diff = (result.params.double() - recorded.double()).abs()
    out = {
        "run_dir": str(run_dir),
        "engine": log.meta.get("engine"),
        "iterations": len(result.events),
        "redispatches": len(log.meta.get("redispatches", [])),
        "bit_identical": bool(torch.equal(result.params, recorded)),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / max(float(recorded.abs().max()), 1e-30)),
        "worker_threads": threads,
    }
    if write:
        (run_dir / "replay.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out
