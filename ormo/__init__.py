"""ormo: ordered momentum (OrMo, OrMo-DA, OrLoMo) and its baselines for asynchronous distributed training.

Public API::

    rule = ormo.make_rule("ormo", lr=0.1, momentum=0.9)
    result = ormo.simulate(rule, params0, grad_fn, num_workers=K, num_iterations=T, order=None, timing=None, seed=0)
    result.params, result.events
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # the names below are loaded on first use: `import ormo` (and the CLI's start) stays light
    from . import engine, rules
    from .engine import (
        Event,
        EventLog,
        EventLogError,
        GradFnError,
        GrowthWarning,
        HeavyTailed,
        Homogeneous,
        NonFiniteError,
        OneSlow,
        PerWorker,
        Replay,
        SimulationError,
        SimulationResult,
        Simulator,
        SlowFraction,
        TimingModel,
        simulate,
    )
    from .rules import Message, Payload, Rule, make_rule, rule_names

_ENGINE_NAMES = ("Event", "EventLog", "EventLogError", "GradFnError", "GrowthWarning", "HeavyTailed", "Homogeneous",
                 "NonFiniteError", "OneSlow", "PerWorker", "Replay", "SimulationError", "SimulationResult",
                 "Simulator", "SlowFraction", "TimingModel", "simulate")
_RULES_NAMES = ("Message", "Payload", "Rule", "make_rule", "rule_names")


def __getattr__(name: str) -> Any:
    """Import torch and the engine on first use of a public name, so that a Ctrl-C while the CLI starts is a clean
    stop rather than a traceback from inside torch's import."""
    if name in ("engine", "rules"):
        return importlib.import_module(f".{name}", __name__)
    for module, names in (("engine", _ENGINE_NAMES), ("rules", _RULES_NAMES)):
        if name in names:
            value = getattr(importlib.import_module(f".{module}", __name__), name)
            globals()[name] = value
            return value
    raise AttributeError(f"module 'ormo' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Event",
    "EventLog",
    "EventLogError",
    "GradFnError",
    "GrowthWarning",
    "HeavyTailed",
    "Homogeneous",
    "Message",
    "NonFiniteError",
    "OneSlow",
    "Payload",
    "PerWorker",
    "Replay",
    "Rule",
    "SimulationError",
    "SimulationResult",
    "Simulator",
    "SlowFraction",
    "TimingModel",
    "engine",
    "make_rule",
    "rule_names",
    "rules",
    "simulate",
]
