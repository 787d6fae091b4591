"""Experiments: typed configs, the training problem (model + data as a grad_fn), runs with metrics and checkpoints."""

from .config import (
    DataConfig,
    ExperimentConfig,
    MethodConfig,
    ModelConfig,
    ScheduleConfig,
    TimingConfig,
    TrainConfig,
    load_config,
    to_toml,
)
from .run import RunResult, train

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "MethodConfig",
    "ModelConfig",
    "RunResult",
    "ScheduleConfig",
    "TimingConfig",
    "TrainConfig",
    "load_config",
    "to_toml",
    "train",
]
