"""Reduction identities R1–R18 of spec §5, on random arrival orders and random quadratics, in float64 to 1e-10.

"≡" in the spec means identical trajectories when both methods see the same arrival order and the same minibatch for
each (worker, index, step); the simulator keys the data that way, so each test runs two rules on one order and
compares the parameters after every iteration.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import Quadratic, max_rel_diff, random_async_order, random_sync_order, recording, trajectory
from hypothesis import given
from hypothesis import strategies as st

import ormo
from ormo.rules import Payload, catch_up, delay_factor, group_of
from ormo.rules.local import local_msgd, local_sgd

TOL = 1e-10

seeds = st.integers(0, 2**31 - 1)
betas = st.floats(0.0, 0.95)
lrs = st.floats(0.01, 0.3)
workers = st.integers(1, 6)
local_steps = st.integers(1, 4)


def _async_setup(seed: int, k: int, length: int = 80):
    rng = np.random.default_rng(seed)
    return Quadratic(seed=seed % 1000), random_async_order(rng, k, length, skew=float(rng.uniform(1, 6)))


def _sync_setup(seed: int, k: int, rounds: int = 12):
    rng = np.random.default_rng(seed)
    return Quadratic(seed=seed % 1000), random_sync_order(rng, k, rounds)


def _same_trajectory(rule_a, rule_b, problem, order, k, *, scheduler_a=None, scheduler_b=None, tol=TOL):
    _, pa, _ = trajectory(rule_a, problem.w0, problem.grad_fn, num_workers=k, order=order, scheduler=scheduler_a)
    _, pb, _ = trajectory(rule_b, problem.w0, problem.grad_fn, num_workers=k, order=order, scheduler=scheduler_b)
    assert len(pa) == len(pb) == len(order)
    for t, (a, b) in enumerate(zip(pa, pb, strict=True)):
        err = max_rel_diff(a, b)
        assert err <= tol, f"iteration {t}: trajectories differ by {err:.3e}"


@given(seed=seeds, k=workers, lr=lrs, sync=st.booleans())
def test_r1_ormo_beta0_is_asgd(seed, k, lr, sync):
    problem, order = _sync_setup(seed, k) if sync else _async_setup(seed, k)
    sched = "sync" if sync else None
    _same_trajectory(ormo.make_rule("ormo", lr=lr, momentum=0.0), ormo.make_rule("asgd", lr=lr), problem, order, k,
                     scheduler_a=sched, scheduler_b=sched, tol=0.0)  # bit for bit


@given(seed=seeds, k=workers, lr=lrs, rule=st.sampled_from(["inverse", "drop_above", "none"]))
def test_r2_ormo_da_beta0_is_da_asgd(seed, k, lr, rule):
    problem, order = _async_setup(seed, k)
    a = ormo.make_rule("ormo-da", lr=lr, momentum=0.0, delay_rule=rule)
    b = ormo.make_rule("da-asgd", lr=lr, delay_rule=rule)
    _same_trajectory(a, b, problem, order, k, tol=0.0)


@pytest.mark.parametrize("name", ["ormo", "ormo-da", "naive-asgdm", "shifted-momentum"])
@given(seed=seeds, lr=lrs, beta=betas)
def test_r3_r5_single_worker_is_torch_sgd_momentum(name, seed, lr, beta):
    """R3 (OrMo, OrMo-DA) and R5 (naive ASGDm, shifted momentum) with K = 1: heavy ball, checked step by step
    against torch.optim.SGD(momentum=β) itself."""
    problem = Quadratic(seed=seed % 1000)
    _, params, _ = trajectory(ormo.make_rule(name, lr=lr, momentum=beta), problem.w0, problem.grad_fn,
                              num_workers=1, num_iterations=40)
    w = problem.w0.clone().requires_grad_(False)
    opt = torch.optim.SGD([w], lr=lr, momentum=beta)
    for t in range(40):
        w.grad = problem.grad_fn(w.detach(), 0, t, 0)
        opt.step()
        assert max_rel_diff(w, params[t]) <= TOL, f"t={t}"


@pytest.mark.parametrize("name", ["ormo", "ormo-da"])
@given(seed=seeds, k=st.integers(2, 6), lr=lrs, beta=betas)
def test_r4_sync_ormo_is_ssgdm_and_torch_sgd_on_summed_gradient(name, seed, k, lr, beta):
    problem, order = _sync_setup(seed, k)
    _same_trajectory(ormo.make_rule(name, lr=lr, momentum=beta), ormo.make_rule("ssgdm", lr=lr, momentum=beta),
                     problem, order, k, scheduler_a="sync")
    # and at every round boundary, torch.optim.SGD with momentum on the sum of the K gradients at w_{rK}
    _, params, _ = trajectory(ormo.make_rule(name, lr=lr, momentum=beta), problem.w0, problem.grad_fn,
                              num_workers=k, order=order, scheduler="sync")
    w = problem.w0.clone()
    opt = torch.optim.SGD([w], lr=lr, momentum=beta)
    for r in range(len(order) // k):
        w.grad = sum(problem.grad_fn(w.detach(), j, r * k, 0) for j in range(k))
        opt.step()
        assert max_rel_diff(w, params[(r + 1) * k - 1]) <= TOL, f"round {r}"


@pytest.mark.parametrize("estimate", ["advanced", "naive"])
@given(seed=seeds, lr=lrs, beta=betas)
def test_r6_smega2_single_worker_is_nesterov(estimate, seed, lr, beta):
    """Gradient at w − ηβv, then v ← βv + g, w ← w − ηv; and the look-ahead SMEGA2 sends is exactly the parameter of
    torch.optim.SGD(nesterov=True)."""
    problem = Quadratic(seed=seed % 1000)
    rule = ormo.make_rule("smega2", lr=lr, momentum=beta, estimate=estimate)
    lookahead = []
    res, params, _ = trajectory(rule, problem.w0, problem.grad_fn, num_workers=1, num_iterations=40)
    ormo.simulate(rule, problem.w0, problem.grad_fn, num_workers=1, num_iterations=40,
                  callback=lambda e, s: lookahead.append(rule.payload(s, index=e.t + 1).params.clone()))
    w, v = problem.w0.clone(), torch.zeros_like(problem.w0)
    p = problem.w0.clone()
    opt = torch.optim.SGD([p], lr=lr, momentum=beta, nesterov=beta > 0)
    for t in range(40):
        g = problem.grad_fn(w - lr * beta * v, 0, t, 0)
        v = beta * v + g
        w = w - lr * v
        assert max_rel_diff(w, params[t]) <= TOL
        p.grad = problem.grad_fn(p.detach(), 0, t, 0)
        opt.step()
        assert max_rel_diff(p, lookahead[t]) <= TOL


@given(seed=seeds, k=st.integers(2, 5), lr=lrs, beta=st.floats(0.3, 0.95))
def test_r7_naive_asgdm_under_sync_is_not_ssgdm(seed, k, lr, beta):
    """Negative control: heavy ball in arrival order is not SSGDm, even on synchronous rounds."""
    problem, order = _sync_setup(seed, k, rounds=4)
    a = ormo.simulate(ormo.make_rule("naive-asgdm", lr=lr, momentum=beta), problem.w0, problem.grad_fn,
                      num_workers=k, order=order, scheduler="sync")
    b = ormo.simulate(ormo.make_rule("ssgdm", lr=lr, momentum=beta), problem.w0, problem.grad_fn,
                      num_workers=k, order=order)
    assert (a.params - b.params).abs().max().item() > 1e-6


@pytest.mark.parametrize("step", ["sgd", "momentum_increment"])
@given(seed=seeds, k=workers, lr=lrs, beta=betas, sync=st.booleans())
def test_r8_vanilla_step_equals_ormo_when_never_late(step, seed, k, lr, beta, sync):
    if sync:
        problem, order = _sync_setup(seed, k)
    else:  # K = 1: every message has n = 0
        problem, order, k = Quadratic(seed=seed % 1000), [0] * 40, 1
    sched = "sync" if sync else None
    _same_trajectory(ormo.make_rule("ormo-vanilla", lr=lr, momentum=beta, step=step),
                     ormo.make_rule("ormo", lr=lr, momentum=beta), problem, order, k,
                     scheduler_a=sched, scheduler_b=sched)


@pytest.mark.parametrize("name", ["ormo", "ormo-da"])
@given(seed=seeds, k=workers, lr=lrs, beta=betas)
def test_r9_ormo_invariants_after_every_iteration(name, seed, k, lr, beta):
    problem, order = _async_setup(seed, k)
    rule, messages = recording(ormo.make_rule(name, lr=lr, momentum=beta))
    res, params, states = trajectory(rule, problem.w0, problem.grad_fn, num_workers=k, order=order)
    sum_g, sum_u = torch.zeros_like(problem.w0), None
    for t, ev in enumerate(res.events):
        eta = lr * (delay_factor("inverse", 1.0, ev.delay, k) if name == "ormo-da" else 1.0)
        group = states[t]["group"]
        assert group == -(-t // k)  # I_{t+1} = ⌈t/K⌉
        sum_g += eta * messages[t].update
        sum_u = sum(
            beta ** (group - group_of(res.events[j].index, k))
            * lr * (delay_factor("inverse", 1.0, res.events[j].delay, k) if name == "ormo-da" else 1.0)
            * messages[j].update
            for j in range(t + 1)
        )
        u = states[t]["momentum"]
        assert max_rel_diff(u, sum_u) <= TOL
        lhs = (1 - beta) * (problem.w0 - params[t]) + beta * u
        assert max_rel_diff(lhs, sum_g) <= TOL


@given(seed=seeds, k=workers, h=local_steps, lr=st.floats(0.3, 1.0), gamma=lrs)
def test_r10_orlomo_beta0_is_al_sgd(seed, k, h, lr, gamma):
    problem, order = _async_setup(seed, k)
    _same_trajectory(ormo.make_rule("orlomo", lr=lr, momentum=0.0, local_lr=gamma, local_steps=h),
                     ormo.make_rule("al-sgd", lr=lr, local_lr=gamma, local_steps=h), problem, order, k)


@given(seed=seeds, k=workers, lr=st.floats(0.3, 1.0), gamma=lrs, beta=betas,
       decay=st.sampled_from(["beta", "beta_pow_H"]))
def test_r11_orlomo_single_step_is_ormo_da(seed, k, lr, gamma, beta, decay):
    problem, order = _async_setup(seed, k)
    _same_trajectory(ormo.make_rule("orlomo", lr=lr, momentum=beta, local_lr=gamma, local_steps=1, group_decay=decay),
                     ormo.make_rule("ormo-da", lr=lr * gamma, momentum=beta), problem, order, k)


@given(seed=seeds, k=workers, lr=st.floats(0.3, 1.0), gamma=lrs, rule=st.sampled_from(["inverse", "none"]))
def test_r12_al_sgd_single_step_is_asgd(seed, k, lr, gamma, rule):
    problem, order = _async_setup(seed, k)
    _same_trajectory(ormo.make_rule("al-sgd", lr=lr, local_lr=gamma, local_steps=1, delay_rule=rule),
                     ormo.make_rule("da-asgd", lr=lr * gamma, delay_rule=rule), problem, order, k)
    if rule == "none":
        _same_trajectory(ormo.make_rule("al-sgd", lr=lr, local_lr=gamma, local_steps=1, delay_rule="none"),
                         ormo.make_rule("asgd", lr=lr * gamma), problem, order, k)


@given(seed=seeds, k=workers, h=local_steps, lr=st.floats(0.3, 1.0), gamma=lrs, beta=betas)
def test_r13_local_ormo_da_reductions(seed, k, h, lr, gamma, beta):
    problem, order = _async_setup(seed, k)
    _same_trajectory(ormo.make_rule("local-ormo-da", lr=lr, momentum=beta, local_lr=gamma, local_steps=1),
                     ormo.make_rule("ormo-da", lr=lr * gamma, momentum=beta), problem, order, k)
    _same_trajectory(ormo.make_rule("local-ormo-da", lr=lr, momentum=0.0, local_lr=gamma, local_steps=h),
                     ormo.make_rule("al-sgd", lr=lr, local_lr=gamma, local_steps=h), problem, order, k)


@given(seed=seeds, k=workers, h=local_steps, lr=st.floats(0.3, 1.0), gamma=lrs, beta=betas)
def test_r14_orlomo_invariant_after_every_iteration(seed, k, h, lr, gamma, beta):
    problem, order = _async_setup(seed, k)
    rule, messages = recording(ormo.make_rule("orlomo", lr=lr, momentum=beta, local_lr=gamma, local_steps=h))
    res, params, states = trajectory(rule, problem.w0, problem.grad_fn, num_workers=k, order=order)
    sum_delta, sum_m = torch.zeros_like(problem.w0), torch.zeros_like(problem.w0)
    for t, ev in enumerate(res.events):
        eta = lr * delay_factor("inverse", 1.0, ev.delay, k)
        sum_delta += eta * messages[t].update
        sum_m += eta * messages[t].momentum
        u = states[t]["momentum"]
        expected = problem.w0 - sum_delta - beta / (1 - beta) * (sum_m - u)
        assert max_rel_diff(params[t], expected) <= TOL


@given(seed=seeds, k=workers, gamma=lrs, beta=betas)
def test_r15_prsgdm_single_step_is_ssgdm(seed, k, gamma, beta):
    """PRSGDm(H = 1) ≡ SSGDm with η = γ/K, and SSGDm's u = γ·ū at every round boundary."""
    problem, order = _sync_setup(seed, k)
    _, pa, sa = trajectory(ormo.make_rule("prsgdm", local_lr=gamma, momentum=beta, local_steps=1), problem.w0,
                           problem.grad_fn, num_workers=k, order=order)
    _, pb, sb = trajectory(ormo.make_rule("ssgdm", lr=gamma / k, momentum=beta), problem.w0, problem.grad_fn,
                           num_workers=k, order=order)
    for t in range(k - 1, len(order), k):  # round boundaries (PRSGDm's w̄ moves only there)
        assert max_rel_diff(pa[t], pb[t]) <= TOL
        assert max_rel_diff(gamma * sa[t]["momentum"], sb[t]["momentum"]) <= TOL


@given(seed=seeds, k=st.integers(1, 6), lr=lrs, beta=betas)
def test_r16_shifted_momentum_round_robin(seed, k, lr, beta):
    """Round-robin arrivals: ``w_{t+1} = w_t − η g_t + β (w_{t−K+1} − w_{t−K})`` for t ≥ K."""
    problem = Quadratic(seed=seed % 1000)
    order = [t % k for t in range(12 * k)]
    rule, messages = recording(ormo.make_rule("shifted-momentum", lr=lr, momentum=beta))
    _, params, _ = trajectory(rule, problem.w0, problem.grad_fn, num_workers=k, order=order)
    w = [problem.w0] + params  # w[t] = w_t
    for t in range(k, len(order)):
        expected = w[t] - lr * messages[t].update + beta * (w[t - k + 1] - w[t - k])
        assert max_rel_diff(w[t + 1], expected) <= TOL


@given(seed=seeds, h=local_steps, gamma=lrs)
def test_r17_msgd_with_zero_momentum_is_sgd(seed, h, gamma):
    problem = Quadratic(seed=seed % 1000)
    payload = Payload(index=3, params=problem.w0.clone())

    def grad(x, step):
        return problem.grad_fn(x, 0, 3, step)

    a = local_msgd(payload, grad, local_lr=gamma, momentum=0.0, local_steps=h)
    b = local_sgd(payload, grad, local_lr=gamma, local_steps=h)
    assert max_rel_diff(a.update, b.update) <= TOL
    # with β = 0 the last local momentum is γ times the last gradient, taken at x_{H−1}
    x_last = problem.w0 - local_sgd(payload, grad, local_lr=gamma, local_steps=h - 1).update
    assert max_rel_diff(a.momentum, gamma * grad(x_last, h - 1)) <= TOL


@pytest.mark.parametrize("name", ["ormo", "ormo-da", "orlomo"])
@given(seed=seeds, k=st.integers(2, 6), beta=betas)
def test_r18_sync_ordered_rules_ignore_order_inside_a_round(name, seed, k, beta):
    problem, order_a = _sync_setup(seed, k)
    rng = np.random.default_rng(seed + 1)
    order_b = random_sync_order(rng, k, len(order_a) // k)
    hp = {"lr": 0.1, "momentum": beta} if name != "orlomo" else {"lr": 1.0, "momentum": beta, "local_steps": 2}
    a = ormo.simulate(ormo.make_rule(name, **hp), problem.w0, problem.grad_fn, num_workers=k, order=order_a,
                      scheduler="sync")
    b = ormo.simulate(ormo.make_rule(name, **hp), problem.w0, problem.grad_fn, num_workers=k, order=order_b,
                      scheduler="sync")
    assert max_rel_diff(a.params, b.params) <= TOL


def test_catch_up_factor():
    assert catch_up(0.9, 0) == 1.0
    assert catch_up(0.5, 3) == pytest.approx(1.875)
    assert catch_up(0.0, 5) == 1.0
    assert catch_up(0.9, 10_000) == pytest.approx(10.0)  # β^n underflows harmlessly to S(∞) = 1/(1 − β)


def test_group_function_is_ceiling():
    assert [group_of(s, 4) for s in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
