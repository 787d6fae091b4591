"""Heterogeneity models: how long each worker takes per message (spec §7, A17, A18).

Every model but :class:`Replay` gives each worker a mean time per local step and multiplies it by i.i.d. jitter.
A message of H local steps takes H steps' time (for gamma jitter with coefficient of variation ``cv``, the sum of H
step times is one Gamma(H/cv², mean·cv²) draw). All randomness comes from generators seeded by ``(seed, stream,
worker)``: each worker has its own stream, so its k-th duration does not depend on how workers interleave.

* :class:`Homogeneous` — every worker the same speed, small jitter (the default: gamma, cv 5 %);
* :class:`PerWorker` — constant per-worker step times (no jitter by default);
* :class:`SlowFraction` — a fraction of the workers (the highest ids) slowed by a factor;
* :class:`OneSlow` — one slow worker (the last id) with a Slow/Fast ratio (OrLoMo Table 3);
* :class:`HeavyTailed` — per-worker speeds from a Pareto law, capped;
* :class:`Replay` — the exact arrival order and times of a recorded event log.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..rules.base import check_choice, check_int_at_least, check_positive, invalid
from .events import EventLog

JITTERS: tuple[str, ...] = ("gamma", "exponential", "none")

# Fixed per-component stream offsets (STYLE: no global random state).
_STREAM_JITTER = 0x7117
_STREAM_SPEEDS = 0x5EED


class WorkerClock:
    """Per-worker durations for one run: ``duration(worker, steps)`` draws the next message's compute time."""

    def __init__(self, mean_step_time_s: np.ndarray, jitter: str, jitter_cv: float, seed: int) -> None:
        self.mean_step_time_s = np.asarray(mean_step_time_s, dtype=np.float64)
        self.jitter, self.jitter_cv = jitter, jitter_cv
        self._rngs = [
            np.random.default_rng([seed, _STREAM_JITTER, k]) for k in range(len(self.mean_step_time_s))
        ]

    def duration(self, worker: int, steps: int) -> float:
        mean = self.mean_step_time_s[worker]
        if self.jitter == "none" or (self.jitter == "gamma" and self.jitter_cv == 0.0):
            return float(steps * mean)
        if self.jitter == "gamma":
            cv2 = self.jitter_cv**2
            return float(self._rngs[worker].gamma(steps / cv2, mean * cv2))
        return float(self._rngs[worker].gamma(steps, mean))  # sum of `steps` exponentials

    def state_dict(self) -> dict[str, Any]:
        return {"rngs": [r.bit_generator.state for r in self._rngs]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for r, s in zip(self._rngs, sd["rngs"], strict=True):
            r.bit_generator.state = s


class TimingModel:
    """Base class. ``bind(num_workers, seed)`` returns the :class:`WorkerClock` of one run."""

    jitter: str
    jitter_cv: float

    def _check_common(self) -> None:
        if hasattr(self, "step_time_s"):  # every model but PerWorker, which lists one time per worker
            check_positive("step_time_s", self.step_time_s)
        check_choice("jitter", self.jitter, JITTERS)
        if isinstance(self.jitter_cv, bool) or not isinstance(self.jitter_cv, int | float) or not (
            0.0 <= self.jitter_cv < math.inf
        ):
            raise invalid("jitter_cv", self.jitter_cv, "a finite number >= 0")

    def step_times(self, num_workers: int, seed: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def bind(self, num_workers: int, seed: int) -> WorkerClock:
        return WorkerClock(self.step_times(num_workers, seed), self.jitter, float(self.jitter_cv), seed)

    def describe(self) -> dict[str, Any]:
        return {"model": type(self).__name__, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class Homogeneous(TimingModel):
    """Every worker takes ``step_time_s`` per step on average, with i.i.d. jitter (default gamma, cv 5 %)."""

    step_time_s: float = 1.0
    jitter: str = "gamma"
    jitter_cv: float = 0.05

    def __post_init__(self) -> None:
        self._check_common()

    def step_times(self, num_workers: int, seed: int) -> np.ndarray:
        return np.full(num_workers, float(self.step_time_s))


@dataclass(frozen=True)
class PerWorker(TimingModel):
    """Constant per-worker step times ``step_times_s[k]`` (one per worker), optionally jittered."""

    step_times_s: tuple[float, ...] = (1.0,)
    jitter: str = "none"
    jitter_cv: float = 0.0

    def __post_init__(self) -> None:
        self._check_common()
        for k, v in enumerate(self.step_times_s):
            check_positive(f"step_times_s[{k}]", v)

    def step_times(self, num_workers: int, seed: int) -> np.ndarray:
        if len(self.step_times_s) != num_workers:
            raise invalid("step_times_s", self.step_times_s, f"one entry per worker (num_workers={num_workers})")
        return np.asarray(self.step_times_s, dtype=np.float64)


def _slow_count(fraction: float, num_workers: int) -> int:
    return int(math.floor(fraction * num_workers + 0.5))


@dataclass(frozen=True)
class SlowFraction(TimingModel):
    """A fraction of the workers (the ``round(fraction·K)`` highest ids) is ``slowdown`` times slower; everyone
    jitters (default gamma, cv 10 %). The OrLoMo paper's heterogeneous pools: 2× (CIFAR), 25 % at 4× (Tiny-ImageNet);
    default 25 % at 2× (spec A17)."""

    fraction: float = 0.25
    slowdown: float = 2.0
    step_time_s: float = 1.0
    jitter: str = "gamma"
    jitter_cv: float = 0.1

    def __post_init__(self) -> None:
        self._check_common()
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float) or not (
            0.0 <= self.fraction <= 1.0
        ):
            raise invalid("fraction", self.fraction, "a number in [0, 1]")
        if isinstance(self.slowdown, bool) or not isinstance(self.slowdown, int | float) or not (
            1.0 <= self.slowdown < math.inf
        ):
            raise invalid("slowdown", self.slowdown, "a finite number >= 1")

    def step_times(self, num_workers: int, seed: int) -> np.ndarray:
        times = np.full(num_workers, float(self.step_time_s))
        n_slow = _slow_count(self.fraction, num_workers)
        if n_slow:
            times[num_workers - n_slow :] *= self.slowdown
        return times


@dataclass(frozen=True)
class OneSlow(TimingModel):
    """One slow worker (id K−1) whose mean step time is ``ratio`` times the others' (OrLoMo Table 3: 1…50)."""

    ratio: float = 10.0
    step_time_s: float = 1.0
    jitter: str = "gamma"
    jitter_cv: float = 0.1

    def __post_init__(self) -> None:
        self._check_common()
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float) or not (
            1.0 <= self.ratio < math.inf
        ):
            raise invalid("ratio", self.ratio, "a finite number >= 1")

    def step_times(self, num_workers: int, seed: int) -> np.ndarray:
        times = np.full(num_workers, float(self.step_time_s))
        times[-1] *= self.ratio
        return times


@dataclass(frozen=True)
class HeavyTailed(TimingModel):
    """Per-worker mean step times ``step_time_s · min(X_k, cap)`` with ``X_k`` Pareto(``alpha``) on [1, ∞), drawn
    once per run from the seed; plus i.i.d. jitter."""

    alpha: float = 1.5
    cap: float = 10.0
    step_time_s: float = 1.0
    jitter: str = "gamma"
    jitter_cv: float = 0.05

    def __post_init__(self) -> None:
        self._check_common()
        check_positive("alpha", self.alpha)
        if isinstance(self.cap, bool) or not isinstance(self.cap, int | float) or not (1.0 <= self.cap < math.inf):
            raise invalid("cap", self.cap, "a finite number >= 1")

    def step_times(self, num_workers: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, _STREAM_SPEEDS])
        factors = np.minimum(1.0 + rng.pareto(self.alpha, size=num_workers), self.cap)
        return self.step_time_s * factors


class Replay:
    """Replay a recorded run: the arrival order and the simulated times of an :class:`EventLog` (or its path)."""

    def __init__(self, log: EventLog | str | Path) -> None:
        self.log = log if isinstance(log, EventLog) else EventLog.load(log)

    def describe(self) -> dict[str, Any]:
        m = self.log.meta  # only what identifies the recording: replaying a replay must not nest metadata
        return {
            "model": "Replay",
            "events": len(self.log),
            "recorded_rule": m.get("rule"),
            "recorded_seed": m.get("seed"),
            "recorded_engine": m.get("engine"),
        }


def check_timing(timing: Any) -> TimingModel | Replay:
    if not isinstance(timing, TimingModel | Replay):
        raise invalid(
            "timing",
            timing,
            "a timing model (Homogeneous, PerWorker, SlowFraction, OneSlow, HeavyTailed) or Replay(log)",
        )
    return timing


def check_seed(seed: Any) -> int:
    return check_int_at_least("seed", seed, 0)


__all__ = [
    "JITTERS",
    "HeavyTailed",
    "Homogeneous",
    "OneSlow",
    "PerWorker",
    "Replay",
    "SlowFraction",
    "TimingModel",
    "WorkerClock",
    "check_seed",
    "check_timing",
]
