"""Every method's server and worker update, written once. Importing this package registers all rules."""

from . import asgd, local, ordered, smega2, sync  # noqa: F401  (registration side effects)
from .base import (
    ConfigError,
    Message,
    Payload,
    Rule,
    ServerState,
    catch_up,
    group_of,
    make_rule,
    rule_class,
    rule_names,
)
from .lr import DELAY_RULES, delay_factor

for _name in rule_names():  # each built-in rule passes the state-check soundness test (tests/test_deferred.py)
    rule_class(_name).state_checks = True

__all__ = [
    "DELAY_RULES",
    "ConfigError",
    "Message",
    "Payload",
    "Rule",
    "ServerState",
    "catch_up",
    "delay_factor",
    "group_of",
    "make_rule",
    "rule_class",
    "rule_names",
]
