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
from .rundir import RunDirError, is_locked
from .runloop import RunStopped

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "MethodConfig",
    "ModelConfig",
    "RunDirError",
    "RunResult",
    "RunStopped",
    "ScheduleConfig",
    "TimingConfig",
    "TrainConfig",
    "is_locked",
    "load_config",
    "to_toml",
    "train",
]
