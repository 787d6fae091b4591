"""Engines: where messages come from. The simulator and the timing models never import Ray."""

from .events import EVENT_FIELDS, Event, EventLog, EventLogError
from .simulator import (
    GradFnError,
    GrowthWarning,
    NonFiniteError,
    SimulationError,
    SimulationResult,
    Simulator,
    check_order,
    simulate,
)
from .timing import HeavyTailed, Homogeneous, OneSlow, PerWorker, Replay, SlowFraction, TimingModel

__all__ = [
    "EVENT_FIELDS",
    "Event",
    "EventLog",
    "EventLogError",
    "GradFnError",
    "GrowthWarning",
    "HeavyTailed",
    "Homogeneous",
    "NonFiniteError",
    "OneSlow",
    "PerWorker",
    "Replay",
    "SimulationError",
    "SimulationResult",
    "Simulator",
    "SlowFraction",
    "TimingModel",
    "check_order",
    "simulate",
]
