"""``train(..., engine="ray")``: the same run directory as a simulated run, from real worker processes.

The run directory gets, besides the usual files, ``rejections.jsonl`` (every rejected message with its reason) and an
event log whose metadata lists the re-dispatches (restarted workers, rejected messages), so that ``ormo replay`` can
rerun the arrival order in the simulator. ``sim_time`` in the log and the metrics is measured wall-clock time.
"""

from __future__ import annotations

import functools
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.events import EventLog
from ..engine.simulator import delay_stats
from ..rules import Rule
from ..task import Task, evaluate_all
from .config import ExperimentConfig, ScheduleConfig, to_toml
from .metrics import MetricsWriter, metric_fields, metrics_row, read_metrics
from .problem import build_task, driver_base_dir
from .run import RunResult
from .rundir import CHECKPOINT, FINAL, load_checkpoint, write_bytes, write_json, write_text
from .runloop import DeferredInterrupt, RunStopped, iteration_marks, progress_bar, shown_metric


def _schedule(schedule: ScheduleConfig, messages_per_epoch: float, t: int) -> float:
    return schedule.factor(t / messages_per_epoch)


def _write_logs(run_dir: Path, final: dict[str, Any]) -> EventLog:
    """The event log (with its re-dispatches) and rejections.jsonl from the server's final state."""
    events = EventLog()
    events.load_state_dict(final["events"])
    events.meta["redispatches"] = final["redispatches"]
    events.save(run_dir / "events.jsonl")
    write_text(run_dir / "rejections.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in final["rejections"]))
    return events


def train_on_ray(
    cfg: ExperimentConfig,
    run_dir: Path,
    info: dict[str, Any],
    *,
    problem: Task,
    rule: Rule,
    total: int,
    messages_per_epoch: float,
    resume: bool,
    progress: bool,
    kill_hook: Any = None,
) -> RunResult:
    try:
        from ray import cloudpickle

        from ..engine.ray_runtime import Halted, ServerDied, run_ray
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("engine='ray' needs Ray: pip install 'ormo[ray]'") from e
    from .plugins import file_modules

    for module in file_modules():  # a rule class defined in a task's file travels by value: no worker imports the
        cloudpickle.register_pickle_by_value(module)  # file before the rule reaches it (the task it rebuilds itself)

    evals = sorted(iteration_marks(cfg.train.eval_every, messages_per_epoch, total))
    checkpoints = sorted(iteration_marks(cfg.train.checkpoint_every, messages_per_epoch, total))
    window = max(1, math.ceil(messages_per_epoch))
    metrics = MetricsWriter(run_dir, fields=metric_fields([m.name for m in problem.metrics]),
                            tensorboard=cfg.train.tensorboard)
    config_toml = to_toml(cfg)
    resume_state = None
    if resume and (run_dir / CHECKPOINT).is_file():
        ckpt = load_checkpoint(run_dir, config_toml=config_toml, engine="ray")
        resume_state = ckpt["server"]
        metrics.reset([r for r in read_metrics(run_dir) if r["iteration"] <= resume_state["t"]])
    else:
        metrics.reset([])
        metrics.add(metrics_row(0, messages_per_epoch=messages_per_epoch, local_steps=rule.local_steps,
                                sim_time_s=0.0, train_loss=math.nan,
                                evaluation=evaluate_all(problem, problem.params0, eval_test=cfg.train.eval_test),
                                delay_mean=math.nan, delay_max=None, lr_scale=cfg.schedule.factor(0.0)))
    first_t = resume_state["t"] if resume_state else 0
    pending = [s for s in (resume_state or {}).get("snapshots", []) if s["t"] > metrics.rows[-1]["iteration"]] \
        if metrics.rows else []
    bar = None  # shown from the first message on; before it, one line says what is starting (no ETA to guess)

    def on_snapshot(snap: dict[str, Any]) -> None:
        problem.set_server_state(snap["buffers"])
        t = snap["t"]
        row = metrics_row(t, messages_per_epoch=messages_per_epoch, local_steps=rule.local_steps,
                          sim_time_s=snap["sim_time_s"], train_loss=snap["train_loss"],
                          evaluation=evaluate_all(problem, snap["params"], eval_test=cfg.train.eval_test),
                          delay_mean=snap["delay_mean"], delay_max=snap["delay_max"], lr_scale=snap["lr_scale"])
        metrics.add(row)
        if bar is not None:
            bar.set_postfix(epoch=f"{row['epoch']:.2f}", wall_s=f"{row['sim_time_s']:.0f}",
                            loss=f"{row['train_loss']:.4f}", **shown_metric(row, problem), refresh=False)

    for snap in pending:  # evaluated by the server before a kill, never written by the driver: written now
        on_snapshot(snap)

    def on_starting(k: int, n: int) -> None:
        if progress:
            print(f"{cfg.name}: starting {k} workers on {n} process{'es' if n != 1 else ''}", file=sys.stderr,
                  flush=True)

    def on_progress(t: int) -> None:
        nonlocal bar
        if bar is None and t > first_t:
            bar = progress_bar(total, first_t, cfg.name, progress)
        if bar is not None:
            bar.update(t - bar.n)

    meta = {"rule": rule.name, "hyperparameters": rule.describe()["hyperparameters"], "scheduler": rule.scheduler,
            "num_workers": cfg.train.num_workers, "seed": cfg.train.seed, "timing": cfg.timing.build().describe(),
            "engine": "ray", "worker_threads": cfg.ray.worker_threads}
    info.update(status="running", engine="ray", ray={"address": cfg.ray.address,
                                                     "worker_threads": cfg.ray.worker_threads})
    info.pop("error", None)  # an earlier failure is history once the run goes on
    write_json(run_dir / "run.json", info)
    started = time.monotonic()
    try:
        # Ctrl-C / SIGTERM: the server stops applying messages, checkpoints at its last applied iteration and hands
        # over its evaluations; then the workers are killed and the run stops with 130 / 143 (a second signal: at once)
        with DeferredInterrupt() as interrupt:
            final = run_ray(
                rule=rule, problem_factory=functools.partial(build_task, cfg, base_dir=driver_base_dir()),
                params0=problem.params0,
                num_workers=cfg.train.num_workers, total=total,
                schedule=functools.partial(_schedule, cfg.schedule, messages_per_epoch),
                timing=cfg.timing.build(), seed=cfg.train.seed, scheduler=rule.scheduler, meta=meta, options=cfg.ray,
                eval_marks=evals, checkpoint_marks=checkpoints, checkpoint_path=str((run_dir / CHECKPOINT).resolve()),
                checkpoint_config=config_toml, buffers_size=problem.server_state().numel(), loss_window=window,
                resume=resume_state, on_snapshot=on_snapshot, on_progress=on_progress, kill_hook=kill_hook,
                should_stop=lambda: interrupt.requested, on_started=interrupt.reinstall, on_starting=on_starting)
    except Halted as e:
        t = None
        if e.state is not None:
            _write_logs(run_dir, e.state)  # the event log up to the stop: replayable like any
            t = int(e.state["t"]) if e.state.get("checkpointed") else None
        raise RunStopped(e.signum, t=t, run_dir=run_dir) from None
    except Exception as e:  # train() records the failure in run.json
        partial = getattr(e, "partial", None)
        if partial is not None:  # the logs of a failed run are the ones most worth reading (and replaying)
            _write_logs(run_dir, partial)
        elif (run_dir / CHECKPOINT).is_file():  # the server is gone: the log up to the last checkpoint
            try:
                _write_logs(run_dir, load_checkpoint(run_dir, config_toml=config_toml, engine="ray")["server"])
            except Exception:  # noqa: S110 - best effort: the failure itself is what gets reported
                pass
        if isinstance(e, ServerDied):
            raise RuntimeError(f"{e}; `ormo train --resume {run_dir}` continues from it") from None
        raise
    finally:
        if bar is not None:
            bar.close()
        metrics.close()

    events = _write_logs(run_dir, final)
    params = final["params"]
    problem.set_server_state(torch.from_numpy(np.array(final["buffers"])))
    buf = io.BytesIO()  # serialized in memory (a copy), so a disk error is an OSError naming the file
    torch.save({"params": params, **problem.final_state(params)}, buf)
    write_bytes(run_dir / FINAL, buf.getvalue())
    k = cfg.train.num_workers
    workers = events.column("worker")
    summary = {
        "rule": rule.name, "scheduler": rule.scheduler, "num_workers": k, "iterations": len(events),
        "sim_time_s": events[-1].sim_time if len(events) else 0.0, "delay": delay_stats(events.column("delay")),
        "messages_per_worker": [int((workers == w).sum()) for w in range(k)], "idle_time_s": final["idle"],
        "rejected_messages": len(final["rejections"]), "redispatches": len(final["redispatches"]),
        "wall_time_s": time.monotonic() - started,
        "server_busy_s": final["busy_s"],
        "worker_time_per_message_s": final["work_s"] / max(len(events), 1),
        "worker_processes": final["processes"],
        # from the start (Ray's own included when this run started it) to the first applied message
        "first_message_s": (None if final["first_applied_s"] is None
                            else final["startup_s"] + final["first_applied_s"]),
    }
    info.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), summary=summary,
                final=metrics.rows[-1], diverged=None)
    write_json(run_dir / "run.json", info)
    return RunResult(run_dir=run_dir, params=params, metrics=metrics.rows, summary=summary)
