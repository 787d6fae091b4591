"""Experiment configuration: one frozen, validated dataclass per component, read from TOML.

A file has the sections ``[method]`` (with ``[method.options]``), ``[model]``, ``[data]`` (with ``[data.options]``),
``[schedule]``, ``[timing]``, ``[train]``, ``[ray]`` and ``[task]`` (with ``[task.options]``: a training problem of
your own, see ``ormo.task``), plus top-level ``name`` and ``extends`` (a path, relative to the file,
of a base file whose values this one overrides). Overrides from the command line are ``section.key=value`` with a
TOML value (``method.lr=0.05``, ``method.options.delay_rule="none"``, ``train.epochs=2``); a bare word is taken
as a string. Unknown sections or keys and wrong types are errors naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.timing import HeavyTailed, Homogeneous, OneSlow, PerWorker, SlowFraction, TimingModel
from ..rules import Rule, make_rule
from ..rules.base import (
    ConfigError,
    check_bool,
    check_choice,
    check_int_at_least,
    check_num_workers,
    check_positive,
    invalid,
    rule_class,
)


@dataclass(frozen=True)
class MethodConfig:
    """The update rule and its hyperparameters (``ormo rules`` lists them)."""

    #: registry name of the rule, e.g. "ormo", "orlomo", "ssgdm"
    name: str = "ormo"
    #: server / global learning rate η (per message); unset = the rule's default. Ignored by rules without one.
    lr: float | None = None
    #: momentum β; ignored by rules without momentum (asgd, ssgd, al-sgd, da-asgd)
    momentum: float | None = None
    #: local learning rate γ of local-update methods; ignored by one-step methods
    local_lr: float | None = None
    #: local steps H per message of local-update methods; ignored by one-step methods
    local_steps: int | None = None
    #: the rule's own switches, e.g. {delay_rule = "inverse", group_decay = "beta"}; checked strictly
    options: dict[str, Any] = field(default_factory=dict)
    #: the method's name in tables, plots and sweep folders, e.g. "ormo-da-drop" for a variant; default: ``name``
    label: str | None = None

    def __post_init__(self) -> None:
        rule_class(self.name)  # unknown names list the valid ones
        if self.label is not None and not self.label.strip():
            raise invalid("method.label", self.label, "a non-empty name")
        self.build()  # validates every value

    def build(self) -> Rule:
        """The rule: the common hyperparameters where the rule has them, then every option."""
        accepted = {f.name for f in dataclasses.fields(rule_class(self.name))}  # type: ignore[arg-type]
        hp = {
            k: v
            for k, v in (("lr", self.lr), ("momentum", self.momentum), ("local_lr", self.local_lr),
                         ("local_steps", self.local_steps))
            if v is not None and k in accepted
        }
        for k in self.options:
            if k in hp or k in ("lr", "momentum", "local_lr", "local_steps"):
                raise ConfigError(f"method.options.{k}: set it as method.{k}")
        return make_rule(self.name, **hp, **self.options)


@dataclass(frozen=True)
class ModelConfig:
    """The network (``ormo.models``)."""

    #: registry name: resnet20, resnet32, resnet56, squeezenet, lenet, mlp, or one you registered
    name: str = "resnet20"


@dataclass(frozen=True)
class DataConfig:
    """The dataset and how workers sample it (``ormo.data``)."""

    #: registry name: digits (bundled, the default), fashion-mnist, mnist, cifar10, cifar100, tinyimagenet, synthetic
    name: str = "digits"
    #: folder holding the archives (default $ORMO_DATA or ~/.cache/ormo; fashion-mnist also finds Debian's copy)
    data_dir: str | None = None
    #: fetch a missing archive from its official location (checksum verified)
    download: bool = False
    #: keep only this many training examples (seeded, class-balanced); unset = all
    subset: int | None = None
    #: hold out this many training examples (class-balanced, the same ones for every seed and method) as a
    #: validation split, evaluated like the test set (val_loss, val_acc); unset = none. Tune on it, not on the test set
    validation: int | None = None
    #: minibatch size per gradient (per local step for local methods)
    batch_size: int = 64
    #: random crop (padding 4) and horizontal flip on training batches
    augment: bool = False
    #: dataset-specific options, e.g. {upsample = true} for digits, fashion-mnist and mnist
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data_dir is not None and not self.data_dir.strip():  # Path("") is the current folder, silently
            raise invalid("data.data_dir", self.data_dir, "a folder's path",
                          "leave it out for $ORMO_DATA or ~/.cache/ormo, or write '.' for the current folder")
        check_int_at_least("data.batch_size", self.batch_size, 1)
        if self.subset is not None:
            check_int_at_least("data.subset", self.subset, 1)
        if self.validation is not None:
            check_int_at_least("data.validation", self.validation, 1)


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule, applied per message by samples consumed, to η (gradient methods) and γ (local ones)."""

    #: linear warm-up length in epochs (0 = none)
    warmup_epochs: float = 0.0
    #: the factor the warm-up starts from (reaches 1 at the end of the warm-up)
    warmup_start: float = 0.1
    #: epochs at which the rate is multiplied by ``decay``
    milestones: list[float] = field(default_factory=list)
    #: the step-decay factor
    decay: float = 0.1

    def __post_init__(self) -> None:
        if not (0 <= self.warmup_epochs < math.inf):
            raise invalid("schedule.warmup_epochs", self.warmup_epochs, "a finite number >= 0")
        check_positive("schedule.warmup_start", self.warmup_start)
        check_positive("schedule.decay", self.decay)
        if any(not (0 < m < math.inf) for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise invalid("schedule.milestones", list(self.milestones), "increasing finite positive epochs")

    def factor(self, epoch: float) -> float:
        """The learning-rate factor after ``epoch`` epochs of samples."""
        f = 1.0
        if self.warmup_epochs > 0 and epoch < self.warmup_epochs:
            f = self.warmup_start + (1.0 - self.warmup_start) * epoch / self.warmup_epochs
        return f * self.decay ** sum(1 for m in self.milestones if epoch >= m)


TIMING_MODELS: dict[str, type[TimingModel]] = {
    "homogeneous": Homogeneous,
    "per_worker": PerWorker,
    "slow_fraction": SlowFraction,
    "one_slow": OneSlow,
    "heavy_tailed": HeavyTailed,
}


@dataclass(frozen=True)
class TimingConfig:
    """Worker speeds (``ormo.engine.timing``). Parameters that a model does not take must stay unset."""

    #: homogeneous, per_worker, slow_fraction, one_slow or heavy_tailed
    model: str = "homogeneous"
    #: slow_fraction: share of slow workers (the highest ids)
    fraction: float | None = None
    #: slow_fraction: how many times slower the slow workers are
    slowdown: float | None = None
    #: one_slow: Slow/Fast ratio of worker K-1
    ratio: float | None = None
    #: heavy_tailed: Pareto shape
    alpha: float | None = None
    #: heavy_tailed: cap on the slowdown
    cap: float | None = None
    #: per_worker: one mean step time per worker
    step_times_s: list[float] | None = None
    #: mean time of one local step of a fast worker, seconds
    step_time_s: float | None = None
    #: gamma, exponential or none
    jitter: str | None = None
    #: coefficient of variation of the gamma jitter
    jitter_cv: float | None = None

    def __post_init__(self) -> None:
        check_choice("timing.model", self.model, tuple(TIMING_MODELS))
        self.build()

    def build(self) -> TimingModel:
        cls = TIMING_MODELS[self.model]
        accepted = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "model" or v is None:
                continue
            if f.name not in accepted:
                raise ConfigError(
                    f"timing.{f.name} does not apply to timing.model={self.model!r} (it takes: "
                    f"{', '.join(sorted(accepted))})"
                )
            kw[f.name] = tuple(v) if f.name == "step_times_s" else v
        return cls(**kw)


#: the most torch threads a run takes (torch itself crashes far above it)
MAX_THREADS = 1024


def most_recorded_threads() -> int:
    """The largest thread count a run can have recorded in run.json: ``MAX_THREADS``, or the CPU count (without
    ``train.threads`` a run records torch's own default, the CPU count)."""
    return max(MAX_THREADS, os.cpu_count() or 1)


def is_thread_count(value: Any) -> bool:
    """Whether a thread count read back from a run's files (run.json, an event log) is one a run can have used."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most_recorded_threads()


@dataclass(frozen=True)
class TrainConfig:
    """How long, how many workers, and the run's bookkeeping."""

    #: training length in epochs of samples consumed (a fraction is fine)
    epochs: float = 10.0
    #: number of workers K
    num_workers: int = 16
    #: L2 weight decay λ, added by the worker to its gradient (spec A13)
    weight_decay: float = 0.0
    #: evaluate the server model on the test set every this many epochs
    eval_every: float = 1.0
    #: evaluate on the test split at all (false: its rows hold no test metrics and the split is dropped from memory
    #: right after loading; a tuned sweep's tuning runs use false, so selection never sees the test split)
    eval_test: bool = True
    #: write a checkpoint every this many epochs (and at the end)
    checkpoint_every: float = 1.0
    #: seeds the model, the data stream and the timing model
    seed: int = 0
    #: torch threads for this run (default: torch's own, usually the CPU count; on a shared or loaded machine 1 is
    #: often several times faster). Recorded in run.json: a resume and a replay use the same count, for the same bits
    threads: int | None = None
    #: cpu, cuda, or cuda:N
    device: str = "cpu"
    #: image tasks: feed the model channels-last (NHWC) images. On a CPU a ResNet20 gradient is ~1.3x faster (oneDNN's
    #: NHWC convolutions); the rounding differs from NCHW, so it is part of the config (old runs replay as they ran)
    channels_last: bool = False
    #: batched in-flight gradients (simulator): the messages of several dispatched workers computed in one
    #: torch.func.vmap call, equal to one-at-a-time up to rounding. "auto": on a CUDA device when the task supports it
    #: (on a CPU one at a time is as fast or faster); true; false. run.json records what ran and why
    batch_workers: bool | str = "auto"
    #: the most messages computed together (default: what 1 GiB of stacked parameters and gradients holds, at most
    #: num_workers); fixed by the config, so a resume and a replay batch alike
    batch_max: int | None = None
    #: the NaN/Inf checks and the loss read-out queue on the device and are read at each evaluation and checkpoint
    #: (no host sync per message on CUDA; a NaN/Inf found there runs the iterations since the last checkpoint again,
    #: checking each message, to stop exactly where a run checking each message stops). "auto": on a CUDA device;
    #: true; false. The results are the same bits either way; run.json records what ran
    deferred_checks: bool | str = "auto"
    #: also write TensorBoard event files (needs the tensorboard package)
    tensorboard: bool = False
    #: a label for tables and plots (e.g. "K=16 het."); default: derived from the varied settings
    label: str | None = None

    def __post_init__(self) -> None:
        check_positive("train.epochs", self.epochs)
        check_num_workers("train.num_workers", self.num_workers)
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise invalid("train.weight_decay", self.weight_decay, "a finite number >= 0")
        check_positive("train.eval_every", self.eval_every)
        check_positive("train.checkpoint_every", self.checkpoint_every)
        check_bool("train.eval_test", self.eval_test)
        check_bool("train.channels_last", self.channels_last)
        if self.threads is not None:
            check_int_at_least("train.threads", self.threads, 1)
            if self.threads > MAX_THREADS:  # torch crashes (a segfault) at 100,000
                raise invalid("train.threads", self.threads, f"<= {MAX_THREADS} (one per core is the most that helps)")
        check_int_at_least("train.seed", self.seed, 0)
        if self.seed >= 2**64:  # torch's generators take 64 bits: found here, not when the run (or a sweep) starts
            raise invalid("train.seed", self.seed, "an integer in [0, 2**64)")
        if not (self.device == "cpu" or self.device == "cuda" or re.fullmatch(r"cuda:[0-9]+", self.device)):
            raise invalid("train.device", self.device, "'cpu', 'cuda' or 'cuda:N'")
        if not (isinstance(self.batch_workers, bool) or self.batch_workers == "auto"):
            raise invalid("train.batch_workers", self.batch_workers, 'true, false or "auto"')
        if not (isinstance(self.deferred_checks, bool) or self.deferred_checks == "auto"):
            raise invalid("train.deferred_checks", self.deferred_checks, 'true, false or "auto"')
        if self.batch_max is not None:
            check_int_at_least("train.batch_max", self.batch_max, 1)
            if self.batch_max >= 2**31:
                raise invalid("train.batch_max", self.batch_max, "< 2^31 (a batch is at most num_workers anyway)")


def check_ray_address(address: Any) -> None:
    """``"auto"``, or ``HOST:PORT`` (optionally ``ray://HOST:PORT``, a Ray client server): what `ray start --head`
    prints; or ``"local"``: a private local instance, as when it is unset. Not a URL of the dashboard, not empty."""
    host, sep, port = address.removeprefix("ray://").rpartition(":") if isinstance(address, str) else ("", "", "")
    if address in ("auto", "local") or (sep and host and "/" not in host and port.isdigit() and
                                        0 < int(port) < 65536):
        return
    raise invalid("ray.address", address, '"auto", "local" (a private local instance, as when unset) or the '
                  'HOST:PORT that `ray start --head` prints, e.g. "10.0.0.5:6379"')


@dataclass(frozen=True)
class RayConfig:
    """The Ray runtime (``ormo train --engine ray``): real worker processes, sleeps for the timing model."""

    #: join an existing cluster ("auto", or the HOST:PORT printed by `ray start --head`); unset or "local" = a private
    #: local instance
    address: str | None = None
    #: CPUs of the local instance (default: the machine's); the server takes none
    num_cpus: int | None = None
    #: GPUs each worker process asks for (0 = CPU workers; otherwise train.device must be "cuda")
    gpus_per_worker: float = 0.0
    #: logical workers hosted by one worker process (each with its own identity, data stream, timing and loop; the
    #: process loads the data once). Unset: one process per CPU of the instance, or per gpus_per_worker GPUs
    workers_per_actor: int | None = None
    #: torch threads per worker process (a replay in the simulator uses the same, for identical arithmetic)
    worker_threads: int = 1
    #: realise the timing model by sleeping after each real computation
    emulate_timing: bool = True
    #: seconds of sleep per unit of the timing model's time (its step_time_s = 1 means 10 ms per step at 0.01)
    time_scale: float = 0.01
    #: how long a synchronous round may wait for its last message before the run stops with an error
    sync_timeout_s: float = 120.0
    #: how many times each worker process may be restarted after it dies
    max_restarts: int = 10
    #: how long the workers may take to start (build their model and data) before the run stops with an error
    startup_timeout_s: float = 600.0
    #: how long a HOST:PORT ray.address may take to answer before the run stops with an error
    connect_timeout_s: float = 15.0
    #: the heartbeat: how long the parameter server may leave the driver's calls (polled every 0.2 s) unanswered
    #: before the run stops with an error, resumable from its last checkpoint
    server_timeout_s: float = 60.0
    #: Ray's runtime environment for the run's processes, e.g. {py_modules = ["examples/my_task.py"]} or
    #: {working_dir = "."}: how a task's or rule's module reaches the workers of a cluster that does not have it
    #: installed (a local instance needs nothing: its workers see the driver's files)
    runtime_env: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.address is not None:
            check_ray_address(self.address)
        if self.num_cpus is not None:
            check_int_at_least("ray.num_cpus", self.num_cpus, 1)
        if not 0 <= self.gpus_per_worker < math.inf:  # (NaN fails this too)
            raise invalid("ray.gpus_per_worker", self.gpus_per_worker, "a finite number >= 0")
        check_int_at_least("ray.worker_threads", self.worker_threads, 1)
        if self.worker_threads > MAX_THREADS:  # as train.threads: torch aborts far above it
            raise invalid("ray.worker_threads", self.worker_threads,
                          f"<= {MAX_THREADS} (one per core is the most that helps)")
        if self.workers_per_actor is not None:
            check_int_at_least("ray.workers_per_actor", self.workers_per_actor, 1)
        if not 0 <= self.time_scale < math.inf:
            raise invalid("ray.time_scale", self.time_scale, "a finite number >= 0")
        check_positive("ray.sync_timeout_s", self.sync_timeout_s)
        check_int_at_least("ray.max_restarts", self.max_restarts, 0)
        check_positive("ray.startup_timeout_s", self.startup_timeout_s)
        check_positive("ray.connect_timeout_s", self.connect_timeout_s)
        check_positive("ray.server_timeout_s", self.server_timeout_s)


@dataclass(frozen=True)
class TaskConfig:
    """The training problem (``ormo.task``): image classification of ``[model]`` on ``[data]`` (the default), or the
    task an entry builds. The entry's module and ``imports`` are imported when the config is read, before the other
    sections are checked, so the models, datasets and rules they register can be named in them."""

    #: "module:callable" or "path/to/file.py:callable", called as callable(context, **options) to build the task
    #: (``ormo.task.TaskContext``); unset = image classification of [model] on [data]
    entry: str | None = None
    #: keyword arguments of the entry (values: numbers, strings, booleans, lists)
    options: dict[str, Any] = field(default_factory=dict)
    #: modules (names or .py paths) to import first, for what they register, e.g. ["mypkg.rules"]
    imports: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from .plugins import check_options, import_modules, resolve_entry

        for k, v in self.options.items():
            if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, dict) for x in v)):
                raise invalid(f"task.options.{k}", v, "a number, string, boolean or list (not a table)",
                              fix="flatten it into several options")
        import_modules(self.imports)
        if self.entry is None:
            if self.options:
                raise ConfigError(f"task.options {sorted(self.options)!r} are set but task.entry is not; set "
                                  f"task.entry = \"module:callable\" (the options are its keyword arguments)")
            return
        check_options(resolve_entry(self.entry), self.options, entry=self.entry)


SECTIONS: dict[str, type] = {
    "method": MethodConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "schedule": ScheduleConfig,
    "timing": TimingConfig,
    "train": TrainConfig,
    "ray": RayConfig,
    "task": TaskConfig,
}

#: what a task of its own (task.entry) takes from [model] and [data]: only the minibatch size
_TASK_USES = {"data.batch_size"}


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: what to train, how, and under which worker speeds."""

    name: str = "experiment"
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        if self.task.entry is None:  # image classification: what builds its model and data is known now
            from ..data.base import check_options
            from ..models.registry import _entry

            _entry(self.model.name)
            check_options(self.data.name, self.data.options)
            return
        for section, default in (("model", ModelConfig()), ("data", DataConfig())):
            for f in dataclasses.fields(default):
                key = f"{section}.{f.name}"
                value = getattr(getattr(self, section), f.name)
                if key not in _TASK_USES and value != getattr(default, f.name):
                    raise ConfigError(f"[task] {key} = {value!r} does not apply with task.entry = "
                                      f"{self.task.entry!r} (the task builds its own model and data; it takes only "
                                      f"data.batch_size); pass it to the task in [task.options] instead")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# reading, type checking, overrides


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation (int accepted for float); returns the value, lists as lists."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(key, value, a)
            except ConfigError as e:
                errors.append(e)
        if set(args) == {bool, str}:  # the switches with an "auto" (their own check names the strings they take)
            raise ConfigError(f'{key}: expected true, false or "auto", got {value!r} ({type(value).__name__})')
        raise errors[0]
    if annotation is Any:
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r} ({type(value).__name__})")
        return dict(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r} ({type(value).__name__})")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # pragma: no cover


def _build_section(name: str, cls: type, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kw = {}
    for key, value in table.items():
        if key not in names:
            raise ConfigError(f"unknown key {name}.{key}; [{name}] accepts: {', '.join(names)}")
        kw[key] = _check_type(f"{name}.{key}", value, hints[key])
    try:
        return cls(**kw)
    except ConfigError as e:
        raise ConfigError(f"[{name}] {e}") from None


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate a config from a (TOML-shaped) dictionary."""
    data = dict(data)
    data.pop("extends", None)
    data.pop("sweep", None)  # read by `ormo sweep` (ormo.experiment.sweep); a single run ignores it
    unknown = [k for k in data if k not in SECTIONS and k != "name"]
    if unknown:
        raise ConfigError(f"unknown section or key {unknown[0]!r}; expected: name, {', '.join(SECTIONS)}")
    name = _check_type("name", data.get("name", "experiment"), str)
    # [task] first: its modules register models, datasets and rules that the other sections may name
    task = _build_section("task", TaskConfig, data.get("task", {}))
    sections = {s: _build_section(s, cls, data.get(s, {})) for s, cls in SECTIONS.items() if s != "task"}
    return ExperimentConfig(name=name, task=task, **sections)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A new nested dict: ``base`` with ``top`` merged in, tables recursively. Neither argument is modified, and the
    result shares no table or list with them (an override on the result never reaches a config it came from)."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def read_toml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file, following ``extends`` chains (relative to each file); ``preset:NAME`` is a packaged one."""
    from ..presets import is_preset, preset_path  # here, not at the top: this hook is the module's only use

    if is_preset(path):
        path = preset_path(str(path))
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); a config "
                          f"file is TOML in UTF-8: fix or restore it") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    base = data.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: extends must be a path string, got {base!r}")
        data = _merge(read_toml(path.parent / base, (*_seen, path.resolve())), data)
    return data


def parse_value(text: str) -> Any:
    """A TOML value (``0.05``, ``true``, ``[80, 120]``, ``"x"``); anything that is not TOML is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def same_value_key(value: Any) -> str:
    """A key under which equal values meet: numbers by their value (``1`` and ``1.0``, ``0.1`` and ``1e-1``), also
    inside lists and tables (``[1]`` and ``[1.0]``: a float field reads both as ``[1.0]``)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(float(value))
    if isinstance(value, list):
        return "[" + ", ".join(same_value_key(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {same_value_key(v)}" for k, v in value.items()) + "}"
    return repr(value)


def override_key(item: str) -> str:
    """The key an override sets, as :func:`apply_overrides` reads it: ``"method . lr = 0.1"`` -> ``"method.lr"`` (so
    checks that compare keys see the key that takes effect)."""
    return ".".join(k.strip() for k in item.split("=", 1)[0].strip().split("."))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A new TOML-shaped dictionary: ``data`` with the ``section.key=value`` overrides applied in order. ``data`` is
    not modified and shares nothing with the result."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. method.lr=0.05)")
        text = item.split("=", 1)[1]
        keys = override_key(item).split(".")
        if len(keys) == 1 and keys[0] == "name":
            data["name"] = parse_value(text)
            continue
        if len(keys) < 2 or keys[0] not in SECTIONS:
            raise ConfigError(f"override {item!r}: the key must be section.key with section in {', '.join(SECTIONS)}")
        names = [f.name for f in dataclasses.fields(SECTIONS[keys[0]])]
        if keys[1] not in names:
            raise ConfigError(f"unknown key {keys[0]}.{keys[1]}; [{keys[0]}] accepts: {', '.join(names)}")
        if len(keys) > 2 and keys[1] != "options":
            raise ConfigError(f"override {item!r}: {keys[0]}.{keys[1]} is a value, it has no key {keys[2]!r}")
        node = data
        for depth, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(keys[:depth + 1])} is {node!r} in the config, "
                                  f"not a table")
        node[keys[-1]] = parse_value(text)
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """``read_toml``, refusing a file that sets nothing (an empty or comment-only file would silently train the
    defaults: a ResNet20 on the digits)."""
    data = read_toml(path)
    if not any(k not in ("extends",) for k in data):
        raise ConfigError(f"config file {str(path)!r} is empty: it sets nothing, so the run would be all defaults; "
                          f"give at least a [method] or [model] section, or start from a preset (`ormo presets`)")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read ``path`` (or start from the defaults), apply overrides, validate. A file that sets nothing is an error."""
    data = read_config_file(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides or []))


# ---------------------------------------------------------------------------------------------------------------
# writing


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):  # a JSON string is a valid TOML basic string (newlines and quotes escaped)
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (e.g. ray.runtime_env's env_vars)
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: ExperimentConfig) -> str:
    """The resolved config as TOML (unset values are omitted, so reading it back gives the same config)."""
    d = cfg.to_dict()
    lines = [f"name = {_toml_value(d.pop('name'))}", ""]
    for section, table in d.items():
        if section == "task" and table == dataclasses.asdict(TaskConfig()):
            continue  # image classification, the default: the file reads as it did before tasks
        subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None and k not in subtables]
        lines.append("")
        for sub, values in subtables.items():
            if values:
                lines.append(f"[{section}.{sub}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
                lines.append("")
    return "\n".join(lines)
