"""Delay-adaptive learning-rate factors (spec §3.8, A2, A25).

A rule multiplies its base learning rate η by ``delay_factor(rule, τ, K)``:

* ``'inverse'`` (default of the DA methods): ``c·K / max(c·K, τ)``: 1 while ``τ ≤ c·K``, then ``c·K/τ``
  (Mishchenko et al. 2022's released code uses ``n / max(n, delay)``; ``c`` = ``delay_threshold``, default 1);
* ``'drop_above'``: 1 while ``τ ≤ c·K``, else 0 (the message is ignored);
* ``'none'``: always 1 (constant learning rate);
* a callable ``f(tau, num_workers) -> float`` for anything else (e.g. ``min(1, c/(L·τ))``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .base import ConfigError, Message, ServerState, check_positive, invalid

DELAY_RULES: tuple[str, ...] = ("inverse", "drop_above", "none")

DelayRule = str | Callable[[int, int], float]


def check_delay_rule(value: Any) -> DelayRule:
    if callable(value):
        return value
    if value not in DELAY_RULES:
        raise invalid("delay_rule", value, "one of " + ", ".join(repr(c) for c in DELAY_RULES) + " or a callable")
    return value


def delay_factor(delay_rule: DelayRule, delay_threshold: float, tau: int, num_workers: int) -> float:
    """The factor ``η_t / η`` for a message of delay ``tau`` with ``num_workers`` workers."""
    if delay_rule == "none":
        return 1.0
    limit = delay_threshold * num_workers
    if delay_rule == "inverse":
        return 1.0 if tau <= limit else limit / tau
    if delay_rule == "drop_above":
        return 1.0 if tau <= limit else 0.0
    factor = float(delay_rule(tau, num_workers))  # type: ignore[operator]
    if not (0.0 <= factor < math.inf):
        raise ConfigError(
            f"delay_rule returned {factor!r} for tau={tau}, num_workers={num_workers} (must be a finite number >= 0)"
        )
    return factor


class DelayAdaptive:
    """Mixin for rules with the fields ``delay_rule`` and ``delay_threshold``."""

    delay_rule: DelayRule
    delay_threshold: float

    def _check_delay(self) -> None:
        check_delay_rule(self.delay_rule)
        check_positive("delay_threshold", self.delay_threshold)

    def lr_at(self, lr: float, tau: int, num_workers: int) -> float:
        return lr * delay_factor(self.delay_rule, self.delay_threshold, tau, num_workers)

    def sgd_ignores(self, state: ServerState, message: Message, *, t: int, lr: float) -> bool:
        """Whether :meth:`sgd_step` may have skipped ``message`` (its ``η_t`` is 0). A callable ``delay_rule`` is not
        called a second time to tell (it may keep state): True."""
        if callable(self.delay_rule):
            return True
        return self.lr_at(lr * state.lr_scale, t - message.index, state.num_workers) == 0.0

    def sgd_step(self, state: ServerState, message: Message, *, t: int, lr: float) -> None:
        """``w ← w − η_t · message.update`` with ``η_t = lr · factor(t − s)`` (skipped when ``η_t = 0``)."""
        eta = self.lr_at(lr * state.lr_scale, t - message.index, state.num_workers)
        if eta != 0.0:
            state.params.add_(message.update, alpha=-eta)
