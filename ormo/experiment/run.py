"""One experiment on the simulator, from config to run directory, resumable after a kill.

A run directory holds::

    config.toml      the resolved configuration (reading it back gives the same config)
    run.json         status, seed, label, package versions, git commit, command line, final summary
    metrics.jsonl    one row per evaluation (also metrics.csv): epoch, iteration, gradients, sim_time_s,
                     train_loss, test_loss, test_acc, delay_mean, delay_max, lr_scale
    events.jsonl     the event log (written at every checkpoint and at the end)
    checkpoint.pt    the latest checkpoint (written atomically: a kill never leaves a torn one)
    final.pt         the final server parameters and BatchNorm statistics
    tensorboard/     when train.tensorboard = true

Training loop, top to bottom: build the problem and the simulator, evaluate w_0, then step the simulator; every
``eval_every`` epochs evaluate and log, every ``checkpoint_every`` epochs checkpoint; at the end write the results.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import NonFiniteError, Simulator
from ..rules.base import ConfigError
from .config import ExperimentConfig, load_config, to_toml
from .metrics import MetricsWriter, metrics_row
from .problem import TrainProblem

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1


@dataclass
class RunResult:
    run_dir: Path
    params: torch.Tensor
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1]


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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))


class DeferredInterrupt:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a flag that the training loop reads between iterations, so that the
    checkpoint written on the way out is taken at a clean iteration boundary. A second signal interrupts at once
    (the last periodic checkpoint stays valid). Only in the main thread, where Python delivers signals."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signum
        self._restore()  # the next signal acts immediately

    def _restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def _iteration_marks(every_epochs: float, messages_per_epoch: float, total: int) -> set[int]:
    marks, k = {total}, 1
    while (t := round(k * every_epochs * messages_per_epoch)) < total:
        if t > 0:
            marks.add(t)
        k += 1
    return marks


def train(
    cfg: ExperimentConfig | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    engine: str = "simulator",
) -> RunResult:
    """Run ``cfg`` into ``run_dir`` on the simulator (default) or on Ray (``engine="ray"``, real worker processes;
    see ``ormo.engine.ray_runtime``). With ``resume=True`` continue the run already there (its own config and engine
    are used) from its last checkpoint: bit-identically to an uninterrupted run on the simulator; on Ray every worker
    restarts from the checkpointed server state."""
    run_dir = Path(run_dir)
    if engine not in ("simulator", "ray"):
        raise ConfigError(f"invalid engine: {engine!r} (must be 'simulator' or 'ray')")
    if resume:
        if not (run_dir / "config.toml").is_file():
            raise ConfigError(f"cannot resume {str(run_dir)!r}: no config.toml there (not a run directory)")
        cfg = load_config(run_dir / "config.toml")
        info = read_run_info(run_dir)
        engine = info.get("engine", "simulator")
        if info.get("status") == "finished":
            return _finished_result(run_dir, info)
        if info.get("threads"):
            torch.set_num_threads(int(info["threads"]))  # the same arithmetic as before the interruption
    else:
        if cfg is None:
            raise ConfigError("train() needs a config unless resume=True")
        if (run_dir / "run.json").exists():
            raise ConfigError(
                f"run directory {str(run_dir)!r} already holds a run; continue it with "
                f"`ormo train --resume {run_dir}` or choose another directory"
            )
        problem, rule = _driver_problem(cfg, engine), cfg.method.build()  # a bad model or dataset fails here, early
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
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
        _write_json(run_dir / "run.json", info)
    assert cfg is not None
    if resume:
        problem, rule = _driver_problem(cfg, engine), cfg.method.build()
    messages_per_epoch = problem.train_size / (cfg.data.batch_size * rule.local_steps)
    total = max(1, math.ceil(cfg.train.epochs * messages_per_epoch))
    if engine == "ray":
        from .run_ray import train_on_ray

        return train_on_ray(cfg, run_dir, info, problem=problem, rule=rule, total=total,
                            messages_per_epoch=messages_per_epoch, resume=resume, progress=progress)
    sim = Simulator(rule, problem.params0, problem.grad_fn, num_workers=cfg.train.num_workers,
                    num_iterations=total, timing=cfg.timing.build(), seed=cfg.train.seed,
                    lr_schedule=lambda t: cfg.schedule.factor(t / messages_per_epoch))
    evals = _iteration_marks(cfg.train.eval_every, messages_per_epoch, total)
    checkpoints = _iteration_marks(cfg.train.checkpoint_every, messages_per_epoch, total)
    window = max(1, math.ceil(messages_per_epoch))  # the last epoch of message losses (A16)
    losses = np.full(window, np.nan)
    metrics = MetricsWriter(run_dir, tensorboard=cfg.train.tensorboard)
    last_eval = 0

    def evaluate() -> dict[str, Any]:
        t = sim.t
        test_loss, test_acc = problem.evaluate(sim.state.params)
        delays = sim.events.column("delay")[last_eval:t]
        filled = losses[~np.isnan(losses)]
        return metrics_row(
            t, messages_per_epoch=messages_per_epoch, local_steps=rule.local_steps, sim_time_s=sim.now,
            train_loss=float(filled.mean()) if filled.size else math.nan, test_loss=test_loss, test_acc=test_acc,
            delay_mean=float(delays.mean()) if delays.size else math.nan,
            delay_max=int(delays.max()) if delays.size else None,
            lr_scale=cfg.schedule.factor(max(t - 1, 0) / messages_per_epoch),
        )

    def save_checkpoint() -> None:
        ckpt = {
            "version": CHECKPOINT_VERSION,
            "t": sim.t,
            "sim": sim.state_dict(),
            "problem": problem.state_dict(),
            "losses": losses.copy(),
            "last_eval": last_eval,
            "metrics": metrics.rows,
        }
        tmp = run_dir / (CHECKPOINT + ".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, run_dir / CHECKPOINT)
        sim.events.save(run_dir / "events.jsonl")

    if resume and (run_dir / CHECKPOINT).is_file():
        ckpt = torch.load(run_dir / CHECKPOINT, weights_only=False)
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise ConfigError(f"{run_dir / CHECKPOINT}: checkpoint version {ckpt.get('version')} is not supported")
        sim.load_state_dict(ckpt["sim"])
        problem.load_state_dict(ckpt["problem"])
        losses[:] = ckpt["losses"]
        last_eval = ckpt["last_eval"]
        metrics.reset(ckpt["metrics"])
    else:
        metrics.reset([])
        metrics.add(evaluate())  # w_0

    info["status"] = "running"
    _write_json(run_dir / "run.json", info)
    bar = _progress(total, sim.t, cfg.name, progress)
    diverged: str | None = None
    try:
        with DeferredInterrupt() as interrupt:
            while sim.t < total:
                sim.step()
                losses[(sim.t - 1) % window] = problem.commit_message()
                if sim.t in evals:
                    row = evaluate()
                    last_eval = sim.t
                    metrics.add(row)
                    if bar is not None:
                        bar.set_postfix(epoch=f"{row['epoch']:.2f}", sim_s=f"{row['sim_time_s']:.0f}",
                                        loss=f"{row['train_loss']:.4f}", acc=f"{row['test_acc']:.2f}", refresh=False)
                if sim.t in checkpoints or interrupt.requested:
                    save_checkpoint()
                if bar is not None:
                    bar.update(1)
                if interrupt.requested:  # checkpointed at this iteration boundary: `--resume` continues from here
                    raise KeyboardInterrupt
    except NonFiniteError as e:
        # A diverged run is a result, not a failure (the papers report such runs): the server stopped at w_t, the
        # last finite parameters; its final row has NaN losses and the accuracy of those parameters.
        problem.discard_message()
        diverged = str(e)
        row = evaluate()
        row.update(train_loss=math.nan, test_loss=math.nan)
        metrics.add(row)
    except KeyboardInterrupt:
        info["status"] = "interrupted"  # the loop checkpointed at an iteration boundary before raising
        _write_json(run_dir / "run.json", info)
        raise
    except Exception as e:
        info["status"], info["error"] = "failed", f"{type(e).__name__}: {e}"
        _write_json(run_dir / "run.json", info)
        raise
    finally:
        if bar is not None:
            bar.close()
        metrics.close()

    result = sim.result()
    torch.save({"params": result.params, "bn_buffers": problem.server_buffers.clone(),
                "model_state": problem.model_state(result.params)}, run_dir / "final.pt")
    sim.events.save(run_dir / "events.jsonl")
    summary = result.summary()
    info.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), summary=summary,
                final=metrics.rows[-1], diverged=diverged)
    _write_json(run_dir / "run.json", info)
    return RunResult(run_dir=run_dir, params=result.params, metrics=metrics.rows, summary=summary)


def _driver_problem(cfg: ExperimentConfig, engine: str) -> TrainProblem:
    """On Ray the driver only evaluates, on CPU: the head node needs no GPU when the workers use one."""
    if engine == "ray" and cfg.train.device != "cpu":
        import dataclasses

        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu"))
    return TrainProblem(cfg)


def _finished_result(run_dir: Path, info: dict[str, Any]) -> RunResult:
    from .metrics import read_metrics

    final = torch.load(run_dir / "final.pt", weights_only=False)
    return RunResult(run_dir=run_dir, params=final["params"], metrics=read_metrics(run_dir),
                     summary=info.get("summary", {}))


def _progress(total: int, initial: int, name: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, initial=initial, desc=name, unit="msg", dynamic_ncols=True, leave=True)
