"""Rules against torch.optim.SGD itself, wherever a reduction reaches it, step by step (float64, 1e-10).

(Heavy ball with K = 1, sync OrMo = SSGDm on the summed gradient, and SMEGA2 = Nesterov are in test_identities.)
"""

from __future__ import annotations

import pytest
import torch
from helpers import Quadratic, max_rel_diff, random_sync_order, trajectory

import ormo

TOL = 1e-10


def _torch_sgd(problem, steps, grad_key, **opt_kw):
    """Run torch.optim.SGD for ``steps`` steps; ``grad_key(step) -> (worker, index, local step)`` keys the data."""
    w = problem.w0.clone()
    opt = torch.optim.SGD([w], **opt_kw)
    out = []
    for i in range(steps):
        w.grad = problem.grad_fn(w.detach(), *grad_key(i))
        opt.step()
        out.append(w.detach().clone())
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_asgd_single_worker_is_sgd(seed):
    problem = Quadratic(seed=seed)
    _, params, _ = trajectory(ormo.make_rule("asgd", lr=0.2), problem.w0, problem.grad_fn, num_workers=1,
                              num_iterations=30)
    ref = _torch_sgd(problem, 30, lambda i: (0, i, 0), lr=0.2)
    assert all(max_rel_diff(a, b) <= TOL for a, b in zip(params, ref, strict=True))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_ssgd_is_minibatch_sgd_on_the_summed_gradient(k):
    import numpy as np

    problem = Quadratic(seed=k)
    order = random_sync_order(np.random.default_rng(k), k, 8)
    _, params, _ = trajectory(ormo.make_rule("ssgd", lr=0.05), problem.w0, problem.grad_fn, num_workers=k,
                              order=order)
    w = problem.w0.clone()
    opt = torch.optim.SGD([w], lr=0.05 * k)  # mean gradient, K·η
    for r in range(8):
        w.grad = sum(problem.grad_fn(w.detach(), j, r * k, 0) for j in range(k)) / k
        opt.step()
        assert max_rel_diff(w.detach(), params[(r + 1) * k - 1]) <= TOL


@pytest.mark.parametrize(("h", "beta"), [(1, 0.9), (3, 0.9), (4, 0.5), (2, 0.0)])
def test_prsgdm_single_worker_is_sgd_momentum_over_all_local_steps(h, beta):
    """With K = 1 the averaged (w̄, ū) is the worker's own, so PRSGDm is SGD with momentum run for T·H steps."""
    problem = Quadratic(seed=7)
    res = ormo.simulate(ormo.make_rule("prsgdm", local_lr=0.1, momentum=beta, local_steps=h), problem.w0,
                        problem.grad_fn, num_workers=1, num_iterations=10)
    ref = _torch_sgd(problem, 10 * h, lambda i: (0, i // h, i % h), lr=0.1, momentum=beta)
    assert max_rel_diff(res.params, ref[-1]) <= TOL


@pytest.mark.parametrize("h", [1, 2, 5])
def test_al_sgd_single_worker_unit_global_lr_is_sgd_over_all_local_steps(h):
    problem = Quadratic(seed=3)
    res = ormo.simulate(ormo.make_rule("al-sgd", lr=1.0, local_lr=0.1, local_steps=h), problem.w0,
                        problem.grad_fn, num_workers=1, num_iterations=10)
    ref = _torch_sgd(problem, 10 * h, lambda i: (0, i // h, i % h), lr=0.1)
    assert max_rel_diff(res.params, ref[-1]) <= TOL


@pytest.mark.parametrize("name", ["naive-asgdm", "ssgdm"])
def test_pytorch_convention_equals_scaled_at_constant_lr(name):
    import numpy as np

    problem = Quadratic(seed=5)
    k = 3
    order = random_sync_order(np.random.default_rng(0), k, 10)
    a = ormo.simulate(ormo.make_rule(name, lr=0.1, momentum=0.9), problem.w0, problem.grad_fn, num_workers=k,
                      order=order)
    b = ormo.simulate(ormo.make_rule(name, lr=0.1, momentum=0.9, convention="pytorch"), problem.w0,
                      problem.grad_fn, num_workers=k, order=order)
    assert max_rel_diff(a.params, b.params) <= TOL


def test_pytorch_convention_matches_torch_after_a_learning_rate_change():
    """Spec A12: the two conventions differ only after an lr change; 'pytorch' then matches torch.optim.SGD."""
    problem = Quadratic(seed=9)
    rules = {c: ormo.make_rule("naive-asgdm", lr=0.1, momentum=0.9, convention=c) for c in ("scaled", "pytorch")}
    states = {c: r.init(problem.w0, num_workers=1) for c, r in rules.items()}
    w = problem.w0.clone()
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    for t in range(20):
        scale = 1.0 if t < 10 else 0.1  # a step decay at t = 10
        for group in opt.param_groups:
            group["lr"] = 0.1 * scale
        w.grad = problem.grad_fn(w.detach(), 0, t, 0)
        opt.step()
        for c, rule in rules.items():
            states[c].lr_scale = scale
            g = problem.grad_fn(states[c].params, 0, t, 0)
            rule.apply(states[c], ormo.Message(index=t, update=g), t=t, worker=0)
        assert max_rel_diff(states["pytorch"].params, w.detach()) <= TOL
    assert max_rel_diff(states["scaled"].params, states["pytorch"].params) > 1e-6


def test_orlomo_previous_local_momentum_carries_over_between_rounds():
    """Spec A4's alternative: the worker starts round r + 1 from its own last m_H instead of zero."""
    problem = Quadratic(seed=11)
    rule = ormo.make_rule("orlomo", momentum=0.8, local_lr=0.1, local_steps=3, local_momentum_init="previous")
    worker_state = rule.init_worker(problem.w0)
    m, x_start = torch.zeros_like(problem.w0), problem.w0.clone()
    for index in (0, 5):
        payload = ormo.Payload(index=index, params=x_start)
        msg = rule.work(payload, lambda x, h, i=index: problem.grad_fn(x, 2, i, h), worker_state)
        x = x_start.clone()
        for h in range(3):  # the same local loop written out, with m carried from the last round
            m = 0.8 * m + 0.1 * problem.grad_fn(x, 2, index, h)
            x = x - m
        assert max_rel_diff(msg.momentum, m) <= TOL
        assert max_rel_diff(msg.update, x_start - x) <= TOL
        assert max_rel_diff(worker_state.momentum, m) <= TOL
    assert ormo.make_rule("orlomo").init_worker(problem.w0) is None  # the default restarts at zero, keeps nothing
