"""An independent float64 reference for every update rule, checked against ``ormo.simulate``.

The reference below is a second, separate reading of ``ALGORITHMS.md`` (§1 notation, §2 the parameter-server loop,
§3/§4 the rules, §9 the switches). It was written from the spec alone, without looking at ``ormo/rules``: plain
numpy, one small class per rule, and a for-loop over server iterations ``t`` doing PRE / take message / UPDATE /
SCHEDULE (§2.2) with its own ``ite(k, t)`` bookkeeping (§2.3).

The reference is first checked against the worked examples of spec §6 (golden numbers). Then hypothesis draws the
number of workers, a feasible arrival order, the hyperparameters and every switch value, and ormo must reproduce
the reference's parameters w_1 … w_T to 1e-10 and its (t, worker, index, delay) record of every iteration exactly.
PRSGDm's parameter-only averaging (A23's alternative), where each worker keeps its own momentum buffer, also has a
worked example at the end of the file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ormo

# ``grad(x, worker, index, step) -> ndarray``: the stochastic gradient at x (numpy float64).
Grad = Callable[[np.ndarray, int, int, int], np.ndarray]


# ======================================================================================================================
# The test problem


class NoisyQuadratic:
    """``f(w) = ½ wᵀAw − bᵀw`` in dimension 5 with ``A`` symmetric positive definite (eigenvalues in [0.1, 1]).

    The gradient noise is a pure function of (worker, parameter index, local step), as spec §5 requires, so ormo
    and the reference see the same minibatch for the same message whatever order they evaluate things in.
    """

    def __init__(self, dim: int = 5, seed: int = 7, sigma: float = 0.1) -> None:
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        a = (q * rng.uniform(0.1, 1.0, size=dim)) @ q.T
        self.A = (a + a.T) / 2
        self.b = rng.normal(size=dim)
        self.w0 = rng.normal(size=dim)
        self.dim, self.seed, self.sigma = dim, seed, sigma

    def grad(self, w: np.ndarray, worker: int, index: int, step: int) -> np.ndarray:
        noise = np.random.default_rng([self.seed, worker, index, step]).normal(size=self.dim) * self.sigma
        return self.A @ w - self.b + noise

    def torch_grad(self, params: torch.Tensor, worker: int, index: int, step: int) -> torch.Tensor:
        """The same function, in ormo's ``grad_fn`` form (a float64 tensor in, a float64 tensor out)."""
        return torch.from_numpy(self.grad(params.detach().cpu().numpy().copy(), worker, index, step))


PROBLEM = NoisyQuadratic()


# ======================================================================================================================
# Reference helpers (§1)


def group(s: int, K: int) -> int:
    """G(s) = ⌈s/K⌉: group 0 is the K index-0 gradients, group i ≥ 1 holds indices (i−1)K+1 … iK (§3.7, A1)."""
    return (s + K - 1) // K


def catch_up(beta: float, n: int) -> float:
    """S(n) = 1 + β + … + β^n (§1)."""
    return sum(beta**j for j in range(n + 1))


def delay_adaptive_lr(lr: float, tau: int, K: int, delay_rule: str, delay_threshold: float) -> float:
    """lr_DA(τ) of §3.8 / A2 with the threshold c·K: 'inverse' η·cK/max(cK, τ), 'drop_above' η or 0, 'none' η."""
    limit = delay_threshold * K
    if delay_rule == "inverse":
        return lr * limit / max(limit, tau)
    if delay_rule == "drop_above":
        return lr if tau <= limit else 0.0
    assert delay_rule == "none"
    return lr


# ======================================================================================================================
# Reference rules: one class each. ``work`` is the worker side (§2.1), ``pre``/``update`` the server side (§2.2),
# ``payload`` what SCHEDULE sends. ``w`` is the server parameter.


class RefRule:
    scheduler = "async"

    def __init__(self, w0: np.ndarray, K: int) -> None:
        self.w, self.K = w0.copy(), K

    def params(self) -> np.ndarray:
        return self.w

    def momentum(self) -> np.ndarray | None:
        """The server momentum after an iteration, for the golden tables (u, or SMEGA2's v)."""
        u = getattr(self, "u", None)
        return None if u is None else u.copy()

    def pre(self, t: int, waiting_empty: bool) -> None:
        pass

    def payload(self) -> Any:
        return self.w.copy()

    def work(self, received: Any, worker: int, index: int, grad: Grad) -> Any:
        return grad(received, worker, index, 0)

    def update(self, t: int, worker: int, index: int, message: Any) -> None:
        raise NotImplementedError


class SSGD(RefRule):
    """§3.1: sync; w ← w − ηg per message."""

    scheduler = "sync"

    def __init__(self, w0, K, *, lr):
        super().__init__(w0, K)
        self.lr = lr

    def update(self, t, worker, index, g):
        self.w = self.w - self.lr * g


class SSGDm(RefRule):
    """§3.2 per-message form: PRE shifts by the momentum once per round; UPDATE adds ηg to both u and w.

    'scaled' keeps u = η·buf; 'pytorch' keeps the plain buffer b and applies η when stepping (A12)."""

    scheduler = "sync"

    def __init__(self, w0, K, *, lr, momentum, convention="scaled"):
        super().__init__(w0, K)
        self.lr, self.beta, self.convention = lr, momentum, convention
        self.u = np.zeros_like(w0)

    def pre(self, t, waiting_empty):
        if t > 0 and t % self.K == 0:
            if self.convention == "scaled":
                self.w = self.w - self.beta * self.u
            else:
                self.w = self.w - self.lr * self.beta * self.u
            self.u = self.beta * self.u

    def update(self, t, worker, index, g):
        self.u = self.u + (self.lr * g if self.convention == "scaled" else g)
        self.w = self.w - self.lr * g


class PRSGDm(RefRule):
    """§3.11: sync local momentum SGD. Workers start from (w̄, ū), run H steps of v ← βv + g, x ← x − γv, send
    (x, v); once all K messages of a round are in, the server averages both (A23). With ``average_momentum=False``
    only x is averaged and every worker keeps its own momentum buffer from one round to the next."""

    scheduler = "sync"

    def __init__(self, w0, K, *, local_lr, momentum, local_steps, average_momentum=True):
        super().__init__(w0, K)
        self.gamma, self.beta, self.H, self.average_momentum = local_lr, momentum, local_steps, average_momentum
        self.u = np.zeros_like(w0)
        self.own_v = [np.zeros_like(w0) for _ in range(K)]
        self.inbox: list[tuple[np.ndarray, np.ndarray]] = []

    def payload(self):
        return self.w.copy(), self.u.copy()

    def work(self, received, worker, index, grad):
        x, u = received
        v = u.copy() if self.average_momentum else self.own_v[worker]
        for h in range(self.H):
            v = self.beta * v + grad(x, worker, index, h)
            x = x - self.gamma * v
        self.own_v[worker] = v
        return x, v

    def update(self, t, worker, index, message):
        self.inbox.append(message)
        if len(self.inbox) == self.K:
            self.w = np.mean([x for x, _ in self.inbox], axis=0)
            self.u = np.mean([v for _, v in self.inbox], axis=0)
            self.inbox = []


class ASGD(SSGD):
    """§3.3: the SSGD update under the async scheduler."""

    scheduler = "async"


class DAASGD(RefRule):
    """ASGD with the delay-adaptive step η_t = lr_DA(τ_t) (§3.8, C3)."""

    def __init__(self, w0, K, *, lr, delay_rule="inverse", delay_threshold=1.0):
        super().__init__(w0, K)
        self.lr, self.delay_rule, self.delay_threshold = lr, delay_rule, delay_threshold

    def eta(self, t, index):
        return delay_adaptive_lr(self.lr, t - index, self.K, self.delay_rule, self.delay_threshold)

    def update(self, t, worker, index, g):
        self.w = self.w - self.eta(t, index) * g


class NaiveASGDm(RefRule):
    """§3.4: heavy ball on gradients in arrival order, u ← βu + ηg, w ← w − u ('pytorch': b ← βb + g, w ← w − ηb)."""

    def __init__(self, w0, K, *, lr, momentum, convention="scaled"):
        super().__init__(w0, K)
        self.lr, self.beta, self.convention = lr, momentum, convention
        self.u = np.zeros_like(w0)

    def update(self, t, worker, index, g):
        if self.convention == "scaled":
            self.u = self.beta * self.u + self.lr * g
            self.w = self.w - self.u
        else:
            self.u = self.beta * self.u + g
            self.w = self.w - self.lr * self.u


class ShiftedMomentum(RefRule):
    """§3.5: one buffer per worker, v_k ← βv_k + g, w ← w − ηv_k."""

    def __init__(self, w0, K, *, lr, momentum):
        super().__init__(w0, K)
        self.lr, self.beta = lr, momentum
        self.v = [np.zeros_like(w0) for _ in range(K)]

    def update(self, t, worker, index, g):
        self.v[worker] = self.beta * self.v[worker] + g
        self.w = self.w - self.lr * self.v[worker]


class SMEGA2(RefRule):
    """§3.6: one buffer v refreshed every K messages from the accumulator A; d = g + βv_old; w ← w − ηd. The worker
    is sent the look-ahead ŵ (advanced: w − ηβ[(K + c(β−1))v + (c/K)A], naive: w − ηβKv)."""

    def __init__(self, w0, K, *, lr, momentum, estimate="advanced"):
        super().__init__(w0, K)
        self.lr, self.beta, self.estimate = lr, momentum, estimate
        self.v, self.A, self.c = np.zeros_like(w0), np.zeros_like(w0), 0

    def momentum(self):
        return self.v.copy()

    def update(self, t, worker, index, g):
        self.c = (self.c + 1) % self.K
        self.A = self.A + g
        d = g + self.beta * self.v
        if self.c == 0:
            self.v = self.beta * self.v + self.A / self.K
            self.A = np.zeros_like(self.A)
        self.w = self.w - self.lr * d

    def payload(self):
        K, c, beta = self.K, self.c, self.beta
        if self.estimate == "advanced":
            return self.w - self.lr * beta * ((K + c * (beta - 1)) * self.v + (c / K) * self.A)
        return self.w - self.lr * beta * K * self.v


def local_sgd(x0: np.ndarray, worker: int, index: int, grad: Grad, gamma: float, H: int) -> np.ndarray:
    """§3.10 worker: H plain SGD steps from x0; returns Δ = x0 − x_H."""
    x = x0.copy()
    for h in range(H):
        x = x - gamma * grad(x, worker, index, h)
    return x0 - x


class ALSGD(DAASGD):
    """§3.10: workers run H local SGD steps and send Δ; the server applies w ← w − η_t Δ."""

    def __init__(self, w0, K, *, lr, local_lr, local_steps, delay_rule="inverse", delay_threshold=1.0):
        super().__init__(w0, K, lr=lr, delay_rule=delay_rule, delay_threshold=delay_threshold)
        self.gamma, self.H = local_lr, local_steps

    def work(self, received, worker, index, grad):
        return local_sgd(received, worker, index, grad, self.gamma, self.H)


class OrMo(RefRule):
    """§3.7: ordered momentum. PRE opens group G(t) (shift w ← w − βu, u ← βu) once w_t is out and C = ∅; a message
    n = I − G(s) groups late enters u with β^n η and w with S(n) η."""

    def __init__(self, w0, K, *, lr, momentum):
        super().__init__(w0, K)
        self.lr, self.beta = lr, momentum
        self.u, self.I = np.zeros_like(w0), 0

    def pre(self, t, waiting_empty):
        if waiting_empty and group(t, self.K) > self.I:
            self.w = self.w - self.beta * self.u
            self.u = self.beta * self.u
            self.I += 1

    def eta(self, t, index):
        return self.lr

    def update(self, t, worker, index, g):
        n, eta = self.I - group(index, self.K), self.eta(t, index)
        self.u = self.u + self.beta**n * eta * g
        self.w = self.w - catch_up(self.beta, n) * eta * g


class OrMoDA(OrMo):
    """§3.8: OrMo with η_t = lr_DA(τ_t) in both the momentum and the parameter update."""

    def __init__(self, w0, K, *, lr, momentum, delay_rule="inverse", delay_threshold=1.0):
        super().__init__(w0, K, lr=lr, momentum=momentum)
        self.delay_rule, self.delay_threshold = delay_rule, delay_threshold

    def eta(self, t, index):
        return delay_adaptive_lr(self.lr, t - index, self.K, self.delay_rule, self.delay_threshold)


class OrMoVanilla(OrMo):
    """§3.9 / A9: OrMo's momentum bookkeeping with the parameter step w ← w − ηg ('sgd') or w ← w − β^n ηg
    ('momentum_increment')."""

    def __init__(self, w0, K, *, lr, momentum, step="sgd"):
        super().__init__(w0, K, lr=lr, momentum=momentum)
        self.step = step

    def update(self, t, worker, index, g):
        n = self.I - group(index, self.K)
        self.u = self.u + self.beta**n * self.lr * g
        self.w = self.w - (1.0 if self.step == "sgd" else self.beta**n) * self.lr * g


class LocalOrMoDA(OrMoDA):
    """§3.12 / A10: workers as AL-SGD; the server is OrMo-DA with Δ (or Δ/γ, Δ/H) in place of the gradient."""

    def __init__(self, w0, K, *, lr, momentum, local_lr, local_steps, delay_rule="inverse", delay_threshold=1.0,
                 delta_scale="none"):
        super().__init__(w0, K, lr=lr, momentum=momentum, delay_rule=delay_rule, delay_threshold=delay_threshold)
        self.gamma, self.H, self.delta_scale = local_lr, local_steps, delta_scale

    def work(self, received, worker, index, grad):
        delta = local_sgd(received, worker, index, grad, self.gamma, self.H)
        return {"none": delta, "inverse_lr": delta / self.gamma, "inverse_steps": delta / self.H}[self.delta_scale]


class OrLoMo(OrMoDA):
    """§3.13: workers run H local MSGD steps from zero momentum (m ← βm + γg, x ← x − m) and send (m_H, Δ). The
    server opens groups like OrMo and applies u ← u + ρ^n η_t m, w ← w − η_t Δ − (β + … + β^{hn}) η_t m, where the
    per-group decay is ρ = β, h = 1 ('beta') or ρ = β^H, h = H ('beta_pow_H'; the shift is then
    w ← w − (β + … + β^H) u, u ← β^H u, i.e. H momentum-only MSGD steps)."""

    def __init__(self, w0, K, *, lr, momentum, local_lr, local_steps, delay_rule="inverse", delay_threshold=1.0,
                 group_decay="beta"):
        super().__init__(w0, K, lr=lr, momentum=momentum, delay_rule=delay_rule, delay_threshold=delay_threshold)
        self.gamma, self.H = local_lr, local_steps
        self.h = 1 if group_decay == "beta" else local_steps

    def work(self, received, worker, index, grad):
        x, m = received.copy(), np.zeros_like(received)
        for h in range(self.H):
            m = self.beta * m + self.gamma * grad(x, worker, index, h)
            x = x - m
        return m, received - x

    def pre(self, t, waiting_empty):
        if waiting_empty and group(t, self.K) > self.I:
            self.w = self.w - (catch_up(self.beta, self.h) - 1.0) * self.u
            self.u = self.beta**self.h * self.u
            self.I += 1

    def update(self, t, worker, index, message):
        m, delta = message
        n, eta = self.I - group(index, self.K), self.eta(t, index)
        self.u = self.u + self.beta ** (self.h * n) * eta * m
        self.w = self.w - eta * delta - (catch_up(self.beta, self.h * n) - 1.0) * eta * m


REFERENCE: dict[str, type[RefRule]] = {
    "ssgd": SSGD,
    "ssgdm": SSGDm,
    "prsgdm": PRSGDm,
    "asgd": ASGD,
    "da-asgd": DAASGD,
    "naive-asgdm": NaiveASGDm,
    "shifted-momentum": ShiftedMomentum,
    "al-sgd": ALSGD,
    "ormo": OrMo,
    "ormo-da": OrMoDA,
    "ormo-vanilla": OrMoVanilla,
    "local-ormo-da": LocalOrMoDA,
    "orlomo": OrLoMo,
    "smega2": SMEGA2,
}


# ======================================================================================================================
# The reference parameter server (§2.2, §2.3)


class Trace:
    """What a reference run produced: per iteration the record (t, worker, index, delay), the parameters w_{t+1},
    the server momentum after the iteration, and what was sent back at its end (None when nothing was sent, as
    within a sync round)."""

    def __init__(self) -> None:
        self.events: list[tuple[int, int, int, int]] = []
        self.params: list[np.ndarray] = []
        self.momentum: list[np.ndarray | None] = []
        self.sent: list[Any] = []


def run_reference(rule: RefRule, grad: Grad, order: list[int], scheduler: str | None = None) -> Trace:
    """The server loop of §2.2 with ``ite(k, t)`` of §2.3.

    ``received[k]`` is the last payload sent to worker k and ``ite[k]`` its index; the initial broadcast sends
    (w_0, 0) to everyone. Under 'async' the consumed worker is answered at once; under 'sync' the answer waits
    until the waiting set C holds all K workers, and then goes to all of them.
    """
    K, scheduler = rule.K, scheduler or rule.scheduler
    trace = Trace()
    first = rule.payload()
    received, ite, waiting = [first] * K, [0] * K, []
    for t, k in enumerate(order):
        rule.pre(t, waiting_empty=not waiting)
        s = ite[k]
        message = rule.work(received[k], k, s, grad)
        rule.update(t, k, s, message)
        trace.events.append((t, k, s, t - s))
        trace.params.append(rule.params().copy())
        trace.momentum.append(rule.momentum())
        waiting.append(k)
        sent = None
        if scheduler == "async" or len(waiting) == K:
            sent = rule.payload()
            for j in waiting:
                received[j], ite[j] = sent, t + 1
            waiting = []
        trace.sent.append(sent)
    return trace


def reference(name: str, K: int, order: list[int], hp: dict[str, Any], grad: Grad = PROBLEM.grad,
              w0: np.ndarray = PROBLEM.w0, scheduler: str | None = None) -> tuple[RefRule, Trace]:
    rule = REFERENCE[name](np.asarray(w0, dtype=np.float64), K, **hp)
    return rule, run_reference(rule, grad, order, scheduler)


# ======================================================================================================================
# 1. The reference reproduces the worked examples of spec §6


def scalar_grad(x: np.ndarray, worker: int, index: int, step: int) -> np.ndarray:
    """§6.2/§6.4: f(w) = w²/2, so the gradient is w itself (no noise)."""
    return x.copy()


ORDER_6_2 = [0, 1, 1, 1, 1, 0, 0, 1]  # K = 2; worker 0's index-1 gradient arrives at t = 5 with τ = 4


def run_6_2(name: str, **hp: Any) -> Trace:
    """A reference run on the example of §6.2/§6.4: f(w) = w²/2, w_0 = 1, K = 2, the order above."""
    return reference(name, 2, ORDER_6_2, hp, grad=scalar_grad, w0=np.array([1.0]))[1]


def first_coordinates(arrays: list[np.ndarray]) -> list[float]:
    return [float(a[0]) for a in arrays]


GOLDEN_6_2 = {  # w_1 … w_8 from the tables of §6.2 (η = 0.1, β = 0.9)
    "ormo": [0.900000, 0.620000, 0.558000, 0.284400, 0.255960, -0.259776, -0.233798, -0.569313],
    "ormo-da": [0.900000, 0.620000, 0.558000, 0.284400, 0.255960, -0.137826, -0.124043, -0.437729],
    "ormo-vanilla": [0.900000, 0.710000, 0.639000, 0.349200, 0.314280, -0.067968, -0.061171, -0.415115],
    "naive-asgdm": [0.900000, 0.710000, 0.468000, 0.203400, -0.055080, -0.377712, -0.630310, -0.852139],
    "asgd": [0.900000, 0.800000, 0.720000, 0.648000, 0.583200, 0.493200, 0.443880, 0.385560],
    "shifted-momentum": [0.900000, 0.800000, 0.630000, 0.414000, 0.178200, -0.001800, -0.163620, -0.393660],
    "smega2": [0.900000, 0.800000, 0.648000, 0.513090, 0.358493, 0.143884, -0.003419, -0.179733],
}


@pytest.mark.parametrize("name", list(GOLDEN_6_2))
def test_reference_reproduces_spec_6_2(name):
    """§6.2, 1-D quadratic, K = 2, order 0,1,1,1,1,0,0,1: the reference's w_1 … w_8 match the printed tables to
    1e-6 (e.g. OrMo ends at w_8 = −0.569313 and SMEGA2 at w_8 = −0.179733)."""
    hp = {"lr": 0.1} if name == "asgd" else {"lr": 0.1, "momentum": 0.9}
    trace = run_6_2(name, **hp)
    np.testing.assert_allclose(first_coordinates(trace.params), GOLDEN_6_2[name], rtol=0, atol=1e-6)


def test_reference_ormo_table_6_2():
    """§6.2 OrMo table, column by column: the indices s_t, the delays τ_t, the momentum u_{t+1}; and OrMo-DA's
    momentum after t = 5, 6, 7 (its η_5 = 0.1·2/4 because τ_5 = 4 > K)."""
    trace = run_6_2("ormo", lr=0.1, momentum=0.9)
    assert [s for _, _, s, _ in trace.events] == [0, 0, 2, 3, 4, 1, 6, 5]
    assert [tau for _, _, _, tau in trace.events] == [0, 1, 0, 0, 0, 4, 0, 2]
    u = [0.100000, 0.180000, 0.242000, 0.273600, 0.302040, 0.344736, 0.318758, 0.309919]
    np.testing.assert_allclose(first_coordinates(trace.momentum), u, rtol=0, atol=1e-6)

    da = run_6_2("ormo-da", lr=0.1, momentum=0.9)
    np.testing.assert_allclose(first_coordinates(da.momentum[5:]), [0.308286, 0.294503, 0.288089], rtol=0, atol=1e-6)


def test_reference_smega2_look_ahead_6_2():
    """§6.2 SMEGA2: the look-ahead estimates ŵ sent after t = 0 … 7 (each worker's next gradient is taken there),
    and the buffer v = 1.0 after t = 1 and 1.43455 after t = 3."""
    trace = run_6_2("smega2", lr=0.1, momentum=0.9)
    sent = [0.855, 0.62, 0.4491, 0.254871, 0.101716, -0.188402, -0.310612, -0.470988]
    np.testing.assert_allclose(first_coordinates(trace.sent), sent, rtol=0, atol=1e-6)
    assert trace.momentum[1][0] == pytest.approx(1.0, abs=1e-6)
    assert trace.momentum[3][0] == pytest.approx(1.43455, abs=1e-6)


LOCAL_6_4 = {"lr": 1.0, "local_lr": 0.1, "local_steps": 2}  # global η = 1 with lr_DA (the default 'inverse')


@pytest.mark.parametrize(
    ("name", "hp", "w8"),
    [
        ("orlomo", {**LOCAL_6_4, "momentum": 0.9}, -0.554132),
        ("local-ormo-da", {**LOCAL_6_4, "momentum": 0.9}, -0.734219),
        ("al-sgd", LOCAL_6_4, 0.141956),
    ],
)
def test_reference_reproduces_spec_6_4(name, hp, w8):
    """§6.4, K = 2, H = 2, γ = 0.1, β = 0.9, global η = 1 with lr_DA, order of §6.2: OrLoMo ends at w_8 = −0.554132,
    local OrMo-DA at −0.734219 and AL-SGD at 0.141956."""
    assert run_6_2(name, **hp).params[-1][0] == pytest.approx(w8, abs=1e-6)


def test_reference_orlomo_table_6_4():
    """§6.4 OrLoMo table, row by row: w_{t+1} and u_{t+1} (η_5 = 0.5 because τ_5 = 4 > K)."""
    trace = run_6_2("orlomo", **LOCAL_6_4, momentum=0.9)
    w = [0.720000, 0.116000, 0.083520, -0.250258, -0.180185, -0.644135, -0.463777, -0.554132]
    u = [0.180000, 0.324000, 0.344880, 0.325426, 0.280379, 0.304829, 0.188885, 0.140806]
    np.testing.assert_allclose(first_coordinates(trace.params), w, rtol=0, atol=1e-6)
    np.testing.assert_allclose(first_coordinates(trace.momentum), u, rtol=0, atol=1e-6)


def test_reference_unit_vector_coefficients_6_1():
    """§6.1, K = 4, β = ½, η = 1, arrivals A B C B C C B B A D C A: every message is its own unit vector, so u_12
    and w_0 − w_12 list each message's weight and cumulative coefficient (β^{3−i} and S(3−i) for group i)."""
    order = [0, 1, 2, 1, 2, 2, 1, 1, 0, 3, 2, 0]
    column: dict[tuple[int, int], int] = {}

    def unit(x, worker, index, step):
        column.setdefault((worker, index), len(column))
        return np.eye(len(order))[column[(worker, index)]]

    rule, trace = reference("ormo", 4, order, {"lr": 1.0, "momentum": 0.5}, grad=unit, w0=np.zeros(len(order)))
    assert [e[2] for e in trace.events] == [0, 0, 0, 2, 3, 5, 4, 7, 1, 0, 6, 9]
    assert [e[3] for e in trace.events] == [0, 1, 2, 1, 1, 0, 2, 0, 7, 9, 4, 2]
    by_group = {0: (1 / 8, 15 / 8), 1: (1 / 4, 7 / 4), 2: (1 / 2, 3 / 2), 3: (1.0, 1.0)}
    for (_, s), j in column.items():
        weight, coefficient = by_group[group(s, 4)]
        assert rule.u[j] == pytest.approx(weight) and -rule.w[j] == pytest.approx(coefficient)
    assert np.allclose(0.5 * (0 - rule.w) + 0.5 * rule.u, 1.0)  # R9: (1−β)(w_0 − w) + βu = Σ ηg


# ======================================================================================================================
# 2. ormo.simulate agrees with the reference on random feasible runs

LR = st.floats(0.005, 0.1)
GLOBAL_LR = st.floats(0.1, 1.0)
LOCAL_LR = st.floats(0.01, 0.2)
BETA = st.floats(0.0, 0.95)
H = st.integers(1, 4)
DELAY = {
    "delay_rule": st.sampled_from(["inverse", "drop_above", "none"]),
    "delay_threshold": st.sampled_from([0.5, 1.0, 1.5, 2.0]),  # dyadic, so c·K is exact and τ = cK is hit exactly
}


def _scale_lr_with_delta(hp: dict[str, Any]) -> dict[str, Any]:
    """Δ/γ is about H gradients, not H·γ of them: shrink the global lr by γ so that the run stays bounded."""
    return {**hp, "lr": hp["lr"] * hp["local_lr"]} if hp["delta_scale"] == "inverse_lr" else hp


HYPERPARAMETERS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    name: st.fixed_dictionaries(strategies)
    for name, strategies in {
        "ssgd": {"lr": LR},
        "ssgdm": {"lr": LR, "momentum": BETA, "convention": st.sampled_from(["scaled", "pytorch"])},
        "prsgdm": {"local_lr": LOCAL_LR, "momentum": BETA, "local_steps": H, "average_momentum": st.booleans()},
        "asgd": {"lr": LR},
        "da-asgd": {"lr": LR, **DELAY},
        "naive-asgdm": {"lr": LR, "momentum": BETA, "convention": st.sampled_from(["scaled", "pytorch"])},
        "shifted-momentum": {"lr": LR, "momentum": BETA},
        "al-sgd": {"lr": GLOBAL_LR, "local_lr": LOCAL_LR, "local_steps": H, **DELAY},
        "ormo": {"lr": LR, "momentum": BETA},
        "ormo-da": {"lr": LR, "momentum": BETA, **DELAY},
        "ormo-vanilla": {"lr": LR, "momentum": BETA, "step": st.sampled_from(["sgd", "momentum_increment"])},
        "local-ormo-da": {
            "lr": GLOBAL_LR, "momentum": BETA, "local_lr": LOCAL_LR, "local_steps": H, **DELAY,
            "delta_scale": st.sampled_from(["none", "inverse_lr", "inverse_steps"]),
        },
        "orlomo": {
            "lr": GLOBAL_LR, "momentum": BETA, "local_lr": LOCAL_LR, "local_steps": H, **DELAY,
            "group_decay": st.sampled_from(["beta", "beta_pow_H"]),
        },
        "smega2": {"lr": LR, "momentum": BETA, "estimate": st.sampled_from(["advanced", "naive"])},
    }.items()
}
HYPERPARAMETERS["local-ormo-da"] = HYPERPARAMETERS["local-ormo-da"].map(_scale_lr_with_delta)
assert set(HYPERPARAMETERS) == set(REFERENCE) == set(ormo.rule_names())


def draw_order(data: st.DataObject, K: int, scheduler: str) -> list[int]:
    """A feasible arrival order of 10 … 60 iterations: any worker ids under async; under sync, concatenated random
    permutations of the workers, the last one possibly cut short."""
    T = data.draw(st.integers(10, 60), label="T")
    if scheduler == "async":
        return data.draw(st.lists(st.integers(0, K - 1), min_size=T, max_size=T), label="order")
    rounds = data.draw(st.lists(st.permutations(range(K)), min_size=-(-T // K), max_size=-(-T // K)), label="rounds")
    return [k for perm in rounds for k in perm][:T]


def simulate(name: str, K: int, order: list[int], hp: dict[str, Any], scheduler: str | None = None, callback=None):
    kw = {} if scheduler is None else {"scheduler": scheduler}
    params0 = torch.tensor(PROBLEM.w0, dtype=torch.float64)
    return ormo.simulate(ormo.make_rule(name, **hp), params0, PROBLEM.torch_grad, num_workers=K, order=order, seed=0,
                         callback=callback, **kw)


def assert_matches_reference(name: str, K: int, order: list[int], hp: dict[str, Any], scheduler: str | None = None):
    """ormo and the reference agree on every event record, on every iterate w_1 … w_T and on the result w_T."""
    _, trace = reference(name, K, order, hp, scheduler=scheduler)
    iterates: list[torch.Tensor] = []

    def record(event, state):  # w_{t+1}, after iteration t
        iterates.append(state.params.clone())

    result = simulate(name, K, order, hp, scheduler, callback=record)
    got_events = [(e.t, e.worker, e.index, e.delay) for e in result.events]
    assert got_events == trace.events, "ormo's (t, worker, index, delay) records differ from the reference's ite()"
    expected = trace.params[-1]
    assert np.abs(expected).max() < 1e3, "the run blew up, so atol=1e-10 would mean nothing; tame the strategies"
    got = result.params.numpy()
    assert np.allclose(got, expected, rtol=0, atol=1e-10), f"w_T: ormo {got} vs reference {expected}"
    for t, (w_ormo, w_ref) in enumerate(zip(iterates, trace.params, strict=True)):
        assert np.allclose(w_ormo.numpy(), w_ref, rtol=0, atol=1e-10), f"w_{t + 1}: ormo {w_ormo} vs reference {w_ref}"


@pytest.mark.parametrize("name", list(REFERENCE))
@settings(deadline=None)  # max_examples from the profile in conftest.py (40; HYPOTHESIS_PROFILE=thorough: 400)
@given(data=st.data())
def test_simulate_matches_reference(name, data):
    """For each rule, its own scheduler, random K ∈ 1..5, a random feasible order of 10..60 iterations, random
    hyperparameters and every switch value (but PRSGDm's average_momentum=False, tested last): ormo's w_T, and every
    iterate before it, equals the reference's to 1e-10, and every event's index and delay equal ite(k, t) and
    t − ite(k, t)."""
    K = data.draw(st.integers(1, 5), label="K")
    order = draw_order(data, K, REFERENCE[name].scheduler)
    hp = data.draw(HYPERPARAMETERS[name], label="hp")
    assert_matches_reference(name, K, order, hp)


ASYNC_RULES = [name for name, cls in REFERENCE.items() if cls.scheduler == "async"]


@pytest.mark.parametrize("name", ASYNC_RULES)
@settings(deadline=None)
@given(data=st.data())
def test_async_rules_under_sync_scheduler_match_reference(name, data):
    """The asynchronous rules run under the sync scheduler (§2.2: the methods differ only in SCHEDULE). This is where
    the ordered rules' ``C = ∅`` clause in PRE matters (§3.7): without it a shift would fire at t = rK + 1."""
    K = data.draw(st.integers(1, 5), label="K")
    order = draw_order(data, K, "sync")
    hp = data.draw(HYPERPARAMETERS[name], label="hp")
    assert_matches_reference(name, K, order, hp, scheduler="sync")


def test_prsgdm_parameter_only_averaging():
    """A23's alternative: the server averages the parameters only. Read literally, nothing else changes, so each
    worker carries its own momentum buffer v_k into the next round (v ← βv + g; x ← x − γv from the averaged x̄).

    Worked example: K = 3, three full rounds and a fourth, γ = 0.1, β = 0.9, H = 2. (On a quadratic the averaged
    parameters depend linearly on the buffers, so this reading gives the same x̄ as averaging both; a restart of
    the buffers at zero does not.)"""
    hp = {"local_lr": 0.1, "momentum": 0.9, "local_steps": 2, "average_momentum": False}
    assert_matches_reference("prsgdm", 3, [0, 1, 2, 2, 0, 1, 1, 2, 0, 0, 1, 2], hp)
