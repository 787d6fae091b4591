"""The convergence theorems, checked empirically: average ‖∇F(w_t)‖² under one ever slower worker.

Both papers' headline result is convergence for smooth non-convex problems under *arbitrary* delays, with a rate that
does not depend on the maximum delay (OrMo Theorems 1–2, OrLoMo Theorem 1; spec §10). This script measures the
quantity those theorems bound, ``(1/T) Σ_{t<T} ‖∇F(w_t)‖²``, on a synthetic problem whose full gradient is exact, for
ASGD, OrMo, OrMo-DA and OrLoMo, with K workers of which one is ``Slow/Fast`` = 1, 10, 100, 1000 times slower
(``ormo.OneSlow``), so the maximum delay grows with the ratio while everything else stays fixed.

Problem (:class:`RippledQuadratic`, float64): ``F(w) = ½ Σ_i λ_i w_i² + a Σ_j cos(b (Qw)_j)`` with λ evenly spaced in
[0.5, 1], a random rotation Q, a = 0.5, b = 2. It is L-smooth with ``L = max λ + a b² = 3``, bounded below by ``−a·d``,
and non-convex (its curvature ranges over ``[λ − a b², λ + a b²]``, which contains negative values). Its gradient grows
linearly in ‖w‖, so it is *not* globally bounded (OrMo's Assumption 2 fails on ℝ^d and holds only on the region the
iterates visit). A worker's stochastic gradient is ``∇F(w) + σ ξ`` with ``ξ ~ N(0, I)`` drawn from a generator keyed
by (seed, worker, index, local step): unbiased with variance ``σ² d`` (Assumption 1), and every method fed the same
arrival order sees the same noise.

Step sizes (fixed for all ratios: nothing depends on the maximum delay). Every method gives a message the same total
weight ``η_eff = 1 / (4 K L)`` (theory's ``η ≤ 1/(c K L)``, spec §10, with c = 4): ASGD ``lr = η_eff``; OrMo and
OrMo-DA ``lr = (1 − β) η_eff`` (a gradient's coefficient in w is S(∞)·lr = lr/(1−β)); OrMo-DA's rate is the spec's
default delay-adaptive ``η_t = lr · K / max(K, τ_t)`` (§3.8, A2); OrLoMo runs H = 4 local momentum steps with
``γ = (1 − β) η_eff / H`` and global ``lr = 1`` with the same delay-adaptive rule (its H = 1 case is OrMo-DA with lr γ,
spec R11). β = 0.9.

A second experiment (``far start``) isolates what OrMo's bounded-gradient assumption is for: at Slow/Fast = 1000 the
slow worker's first gradient is computed at w_0 and lands thousands of iterations later, when the others have
converged. The initial point is scaled by 1, 10 and 100 (so that gradient is 10× and 100× larger) and the jump in
‖∇F‖² when it lands is measured.

    python benchmarks/theorem_check.py [--quick] [--out DIR] [--iterations T] [--seed S]

writes ``theorem_vs_T.png``, ``theorem_vs_max_delay.png``, ``theorem_stale_kick.png`` and ``results.md`` to DIR
(default ``docs/theory``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import ormo

METHODS: tuple[str, ...] = ("asgd", "ormo", "ormo-da", "orlomo")
RATIOS: tuple[int, ...] = (1, 10, 100, 1000)
FAR_START_SCALES: tuple[float, ...] = (1.0, 10.0, 100.0)
LABELS = {"asgd": "ASGD", "ormo": "OrMo", "ormo-da": "OrMo-DA", "orlomo": "OrLoMo"}
COLORS = {"asgd": "tab:gray", "ormo": "tab:blue", "ormo-da": "tab:orange", "orlomo": "tab:green"}
STYLES = {"asgd": "-", "ormo": "-", "ormo-da": "--", "orlomo": "-"}  # OrMo-DA dashed: it often lies on OrMo

# Fixed per-component stream offsets (STYLE: no global random state).
_STREAM_PROBLEM = 0x7E01
_STREAM_INIT = 0x7E02
_STREAM_NOISE = 0x7E03
_MIX = 1_000_003  # a prime larger than any index or worker id used here: distinct keys for distinct tuples


def _key(*parts: int) -> int:
    """One 63-bit generator seed from a tuple of small non-negative integers (deterministic, unlike ``hash``)."""
    key = 0
    for p in parts:
        key = (key * _MIX + int(p)) % (2**63 - 1)
    return key


class RippledQuadratic:
    """``F(w) = ½ Σ_i λ_i w_i² + a Σ_j cos(b (Qw)_j)`` in float64, with the exact gradient and a noisy oracle.

    ``∇F(w) = λ ⊙ w − a b Qᵀ sin(b Q w)``; the Hessian is ``diag(λ) − a b² Qᵀ diag(cos(b Q w)) Q``, so
    ``L = max λ + a b²`` and, when ``a b² > min λ``, F is non-convex. ``F ≥ −a·dim``.
    """

    def __init__(
        self,
        *,
        dim: int = 20,
        curvature: tuple[float, float] = (0.5, 1.0),
        ripple_amplitude: float = 0.5,
        ripple_frequency: float = 2.0,
        noise_std: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.dim, self.noise_std, self.seed = dim, float(noise_std), seed
        self.a, self.b = float(ripple_amplitude), float(ripple_frequency)
        self.curvature = torch.linspace(curvature[0], curvature[1], dim, dtype=torch.float64)
        gen = torch.Generator().manual_seed(_key(seed, _STREAM_PROBLEM))
        self.rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))

    @property
    def smoothness(self) -> float:
        """L = max λ + a b² (the largest possible |curvature|)."""
        return float(self.curvature.max()) + self.a * self.b**2

    def value(self, w: Tensor) -> Tensor:
        return 0.5 * (self.curvature * w * w).sum() + self.a * torch.cos(self.b * (self.rotation @ w)).sum()

    def full_grad(self, w: Tensor) -> Tensor:
        """The exact ∇F(w)."""
        return self.curvature * w - (self.a * self.b) * (self.rotation.T @ torch.sin(self.b * (self.rotation @ w)))

    def grad_fn(self, params: Tensor, worker: int, index: int, step: int) -> Tensor:
        """``ormo.simulate``'s oracle: ``∇F(params) + σ ξ``, ξ keyed by (seed, worker, index, step)."""
        gen = torch.Generator().manual_seed(_key(self.seed, _STREAM_NOISE, worker, index, step))
        noise = torch.randn(self.dim, generator=gen, dtype=torch.float64)
        return self.full_grad(params).add_(noise, alpha=self.noise_std)

    def initial_point(self, scale: float) -> Tensor:
        """``w_0 = scale · z``, z ~ N(0, I) from the problem's seed (the same direction for every scale)."""
        gen = torch.Generator().manual_seed(_key(self.seed, _STREAM_INIT))
        return scale * torch.randn(self.dim, generator=gen, dtype=torch.float64)


@dataclass(frozen=True)
class CheckConfig:
    """One experiment's settings (the defaults are the committed run)."""

    num_workers: int = 8
    """K; worker K−1 is the slow one"""
    num_iterations: int = 16_000
    """T server iterations (messages consumed) per run"""
    momentum: float = 0.9
    """β of OrMo, OrMo-DA and OrLoMo"""
    local_steps: int = 4
    """H of OrLoMo"""
    step_constant: float = 4.0
    """c in η_eff = 1 / (c K L), the total weight every method gives one message"""
    init_scale: float = 3.0
    """w_0 = init_scale · z, z ~ N(0, I)"""
    noise_std: float = 1.0
    """σ: per-coordinate standard deviation of the gradient noise"""
    dim: int = 20
    seed: int = 0
    """seeds the problem (Q, w_0), the gradient noise and the timing jitter"""

    def problem(self) -> RippledQuadratic:
        return RippledQuadratic(dim=self.dim, noise_std=self.noise_std, seed=self.seed)


def effective_step(cfg: CheckConfig, problem: RippledQuadratic) -> float:
    """η_eff = 1 / (c K L)."""
    return 1.0 / (cfg.step_constant * cfg.num_workers * problem.smoothness)


def make_method(method: str, cfg: CheckConfig, problem: RippledQuadratic) -> ormo.Rule:
    """The rule of ``method`` with this experiment's step sizes (see the module docstring)."""
    eta, beta = effective_step(cfg, problem), cfg.momentum
    if method == "asgd":
        return ormo.make_rule("asgd", lr=eta)
    if method in ("ormo", "ormo-da"):  # ormo-da: the spec's default delay_rule='inverse', threshold 1·K
        return ormo.make_rule(method, lr=(1.0 - beta) * eta, momentum=beta)
    if method == "orlomo":
        return ormo.make_rule("orlomo", lr=1.0, momentum=beta, local_lr=(1.0 - beta) * eta / cfg.local_steps,
                              local_steps=cfg.local_steps)
    raise ValueError(f"invalid method: {method!r} (must be one of {', '.join(METHODS)})")


@dataclass
class RunRecord:
    """One run. ``grad_sq[t] = ‖∇F(w_t)‖²`` for t = 0 … T; ``delay``/``worker`` per consumed message."""

    method: str
    ratio: float
    init_scale: float
    grad_sq: np.ndarray
    delay: np.ndarray
    worker: np.ndarray
    num_workers: int

    @property
    def num_iterations(self) -> int:
        return len(self.delay)

    @property
    def average(self) -> float:
        """(1/T) Σ_{t=0}^{T−1} ‖∇F(w_t)‖², the quantity the theorems bound."""
        return float(self.grad_sq[:-1].mean())

    def running_average(self) -> np.ndarray:
        """Entry T−1 is the average over the first T iterations."""
        head = self.grad_sq[:-1]
        return np.cumsum(head) / np.arange(1, len(head) + 1)

    @property
    def second_half_average(self) -> float:
        """Average of ‖∇F(w_t)‖² over t ∈ [T/2, T): the stationary phase, past the initial transient."""
        return float(self.grad_sq[self.num_iterations // 2 : -1].mean())

    def second_half_stderr(self, blocks: int = 8) -> float:
        """Standard error of :attr:`second_half_average` by batch means (``blocks`` contiguous blocks; the series
        is autocorrelated, so the plain i.i.d. formula would understate it)."""
        means = [float(b.mean()) for b in np.array_split(self.grad_sq[self.num_iterations // 2 : -1], blocks)]
        return float(np.std(means, ddof=1) / math.sqrt(blocks))

    @property
    def max_delay(self) -> int:
        return int(self.delay.max())

    @property
    def mean_delay(self) -> float:
        return float(self.delay.mean())

    @property
    def slow_messages(self) -> int:
        return int((self.worker == self.num_workers - 1).sum())

    def first_late_arrival(self) -> int | None:
        """The iteration t at which the slow worker's first message (computed at w_0) is consumed."""
        hits = np.flatnonzero(self.worker == self.num_workers - 1)
        return int(hits[0]) if hits.size else None

    def kick(self, window: int = 200) -> tuple[float, float, float, int] | None:
        """When the slow worker's first message lands at iteration t: (max of ‖∇F(w_{t'})‖² over the ``window``
        iterates before it, t − window < t' ≤ t; the same max over the ``window`` iterates after it,
        t < t' ≤ t + window; its delay). None when it never lands. Maxima on both sides, so the noise floor's own
        fluctuations count alike."""
        t = self.first_late_arrival()
        if t is None:
            return None
        before = float(self.grad_sq[max(t + 1 - window, 0) : t + 1].max())
        after = self.grad_sq[t + 1 : t + 1 + window]
        return before, float(after.max()), float(after.mean()), int(self.delay[t])


def run_one(method: str, ratio: float, cfg: CheckConfig, *, init_scale: float | None = None,
            num_iterations: int | None = None) -> RunRecord:
    """Simulate ``method`` with one worker ``ratio``× slower and record ‖∇F(w_t)‖² after every iteration."""
    problem = cfg.problem()
    scale = cfg.init_scale if init_scale is None else init_scale
    params0 = problem.initial_point(scale)
    T = cfg.num_iterations if num_iterations is None else num_iterations
    grad_sq = np.empty(T + 1)
    grad_sq[0] = float(problem.full_grad(params0).square().sum())

    def measure(event: ormo.Event, state) -> None:  # state.params is w_{t+1}
        grad_sq[event.t + 1] = float(problem.full_grad(state.params).square().sum())

    result = ormo.simulate(make_method(method, cfg, problem), params0, problem.grad_fn, num_workers=cfg.num_workers,
                           num_iterations=T, timing=ormo.OneSlow(ratio=float(ratio)), seed=cfg.seed,
                           callback=measure)
    return RunRecord(method=method, ratio=float(ratio), init_scale=scale, grad_sq=grad_sq,
                     delay=result.events.column("delay").astype(np.int64),
                     worker=result.events.column("worker").astype(np.int64), num_workers=cfg.num_workers)


def run_grid(cfg: CheckConfig, *, methods: Sequence[str] = METHODS, ratios: Sequence[float] = RATIOS,
             verbose: bool = False) -> list[RunRecord]:
    """Every (method, ratio) pair, in that order."""
    out = []
    for ratio in ratios:
        for method in methods:
            t0 = time.perf_counter()
            rec = run_one(method, ratio, cfg)
            out.append(rec)
            if verbose:
                print(f"  {LABELS[method]:8s} Slow/Fast {ratio:6g}: avg |grad F|^2 {rec.average:.4f}, "
                      f"max delay {rec.max_delay:5d} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return out


def run_far_start(cfg: CheckConfig, *, methods: Sequence[str] = METHODS, scales: Sequence[float] = FAR_START_SCALES,
                  ratio: float = 1000.0, num_iterations: int | None = None, verbose: bool = False) -> list[RunRecord]:
    """Slow/Fast = ``ratio`` with w_0 scaled by each of ``scales`` (relative to ``cfg.init_scale``).

    ``num_iterations`` defaults to just past the slow worker's first arrival, ≈ (K−1)·ratio, plus the window."""
    if num_iterations is None:
        num_iterations = int(1.3 * (cfg.num_workers - 1) * ratio) + 400
    out = []
    for s in scales:
        for method in methods:
            rec = run_one(method, ratio, cfg, init_scale=s * cfg.init_scale, num_iterations=num_iterations)
            out.append(rec)
            if verbose:
                k = rec.kick()
                what = "never landed" if k is None else f"{k[0]:.3g} -> {k[1]:.3g} at delay {k[3]}"
                print(f"  {LABELS[method]:8s} w_0 x{s:g}: max |grad F|^2 around the w_0 gradient's landing: {what}",
                      flush=True)
    return out


# --------------------------------------------------------------------------------------------------------
# outputs


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def plot_vs_T(records: Sequence[RunRecord], path: Path) -> None:
    """Running average of ‖∇F(w_t)‖² against T: one panel per Slow/Fast, one line per method."""
    ratios = sorted({r.ratio for r in records})
    cols = min(len(ratios), 2)
    rows = math.ceil(len(ratios) / cols)
    fig, axes = _figure(rows, cols, (5.2 * cols, 3.6 * rows))
    for ax, ratio in zip(axes.flat, ratios, strict=False):
        for rec in (r for r in records if r.ratio == ratio):
            run = rec.running_average()
            ax.plot(np.arange(1, len(run) + 1), run, color=COLORS[rec.method], ls=STYLES[rec.method],
                    label=LABELS[rec.method], lw=1.3)
        late = next(r for r in records if r.ratio == ratio)
        slow = np.flatnonzero(late.worker == late.num_workers - 1)
        if 0 < slow.size <= 20:  # where the slow worker's messages land (same arrival times for every method)
            for t in slow:
                ax.axvline(t, color="k", lw=0.6, ls=":", alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"Slow/Fast = {ratio:g}, max delay {max(r.max_delay for r in records if r.ratio == ratio)}")
        ax.set_xlabel("T (server iterations)")
        ax.set_ylabel(r"$\frac{1}{T}\sum_{t<T}\|\nabla F(w_t)\|^2$")
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(ratios):]:
        ax.set_visible(False)
    axes.flat[0].legend(loc="upper right", fontsize=8)
    fig.suptitle("Average squared gradient norm against T (dotted: the slow worker's arrivals)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_vs_delay(records: Sequence[RunRecord], path: Path) -> None:
    """Average ‖∇F(w_t)‖² at the final T (and over its second half) against the run's maximum delay."""
    fig, axes = _figure(1, 2, (10.4, 3.8))
    for ax, attr, title in ((axes[0, 0], "average", "over all T iterations"),
                            (axes[0, 1], "second_half_average", "over the second half, t in [T/2, T)")):
        for method in dict.fromkeys(r.method for r in records):
            rows = sorted((r for r in records if r.method == method), key=lambda r: r.max_delay)
            ax.plot([r.max_delay for r in rows], [getattr(r, attr) for r in rows], marker="o",
                    color=COLORS[method], ls=STYLES[method], label=LABELS[method], lw=1.3)
        T = records[0].num_iterations
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("maximum delay of the run (Slow/Fast 1, 10, 100, 1000)")
        ax.set_ylabel(r"average $\|\nabla F(w_t)\|^2$")
        ax.set_title(f"{title} (T = {T})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_stale_kick(far: Sequence[RunRecord], path: Path, *, before: int = 100, after: int = 300) -> None:
    """‖∇F(w_t)‖² around the iteration where the slow worker's gradient from w_0 lands, one panel per w_0 scale."""
    scales = sorted({r.init_scale for r in far})
    fig, axes = _figure(1, len(scales), (4.2 * len(scales), 3.4))
    base = min(scales)
    for ax, scale in zip(axes.flat, scales, strict=True):
        for rec in (r for r in far if r.init_scale == scale):
            t = rec.first_late_arrival()
            if t is None:
                continue
            lo, hi = max(t - before, 0), min(t + after, rec.num_iterations)
            ax.plot(np.arange(lo, hi + 1) - t, rec.grad_sq[lo : hi + 1], color=COLORS[rec.method],
                    label=LABELS[rec.method], lw=1.1)
        ax.set_yscale("log")
        ax.set_xlabel("t − (iteration the w_0 gradient lands)")
        ax.set_ylabel(r"$\|\nabla F(w_t)\|^2$")
        first = next(r for r in far if r.init_scale == scale)
        ax.set_title(rf"$w_0$ x {scale / base:g}: $\|\nabla F(w_0)\|^2$ = {first.grad_sq[0]:.3g}", fontsize=10)
        ax.grid(True, alpha=0.3)
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Slow/Fast = {far[0].ratio:g}: the slow worker's first gradient, computed at w_0, arrives "
                 f"{far[0].kick()[3] if far[0].kick() else '(never)'} iterations late", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(records: Sequence[RunRecord], far: Sequence[RunRecord], cfg: CheckConfig, command: str) -> str:
    problem = cfg.problem()
    eta = effective_step(cfg, problem)
    T = records[0].num_iterations
    lines = [
        "# Theory, checked empirically: the measured numbers",
        "",
        f"Regenerate: `{command}`. K = {cfg.num_workers} workers, worker {cfg.num_workers - 1} is Slow/Fast times "
        f"slower (`ormo.OneSlow`, gamma jitter cv 0.1); T = {T} server iterations; seed {cfg.seed}; problem "
        f"`RippledQuadratic` (d = {cfg.dim}, L = {problem.smoothness:g}, σ = {cfg.noise_std:g}); η_eff = 1/(4KL) = "
        f"{eta:.5f}; β = {cfg.momentum}; OrLoMo H = {cfg.local_steps}. ‖∇F(w_0)‖² = {records[0].grad_sq[0]:.2f}. "
        "s.e.: standard error by batch means over 8 blocks of the second half.",
        "",
        "| method | Slow/Fast | max delay | mean delay | slow worker's messages | avg ‖∇F(w_t)‖², t < T | "
        "avg over t ∈ [T/2, T) ± s.e. |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rec in records:
        lines.append(f"| {LABELS[rec.method]} | {rec.ratio:g} | {rec.max_delay} | {rec.mean_delay:.2f} | "
                     f"{rec.slow_messages} | {rec.average:.4f} | {rec.second_half_average:.4f} ± "
                     f"{rec.second_half_stderr():.4f} |")
    lines += ["", "Spread across Slow/Fast 1 … 1000 (max / min of each column, per method):", "",
              "| method | avg over t < T | avg over [T/2, T) |", "|---|---:|---:|"]
    for method in dict.fromkeys(r.method for r in records):
        a = [r.average for r in records if r.method == method]
        b = [r.second_half_average for r in records if r.method == method]
        lines.append(f"| {LABELS[method]} | {max(a) / min(a):.3f} | {max(b) / min(b):.3f} |")
    if far:
        base = min(r.init_scale for r in far)
        lines += ["", f"Far start (Slow/Fast = {far[0].ratio:g}, T = {far[-1].num_iterations}; scale 1 is the grid's "
                  "run): "
                  "the maximum of ‖∇F(w_t)‖² over the 200 iterates before and the 200 after the slow worker's first "
                  "gradient (computed at w_0) lands, and the mean over those 200 after.", "",
                  "| method | w_0 scale | ‖∇F(w_0)‖² | delay of that gradient | max ‖∇F‖² before | "
                  "max ‖∇F‖² after | mean ‖∇F‖² after |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for rec in far:
            k = rec.kick()
            if k is None:
                lines.append(f"| {LABELS[rec.method]} | {rec.init_scale / base:g} | {rec.grad_sq[0]:.3g} | "
                             "(did not land) | | | |")
            else:
                lines.append(f"| {LABELS[rec.method]} | {rec.init_scale / base:g} | {rec.grad_sq[0]:.3g} | {k[3]} | "
                             f"{k[0]:.3g} | {k[1]:.3g} | {k[2]:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 2000, Slow/Fast 1, 10, 100, far start at 100")
    parser.add_argument("--out", default="docs/theory", help="output folder (default docs/theory)")
    parser.add_argument("--iterations", type=int, help="T (default 16000, 2000 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # d = 20: threads only add overhead
    try:
        cfg = CheckConfig(seed=args.seed)
        ratios, far_ratio = RATIOS, 1000.0
        if args.quick:
            cfg, ratios, far_ratio = replace(cfg, num_iterations=2000), RATIOS[:3], 100.0
        if args.iterations is not None:
            cfg = replace(cfg, num_iterations=args.iterations)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        print(f"grid: {len(METHODS)} methods x Slow/Fast {list(ratios)}, K = {cfg.num_workers}, "
              f"T = {cfg.num_iterations}")
        records = run_grid(cfg, ratios=ratios, verbose=True)
        print(f"far start: Slow/Fast {far_ratio:g}, w_0 scaled by {list(FAR_START_SCALES)} (x1: the grid's run)")
        far_T = min(cfg.num_iterations, int(1.3 * (cfg.num_workers - 1) * far_ratio) + 400)
        # scale 1 is the grid's run at this ratio (bit-identical over the first far_T iterations): not run twice
        far = [r for r in records if r.ratio == far_ratio] + run_far_start(
            cfg, ratio=far_ratio, scales=[s for s in FAR_START_SCALES if s != 1.0], num_iterations=far_T, verbose=True)
        plot_vs_T(records, out / "theorem_vs_T.png")
        plot_vs_delay(records, out / "theorem_vs_max_delay.png")
        plot_stale_kick(far, out / "theorem_stale_kick.png")
        command = "python benchmarks/theorem_check.py" + (" --quick" if args.quick else "")
        if args.iterations is not None:
            command += f" --iterations {args.iterations}"
        if args.seed:
            command += f" --seed {args.seed}"
        (out / "results.md").write_text(markdown(records, far, cfg, command))
        print(f"wrote {out}/theorem_vs_T.png, theorem_vs_max_delay.png, theorem_stale_kick.png, results.md "
              f"({time.perf_counter() - t0:.0f} s)")
        return 0

    finally:  # a caller's (e.g. a test process's) thread count is untouched
        torch.set_num_threads(previous_threads)

if __name__ == "__main__":
    raise SystemExit(main())
