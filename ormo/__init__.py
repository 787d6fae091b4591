"""ormo: ordered momentum (OrMo, OrMo-DA, OrLoMo) and its baselines for asynchronous distributed training.

Public API::

    rule = ormo.make_rule("ormo", lr=0.1, momentum=0.9)
    result = ormo.simulate(rule, params0, grad_fn, num_workers=K, num_iterations=T, order=None, timing=None, seed=0)
    result.params, result.events
"""

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
from .rules import ConfigError, Message, Payload, Rule, make_rule, rule_names

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
