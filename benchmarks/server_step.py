"""Server-step cost of OrMo and OrLoMo against the memory floor of the same update, measured in the same run.

What is measured
----------------
One server iteration ``t`` is ``rule.begin_iteration(state, t=t, waiting_empty=True)`` followed by
``rule.apply(state, Message(...), t=t, worker=k)``, exactly as an engine calls it. Messages arrive round-robin from
``K = 16`` workers: the message consumed at ``t`` was computed from index ``s = max(0, t − K + 1)``, so 15 of every
16 messages are one group late (``n = 1``, every term of the update active) and one is on time (``n = 0``). The
message tensors (``g`` for OrMo; ``Δ`` and ``m`` for OrLoMo) are random, allocated once and reused, so the loop
times the server alone. Sizes: 0.27M float32 parameters (a small CNN; the tensors sit in the last-level cache
and per-call Python overhead matters) and 11M (a ResNet-18; every pass streams from DRAM).

Why the floor is defined this way
---------------------------------
A server step is a few element-wise passes over parameter-sized tensors, so it is memory-bound: no implementation
can do less than stream, once each, the tensors its math reads and writes. The floor is therefore *the same
arithmetic written as the bare minimum of fused in-place triads* — one ``torch.add(x, y, alpha=c, out=x)`` per
term (read ``x`` and ``y``, write ``x``), on the same tensors, in the same order, with the same per-step schedule:

* OrMo, per message:   ``u ← u + β^n η g`` and ``w ← w − S(n) η g`` (two triads);
* OrLoMo, per message: ``u ← u + β^n η m``, ``w ← w − η Δ`` and, when ``n ≥ 1``, ``w ← w − (β + … + β^n) η m``;
* both, when a group closes (every K iterations): ``w ← w − β u`` and ``u ← β u`` (``torch.mul(u, β, out=u)``).

The floor runs the identical op sequence with the coefficients precomputed (checked: from the same w and u, a block
of floor steps gives the same w and u as the rule, column "same math"), i.e. everything the rule does minus its
bookkeeping (group index, lateness, delay factor, coefficient computation, Message construction and the method
calls). ``ratio = rule µs/step ÷ floor µs/step`` is then the rule's overhead over its own memory traffic; the
goal is ≤ 1.3. Because the machine is shared and noisy, short rule and floor blocks are interleaved (alternating
which goes first), every block covers a whole number of groups (so it contains the same number of shifts), and
after a warm-up the table reports the median µs/step of each and, as the ratio, the median (and interquartile
range) over pairs of rule/floor for adjacent blocks. On a loaded machine the µs medians of rule and floor can land
in different load regimes and disagree with each other; the paired ratio is the robust number (the JSON also has
every sample and the ratios of medians and of minima). ``torch.set_num_threads`` is
left at its default.

No new tensors per step: the script checks that ``state.params.data_ptr()`` and ``state.momentum.data_ptr()`` never
change, and counts CPU allocations during a block of steps with ``torch.profiler`` (``profile_memory=True``). The
only allocations expected are the 8-byte wrapped scalars PyTorch creates for ``mul_(python_float)`` at each shift,
which the floor's ``torch.mul(u, β, out=u)`` makes too; no allocation may be parameter-sized.

Usage::

    .venv/bin/python benchmarks/server_step.py            # full run (< 2 minutes on 2 cores)
    .venv/bin/python benchmarks/server_step.py --quick    # fewer pairs
    .venv/bin/python benchmarks/server_step.py --json results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import ormo
from ormo.rules import Message, catch_up, group_of

NUM_WORKERS = 16
GOAL = 1.3
SIZES: dict[str, int] = {"0.27M": 270_000, "11M": 11_000_000}
RULES: dict[str, dict[str, Any]] = {
    "ormo": {"lr": 0.1, "momentum": 0.9},
    "orlomo": {"lr": 1.0, "momentum": 0.9, "local_lr": 0.1, "local_steps": 8},
}
#: Allocations at least this large would be a parameter-sized temporary (the smallest tensor here is 1 MiB).
TENSOR_ALLOC_BYTES = 1024


def source_index(t: int) -> int:
    """Round-robin arrival with K workers: the message consumed at ``t`` was computed from ``w_{t−K+1}``."""
    return max(0, t - NUM_WORKERS + 1)


class Bench:
    """One (rule, size) configuration: the rule's state, the reused message tensors, and both step loops."""

    def __init__(self, rule_name: str, numel: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.rule_name = rule_name
        self.rule = ormo.make_rule(rule_name, **RULES[rule_name])
        self.state = self.rule.init(torch.randn(numel, generator=gen), num_workers=NUM_WORKERS)
        # Small messages keep w and u well scaled however many steps run (the floor also updates them).
        self.update = torch.randn(numel, generator=gen).mul_(1e-3)
        self.momentum = torch.randn(numel, generator=gen).mul_(1e-3) if rule_name == "orlomo" else None
        self.t = 0  # last iteration the rule consumed; the rule loop continues from t + 1
        self.ptrs = (self.state.params.data_ptr(), self.state.momentum.data_ptr())

    # -- the rule, called as an engine calls it --------------------------------------------------------------
    def run_rule(self, steps: int) -> None:
        rule, state, g, m = self.rule, self.state, self.update, self.momentum
        t0 = self.t + 1
        for t in range(t0, t0 + steps):
            rule.begin_iteration(state, t=t, waiting_empty=True)
            rule.apply(state, Message(index=source_index(t), update=g, momentum=m), t=t, worker=t % NUM_WORKERS)
        self.t = t0 + steps - 1

    # -- the floor: the same in-place passes, coefficients precomputed ------------------------------------
    def floor_schedule(self, steps: int) -> list[tuple[bool, float, float, float]]:
        """Per step of a block: (shift?, coefficient of the u-triad, of the first w-triad, of the second w-triad).

        Built from the same arrival pattern and group bookkeeping as the rule, outside the timed loop. A zero
        coefficient means the rule skips that pass (OrLoMo's late term when ``n = 0``), so the floor skips it too.
        """
        beta = self.rule.momentum
        eta = self.rule.lr  # lr_scale = 1 and the delay factor is 1 (τ = K − 1 ≤ K), as in the rule
        group = self.state.group
        out = []
        for t in range(self.t + 1, self.t + 1 + steps):
            shift = group < group_of(t, NUM_WORKERS)
            group = max(group, group_of(t, NUM_WORKERS))
            n = group - group_of(source_index(t), NUM_WORKERS)
            if self.rule_name == "ormo":
                out.append((shift, beta**n * eta, -catch_up(beta, n) * eta, 0.0))
            else:
                out.append((shift, beta**n * eta, -eta, -(catch_up(beta, n) - 1.0) * eta))
        return out

    def run_floor(self, schedule: list[tuple[bool, float, float, float]]) -> None:
        w, u, g, m = self.state.params, self.state.momentum, self.update, self.momentum
        beta = self.rule.momentum
        if m is None:  # OrMo: u += a g ; w += b g
            for shift, a, b, _ in schedule:
                if shift:
                    torch.add(w, u, alpha=-beta, out=w)
                    torch.mul(u, beta, out=u)
                torch.add(u, g, alpha=a, out=u)
                torch.add(w, g, alpha=b, out=w)
        else:  # OrLoMo: u += a m ; w += b Δ ; w += c m (when n ≥ 1)
            for shift, a, b, c in schedule:
                if shift:
                    torch.add(w, u, alpha=-beta, out=w)
                    torch.mul(u, beta, out=u)
                torch.add(u, m, alpha=a, out=u)
                torch.add(w, g, alpha=b, out=w)
                if c != 0.0:
                    torch.add(w, m, alpha=c, out=w)

    def floor_matches_rule(self, steps: int) -> bool:
        """Run ``steps`` iterations of the rule, then the floor from the same starting w and u: same result?"""
        w, u = self.state.params, self.state.momentum
        schedule = self.floor_schedule(steps)
        w0, u0 = w.clone(), u.clone()
        self.run_rule(steps)
        w_rule, u_rule = w.clone(), u.clone()
        w.copy_(w0)
        u.copy_(u0)
        self.run_floor(schedule)
        return torch.allclose(w, w_rule, rtol=1e-5, atol=1e-6) and torch.allclose(u, u_rule, rtol=1e-5, atol=1e-6)

    def check_ptrs(self) -> bool:
        return (self.state.params.data_ptr(), self.state.momentum.data_ptr()) == self.ptrs


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ backend prints start/stop lines there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_allocations(fn: Callable[[], None]) -> tuple[int, int]:
    """(number of CPU allocations, largest one in bytes) made while ``fn`` runs."""
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.cpu_memory_usage for e in prof.events() if e.name == "[memory]" and e.cpu_memory_usage > 0]
    return len(sizes), max(sizes, default=0)


def measure(rule_name: str, size_name: str, *, pairs: int, steps: int) -> dict[str, Any]:
    """Time ``pairs`` interleaved (rule block, floor block) pairs of ``steps`` iterations each (a multiple of K)."""
    bench = Bench(rule_name, SIZES[size_name])
    # Warm-up: the first K iterations have s = 0 (not the steady pattern), then a few blocks of each.
    bench.run_rule(NUM_WORKERS)
    for _ in range(2):
        bench.run_rule(steps)
        bench.run_floor(bench.floor_schedule(steps))
    same_math = bench.floor_matches_rule(2 * NUM_WORKERS)

    rule_s: list[float] = []
    floor_s: list[float] = []
    for rep in range(pairs):
        schedule = bench.floor_schedule(steps)
        pair = [
            (rule_s, lambda: bench.run_rule(steps)),
            (floor_s, lambda schedule=schedule: bench.run_floor(schedule)),
        ]
        for sink, fn in pair if rep % 2 == 0 else pair[::-1]:
            sink.append(timed(fn) / steps)

    # Allocation check on one more group of each (not timed: the profiler adds its own overhead).
    rule_allocs, rule_max = count_allocations(lambda: bench.run_rule(NUM_WORKERS))
    schedule = bench.floor_schedule(NUM_WORKERS)
    floor_allocs, floor_max = count_allocations(lambda: bench.run_floor(schedule))

    # Headline ratio: median over pairs of (rule / floor) of adjacent blocks, which cancels the slow swings in
    # available bandwidth and CPU on a shared machine better than a ratio of two separately taken medians.
    pair_ratios = [r / f for r, f in zip(rule_s, floor_s, strict=True)]
    q1, ratio, q3 = statistics.quantiles(pair_ratios, n=4)
    return {
        "rule": rule_name,
        "size": size_name,
        "numel": SIZES[size_name],
        "steps_per_block": steps,
        "pairs": pairs,
        "rule_us_per_step": statistics.median(rule_s) * 1e6,
        "floor_us_per_step": statistics.median(floor_s) * 1e6,
        "ratio": ratio,
        "ratio_quartiles": [q1, q3],
        "ratio_of_medians": statistics.median(rule_s) / statistics.median(floor_s),
        "ratio_of_minima": min(rule_s) / min(floor_s),
        "rule_us_samples": [x * 1e6 for x in rule_s],
        "floor_us_samples": [x * 1e6 for x in floor_s],
        "floor_matches_rule": same_math,
        "goal": GOAL,
        "meets_goal": ratio <= GOAL,
        "data_ptr_stable": bench.check_ptrs(),
        "rule_allocs_per_step": rule_allocs / NUM_WORKERS,
        "rule_max_alloc_bytes": rule_max,
        "floor_allocs_per_step": floor_allocs / NUM_WORKERS,
        "floor_max_alloc_bytes": floor_max,
        "no_tensor_allocs": bench.check_ptrs() and rule_max < TENSOR_ALLOC_BYTES,
    }


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def format_table(results: list[dict[str, Any]]) -> str:
    """One row per configuration: median µs/step of rule and floor, paired ratio (IQR), goal and the checks."""
    columns = [
        ("rule", "<8"),
        ("size", ">6"),
        ("rule µs/step", ">13"),
        ("floor µs/step", ">14"),
        ("ratio", ">6"),
        ("(IQR)", ">11"),
        ("goal", ">6"),
        ("ok", "<4"),
        ("same math", "<9"),
        ("ptrs same", "<9"),
        ("allocs/step (max B)", "<19"),
    ]
    rows = []
    for r in results:
        q1, q3 = r["ratio_quartiles"]
        rows.append(
            [
                r["rule"],
                r["size"],
                f"{r['rule_us_per_step']:.1f}",
                f"{r['floor_us_per_step']:.1f}",
                f"{r['ratio']:.2f}x",
                f"({q1:.2f}–{q3:.2f})",
                f"≤{GOAL}",
                yes(r["meets_goal"]),
                yes(r["floor_matches_rule"]),
                yes(r["data_ptr_stable"]),
                f"{r['rule_allocs_per_step']:.3g} ({r['rule_max_alloc_bytes']} B)",
            ]
        )
    header = " ".join(f"{name:{spec}}" for name, spec in columns)
    lines = [header, "-" * len(header)]
    lines += [" ".join(f"{cell:{spec}}" for cell, (_, spec) in zip(row, columns, strict=True)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="7 and 5 pairs instead of 31 (5-15 s instead of 15-60 s)")
    parser.add_argument("--json", metavar="PATH", help="write the results to PATH as JSON")
    args = parser.parse_args(argv)
    # a line per case as it finishes, even through a pipe (`make bench | tee`): the full run takes a minute or two
    sys.stdout.reconfigure(line_buffering=True)

    # (steps per block, pairs). Blocks hold a whole number of groups, so each has the same number of shifts, and
    # last ~25-60 ms unloaded: long enough to average over the OS scheduler's time slices (with 2-ms blocks on a
    # loaded 2-core machine, whichever block ran first in a pair was systematically the slow one), short enough
    # that rule and floor of a pair see the same load.
    plan = {"0.27M": (64 * NUM_WORKERS, 31), "11M": (NUM_WORKERS, 31)}
    if args.quick:
        plan = {"0.27M": (64 * NUM_WORKERS, 7), "11M": (NUM_WORKERS, 5)}

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"K={NUM_WORKERS} round-robin (n=1 for 15/16 messages), float32"
    )
    results = []
    start = time.perf_counter()
    for size_name in SIZES:
        for rule_name in RULES:
            steps, pairs = plan[size_name]
            print(f"  {rule_name:6s} {size_name:>5s}: {pairs} pairs of {steps}-step blocks ...", end=" ", flush=True)
            r = measure(rule_name, size_name, pairs=pairs, steps=steps)
            results.append(r)
            print(f"ratio {r['ratio']:.2f}x ({r['rule_us_per_step']:.1f} vs {r['floor_us_per_step']:.1f} µs/step), "
                  f"{time.perf_counter() - start:.0f} s so far")

    print(format_table(results))
    floor_allocs = {f"{r['floor_allocs_per_step']:.3g} ({r['floor_max_alloc_bytes']} B)" for r in results}
    print(
        f"floor allocs/step (max B): {', '.join(sorted(floor_allocs))}; allocations under {TENSOR_ALLOC_BYTES} B are "
        "PyTorch's wrapped Python scalars, not tensors. "
        f"Parameter-sized allocations per step: {'none' if all(r['no_tensor_allocs'] for r in results) else 'FOUND'}"
    )
    print(f"total {time.perf_counter() - start:.1f} s")

    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "num_workers": NUM_WORKERS}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0 if all(r["no_tensor_allocs"] and r["floor_matches_rule"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
