"""Synchronous rules: SSGD, SSGDm and PRSGDm (spec §3.1, §3.2, §3.11). They use the synchronous scheduler:
the server sends the new parameter to all K workers only once every worker's message of the round is in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import (
    BoundGrad,
    Message,
    Payload,
    Rule,
    ServerState,
    WorkerState,
    check_bool,
    check_choice,
    check_local_steps,
    check_momentum,
    check_rate,
    register,
    zeros_like,
)

CONVENTIONS: tuple[str, ...] = ("scaled", "pytorch")


@dataclass
class MomentumState(ServerState):
    """``params`` = w, ``momentum`` = u (scaled: η inside) or the PyTorch buffer (η outside)."""

    momentum: Tensor = None  # type: ignore[assignment]


@register
@dataclass(frozen=True)
class SSGD(Rule):
    """Synchronous SGD: ``w ← w − η g`` per message; the parameter is sent back once per round of K messages.

    Per round this is minibatch SGD on the *sum* of the K gradients with learning rate η (spec §3.1, A11).
    """

    name: ClassVar[str] = "ssgd"
    scheduler: ClassVar[str] = "sync"
    worker_sends: ClassVar[str] = "g"
    server_sends: ClassVar[str] = "w (to all K workers, once per round)"

    lr: float = 0.1

    def __post_init__(self) -> None:
        check_rate("lr", self.lr)

    def apply(self, state: ServerState, message: Message, *, t: int, worker: int) -> None:
        state.params.add_(message.update, alpha=-self.lr * state.lr_scale)


@register
@dataclass(frozen=True)
class SSGDm(Rule):
    """Synchronous SGD with momentum in the OrMo paper's per-message form (spec §3.2)::

        PRE(t):    if t > 0 and t mod K == 0:  w ← w − β u ;  u ← β u
        UPDATE(t): u ← u + η g ;  w ← w − η g

    Per round: ``u_{r+1} = β u_r + η Σ_k g^k``, ``w ← w − u_{r+1}`` (heavy ball on the summed gradient).
    ``convention='pytorch'`` keeps η outside the buffer (identical at constant η; spec A12).
    """

    name: ClassVar[str] = "ssgdm"
    scheduler: ClassVar[str] = "sync"
    worker_sends: ClassVar[str] = "g"
    server_sends: ClassVar[str] = "w (to all K workers, once per round)"

    lr: float = 0.1
    momentum: float = 0.9
    convention: str = "scaled"

    def __post_init__(self) -> None:
        check_rate("lr", self.lr)
        check_momentum("momentum", self.momentum)
        check_choice("convention", self.convention, CONVENTIONS)

    def init(self, params0: Tensor, *, num_workers: int) -> MomentumState:
        return MomentumState(params=params0.clone(), num_workers=num_workers, momentum=zeros_like(params0))

    def begin_iteration(self, state: MomentumState, *, t: int, waiting_empty: bool) -> None:  # type: ignore[override]
        if t > 0 and t % state.num_workers == 0:
            eta = 1.0 if self.convention == "scaled" else self.lr * state.lr_scale
            if self.momentum != 0.0:
                state.params.add_(state.momentum, alpha=-self.momentum * eta)
            state.momentum.mul_(self.momentum)

    def apply(self, state: MomentumState, message: Message, *, t: int, worker: int) -> None:  # type: ignore[override]
        eta = self.lr * state.lr_scale
        state.momentum.add_(message.update, alpha=eta if self.convention == "scaled" else 1.0)
        state.params.add_(message.update, alpha=-eta)


@dataclass
class PRSGDmState(ServerState):
    """``params`` = w̄, ``momentum`` = ū; the round's running sums and how many messages they hold."""

    momentum: Tensor = None  # type: ignore[assignment]
    sum_params: Tensor = None  # type: ignore[assignment]
    sum_momentum: Tensor = None  # type: ignore[assignment]
    received: int = 0


@register
@dataclass(frozen=True)
class PRSGDm(Rule):
    """Parallel restarted SGD with momentum (Yu, Jin, Yang, ICML 2019; spec §3.11, A23).

    Worker, from the server's ``(w̄, ū)``: ``x ← w̄, v ← ū``; H times ``v ← β v + ∇f(x; ξ_h)``, ``x ← x − γ v``;
    sends ``(x, v)``. Server: once all K messages of the round are in, ``w̄ ← mean x_k``, ``ū ← mean v_k``.
    ``average_momentum=False`` averages the parameters only: each worker keeps its own ``v`` from round to round and
    sends ``x`` alone.
    """

    name: ClassVar[str] = "prsgdm"
    scheduler: ClassVar[str] = "sync"
    scheduled_rate: ClassVar[str] = "local_lr"
    worker_sends: ClassVar[str] = "(x_k, v_k)"
    server_sends: ClassVar[str] = "(w̄, ū) (to all K workers, once per round)"

    local_lr: float = 0.1
    momentum: float = 0.9
    local_steps: int = 8  # type: ignore[assignment]
    average_momentum: bool = True

    def __post_init__(self) -> None:
        check_rate("local_lr", self.local_lr)
        check_momentum("momentum", self.momentum)
        check_local_steps(self.local_steps)
        check_bool("average_momentum", self.average_momentum)

    def init(self, params0: Tensor, *, num_workers: int) -> PRSGDmState:
        return PRSGDmState(
            params=params0.clone(),
            num_workers=num_workers,
            momentum=zeros_like(params0),
            sum_params=zeros_like(params0),
            sum_momentum=zeros_like(params0),
        )

    def payload(self, state: PRSGDmState, *, index: int) -> Payload:  # type: ignore[override]
        momentum = state.momentum if self.average_momentum else None
        return Payload(index=index, params=state.params, momentum=momentum, lr_scale=state.local_lr_scale)

    @property
    def message_has_momentum(self) -> bool:
        return self.average_momentum

    def init_worker(self, params0: Tensor) -> WorkerState | None:
        return None if self.average_momentum else WorkerState(momentum=zeros_like(params0))

    def work(self, payload: Payload, grad: BoundGrad, worker_state: WorkerState | None = None) -> Message:
        gamma = self.local_lr * payload.lr_scale
        x = payload.params.clone()
        if worker_state is not None:  # parameter-only averaging: the worker's own buffer, updated in place
            v = worker_state.momentum
        else:
            v = payload.momentum.clone() if payload.momentum is not None else zeros_like(x)
        for h in range(self.local_steps):
            g = grad(x, h)
            v.mul_(self.momentum).add_(g)
            x.add_(v, alpha=-gamma)
            del g  # released before the next gradient, whose buffer can then be the same memory
        return Message(index=payload.index, update=x, momentum=None if worker_state is not None else v)

    def apply(self, state: PRSGDmState, message: Message, *, t: int, worker: int) -> None:  # type: ignore[override]
        state.sum_params.add_(message.update)
        if self.average_momentum:
            assert message.momentum is not None
            state.sum_momentum.add_(message.momentum)
        state.received += 1
        if state.received == state.num_workers:
            torch.div(state.sum_params, state.num_workers, out=state.params)
            state.sum_params.zero_()
            if self.average_momentum:
                torch.div(state.sum_momentum, state.num_workers, out=state.momentum)
                state.sum_momentum.zero_()
            state.received = 0
