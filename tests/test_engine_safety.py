"""Ways a run could go silently wrong, each shut: aliasing, autograd leaks, overflow, replay mismatches, worker
state on failure, and inputs that are numbers of another type."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from helpers import Quadratic, max_rel_diff, random_async_order, random_sync_order, roundtrip

import ormo
from ormo import ConfigError, GradFnError, NonFiniteError
from ormo.engine import Simulator


def test_state_dict_is_a_deep_copy_not_a_view_of_live_buffers():
    """Taking a state_dict in memory, stepping on, then loading it must continue from the saved point."""
    problem = Quadratic(seed=1)
    kw = dict(num_workers=3, num_iterations=40, seed=2)
    full = Simulator(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, **kw).run(40).result()
    sim = Simulator(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, **kw).run(15)
    saved = sim.state_dict()
    sim.run(30)  # keeps mutating the live snapshot buffers
    fresh = Simulator(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, **kw)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.run(40).result().params, full.params)


@pytest.mark.parametrize("name", ["asgd", "ssgd", "ormo"])
def test_overflowing_server_parameters_stop_the_run_with_the_iteration_named(name):
    w0 = torch.ones(4, dtype=torch.float64)

    def grad_fn(params, worker, index, step):
        return torch.full_like(params, 1e300)  # finite, but one step of lr 1e30 overflows float64

    with pytest.raises(NonFiniteError, match=r"the server parameters became NaN/Inf at iteration t=\d+, after "
                                             r"applying the message of worker \d \(index \d+, delay \d+\): the run "
                                             r"diverged") as info:
        ormo.simulate(ormo.make_rule(name, lr=1e30), w0, grad_fn, num_workers=2, num_iterations=10)
    assert info.value.partial is not None


def test_params0_requiring_grad_builds_no_graph():
    problem = Quadratic()
    w0 = problem.w0.clone().requires_grad_(True)
    res = ormo.simulate(ormo.make_rule("ormo"), w0, lambda p, *a: problem.grad_fn(p, *a).requires_grad_(True),
                        num_workers=2, num_iterations=20)
    assert not res.params.requires_grad and res.params.grad_fn is None
    res.params.numpy()  # would raise on a tensor that requires grad


def test_autograd_grad_fn_on_a_shared_sync_snapshot_does_not_leak_between_workers():
    """The common pattern ``params.requires_grad_(); f(params).backward(); return params.grad`` must give each worker
    its own gradient, although a synchronous round shares one snapshot."""
    problem = Quadratic(seed=3)

    def autograd_grad(params, worker, index, step):
        params.requires_grad_(True)
        f = 0.5 * params @ problem.A @ params - problem.b @ params + problem.noise_at(worker, index, step) @ params
        f.backward()
        return params.grad

    order = random_sync_order(np.random.default_rng(0), 4, 5)
    a = ormo.simulate(ormo.make_rule("ssgd", lr=0.05), problem.w0, autograd_grad, num_workers=4, order=order)
    b = ormo.simulate(ormo.make_rule("ssgd", lr=0.05), problem.w0, problem.grad_fn, num_workers=4, order=order)
    assert max_rel_diff(a.params, b.params) <= 1e-12


def test_grad_fn_writing_into_its_params_is_an_error():
    problem = Quadratic()

    def grad_fn(params, worker, index, step):
        g = problem.grad_fn(params, worker, index, step)
        params.mul_(0.5)  # corrupts the snapshot the whole round shares
        return g

    with pytest.raises(GradFnError, match="changed its params argument in place .* clone it first"):
        ormo.simulate(ormo.make_rule("ssgdm"), problem.w0, grad_fn, num_workers=2, num_iterations=4)


def _cubic_grad(seed):
    def grad_fn(params, worker, index, step):
        xi = torch.tensor(np.random.default_rng([seed, worker, index, step]).normal(size=params.numel()) * 0.1)
        return params**3 + params - 1.0 + xi

    return grad_fn


@pytest.mark.parametrize("average_momentum", [True, False])
def test_prsgdm_momentum_averaging_on_a_nonlinear_problem(average_momentum):
    """On a quadratic, averaging the momenta or keeping each worker's own gives the same x̄ (the updates are linear);
    a cubic gradient tells them apart. Reference: a plain loop over rounds and workers."""
    k, h, gamma, beta, rounds = 3, 2, 0.05, 0.9, 6
    grad_fn = _cubic_grad(7)
    w0 = torch.tensor([0.3, -0.2, 1.1], dtype=torch.float64)
    order = random_sync_order(np.random.default_rng(1), k, rounds)
    res = ormo.simulate(ormo.make_rule("prsgdm", local_lr=gamma, momentum=beta, local_steps=h,
                                       average_momentum=average_momentum), w0, grad_fn, num_workers=k, order=order)
    w, u, own = w0.clone(), torch.zeros(3, dtype=torch.float64), [torch.zeros(3, dtype=torch.float64)] * k
    for r in range(rounds):
        xs, vs = [], []
        for j in range(k):
            x, v = w.clone(), (u.clone() if average_momentum else own[j].clone())
            for step in range(h):
                v = beta * v + grad_fn(x, j, r * k, step)
                x = x - gamma * v
            xs.append(x)
            vs.append(v)
            own[j] = v
        w, u = sum(xs) / k, sum(vs) / k
    assert max_rel_diff(res.params, w) <= 1e-12
    other = ormo.simulate(ormo.make_rule("prsgdm", local_lr=gamma, momentum=beta, local_steps=h,
                                         average_momentum=not average_momentum), w0, grad_fn, num_workers=k,
                          order=order)
    assert max_rel_diff(res.params, other.params) > 1e-6  # the test can tell the two readings apart


def test_replay_checks_the_indices_it_reproduces():
    problem = Quadratic()
    log = ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, order=[0, 1, 2] * 4).events
    log.meta.pop("scheduler")  # e.g. a hand-made log: the per-event index check still catches it
    with pytest.raises(ConfigError, match=r"the replayed log says iteration t=3 consumed index 1, but replaying it "
                                          r"here gives index 3"):
        ormo.simulate(ormo.make_rule("ssgdm"), problem.w0, problem.grad_fn, num_workers=3, timing=ormo.Replay(log))


def test_worker_state_is_restored_when_its_message_is_rejected():
    problem = Quadratic()
    calls = []

    def grad_fn(params, worker, index, step):
        calls.append((worker, index, step))
        g = problem.grad_fn(params, worker, index, step)
        if index >= 8 and worker == 0 and step == 1:
            g[0] = math.nan
        return g

    rule = ormo.make_rule("orlomo", local_steps=2, local_momentum_init="previous")
    sim = Simulator(rule, problem.w0, grad_fn, num_workers=2, order=random_async_order(np.random.default_rng(0), 2, 30))
    before = None
    with pytest.raises(NonFiniteError) as info:
        while True:
            before = sim.worker_states[0].momentum.clone()
            sim.step()
    assert info.value.worker == 0
    assert torch.equal(sim.worker_states[0].momentum, before)  # not half-updated by the rejected message


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "1"])
def test_learning_rate_schedule_values_are_checked(bad):
    problem = Quadratic()
    with pytest.raises(ConfigError, match=r"invalid lr_schedule\(\d+\): .* \(must be a finite number >= 0\)"):
        ormo.simulate(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=2, num_iterations=5,
                      lr_schedule=lambda t: 1.0 if t < 2 else bad)


def test_callable_delay_rule_returning_infinity_is_an_error():
    problem = Quadratic()
    with pytest.raises(ConfigError, match=r"delay_rule returned inf .* \(must be a finite number >= 0\)"):
        ormo.simulate(ormo.make_rule("ormo-da", delay_rule=lambda tau, k: math.inf), problem.w0, problem.grad_fn,
                      num_workers=2, order=[0, 1])


def test_numpy_scalars_are_accepted_where_numbers_are():
    problem = Quadratic()
    rule = ormo.make_rule("orlomo", lr=np.float64(0.5), momentum=np.float32(0.9), local_steps=np.int64(2))
    res = ormo.simulate(rule, problem.w0, problem.grad_fn, num_workers=np.int64(2), num_iterations=np.int32(6),
                        seed=np.uint8(3))
    assert len(res.events) == 6
    with pytest.raises(ConfigError, match="invalid momentum: np.True_"):
        ormo.make_rule("ormo", momentum=np.bool_(True))


# ---------------------------------------------------------------------------------------------------------------
# an adversarial read: a state loaded into a simulator it does not fit, and loose arguments


def _saved_ormo_state():
    problem = Quadratic()
    sim = Simulator(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=20, seed=0)
    sim.run(10)
    return problem, roundtrip(sim.state_dict())


@pytest.mark.parametrize(("change", "named"), [
    ({"rule": "orlomo"}, "rule 'ormo' (this simulator: 'orlomo')"),
    ({"scheduler": "sync"}, "scheduler 'async' (this simulator: 'sync')"),
    ({"num_workers": 5}, "num_workers 3 (this simulator: 5)"),
    ({"params0": "longer"}, "params [[5], 'float64'] (this simulator: [[11], 'float64'])"),
    ({"params0": "float32"}, "params [[5], 'float64'] (this simulator: [[5], 'float32'])"),
])
def test_a_state_that_does_not_fit_the_simulator_is_refused_naming_what_differs(change, named):
    problem, saved = _saved_ormo_state()
    w0 = problem.w0
    if change.get("params0") == "longer":
        w0 = torch.zeros(11, dtype=w0.dtype)
    elif change.get("params0") == "float32":
        w0 = w0.float()
    other = Simulator(ormo.make_rule(change.get("rule", "ormo")), w0, problem.grad_fn,
                      num_workers=change.get("num_workers", 3), num_iterations=20, seed=0,
                      scheduler=change.get("scheduler"))
    with pytest.raises(ConfigError, match=re.escape(named)):
        other.load_state_dict(saved)
    assert other.t == 0  # nothing was loaded
    # a state from before the record existed: what can be read from it is still checked
    old = {k: v for k, v in saved.items() if k != "made_by"}
    if "num_workers" in change or "params0" in change:
        with pytest.raises(ConfigError, match="the state was saved by a simulator with"):
            other.load_state_dict(old)


@pytest.mark.parametrize("state", [None, {}, "state", {"t": 3}])
def test_what_is_not_a_state_is_refused_in_one_line(state):
    problem = Quadratic()
    sim = Simulator(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=20)
    with pytest.raises(ConfigError, match="Simulator.state_dict"):
        sim.load_state_dict(state)


def test_loose_arguments_are_refused():
    problem = Quadratic()
    with pytest.raises(ConfigError, match=r"invalid check_finite: 'no' \(must be True or False\)"):
        Simulator(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, check_finite="no")
    sim = Simulator(ormo.make_rule("ormo"), problem.w0, problem.grad_fn, num_workers=3, num_iterations=20)
    for until in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="invalid until"):
            sim.run(until)
    assert sim.run(4).t == 4
