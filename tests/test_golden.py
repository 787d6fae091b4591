"""The worked examples of spec §6, to 1e-6: coefficient bookkeeping (6.1, 6.3) and numbers (6.2, 6.4)."""

from __future__ import annotations

import pytest
import torch
from helpers import recording, trajectory

import ormo
from ormo.rules import Message

A, B, C, D = 0, 1, 2, 3
ATOL = 1e-6

# ---------------------------------------------------------------------------------------------------------------
# §6.1: OrMo, K = 4, β = 1/2, η = 1, every message a distinct unit vector

ORDER_61 = [A, B, C, B, C, C, B, B, A, D, C, A]
#        t:  s, τ, G(s), shift at t, I after shift, n, weight β^n, coef S(n)
TABLE_61 = [
    (0, 0, 0, False, 0, 0, 1.0, 1.0),
    (0, 1, 0, True, 1, 1, 0.5, 1.5),
    (0, 2, 0, False, 1, 1, 0.5, 1.5),
    (2, 1, 1, False, 1, 0, 1.0, 1.0),
    (3, 1, 1, False, 1, 0, 1.0, 1.0),
    (5, 0, 2, True, 2, 0, 1.0, 1.0),
    (4, 2, 1, False, 2, 1, 0.5, 1.5),
    (7, 0, 2, False, 2, 0, 1.0, 1.0),
    (1, 7, 1, False, 2, 1, 0.5, 1.5),
    (0, 9, 0, True, 3, 3, 0.125, 1.875),
    (6, 4, 2, False, 3, 1, 0.5, 1.5),
    (9, 2, 3, False, 3, 0, 1.0, 1.0),
]


def _unit_vector_grad(order, table, dim):
    """grad_fn giving the message consumed at iteration t the unit vector e_t (keyed by (worker, index))."""
    slot = {(k, row[0]): t for t, (k, row) in enumerate(zip(order, table, strict=True))}

    def grad_fn(params, worker, index, step):
        e = torch.zeros(dim, dtype=torch.float64)
        e[slot[(worker, index)]] = 1.0
        return e

    return grad_fn


def test_61_coefficient_table():
    rule = ormo.make_rule("ormo", lr=1.0, momentum=0.5)
    w0 = torch.zeros(12, dtype=torch.float64)
    res, params, states = trajectory(rule, w0, _unit_vector_grad(ORDER_61, TABLE_61, 12), num_workers=4, order=ORDER_61)

    prev_group = 0
    for t, (s, tau, group, shifted, group_after, n, weight, coef) in enumerate(TABLE_61):
        ev = res.events[t]
        assert (ev.worker, ev.index, ev.delay) == (ORDER_61[t], s, tau)
        assert ormo.rules.group_of(s, 4) == group
        assert states[t]["group"] == group_after
        assert (states[t]["group"] > prev_group) == shifted
        assert group_after - group == n
        prev_group = states[t]["group"]
        # e_t enters u with its weight and w_0 − w with its catch-up coefficient, at once
        assert states[t]["momentum"][t].item() == pytest.approx(weight, abs=ATOL)
        assert -params[t][t].item() == pytest.approx(coef, abs=ATOL)


def test_61_state_after_t8_and_t11():
    rule = ormo.make_rule("ormo", lr=1.0, momentum=0.5)
    w0 = torch.zeros(12, dtype=torch.float64)
    _, params, states = trajectory(rule, w0, _unit_vector_grad(ORDER_61, TABLE_61, 12), num_workers=4, order=ORDER_61)
    # message slots by name: g0A,g0B,g0C = t0,t1,t2; g0D = t9; g1 = t8, g2 = t3, g3 = t4, g4 = t6; g5 = t5, g6 = t10,
    # g7 = t7; g9 = t11
    u9, w9 = states[8]["momentum"], -params[8]
    expect_u9 = {0: 0.25, 1: 0.25, 2: 0.25, 8: 0.5, 3: 0.5, 4: 0.5, 6: 0.5, 5: 1.0, 7: 1.0}
    expect_w9 = {0: 1.75, 1: 1.75, 2: 1.75, 8: 1.5, 3: 1.5, 4: 1.5, 6: 1.5, 5: 1.0, 7: 1.0}
    for slot in range(12):
        assert u9[slot].item() == pytest.approx(expect_u9.get(slot, 0.0), abs=ATOL)
        assert w9[slot].item() == pytest.approx(expect_w9.get(slot, 0.0), abs=ATOL)

    u12, w12 = states[11]["momentum"], -params[11]
    groups = {0: [0, 1, 2, 9], 1: [8, 3, 4, 6], 2: [5, 10, 7], 3: [11]}
    for g, slots in groups.items():
        for slot in slots:
            assert u12[slot].item() == pytest.approx(0.5 ** (3 - g), abs=ATOL)
            assert w12[slot].item() == pytest.approx((1 - 0.5 ** (4 - g)) / 0.5, abs=ATOL)
    # R9: ½(w_0 − w_12) + ½ u_12 = Σ g  (every unit vector with coefficient 1)
    assert torch.allclose(0.5 * w12 + 0.5 * u12, torch.ones(12, dtype=torch.float64), atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# §6.2: 1-D quadratic f(w) = w²/2, K = 2, w_0 = 1, η = 0.1, β = 0.9

ORDER_62 = [0, 1, 1, 1, 1, 0, 0, 1]
W0_62 = torch.tensor([1.0], dtype=torch.float64)


def _identity_grad(params, worker, index, step):
    return params.clone()


ORMO_62 = [  # (s, τ, g, I after t, n, u_{t+1}, w_{t+1})
    (0, 0, 1.000000, 0, 0, 0.100000, 0.900000),
    (0, 1, 1.000000, 1, 1, 0.180000, 0.620000),
    (2, 0, 0.620000, 1, 0, 0.242000, 0.558000),
    (3, 0, 0.558000, 2, 0, 0.273600, 0.284400),
    (4, 0, 0.284400, 2, 0, 0.302040, 0.255960),
    (1, 4, 0.900000, 3, 2, 0.344736, -0.259776),
    (6, 0, -0.259776, 3, 0, 0.318758, -0.233798),
    (5, 2, 0.255960, 4, 1, 0.309919, -0.569313),
]


def test_62_ormo_table():
    rule, messages = recording(ormo.make_rule("ormo", lr=0.1, momentum=0.9))
    res, params, states = trajectory(rule, W0_62, _identity_grad, num_workers=2, order=ORDER_62)
    for t, (s, tau, g, group, n, u, w) in enumerate(ORMO_62):
        assert (res.events[t].index, res.events[t].delay) == (s, tau)
        assert messages[t].update.item() == pytest.approx(g, abs=ATOL)
        assert states[t]["group"] == group
        assert group - ormo.rules.group_of(s, 2) == n
        assert states[t]["momentum"].item() == pytest.approx(u, abs=ATOL)
        assert params[t].item() == pytest.approx(w, abs=ATOL)


OTHERS_62 = {
    ("ormo-da", ()): [0.900000, 0.620000, 0.558000, 0.284400, 0.255960, -0.137826, -0.124043, -0.437729],
    ("ormo-vanilla", ()): [0.900000, 0.710000, 0.639000, 0.349200, 0.314280, -0.067968, -0.061171, -0.415115],
    ("naive-asgdm", ()): [0.900000, 0.710000, 0.468000, 0.203400, -0.055080, -0.377712, -0.630310, -0.852139],
    ("asgd", ("momentum",)): [0.900000, 0.800000, 0.720000, 0.648000, 0.583200, 0.493200, 0.443880, 0.385560],
    ("shifted-momentum", ()): [0.900000, 0.800000, 0.630000, 0.414000, 0.178200, -0.001800, -0.163620, -0.393660],
    ("smega2", ()): [0.900000, 0.800000, 0.648000, 0.513090, 0.358493, 0.143884, -0.003419, -0.179733],
}


@pytest.mark.parametrize(("name", "drop"), list(OTHERS_62), ids=[k[0] for k in OTHERS_62])
def test_62_other_methods(name, drop):
    hp = {k: v for k, v in {"lr": 0.1, "momentum": 0.9}.items() if k not in drop}
    _, params, _ = trajectory(ormo.make_rule(name, **hp), W0_62, _identity_grad, num_workers=2, order=ORDER_62)
    assert [p.item() for p in params] == pytest.approx(OTHERS_62[(name, drop)], abs=ATOL)


def test_62_ormo_da_momentum_and_rate():
    _, _, states = trajectory(ormo.make_rule("ormo-da", lr=0.1, momentum=0.9), W0_62, _identity_grad,
                              num_workers=2, order=ORDER_62)
    assert [states[t]["momentum"].item() for t in (5, 6, 7)] == pytest.approx([0.308286, 0.294503, 0.288089], abs=ATOL)
    # the delay-adaptive rate at t = 5 (τ = 4 > K = 2) is 0.1·2/4
    assert ormo.rules.delay_factor("inverse", 1.0, 4, 2) * 0.1 == pytest.approx(0.05)


def test_62_smega2_lookahead_counter_and_buffer():
    rule = ormo.make_rule("smega2", lr=0.1, momentum=0.9)
    lookaheads, counters, buffers, seen = [], [], [], []

    def grad_fn(params, worker, index, step):
        seen.append((index, params.item()))
        return params.clone()

    def cb(event, state):
        lookaheads.append(rule.payload(state, index=event.t + 1).params.item())
        counters.append(state.counter)
        buffers.append(state.momentum.item())

    ormo.simulate(rule, W0_62, grad_fn, num_workers=2, order=ORDER_62, callback=cb)
    expected = [0.855, 0.62, 0.4491, 0.254871, 0.101716, -0.188402, -0.310612, -0.470988]
    assert lookaheads == pytest.approx(expected, abs=ATOL)
    assert counters == [1, 0, 1, 0, 1, 0, 1, 0]
    assert buffers[1] == pytest.approx(1.0, abs=ATOL) and buffers[3] == pytest.approx(1.43455, abs=ATOL)
    # each gradient is taken at the estimate the worker was sent after iteration index − 1
    for index, at in seen:
        if index > 0:
            assert at == pytest.approx(expected[index - 1], abs=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# §6.3: OrLoMo Figure 1 (server side only, K = 4, β = 1/2, constant η = 1, unit-vector m and Δ)


def test_63_orlomo_figure1_weights():
    rule = ormo.make_rule("orlomo", lr=1.0, momentum=0.5, delay_rule="none", local_steps=1)
    indices = [0, 0, 0, 2, 3, 5, 4, 7, 1]  # m0A m0B m0C m2 m3 m5 m4 m7 m1
    dim = 2 * len(indices)  # slot i: Δ of message i; slot 9 + i: its m
    state = rule.init(torch.zeros(dim, dtype=torch.float64), num_workers=4)
    for t, s in enumerate(indices):
        rule.begin_iteration(state, t=t, waiting_empty=True)
        delta, m = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
        delta[t], m[len(indices) + t] = 1.0, 1.0
        rule.apply(state, Message(index=s, update=delta, momentum=m), t=t, worker=0)
    assert state.group == 2
    u, w = state.momentum[len(indices):], -state.params
    expect_u = [0.25, 0.25, 0.25, 0.5, 0.5, 1.0, 0.5, 1.0, 0.5]
    expect_m_in_w = [0.75, 0.75, 0.75, 0.5, 0.5, 0.0, 0.5, 0.0, 0.5]
    assert u.tolist() == pytest.approx(expect_u, abs=ATOL)
    assert w[: len(indices)].tolist() == pytest.approx([1.0] * len(indices), abs=ATOL)  # every Δ once
    assert w[len(indices):].tolist() == pytest.approx(expect_m_in_w, abs=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# §6.4: OrLoMo numbers, K = 2, H = 2, γ = 0.1, β = 0.9, global η = 1 with the delay-adaptive rule

ORLOMO_64 = [  # (s, τ, η_t, m, Δ, I, u_{t+1}, w_{t+1})
    (0, 0, 1.0, 0.180000, 0.280000, 0, 0.180000, 0.720000),
    (0, 1, 1.0, 0.180000, 0.280000, 1, 0.324000, 0.116000),
    (2, 0, 1.0, 0.020880, 0.032480, 1, 0.344880, 0.083520),
    (3, 0, 1.0, 0.015034, 0.023386, 2, 0.325426, -0.250258),
    (4, 0, 1.0, -0.045046, -0.070072, 2, 0.280379, -0.180185),
    (1, 4, 0.5, 0.129600, 0.201600, 3, 0.304829, -0.644135),
    (6, 0, 1.0, -0.115944, -0.180358, 3, 0.188885, -0.463777),
    (5, 2, 1.0, -0.032433, -0.050452, 4, 0.140806, -0.554132),
]


def test_64_orlomo_table():
    rule, messages = recording(ormo.make_rule("orlomo", lr=1.0, momentum=0.9, local_lr=0.1, local_steps=2))
    res, params, states = trajectory(rule, W0_62, _identity_grad, num_workers=2, order=ORDER_62)
    for t, (s, tau, eta, m, delta, group, u, w) in enumerate(ORLOMO_64):
        assert (res.events[t].index, res.events[t].delay) == (s, tau)
        assert ormo.rules.delay_factor("inverse", 1.0, tau, 2) == eta
        assert messages[t].momentum.item() == pytest.approx(m, abs=ATOL)
        assert messages[t].update.item() == pytest.approx(delta, abs=ATOL)
        assert states[t]["group"] == group
        assert states[t]["momentum"].item() == pytest.approx(u, abs=ATOL)
        assert params[t].item() == pytest.approx(w, abs=ATOL)


@pytest.mark.parametrize(("name", "w8"), [("local-ormo-da", -0.734219), ("al-sgd", 0.141956)])
def test_64_local_baselines(name, w8):
    hp = {"lr": 1.0, "local_lr": 0.1, "local_steps": 2}
    if name == "local-ormo-da":
        hp["momentum"] = 0.9
    res = ormo.simulate(ormo.make_rule(name, **hp), W0_62, _identity_grad, num_workers=2, order=ORDER_62)
    assert res.params.item() == pytest.approx(w8, abs=ATOL)
