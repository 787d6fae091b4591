"""benchmarks/theorem_check.py: the synthetic problem is what it claims (exact gradient, L-smooth, non-convex,
unbiased keyed noise), runs are deterministic, every method converges, the maximum delay grows with Slow/Fast, and
the delay-adaptive rate damps a very late gradient that constant-η OrMo applies in full. Tiny sizes: a few seconds."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "theorem_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("theorem_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


tc = _load()
TINY = tc.CheckConfig(num_workers=4, num_iterations=400)


def test_full_grad_is_the_autograd_gradient_of_the_value():
    problem = tc.RippledQuadratic(dim=7, seed=3)
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        w = (3.0 * torch.randn(7, generator=gen, dtype=torch.float64)).requires_grad_()
        (expected,) = torch.autograd.grad(problem.value(w), w)
        torch.testing.assert_close(problem.full_grad(w.detach()), expected, rtol=0, atol=1e-12)


def test_problem_is_L_smooth_and_not_convex():
    problem = tc.RippledQuadratic(dim=5, seed=1)
    assert problem.smoothness == pytest.approx(1.0 + 0.5 * 2.0**2)
    gen = torch.Generator().manual_seed(5)
    lowest, highest = np.inf, -np.inf
    for _ in range(20):
        w = 2.0 * torch.randn(5, generator=gen, dtype=torch.float64)
        eig = torch.linalg.eigvalsh(torch.autograd.functional.hessian(problem.value, w))
        lowest, highest = min(lowest, float(eig.min())), max(highest, float(eig.max()))
    assert lowest < 0.0  # non-convex somewhere
    assert highest <= problem.smoothness + 1e-12  # |curvature| ≤ L


def test_noise_is_keyed_by_worker_index_step_and_unbiased():
    problem = tc.RippledQuadratic(dim=6, noise_std=0.5, seed=2)
    w = problem.initial_point(1.0)
    a, b = problem.grad_fn(w, 1, 7, 0), problem.grad_fn(w, 1, 7, 0)
    assert torch.equal(a, b)
    for other in (problem.grad_fn(w, 2, 7, 0), problem.grad_fn(w, 1, 8, 0), problem.grad_fn(w, 1, 7, 1)):
        assert not torch.equal(a, other)
    noise = torch.stack([problem.grad_fn(w, k, i, 0) for k in range(4) for i in range(500)]) - problem.full_grad(w)
    assert noise.mean(0).abs().max() < 4 * 0.5 / np.sqrt(2000)
    assert float(noise.std(0).mean()) == pytest.approx(0.5, rel=0.05)


@pytest.fixture(scope="module")
def grid():
    return tc.run_grid(TINY, ratios=(1, 50))


def test_every_method_gets_below_its_initial_gradient_norm(grid):
    assert len(grid) == 2 * len(tc.METHODS)
    for rec in grid:
        start = rec.grad_sq[0]
        assert rec.average < start, (rec.method, rec.ratio)
        assert rec.second_half_average < start / 10, (rec.method, rec.ratio)
        run = rec.running_average()
        assert run[-1] == pytest.approx(rec.average) and run[0] == start


def test_max_delay_grows_with_slow_fast_while_the_mean_stays_near_K(grid):
    K = TINY.num_workers
    for method in tc.METHODS:
        fast, slow = (next(r for r in grid if r.method == method and r.ratio == q) for q in (1.0, 50.0))
        assert fast.max_delay < 4 * K
        assert slow.max_delay > 25 * (K - 1)  # the slow worker's message waits ≈ (K−1)·ratio iterations
        assert slow.slow_messages < fast.slow_messages / 10
        assert abs(fast.mean_delay - (K - 1)) < 0.5 and abs(slow.mean_delay - (K - 1)) < 1.0


def test_a_run_is_deterministic_for_its_seed():
    one, two = (tc.run_one("ormo", 10, replace(TINY, num_iterations=150)) for _ in range(2))
    assert np.array_equal(one.grad_sq, two.grad_sq) and np.array_equal(one.delay, two.delay)
    other = tc.run_one("ormo", 10, replace(TINY, num_iterations=150, seed=1))
    assert not np.array_equal(one.grad_sq, other.grad_sq)


def test_delay_adaptive_rate_damps_the_late_gradient_from_w0_that_constant_lr_ormo_applies_in_full():
    # one worker 300x slower: its gradient at a far-away w_0 lands ~900 iterations late, after the others converged
    cfg = replace(TINY, init_scale=90.0)
    far = tc.run_far_start(cfg, methods=("ormo", "ormo-da"), scales=(1.0,), ratio=300.0)
    kicks = {r.method: r.kick() for r in far}
    before, after, _, delay = kicks["ormo"]
    assert delay > 500
    assert after > 20 * before  # applied with S(n)·η ≈ η/(1−β): a jump sized by |∇F(w_0)|
    before_da, after_da, _, _ = kicks["ormo-da"]
    assert after_da < 3 * before_da  # scaled by K/τ: no jump


def test_bad_method_name_is_named():
    with pytest.raises(ValueError, match="invalid method: 'adam'"):
        tc.make_method("adam", TINY, TINY.problem())


def test_main_writes_the_plots_and_the_table(tmp_path, capsys):
    assert tc.main(["--quick", "--iterations", "200", "--out", str(tmp_path)]) == 0
    for name in ("theorem_vs_T.png", "theorem_vs_max_delay.png", "theorem_stale_kick.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "results.md").read_text()
    assert "| OrMo-DA | 100 |" in table and "| OrLoMo | 1 |" in table
    assert "python benchmarks/theorem_check.py --quick --iterations 200" in table
    assert "wrote" in capsys.readouterr().out
