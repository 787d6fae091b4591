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
from ..engine.events import EventLogError
from .config import is_thread_count, load_config, most_recorded_threads
from .plugins import check_task_sources, task_sources
from .problem import build_task
from .rundir import CHECKPOINT, FINAL, RunDirError, read_run_info, safe_load, write_text


def _check_complete(run_dir: Path, events: int) -> None:
    """A log with fewer events than the run made (a copy cut short), or more (another run's, or appended to), cannot
    be replayed: say so, rather than let the comparison merely come out different. The run's count is run.json's
    summary, or its last checkpoint's t."""
    path = run_dir / "events.jsonl"
    made, source = None, ""
    try:
        made, source = int(read_run_info(run_dir)["summary"]["iterations"]), "run.json's summary"
    except (OSError, RunDirError, KeyError, TypeError, ValueError):
        if (run_dir / CHECKPOINT).is_file():
            try:
                ckpt = safe_load(run_dir / CHECKPOINT, fix="")
                made, source = int(ckpt.get("t", ckpt.get("server", {}).get("t"))), f"{CHECKPOINT}"
            except (RunDirError, TypeError, ValueError, AttributeError):
                pass
    if made is not None and events < made:
        raise EventLogError(f"{path} is truncated: it holds {events} events, but the run made {made} iterations "
                            f"({source}); the log ends at line {events + 1}, so the run cannot be replayed (restore "
                            f"the complete events.jsonl)")
    if made is not None and events > made and source == "run.json's summary":  # a checkpoint may lag the log
        raise EventLogError(f"{path} holds {events} events, but the run made {made} iterations ({source}): the lines "
                            f"after line {made + 1} belong to no iteration of this run (restore the run's own "
                            f"events.jsonl)")


def _check_same_run(run_dir: Path, meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """A log copied from another run (another rule or seed) would replay into a mere "differs": name the mismatch."""
    for key, value in expected.items():
        if key in meta and meta[key] != value:
            raise EventLogError(f"{run_dir / 'events.jsonl'}:1: its header says {key} = {json.dumps(meta[key])}, but "
                                f"config.toml says {json.dumps(value)}: the log belongs to another run; restore this "
                                f"run's events.jsonl")


def replay(run_dir: str | Path, *, write: bool = True) -> dict[str, Any]:
    """Replay ``run_dir`` and compare with its ``final.pt``; returns (and writes ``replay.json``) the comparison."""
    run_dir = Path(run_dir)
    for name in ("config.toml", "events.jsonl", "final.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"cannot replay {run_dir}: {name} is missing (is the run finished?)")
    cfg = load_config(run_dir / "config.toml")
    log = EventLog.load(run_dir / "events.jsonl")
    log.check_workers(cfg.train.num_workers, source=run_dir / "events.jsonl")
    _check_same_run(run_dir, log.meta, {"rule": cfg.method.name, "seed": cfg.train.seed})
    _check_complete(run_dir, len(log))
    recorded = safe_load(run_dir / FINAL, fix="the run's final parameters are lost: it cannot be compared")
    if not isinstance(recorded.get("params"), torch.Tensor):
        raise RunDirError(f"{run_dir / FINAL} holds no 'params' tensor; it is not an ormo final.pt")
    recorded = recorded["params"]
    # the thread count the arithmetic ran with: the Ray workers' (in the log), or the simulated run's (run.json; a
    # sweep runs with fewer threads than a lone `ormo train`, and matrix products round differently)
    threads, where = log.meta.get("worker_threads"), f"{run_dir / 'events.jsonl'}'s header has worker_threads"
    if not threads:
        try:
            threads, where = read_run_info(run_dir).get("threads"), f"{run_dir / 'run.json'} has threads"
        except (OSError, ValueError, RuntimeError):
            threads = None
    if threads is not None and not is_thread_count(threads):  # a hand edit: torch would abort, or a traceback
        raise RunDirError(f"{where} = {json.dumps(threads)}, not a torch thread count (an integer in [1, "
                          f"{most_recorded_threads()}]); restore the value the run recorded")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        problem = build_task(cfg)
        if cfg.task.entry or cfg.task.imports:  # the run's own code, or the comparison means nothing
            try:
                sources = (read_run_info(run_dir).get("task") or {}).get("sources")
            except (OSError, ValueError, RuntimeError):
                sources = None
            check_task_sources(sources, task_sources(cfg.task.entry, cfg.task.imports), what=f"replay {run_dir}")
        rule = cfg.method.build()
        messages_per_epoch = problem.train_size / (cfg.data.batch_size * rule.local_steps)
        batch = log.meta.get("batch", 0)  # a batched run replays batched alike (its rounding is its own)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:  # a hand edit
            raise EventLogError(f"{run_dir / 'events.jsonl'}:1: its header says batch = {json.dumps(batch)}, not a "
                                f"number of messages (an integer >= 0); restore the value the run recorded")
        sim = Simulator(rule, problem.params0, problem.grad_fn, num_workers=cfg.train.num_workers,
                        timing=Replay(log), seed=cfg.train.seed,
                        lr_schedule=lambda t: cfg.schedule.factor(t / messages_per_epoch),
                        on_redispatch=problem.reset_worker, batch=batch,
                        grad_batch=getattr(problem, "grad_batch", None) if batch else None,
                        on_consume=getattr(problem, "select_message", None) if batch else None)
        result = sim.run().result()
    finally:
        torch.set_num_threads(previous_threads)
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
        write_text(run_dir / "replay.json", json.dumps(out, indent=2) + "\n")
    return out
