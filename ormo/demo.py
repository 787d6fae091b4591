"""A small simulated comparison: the OrMo-paper methods on seeded logistic regression with K = 16 workers.

``ormo demo`` runs the quickstart sweep (configs/quickstart.toml) when the repository's configs are present; this
self-contained comparison is its fallback for an installed package without them.

Every method sees the same data for the same (worker, index, step) and runs for the same number of gradients;
the table gives the final training loss (mean ± std over seeds) and the simulated time the run took.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from . import Homogeneous, NonFiniteError, SlowFraction, make_rule, simulate
from .keys import minibatch_seed

METHODS = ["ssgdm", "asgd", "naive-asgdm", "shifted-momentum", "smega2", "ormo", "ormo-da"]


class LogisticProblem:
    """Binary logistic regression on a fixed seeded dataset (features with condition number ~100)."""

    def __init__(self, *, num_samples: int = 4096, dim: int = 32, batch_size: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        scales = torch.logspace(0, -1, dim, dtype=torch.float64)
        self.x = torch.randn(num_samples, dim, generator=g, dtype=torch.float64) * scales
        w_true = torch.randn(dim, generator=g, dtype=torch.float64) * 4
        p = torch.sigmoid(self.x @ w_true)
        self.y = (torch.rand(num_samples, generator=g, dtype=torch.float64) < p).to(torch.float64) * 2 - 1
        self.batch_size, self.seed = batch_size, seed

    def loss(self, w: torch.Tensor) -> float:
        return float(torch.nn.functional.softplus(-self.y * (self.x @ w)).mean())

    def grad_fn(self, w: torch.Tensor, worker: int, index: int, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(minibatch_seed(self.seed, worker, index, step))
        idx = torch.randint(0, self.x.shape[0], (self.batch_size,), generator=gen)
        xb, yb = self.x[idx], self.y[idx]
        return xb.T @ (-yb * torch.sigmoid(-yb * (xb @ w))) / self.batch_size


def run(*, num_workers: int = 16, num_iterations: int = 3000, seeds: tuple[int, ...] = (0, 1, 2),
        lr: float = 0.2, momentum: float = 0.9) -> list[dict]:
    settings = {"homogeneous": Homogeneous(), "heterogeneous": SlowFraction(fraction=0.25, slowdown=4.0)}
    rows = []
    for method in METHODS:
        hp = {"lr": lr} if method == "asgd" else {"lr": lr, "momentum": momentum}
        row = {"method": method}
        for setting, timing in settings.items():
            losses, times = [], []
            for seed in seeds:
                problem = LogisticProblem(seed=seed)
                try:
                    res = simulate(make_rule(method, **hp), torch.zeros(problem.x.shape[1], dtype=torch.float64),
                                   problem.grad_fn, num_workers=num_workers, num_iterations=num_iterations,
                                   timing=timing, seed=seed)
                except NonFiniteError:  # a diverged run is a result: shown as "diverged"
                    losses.append(math.inf)
                    continue
                losses.append(problem.loss(res.params))
                times.append(res.sim_time_s)
            mean = statistics.mean(losses)
            std = statistics.pstdev(losses) if math.isfinite(mean) else math.nan
            row[setting] = (mean, std, statistics.mean(times) if times else math.nan)
        rows.append(row)
    return rows


def main() -> None:
    t0 = time.perf_counter()
    rows = run()
    print("Logistic regression, K = 16 workers, 3000 gradients each run, 3 seeds (lr 0.2, momentum 0.9).")
    print("Heterogeneous: 25 % of workers 4x slower. Time = simulated seconds (1 s per gradient on a fast worker).")
    print()
    print(f"{'method':18s} {'hom. loss':>17s} {'hom. time':>10s} {'het. loss':>17s} {'het. time':>10s}")
    for r in rows:
        cells = []
        for setting in ("homogeneous", "heterogeneous"):
            mean, std, sim_t = r[setting]
            loss = f"{mean:.4f} ± {std:.4f}" if math.isfinite(mean) else "diverged"
            cells.append(f"{loss:>17s} {sim_t:10.0f}")
        print(f"{r['method']:18s} " + " ".join(cells))
    print(f"\n(wall time {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
