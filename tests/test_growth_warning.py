"""The simulator warns once when the server parameters grow by orders of magnitude, and never changes results."""

from __future__ import annotations

import warnings

import pytest
import torch

import ormo
from ormo.engine import simulator


def _run(lr: float, *, num_iterations: int = 300, w0: float = 1.0) -> tuple[ormo.SimulationResult, list]:
    """ASGD with K = 1 on f(w) = w²/2: w_{t+1} = (1 − lr) w_t exactly (the gradient is w, no noise)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ormo.simulate(ormo.make_rule("asgd", lr=lr), torch.tensor([w0], dtype=torch.float64),
                               lambda w, *_: w.clone(), num_workers=1, num_iterations=num_iterations)
    return result, [w for w in caught if issubclass(w.category, ormo.GrowthWarning)]


def test_a_diverging_quadratic_warns_once_naming_the_iteration_the_norms_and_the_fix():
    # lr = 3: w_n = (−2)^n, so |w_n| passes 1e3 · max(|w_0|, 1) = 1e3 at n = 10; the first check after that is at
    # n = 16 (a power of two), i.e. after iteration t = 15, where |w_16| = 2^16 = 65536
    result, growth = _run(3.0)
    assert abs(float(result.params[0])) == 2.0**300  # the run itself went on: a warning, not an error
    (w,) = growth  # once per run, though every later check is over the limit too
    text = str(w.message)
    assert "t=15" in text and "|w_0| = 1 " in text and "|w_16| = 6.55e+04" in text
    assert "smaller lr than 3" in text and "K = 1 workers" in text
    assert w.filename == __file__  # attributed to the caller, not to the simulator's internals


def test_a_converging_quadratic_does_not_warn_even_from_a_large_start():
    for w0 in (1.0, 1e6):
        result, growth = _run(0.5, w0=w0)
        assert growth == [] and abs(float(result.params[0])) < w0


def test_growth_below_the_factor_does_not_warn():
    # lr = 2: w_n = (−1)^n, no growth at all; lr = 2.5: |w_n| = 1.5^n reaches 1e3 at n = 18, first check n = 32
    assert _run(2.0)[1] == []
    assert _run(2.5, num_iterations=17)[1] == []  # the largest norm is 1.5^17 < 1e3
    (w,) = _run(2.5, num_iterations=32)[1]
    assert "t=31" in str(w.message)


def test_the_check_never_changes_the_result(monkeypatch):
    warned, _ = _run(3.0)
    monkeypatch.setattr(simulator, "growth_check_due", lambda t: False)
    unchecked, growth = _run(3.0)
    assert growth == [] and torch.equal(warned.params, unchecked.params)


def test_checked_iterations_are_the_powers_of_two_then_a_stride():
    due = [t + 1 for t in range(1100) if simulator.growth_check_due(t)]
    assert due == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024]


def test_as_an_error_it_stops_at_a_consistent_iteration_boundary():
    sim = ormo.Simulator(ormo.make_rule("asgd", lr=3.0), torch.tensor([1.0], dtype=torch.float64),
                         lambda w, *_: w.clone(), num_workers=1, num_iterations=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ormo.GrowthWarning)
        with pytest.raises(ormo.GrowthWarning, match="t=15"):
            sim.run()
    assert sim.t == 16 and float(sim.state.params[0]) == 2.0**16
