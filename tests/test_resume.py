"""Simulator checkpoints: stopping at any iteration, saving with torch.save and continuing in a fresh simulator gives
bit-identical events and parameters; and the per-iteration learning-rate schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import Quadratic, max_rel_diff, random_async_order, roundtrip

import ormo
from ormo.engine import Simulator
from ormo.engine.timing import OneSlow, SlowFraction

CASES = [(name, {}) for name in ormo.rule_names()] + [
    ("orlomo", {"local_momentum_init": "previous"}),
    ("prsgdm", {"average_momentum": False}),
    ("smega2", {"estimate": "naive"}),
]


def _rule(name, extra):
    hp = dict(extra)
    if "local_steps" in ormo.make_rule(name).describe()["hyperparameters"]:
        hp["local_steps"] = 2
    return ormo.make_rule(name, **hp)


@pytest.mark.parametrize(("name", "extra"), CASES, ids=[f"{n}{'-' + '-'.join(map(str, e.values())) if e else ''}"
                                                        for n, e in CASES])
@pytest.mark.parametrize("source", ["heap", "order"])
def test_resume_at_any_iteration_is_bit_identical(name, extra, source):
    problem = Quadratic(seed=3, dtype=torch.float32)
    k, total = 4, 48
    if source == "order":
        kw = {"order": random_async_order(np.random.default_rng(0), k, total)}
        if _rule(name, extra).scheduler == "sync":
            kw = {"order": np.concatenate([np.random.default_rng(r).permutation(k) for r in range(12)]).tolist()}
    else:
        kw = {"num_iterations": total, "timing": SlowFraction(fraction=0.5, slowdown=3.0)}

    def build():
        return Simulator(_rule(name, extra), problem.w0, problem.grad_fn, num_workers=k, seed=5,
                         lr_schedule=lambda t: 1.0 if t < 20 else 0.5, **kw)

    full = build().run(total).result()
    for stop in (1, 17, 31):
        first = build().run(stop)
        saved = roundtrip(first.state_dict())
        second = build()
        second.load_state_dict(saved)
        res = second.run(total).result()
        assert res.events == full.events
        assert torch.equal(res.params, full.params), f"stopped at {stop}"
        assert res.idle_time_s == full.idle_time_s


def test_resume_from_a_replay():
    problem = Quadratic(seed=1)
    first = ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=30,
                          timing=OneSlow(ratio=4.0))
    replay = ormo.Replay(first.events)
    part = Simulator(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, timing=replay).run(12)
    rest = Simulator(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, timing=replay)
    rest.load_state_dict(roundtrip(part.state_dict()))
    assert torch.equal(rest.run().result().params, first.params)


def test_stepping_past_an_order_is_an_error():
    problem = Quadratic()
    sim = Simulator(ormo.make_rule("asgd"), problem.w0, problem.grad_fn, num_workers=2, order=[0, 1])
    sim.run()
    with pytest.raises(ormo.ConfigError, match="past the end of the given order"):
        sim.step()


@pytest.mark.parametrize("name", ["asgd", "ormo", "ormo-da", "naive-asgdm", "smega2", "shifted-momentum", "ssgdm"])
def test_constant_schedule_factor_equals_a_scaled_learning_rate(name):
    problem = Quadratic(seed=2)
    hp = {} if name == "asgd" else {"momentum": 0.9}
    order = random_async_order(np.random.default_rng(1), 3, 60) if name != "ssgdm" else [0, 1, 2] * 20
    a = ormo.simulate(ormo.make_rule(name, lr=0.2, **hp), problem.w0, problem.grad_fn, num_workers=3, order=order,
                      lr_schedule=lambda t: 0.25)
    b = ormo.simulate(ormo.make_rule(name, lr=0.05, **hp), problem.w0, problem.grad_fn, num_workers=3, order=order)
    assert max_rel_diff(a.params, b.params) <= 1e-12


@pytest.mark.parametrize("name", ["al-sgd", "local-ormo-da", "orlomo", "prsgdm"])
def test_schedule_drives_the_local_rate_of_local_methods_only(name):
    """For local-update methods the schedule scales γ (the issue: "to η for gradient methods and to γ for local
    ones"), never η as well: a factor 0.5 is exactly local_lr × 0.5."""
    problem = Quadratic(seed=2)
    k = 3
    order = random_async_order(np.random.default_rng(1), k, 30) if name != "prsgdm" else [0, 1, 2] * 10
    hp = {"local_steps": 3} | ({"lr": 0.7} if name != "prsgdm" else {})
    a = ormo.simulate(ormo.make_rule(name, local_lr=0.2, **hp), problem.w0, problem.grad_fn, num_workers=k,
                      order=order, lr_schedule=lambda t: 0.5)
    b = ormo.simulate(ormo.make_rule(name, local_lr=0.1, **hp), problem.w0, problem.grad_fn, num_workers=k,
                      order=order)
    assert max_rel_diff(a.params, b.params) <= 1e-12


def test_inverse_lr_divides_by_the_rate_the_worker_used():
    """local OrMo-DA with delta_scale='inverse_lr' across a decay: Δ is divided by the γ its worker used (its factor
    at dispatch, carried by the message), not by the γ in force when the server applies it."""
    rule = ormo.make_rule("local-ormo-da", lr=1.0, momentum=0.5, local_lr=0.2, local_steps=1,
                          delta_scale="inverse_lr", delay_rule="none")
    state = rule.init(torch.zeros(3, dtype=torch.float64), num_workers=1)
    state.local_lr_scale = 0.1  # the schedule has just decayed γ tenfold
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    message = ormo.Message(index=0, update=0.2 * 1.0 * g, local_lr_scale=1.0)  # computed before the decay
    rule.begin_iteration(state, t=0, waiting_empty=True)
    rule.apply(state, message, t=0, worker=0)
    assert torch.allclose(state.momentum, g) and torch.allclose(state.params, -g)
