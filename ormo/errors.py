"""The project's input error, in a module that imports nothing heavy (the command line loads it before torch)."""


class ConfigError(ValueError):
    """An invalid hyperparameter, option or input. The message names the field, the value and the constraint."""
