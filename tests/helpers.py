"""Shared test problems and small utilities (no ormo maths in here: only data, orders and recording)."""

from __future__ import annotations

import numpy as np
import torch

import ormo


class Quadratic:
    """``f(w) = ½ wᵀAw − bᵀw`` with SPD ``A``; gradient noise is a pure function of (seed, worker, index, step)."""

    def __init__(self, dim: int = 5, seed: int = 0, noise: float = 0.1, dtype: torch.dtype = torch.float64) -> None:
        rng = np.random.default_rng(seed)
        m = rng.normal(size=(dim, dim))
        a = m @ m.T / dim + 0.5 * np.eye(dim)
        self.A = torch.tensor(a / np.linalg.eigvalsh(a).max(), dtype=dtype)  # largest curvature 1
        self.b = torch.tensor(rng.normal(size=dim), dtype=dtype)
        self.w0 = torch.tensor(rng.normal(size=dim), dtype=dtype)
        self.dim, self.seed, self.noise, self.dtype = dim, seed, noise, dtype

    def noise_at(self, worker: int, index: int, step: int) -> torch.Tensor:
        xi = np.random.default_rng([self.seed, worker, index, step]).normal(size=self.dim)
        return torch.tensor(xi * self.noise, dtype=self.dtype)

    def grad_fn(self, params: torch.Tensor, worker: int, index: int, step: int) -> torch.Tensor:
        return self.A @ params - self.b + self.noise_at(worker, index, step)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a − b| / max(1, max|a|)``: an absolute error on trajectories of moderate size, relative on large ones."""
    return (a - b).abs().max().item() / max(1.0, a.abs().max().item())


def random_async_order(rng: np.random.Generator, num_workers: int, length: int, skew: float = 1.0) -> list[int]:
    """Arrivals with worker-dependent rates (``skew`` > 1 makes the last worker rarer)."""
    p = np.linspace(1.0, 1.0 / skew, num_workers)
    return rng.choice(num_workers, size=length, p=p / p.sum()).tolist()


def random_sync_order(rng: np.random.Generator, num_workers: int, rounds: int) -> list[int]:
    return np.concatenate([rng.permutation(num_workers) for _ in range(rounds)]).tolist()


def recording(rule: ormo.Rule) -> tuple[ormo.Rule, list[ormo.Message]]:
    """A copy of ``rule`` whose worker side also appends every message it sends to the returned list."""
    base = type(rule)
    messages: list[ormo.Message] = []

    class Recording(base):  # type: ignore[misc, valid-type]
        def work(self, payload, grad, worker_state=None):
            msg = base.work(self, payload, grad, worker_state)
            messages.append(msg)
            return msg

    hp = rule.describe()["hyperparameters"]
    return Recording(**hp), messages


def trajectory(rule, params0, grad_fn, **kw):
    """Run ``ormo.simulate`` and return (result, [w_1, …, w_T], [state snapshots as dicts])."""
    params, states = [], []

    def cb(event, state):
        params.append(state.params.clone())
        states.append(state.state_dict())

    res = ormo.simulate(rule, params0, grad_fn, callback=cb, **kw)
    return res, params, states


def stopping_interrupt(base, after_reads: int):
    """A ``DeferredInterrupt`` (``base``) that reports a SIGINT once it has been read ``after_reads`` times: a run
    loop reads it once per iteration, so ``n`` stops the run with a checkpoint at iteration ``n + 1``, as Ctrl-C
    does."""
    import signal

    class Stop(base):
        reads = 0

        @property
        def requested(self):
            type(self).reads += 1
            return signal.SIGINT if type(self).reads > after_reads else None

        @requested.setter
        def requested(self, value):
            pass

    return Stop


#: a tiny synthetic image task for run-level tests (``load_config(None, [*SYNTH, ...])``)
SYNTH = ["data.name=synthetic", "data.options.train_size=256", "data.options.test_size=32",
         "data.options.image_shape=[3, 8, 8]", "data.batch_size=8", "train.num_workers=4"]


def rule_with_local_steps(name: str, **extra):
    """``ormo.make_rule(name, **extra)``, with 3 local steps for a local method (so its local loop is exercised)."""
    hp = dict(extra)
    if "local_steps" in ormo.make_rule(name).describe()["hyperparameters"]:
        hp["local_steps"] = 3
    return ormo.make_rule(name, **hp)


def roundtrip(sd):
    """``sd`` through bytes, as a checkpoint file is written and read (the project's plain data, weights_only)."""
    import io

    from ormo.experiment.rundir import plain

    buf = io.BytesIO()
    torch.save(plain(sd), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
