"""One experiment on the simulator, from config to run directory, resumable after a kill.

A run directory holds::

    config.toml      the resolved configuration (reading it back gives the same config)
    run.json         status, seed, label, package versions, git commit, command line, final summary, and the task
                     (its entry, metrics with their directions, and what it read)
    metrics.jsonl    one row per evaluation (also metrics.csv): epoch, iteration, gradients, sim_time_s,
                     train_loss, test_<metric> and val_<metric> for each metric of the task (image classification:
                     test_loss, test_acc, val_loss, val_acc), delay_mean, delay_max, lr_scale
    events.jsonl     the event log (written at every checkpoint and at the end)
    checkpoint.pt    the latest checkpoint (written atomically: a kill never leaves a torn one), stamped with the
                     config and code version that made it
    final.pt         the final server parameters and BatchNorm statistics
    .lock            the run lock: one process writes a run directory at a time (see ``rundir.RunLock``)
    tensorboard/     when train.tensorboard = true

Training loop, top to bottom: build the problem and the simulator, evaluate w_0, then step the simulator; every
``eval_every`` epochs evaluate and log, every ``checkpoint_every`` epochs checkpoint; at the end write the results.
File I/O lives in ``rundir``; the loop's shared pieces (marks, signals, progress bar) in ``runloop``.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import NonFiniteError, Simulator
from ..engine.simulator import ahead_problem, state_checks_sound
from ..rules import Rule
from ..rules.base import ConfigError
from ..task import Task, describe_task, evaluate_all
from .config import (
    ExperimentConfig,
    check_ray_address,
    is_thread_count,
    load_config,
    most_recorded_threads,
    to_toml,
)
from .metrics import MetricsWriter, metric_fields, metrics_row
from .plugins import check_task_sources, task_sources
from .problem import build_task
from .rundir import (
    CHECKPOINT,
    CHECKPOINT_VERSION,
    FINAL,
    CheckpointRefused,
    RunDirError,
    RunLock,
    explain_os_error,
    load_checkpoint,
    make_run_dir,
    read_run_info,
    safe_load,
    save_checkpoint,
    write_bytes,
    write_json,
    write_text,
)
from .runloop import DeferredInterrupt, RunStopped, iteration_marks, progress_bar, shown_metric

__all__ = ["CHECKPOINT", "CHECKPOINT_VERSION", "DeferredInterrupt", "RunResult", "RunStopped", "read_run_info",
           "train"]

# the names run_ray.py and older callers imported from here
_iteration_marks, _progress, _write_json = iteration_marks, progress_bar, write_json


@dataclass
class RunResult:
    run_dir: Path
    params: torch.Tensor
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    #: ``"run diverged at iteration t (worker w): ..."`` when the run stopped on NaN/Inf, else None
    diverged: str | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1]

    @property
    def status(self) -> str:
        return "diverged" if self.diverged else "finished"


def _versions() -> dict[str, str]:
    from .. import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "ormo": __version__}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def train(
    cfg: ExperimentConfig | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    engine: str = "simulator",
    address: str | None = None,
) -> RunResult:
    """Run ``cfg`` into ``run_dir`` on the simulator (default) or on Ray (``engine="ray"``, real worker processes;
    see ``ormo.engine.ray_runtime``). With ``resume=True`` continue the run already there (its own config and engine
    are used) from its last checkpoint: bit-identically to an uninterrupted run on the simulator; on Ray every worker
    restarts from the checkpointed server state. ``address`` (with ``resume``, a Ray run only): continue on the
    cluster at this ``ray.address`` instead of the recorded one (where a run runs is not part of what it computes).

    The run holds ``run_dir``'s lock from before it looks at the directory to the end: a second process gets a
    ``RunDirError`` naming the holder. SIGINT/SIGTERM stop the run with a checkpoint and raise :class:`RunStopped`.
    File-system failures raise ``RunDirError`` (or ``OSError``) naming the file, with ``run.json`` set to ``failed``
    when it can still be written."""
    if cfg is not None and not isinstance(cfg, ExperimentConfig):  # e.g. a path: it was an AttributeError
        raise ConfigError(f"invalid cfg: {type(cfg).__name__} (must be an ExperimentConfig: "
                          f"ormo.experiment.load_config(path, overrides) reads one, or None with resume=True)")
    run_dir = Path(run_dir)
    if engine not in ("simulator", "ray"):
        raise ConfigError(f"invalid engine: {engine!r} (must be 'simulator' or 'ray')")
    previous_threads = torch.get_num_threads()
    try:
        if not resume and cfg is not None and cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)  # before the task is built: its arithmetic runs with it too
        return _train(cfg, run_dir, resume=resume, progress=progress, engine=engine, address=address)
    finally:
        torch.set_num_threads(previous_threads)  # a caller's own count is untouched


def _train(cfg: ExperimentConfig | None, run_dir: Path, *, resume: bool, progress: bool, engine: str,
           address: str | None = None) -> RunResult:
    built: tuple[Task, Rule] | None = None
    if address is not None and not resume:
        raise ConfigError("train(address=...) moves a resumed Ray run to another cluster: give ray.address in the "
                          "config of a new run")
    if resume:
        if not (run_dir / "config.toml").is_file():
            raise ConfigError(f"cannot resume {str(run_dir)!r}: no config.toml there (not a run directory, or a run "
                              f"that stopped before writing it: start it again with the command that made it)")
        if address is not None:
            check_ray_address(address)
    else:
        if cfg is None:
            raise ConfigError("train() needs a config unless resume=True")
        if engine == "ray" and cfg.train.batch_workers is True:
            raise ConfigError("invalid train.batch_workers: true with --engine ray (batching in-flight gradients is "
                              "the simulator's; Ray's workers are real processes): set it to \"auto\" or false")
        if not (run_dir / "run.json").exists():  # a bad model or dataset fails here, early, before any file is made
            built = _driver_problem(cfg, engine), cfg.method.build()
            _run_length(cfg, train_size=built[0].train_size, local_steps=built[1].local_steps)
        make_run_dir(run_dir)
    with RunLock(run_dir):
        return _train_locked(cfg, run_dir, resume=resume, progress=progress, engine=engine, built=built,
                             address=address)


def _train_locked(cfg: ExperimentConfig | None, run_dir: Path, *, resume: bool, progress: bool, engine: str,
                  built: tuple[Task, Rule] | None, address: str | None = None) -> RunResult:
    if resume:
        cfg = load_config(run_dir / "config.toml")
        try:
            info = read_run_info(run_dir)
        except FileNotFoundError:
            raise ConfigError(f"cannot resume {str(run_dir)!r}: its run.json is missing (config.toml is there); "
                              f"restore run.json, or delete the directory to start the run over") from None
        engine = info.get("engine", "simulator")
        if info.get("status") == "finished":
            return _finished_result(run_dir, info)
        if address is not None and address != cfg.ray.address:
            if engine != "ray":
                raise ConfigError(f"--address moves a Ray run to another cluster, but {str(run_dir)!r} is a "
                                  f"{engine} run: resume it without --address")
            cfg = load_config(run_dir / "config.toml", [f"ray.address={json.dumps(address)}"])
            write_text(run_dir / "config.toml", to_toml(cfg))  # later resumes (and replays) use it too
        _check_recorded(info, run_dir)
        torch.set_num_threads(info["threads"])  # the same arithmetic as before the interruption
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # where this part runs (a sweep may pin another GPU)
            info["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    else:
        assert cfg is not None
        if (run_dir / "run.json").exists():
            raise ConfigError(
                f"run directory {str(run_dir)!r} already holds a run; continue it with "
                f"`ormo train --resume {run_dir}` or choose another directory"
            )
        write_text(run_dir / "config.toml", to_toml(cfg))
        info = {
            "name": cfg.name,
            "label": cfg.train.label,
            "method": cfg.method.name,
            "seed": cfg.train.seed,
            "engine": engine,
            "threads": torch.get_num_threads(),
            "status": "running",
            "versions": _versions(),
            "git_commit": _git_commit(),
            "command": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # which GPU(s) "cuda" meant (a sweep pins one)
            info["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
        if built is not None:  # reports read the metric directions from here
            info["task"] = describe_task(built[0], entry=cfg.task.entry)
            if cfg.task.entry or cfg.task.imports:  # the user code, so that a resume or replay can check it
                info["task"]["sources"] = task_sources(cfg.task.entry, cfg.task.imports)
        write_json(run_dir / "run.json", info)
    assert cfg is not None
    problem, rule = built if built is not None else (_driver_problem(cfg, engine), cfg.method.build())
    if resume and (cfg.task.entry or cfg.task.imports):  # the same user code as when the run started, or nothing runs
        try:
            check_task_sources((info.get("task") or {}).get("sources"),
                               task_sources(cfg.task.entry, cfg.task.imports), what=f"resume {run_dir}")
        except ConfigError as e:
            raise CheckpointRefused(str(e)) from None
    messages_per_epoch, total = _run_length(cfg, train_size=problem.train_size, local_steps=rule.local_steps)
    try:
        if not resume:  # inside the try: warnings turned into errors (-W error) still mark the run failed
            _warn_about_the_size(cfg, train_size=problem.train_size, local_steps=rule.local_steps, total=total)
        if engine == "ray":
            from .run_ray import train_on_ray

            return train_on_ray(cfg, run_dir, info, problem=problem, rule=rule, total=total,
                                messages_per_epoch=messages_per_epoch, resume=resume, progress=progress)
        return _train_simulated(cfg, run_dir, info, problem=problem, rule=rule, total=total,
                                messages_per_epoch=messages_per_epoch, resume=resume, progress=progress)
    except KeyboardInterrupt:  # RunStopped included: the loop checkpointed before raising
        _record(run_dir, info, status="interrupted")
        raise
    except CheckpointRefused:  # nothing ran: the run stays as it was (interrupted, stopped), to be fixed and resumed
        raise
    except Exception as e:
        if info.get("status") != "finished":
            _record(run_dir, info, status="failed",
                    error=str(e) if isinstance(e, RunDirError) else f"{type(e).__name__}: {e}")
        raise


def _run_length(cfg: ExperimentConfig, *, train_size: int, local_steps: int) -> tuple[float, int]:
    """Messages per epoch, and the run's messages (server iterations) for ``train.epochs`` epochs."""
    messages_per_epoch = train_size / (cfg.data.batch_size * local_steps)
    messages = cfg.train.epochs * messages_per_epoch
    if not math.isfinite(messages):  # a huge but finite epochs times the messages of an epoch overflows a float
        raise ConfigError(f"invalid train.epochs: {cfg.train.epochs:g} (at {messages_per_epoch:g} messages an epoch "
                          f"the run's number of messages overflows; must be at most "
                          f"{sys.float_info.max / messages_per_epoch:.3g} epochs here): choose fewer epochs")
    return messages_per_epoch, max(1, math.ceil(messages))


def _check_recorded(info: dict[str, Any], run_dir: Path) -> None:
    """What a resume takes from run.json (the arithmetic of the run so far), checked: a hand-edited value would make
    the resumed run compute something else, silently, or fail with a traceback."""
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"cannot resume {str(run_dir)!r}: its run.json has {key} = {json.dumps(info.get(key))} "
                           f"({why}); restore the value the run recorded, or delete the directory to start over")

    if info.get("engine", "simulator") not in ("simulator", "ray"):  # any other value ran on the simulator, silently
        raise bad("engine", 'the engine the run computed on: "simulator" or "ray"')
    if not is_thread_count(info.get("threads")):
        raise bad("threads", f"the torch thread count the run computed with, an integer in [1, "
                             f"{most_recorded_threads()}]")
    batching = info.get("batch_workers")
    if batching is not None and not (
            isinstance(batching, dict) and batching.get("mode") in ("batched", "sequential") and (
                batching["mode"] == "sequential" or (isinstance(batching.get("max"), int) and not isinstance(
                    batching.get("max"), bool) and batching["max"] >= 1))):
        raise bad("batch_workers", 'how the run computed its messages: {"mode": "sequential"} or {"mode": '
                  '"batched", "max": N >= 1}')
    if info.get("task") is not None and not isinstance(info["task"], dict):
        raise bad("task", "what the run recorded about its task, a table")


#: the memory batched mode may stack by default: the parameters, gradients and their flat copy for every request
BATCH_BYTES = 1 << 30


def resolve_batching(cfg: ExperimentConfig, problem: Task) -> dict[str, Any]:
    """What ``train.batch_workers`` means for this run on the simulator: ``{"mode": "batched" | "sequential",
    "max": N (batched), "why": ...}``, recorded in run.json and used again by a resume and a replay."""
    wanted, k = cfg.train.batch_workers, cfg.train.num_workers
    if wanted is False:
        return {"mode": "sequential", "why": "train.batch_workers = false"}
    if not callable(getattr(problem, "grad_batch", None)):
        if wanted is True:
            raise ConfigError(f"invalid train.batch_workers: true (the task {type(problem).__name__} computes one "
                              f"message at a time: it has no grad_batch, which every ModelTask has); set it to false "
                              f"or \"auto\"")
        return {"mode": "sequential", "why": "the task has no grad_batch"}
    if wanted == "auto":
        if not cfg.train.device.startswith("cuda"):
            return {"mode": "sequential", "why": "auto: on a CPU one message at a time is as fast or faster "
                                                 "(benchmarks/gpu_throughput.py)"}
        if k == 1:
            return {"mode": "sequential", "why": "auto: one worker"}
    reason = problem.batch_problem() if callable(getattr(problem, "batch_problem", None)) else None
    if reason is not None:
        if wanted is True:  # asked for: a run that quietly computed one message at a time would say "batched"
            raise ConfigError(f"invalid train.batch_workers: true ({reason}); set it to false or \"auto\"")
        return {"mode": "sequential", "why": f"auto: {reason}"}
    p = problem.params0
    most = min(k, cfg.train.batch_max or max(1, BATCH_BYTES // (3 * p.numel() * p.element_size())))
    return {"mode": "batched", "max": int(most),
            "why": "train.batch_workers = true" if wanted is True else f"auto: {cfg.train.device}"}


def resolve_ahead(problem: Task, rule: Rule, *, batched: bool, defer_checks: bool | str) -> dict[str, Any]:
    """Whether the simulator computes each message ahead (``Simulator(ahead=True)``): ``{"on": bool, "why": str}``,
    recorded in run.json. Bit-identical either way (a resume may decide differently); on where it saves time: a
    model whose parameters are large tensors (the flat model binds them without copies, so the worker's copy of the
    parameters is the one pass over them left), a one-step asynchronous method, one message at a time."""
    if batched:
        return {"on": False, "why": "batched gradients compute messages ahead already"}
    from ..task import ModelTask

    own = ("grad_fn", "stash_message", "select_message", "commit_message", "discard_message")
    if not isinstance(problem, ModelTask) or any(getattr(type(problem), n) is not getattr(ModelTask, n) for n in own):
        return {"on": False, "why": f"the task {type(problem).__name__} computes its own messages (computing ahead "
                                    f"needs ModelTask's own grad_fn and message staging)"}
    if not problem.compute_ahead:
        return {"on": False, "why": f"the task {type(problem).__name__} sets compute_ahead = False"}
    if not getattr(getattr(problem, "flat", None), "rebinds", False):
        return {"on": False, "why": "the parameters are small tensors: copying them costs less than a message's "
                                    "own bookkeeping"}
    why = ahead_problem(rule, rule.scheduler, 0, defer_checks)
    if why is not None:
        return {"on": False, "why": why}
    return {"on": True, "why": "large parameter tensors: each message is computed from the server's parameters at "
                               "its dispatch instead of from a copy (one pass over the parameters less per message)"}


def resolve_deferred(cfg: ExperimentConfig, *, batched: bool = False, rule: Rule | None = None) -> dict[str, Any]:
    """What ``train.deferred_checks`` means for this run on the simulator: ``{"on": bool, "why": str}``, plus
    ``"checks"`` when on: ``"record"`` (each check queued on the device into a record of the first failure) or
    ``"state"`` (nothing per message: the server's and workers' state is checked at each read-out)."""
    wanted = cfg.train.deferred_checks
    if wanted is False:
        return {"on": False, "why": "train.deferred_checks = false"}
    if wanted is True:
        return {"on": True, "checks": "record", "why": "train.deferred_checks = true"}
    if cfg.train.device.startswith("cuda"):
        return {"on": True, "checks": "record", "why": f"auto: {cfg.train.device} (no host sync per message)"}
    if batched:
        return {"on": False, "why": "auto: on a CPU a check costs no wait (batched gradients check each batch)"}
    if rule is not None and not state_checks_sound(rule):
        return {"on": False, "why": f"auto: on a CPU a check costs no wait (the rule {rule.name!r} does not declare "
                                    f"Rule.state_checks, so each message is checked)"}
    return {"on": True, "checks": "state",
            "why": "auto: on a CPU, one message at a time: nothing is checked per message; the parameters, momenta "
                   "and worker states are checked at each read-out"}


class _PendingLosses:
    """Message losses left on the device (deferred checks), written into the loss window at a read-out, in order.
    Compacted on the device every ``COMPACT`` messages (no host sync), so a long evaluation interval holds a few
    tensors, not one per message."""

    COMPACT = 4096

    def __init__(self) -> None:
        self.slots: list[int] = []
        self.values: list[torch.Tensor] = []
        self.done: list[tuple[list[int], torch.Tensor]] = []

    def add(self, slot: int, value: torch.Tensor) -> None:
        self.slots.append(slot)
        self.values.append(value.reshape(()))
        if len(self.values) >= self.COMPACT:
            self.done.append((self.slots, torch.stack(self.values)))
            self.slots, self.values = [], []

    def write(self, losses: np.ndarray) -> None:
        if self.values:
            self.done.append((self.slots, torch.stack(self.values)))
        if self.done:
            values = torch.cat([v for _, v in self.done]).tolist()  # the one host sync
            slots = [s for chunk, _ in self.done for s in chunk]
            for slot, value in zip(slots, values, strict=True):  # in order: a later message overwrites its slot
                losses[slot] = value
        self.clear()

    def clear(self) -> None:
        self.slots, self.values, self.done = [], [], []


def _record(run_dir: Path, info: dict[str, Any], **fields: Any) -> None:
    """Best effort: the run's status in run.json. When even that cannot be written (a full disk), the lock tells
    the story: a ``running`` run whose lock is free is reported as ``stopped``."""
    info.update(fields)
    try:
        write_json(run_dir / "run.json", info)
    except (RunDirError, OSError):
        pass


def _warn_about_the_size(cfg: ExperimentConfig, *, train_size: int, local_steps: int, total: int) -> None:
    if cfg.data.batch_size > train_size:
        warnings.warn(f"data.batch_size = {cfg.data.batch_size} is larger than the training set ({train_size} "
                      f"examples): one message is {cfg.data.batch_size * local_steps / train_size:.3g} epochs",
                      stacklevel=4)  # the caller of train()
    if cfg.train.num_workers > total:
        warnings.warn(f"train.num_workers = {cfg.train.num_workers} is larger than the number of messages in the run "
                      f"({total}): at least {cfg.train.num_workers - total} workers never report; raise train.epochs "
                      f"or lower train.num_workers", stacklevel=4)


def _train_simulated(cfg: ExperimentConfig, run_dir: Path, info: dict[str, Any], *, problem: Task, rule: Rule,
                     total: int, messages_per_epoch: float, resume: bool, progress: bool) -> RunResult:
    # A checkpoint continues with the batching it was written with; without one, the config decides (as edited)
    checkpointed = resume and (run_dir / CHECKPOINT).is_file()
    batching = info.get("batch_workers") if checkpointed else None
    if batching is None:  # a run checkpointed before batching existed continues as it ran: one at a time
        batching = {"mode": "sequential", "why": "resumed from a checkpoint written one message at a time"} if (
            checkpointed) else resolve_batching(cfg, problem)
    info["batch_workers"] = batching
    batched = batching["mode"] == "batched"
    deferring = resolve_deferred(cfg, batched=batched, rule=rule)
    info["deferred_checks"] = deferring
    how = deferring.get("checks") if deferring["on"] else None
    defer = {"record": True, "state": "state"}.get(how, False)
    info["compute_ahead"] = ahead = resolve_ahead(problem, rule, batched=batched, defer_checks=defer)
    sim = Simulator(rule, problem.params0, problem.grad_fn, num_workers=cfg.train.num_workers,
                    num_iterations=total, timing=cfg.timing.build(), seed=cfg.train.seed,
                    lr_schedule=lambda t: cfg.schedule.factor(t / messages_per_epoch),
                    batch=int(batching["max"]) if batched else 0,
                    grad_batch=getattr(problem, "grad_batch", None) if batched else None,
                    on_consume=getattr(problem, "select_message", None),
                    defer_checks=defer, ahead=ahead["on"], on_ahead=getattr(problem, "stash_message", None))
    if hasattr(problem, "defer_sync"):  # the losses and BatchNorm checks stay on the device with the record
        problem.defer_sync = how == "record"
    pending = _PendingLosses()
    evals = iteration_marks(cfg.train.eval_every, messages_per_epoch, total)
    checkpoints = iteration_marks(cfg.train.checkpoint_every, messages_per_epoch, total)
    window = max(1, math.ceil(messages_per_epoch))  # the last epoch of message losses (A16)
    losses = np.full(window, np.nan)
    metrics = MetricsWriter(run_dir, fields=metric_fields([m.name for m in problem.metrics]),
                            tensorboard=cfg.train.tensorboard)
    config_toml = to_toml(cfg)
    last_eval = 0

    def evaluate() -> dict[str, Any]:
        t = sim.t
        evaluation = evaluate_all(problem, sim.state.params, eval_test=cfg.train.eval_test)
        delays = sim.events.column("delay")[last_eval:t]
        filled = losses[~np.isnan(losses)]
        return metrics_row(
            t, messages_per_epoch=messages_per_epoch, local_steps=rule.local_steps, sim_time_s=sim.now,
            train_loss=float(filled.mean()) if filled.size else math.nan, evaluation=evaluation,
            delay_mean=float(delays.mean()) if delays.size else math.nan,
            delay_max=int(delays.max()) if delays.size else None,
            lr_scale=cfg.schedule.factor(max(t - 1, 0) / messages_per_epoch),
        )

    def flush() -> None:
        """Read what deferred checks and losses left on the device (one host sync; nothing otherwise)."""
        sim.flush_checks()
        pending.write(losses)

    def save() -> None:
        state = {"engine": "simulator", "t": sim.t, "sim": sim.state_dict(copy=False), "problem": problem.state_dict(),
                 "losses": losses.copy(), "last_eval": last_eval, "metrics": metrics.rows}
        save_checkpoint(run_dir / CHECKPOINT, state, config_toml=config_toml)
        sim.events.save(run_dir / "events.jsonl")

    def restore(state: dict[str, Any]) -> None:
        nonlocal last_eval
        sim.load_state_dict(state["sim"])
        problem.load_state_dict(state["problem"])
        losses[:] = np.asarray(state["losses"])
        last_eval = int(state["last_eval"])
        metrics.reset(state["metrics"])

    if resume and (run_dir / CHECKPOINT).is_file():
        ckpt = load_checkpoint(run_dir, config_toml=config_toml, engine="simulator")
        try:  # defensive: the stamp matched, so this fits unless the file was edited by hand
            restore(ckpt)
        except Exception as e:  # noqa: BLE001 - whatever a bad state raises, the fix is the same
            raise CheckpointRefused(f"{run_dir / CHECKPOINT} does not fit this run ({type(e).__name__}: {e}); delete "
                                    f"{CHECKPOINT} to restart the run from scratch") from None
    else:
        metrics.reset([])
        metrics.add(evaluate())  # w_0
        if sim.record is not None:  # deferred checks: a checkpoint at w_0, where a NaN/Inf before the next one goes
            write_json(run_dir / "run.json", info)  # first: a resume reads the batching it was written with there
            save()

    def check_each_message() -> None:
        """A deferred check found a NaN/Inf (or a message check did while checks were deferred): go back to the last
        state known finite (the last checkpoint, written after a clean read-out; the first is at w_0) and run checking
        each message, so the run stops exactly where a run checking each message stops, with its last finite
        parameters. Costs at most one checkpoint interval of iterations again."""
        sim.check_each_message()
        if hasattr(problem, "defer_sync"):
            problem.defer_sync = False
        pending.clear()
        problem.discard_message()
        restore(load_checkpoint(run_dir, config_toml=config_toml, engine="simulator"))
        info["deferred_checks"] = {**deferring, "on": False, "rerun_from": sim.t,
                                   "why": f"{deferring['why']}; a NaN/Inf was found, so the iterations from "
                                          f"{sim.t} were run again checking each message"}
        if bar is not None:
            bar.n = sim.t
            bar.refresh()

    info.pop("error", None)  # an earlier failure is history once the run goes on
    info["status"] = "running"
    write_json(run_dir / "run.json", info)
    bar = progress_bar(total, sim.t, cfg.name, progress)
    diverged: str | None = None
    try:
        with DeferredInterrupt() as interrupt:
            while True:
                try:
                    while sim.t < total:
                        sim.step()
                        loss = problem.commit_message()
                        if isinstance(loss, torch.Tensor):
                            pending.add((sim.t - 1) % window, loss)
                        else:
                            losses[(sim.t - 1) % window] = loss
                        if sim.t in evals:
                            flush()
                            row = evaluate()
                            last_eval = sim.t
                            metrics.add(row)
                            if bar is not None:
                                bar.set_postfix(epoch=f"{row['epoch']:.2f}", sim_s=f"{row['sim_time_s']:.0f}",
                                                loss=f"{row['train_loss']:.4f}", **shown_metric(row, problem),
                                                refresh=False)
                        stop = interrupt.requested  # read once: a signal between two reads stopped unsaved
                        if sim.t in checkpoints or stop:
                            flush()  # a checkpoint is written only where everything before it was checked
                            save()
                        if bar is not None:
                            bar.update(1)
                        if stop:  # checkpointed at this boundary: `--resume` continues from here
                            raise RunStopped(stop, t=sim.t, run_dir=run_dir)
                    flush()
                    break
                except NonFiniteError:
                    if sim.record is None:
                        raise
                    check_each_message()
    except NonFiniteError as e:
        # A diverged run is a result, not a failure (the papers report such runs): the server stopped at w_t, the
        # last finite parameters; its final row has NaN losses and the accuracy of those parameters.
        problem.discard_message()
        diverged = f"run diverged at iteration {getattr(e, 't', sim.t)} (worker {getattr(e, 'worker', '?')}): {e}"
        row = evaluate()
        row["train_loss"] = math.nan
        if "test_loss" in row:  # a task with a loss metric: its test loss is NaN too, as the papers report it
            row["test_loss"] = math.nan
        metrics.add(row)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()

    result = sim.result()
    _save_final(run_dir, {"params": result.params, **problem.final_state(result.params)})
    sim.events.save(run_dir / "events.jsonl")
    summary = result.summary()
    info.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), summary=summary,
                final=metrics.rows[-1], diverged=diverged)
    write_json(run_dir / "run.json", info)
    return RunResult(run_dir=run_dir, params=result.params, metrics=metrics.rows, summary=summary, diverged=diverged)


def _save_final(run_dir: Path, final: dict[str, Any]) -> None:
    buf = io.BytesIO()  # serialized in memory (a copy of the parameters), so a disk error is an OSError
    torch.save(final, buf)
    write_bytes(run_dir / FINAL, buf.getvalue())


def _driver_problem(cfg: ExperimentConfig, engine: str) -> Task:
    """On Ray the driver only evaluates, on CPU: the head node needs no GPU when the workers use one."""
    if engine == "ray" and cfg.train.device != "cpu":
        import dataclasses

        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu"))
    return build_task(cfg)


def _finished_result(run_dir: Path, info: dict[str, Any]) -> RunResult:
    from .metrics import read_metrics

    fix = "the run's results are damaged: restore the file, or run it again into a new directory"
    final = safe_load(run_dir / FINAL, fix=fix)
    if not isinstance(final.get("params"), torch.Tensor):
        raise RunDirError(f"{run_dir / FINAL} holds no 'params' tensor, so it is not an ormo final.pt; {fix}")
    path = run_dir / "metrics.jsonl"
    try:
        metrics = read_metrics(run_dir)
    except OSError as e:
        raise RunDirError(f"{explain_os_error(e, path)}; {fix}") from None
    except (ValueError, AttributeError) as e:  # not JSON (UnicodeDecodeError is a ValueError), or not rows
        raise RunDirError(f"{path} cannot be read ({type(e).__name__}: {e}); {fix}") from None
    if not metrics or not {"epoch", "train_loss", "sim_time_s"} <= metrics[-1].keys():
        raise RunDirError(f"{path} has no final row (epoch, train_loss, sim_time_s, ...); {fix}")
    return RunResult(run_dir=run_dir, params=final["params"], metrics=metrics, summary=info.get("summary", {}),
                     diverged=info.get("diverged"))
