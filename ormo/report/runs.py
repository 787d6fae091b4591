"""Run directories as plain records, read from their files only (reports never import training code).

A run directory holds ``run.json`` (name, label, method, seed, status and, once finished, ``summary`` and
``final``), ``config.toml`` (the resolved configuration) and ``metrics.jsonl`` (one row per evaluation, NaN written
as null). A sweep writes many of them under one folder, e.g. ``SWEEP/<setting-slug>/<method-label>/seed<k>/``.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]

#: the defaults of ``train.num_workers`` and ``timing.model`` (a resolved config.toml may leave them out)
_DEFAULT_NUM_WORKERS = 16
_DEFAULT_TIMING_MODEL = "homogeneous"


@dataclass(frozen=True)
class RunRecord:
    """One run directory, as read from its files."""

    #: the run directory
    path: Path
    #: ``run.json`` name (the experiment's name)
    name: str
    #: the method's label: its row in tables and plots (``method.label`` of the config, e.g. ``"ormo-da-drop"`` for
    #: a variant; the rule's registry name when the config has none)
    method: str
    #: the setting the run belongs to in tables and plots, e.g. ``"K=16 het."``
    label: str
    #: the run's seed (``train.seed``)
    seed: int
    #: ``"running"``, ``"finished"``, ``"failed"``, ``"interrupted"`` or ``"stopped"`` (run.json says running but no
    #: process holds the run's lock: it was killed; ``ormo train --resume`` continues it)
    status: str
    #: ``config.toml`` as a nested dict (empty when the file is missing)
    config: dict[str, Any] = field(repr=False)
    #: ``metrics.jsonl`` rows in file order; null values come back as NaN
    metrics: list[dict[str, Any]] = field(repr=False)
    #: ``run.json`` summary (only for finished runs; empty otherwise)
    summary: dict[str, Any] = field(repr=False)
    #: the rule's registry name, e.g. ``"ormo-da"`` (default: ``method``)
    rule: str = ""
    #: ``run.json`` task record: entry, metrics with directions, primary metric (empty for runs made before tasks:
    #: image classification)
    task: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.rule:
            object.__setattr__(self, "rule", self.method)

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def _as_path_list(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    # A str is iterable too: treat one path as a list of one.
    if isinstance(paths, str | os.PathLike):
        return [Path(paths)]
    return [Path(p) for p in paths]


def find_runs(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """The run directories under ``paths``, without duplicates.

    Each path is a run directory (it holds ``run.json``), a ``run.json`` file, or a folder searched recursively
    for ``run.json`` (skipping hidden folders below it, such as a tuned sweep's ``.tuning``); the runs found under
    one folder come in sorted path order, folders in the order given.
    A path that does not exist raises ``FileNotFoundError``; a folder without runs contributes nothing.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for path in _as_path_list(paths):
        if not path.exists():
            raise FileNotFoundError(f"run path {str(path)!r} does not exist (expected a run directory or a folder "
                                    f"holding run directories)")
        if path.is_file():
            if path.name != "run.json":
                raise ValueError(f"run path {str(path)!r} is a file but not a run.json; pass its run directory")
            candidates = [path.parent]
        elif (path / "run.json").is_file():
            candidates = [path]
        else:
            # hidden folders below it are skipped: a tuned sweep's OUT/.tuning runs are not its results (pass
            # OUT/.tuning itself to see them)
            candidates = sorted(p.parent for p in path.rglob("run.json") if p.is_file()
                                and not any(part.startswith(".") for part in p.relative_to(path).parts[:-1]))
        for run_dir in candidates:
            key = run_dir.resolve()
            if key not in seen:
                seen.add(key)
                found.append(run_dir)
    return found


def _runs_without_record(paths: list[Path]) -> list[Path]:
    """Folders under ``paths`` (searched as :func:`find_runs` does) that hold a run's ``metrics.jsonl`` but no
    ``run.json``: a run whose record was lost, which a table must not drop without a word."""
    found = []
    for path in paths:
        if not path.is_dir() or (path / "run.json").is_file():
            continue
        found += sorted(p.parent for p in path.rglob("metrics.jsonl") if not (p.parent / "run.json").exists()
                        and not any(part.startswith(".") for part in p.relative_to(path).parts[:-1]))
    return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


#: the sections of a resolved config.toml: each is a table (reports read keys inside them)
_CONFIG_SECTIONS = ("method", "model", "data", "schedule", "timing", "train", "ray", "task")


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as f:
            config = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid TOML: {e}") from e
    for section in _CONFIG_SECTIONS:
        if section in config and not isinstance(config[section], dict):
            raise ValueError(f"{str(path)!r}: {section} = {config[section]!r} is not a [{section}] table (the file is "
                             f"damaged); restore it or delete the run")
    return config


def _check_record(path: Path, info: dict[str, Any]) -> None:
    """The run.json fields a report reads must have the types ormo writes: a crafted or damaged file is a ValueError
    naming the field, never a wrong value (a seed of 1.7 read as 1) or a TypeError."""
    def bad(key: str, what: str) -> ValueError:
        return ValueError(f"{str(path)!r}: {key} = {info[key]!r} is not {what} (the file is damaged); restore it or "
                          f"delete the run")

    for key in ("name", "label", "method", "status"):
        if info.get(key) is not None and not isinstance(info[key], str):
            raise bad(key, "a string")
    seed = info.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise bad("seed", "an integer >= 0")
    for key in ("summary", "task", "final"):
        if info.get(key) is not None and not isinstance(info[key], dict):
            raise bad(key, "a JSON object")
    metrics = (info.get("task") or {}).get("metrics")
    if metrics is not None and not (isinstance(metrics, list) and all(
            isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("higher_is_better"), bool)
            for m in metrics)):
        raise ValueError(f"{str(path)!r}: task.metrics = {metrics!r} is not a list of {{\"name\": ..., "
                         f"\"higher_is_better\": true/false}} objects (the file is damaged); restore it or delete "
                         f"the run")


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl``; null (how the writer stores NaN) comes back as NaN."""
    if not path.is_file():
        return []
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} line {lineno} is not valid JSON: {e}") from e
        if not isinstance(row, dict):
            raise ValueError(f"{str(path)!r} line {lineno} is not a JSON object of metric values: {line[:60]!r}")
        for key, value in row.items():  # the writer stores numbers and null only: anything else is damage
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{str(path)!r} line {lineno}: {key} = {value!r} is not a number (the file is "
                                 f"damaged)")
        rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
    return rows


def _check_finished(run_dir: Path, info: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
    """A finished run's files must be whole: a resolved config, metrics rows, and a last row that is the one
    run.json recorded as ``final`` (a metrics.jsonl cut short would otherwise report an earlier epoch as final)."""
    if not (run_dir / "config.toml").is_file():
        raise ValueError(f"{str(run_dir)!r}: config.toml is missing (a finished run keeps its resolved config); "
                         f"restore it or delete the run")
    if not metrics:
        raise ValueError(f"{str(run_dir)!r}: metrics.jsonl is missing or has no rows")
    last, final = metrics[-1], info.get("final")
    if isinstance(final, dict):
        expected = {k: final[k] for k in ("iteration", "epoch") if isinstance(final.get(k), int | float)}
    else:  # a run.json without a final row: its summary's iteration count
        iterations = (info.get("summary") or {}).get("iterations")
        expected = {"iteration": iterations} if isinstance(iterations, int | float) else {}
    for key, value in expected.items():
        if last.get(key) != value:
            raise ValueError(f"{str(run_dir)!r}: the last row of metrics.jsonl has {key} = {last.get(key)!r} but "
                             f"run.json's final row says {value!r} (metrics.jsonl is cut short or damaged)")


def derived_label(config: dict[str, Any]) -> str:
    """The setting label of a run whose ``run.json`` has none: ``train.label`` if the config has one, otherwise
    ``f"K={train.num_workers} {timing.model}"``, e.g. ``"K=16 homogeneous"``."""
    train = config.get("train", {})
    if train.get("label"):
        return str(train["label"])
    num_workers = train.get("num_workers", _DEFAULT_NUM_WORKERS)
    timing_model = config.get("timing", {}).get("model", _DEFAULT_TIMING_MODEL)
    return f"K={num_workers} {timing_model}"


def read_run(run_dir: PathLike) -> RunRecord:
    """The record of one run directory (any status)."""
    run_dir = Path(run_dir)
    info = _read_json(run_dir / "run.json")
    _check_record(run_dir / "run.json", info)
    config = _read_config(run_dir / "config.toml")
    method_table = config.get("method", {}) if isinstance(config.get("method"), dict) else {}
    rule = info.get("method") or method_table.get("name")
    if not rule:
        raise ValueError(f"{str(run_dir / 'run.json')!r} has no method, and config.toml no [method] name")
    seed = info.get("seed", config.get("train", {}).get("seed"))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{str(run_dir / 'run.json')!r} has no seed, and config.toml no [train] seed (an integer)")
    status = _live_status(run_dir, str(info.get("status", "unknown")))
    metrics = _read_metrics(run_dir / "metrics.jsonl")
    if status == "finished":
        _check_finished(run_dir, info, metrics)
    return RunRecord(
        path=run_dir,
        name=str(info.get("name") or config.get("name") or run_dir.name),
        method=str(method_table.get("label") or rule),
        rule=str(rule),
        label=str(info["label"]) if info.get("label") else derived_label(config),
        seed=int(seed),
        status=status,
        config=config,
        metrics=metrics,
        summary=dict(info.get("summary") or {}),
        task=dict(info.get("task") or {}) if isinstance(info.get("task"), dict) else {},
    )


def check_one_experiment_per_cell(records: Iterable[RunRecord]) -> None:
    """Refuse runs that would share one table cell or plot line (method label and setting label) but whose configs
    differ in anything but ``train.seed``: their mean would mix two experiments under one name. A key that only one
    of the two configs holds (a run made by an older version) is not compared; runs without a config neither."""
    from ..experiment.rundir import flatten  # imported here, as is_locked: the module stays light to import

    first: dict[tuple[str, str], tuple[RunRecord, dict[str, Any]]] = {}
    for r in records:
        if not r.config:
            continue
        flat = flatten(r.config)
        flat.pop("train.seed", None)
        key = (r.method, r.label)
        if key not in first:
            first[key] = (r, flat)
            continue
        other, theirs = first[key]
        diff = sorted(k for k in flat.keys() & theirs.keys() if flat[k] != theirs[k])
        if diff:
            shown = ", ".join(f"{k} ({theirs[k]!r} vs {flat[k]!r})" for k in diff[:3])
            more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
            raise ValueError(f"runs {str(other.path)!r} and {str(r.path)!r} would share the cell of method "
                             f"{r.method!r}, setting {r.label!r}, but their configs differ in {shown}{more}, not "
                             f"only in train.seed: give them distinct labels (train.label or method.label), or "
                             f"pass them to separate tables")


#: name -> higher is better, of image classification's metrics: runs made before tasks, or without a task record
IMAGE_METRICS: dict[str, bool] = {"loss": False, "acc": True}
#: columns that are not evaluation metrics, all lower-is-better (losses, times, delays)
_LOWER_COLUMNS = ("train_loss", "sim_time_s", "delay_mean", "delay_max", "delay_p50", "delay_p90", "delay_p99")


def metric_directions(record: RunRecord) -> dict[str, bool]:
    """The run's task metrics: name -> higher is better (image classification's for a run without a task record)."""
    declared = record.task.get("metrics")
    if isinstance(declared, list) and declared:
        return {str(m["name"]): bool(m["higher_is_better"]) for m in declared if isinstance(m, dict) and "name" in m}
    return dict(IMAGE_METRICS)


def metric_label(record: RunRecord, name: str) -> str:
    """A task metric's heading label (its name when the task gives none)."""
    for m in record.task.get("metrics") or []:
        if isinstance(m, dict) and m.get("name") == name:
            return str(m.get("label") or name)
    return name


def higher_is_better(record: RunRecord, key: str) -> bool:
    """Whether a larger value of the metrics column ``key`` (``test_acc``, ``val_ppl``, ``train_loss``, ...) is
    better, from the run's task declaration; a ValueError names the run's metrics for an unknown column."""
    if key in _LOWER_COLUMNS:
        return False
    split, _, name = key.partition("_")
    directions = metric_directions(record)
    if split in ("test", "val") and name in directions:
        return directions[name]
    raise ValueError(f"metric {key!r} is not a metric of run {str(record.path)!r}; its task reports "
                     f"{', '.join(f'test_{n}, val_{n}' for n in directions)} (and train_loss)")


def primary_metric(record: RunRecord) -> str:
    """The run's primary metric name (``acc`` for image classification)."""
    if not record.task:
        return "acc"
    return str(record.task.get("primary") or next(iter(metric_directions(record))))


def _live_status(run_dir: Path, status: str) -> str:
    """``running`` only while a process holds the run's lock; otherwise it was killed: ``stopped``."""
    from ..experiment.rundir import is_locked  # imported here: only a "running" run needs it

    return "stopped" if status == "running" and not is_locked(run_dir) else status


def load_runs(paths: PathLike | Iterable[PathLike], *, include_unfinished: bool = False) -> list[RunRecord]:
    """The records of every run under ``paths`` (see ``find_runs``), in the order found.

    Runs whose status is not ``"finished"`` are skipped with a warning that names them, unless
    ``include_unfinished=True`` (their metrics stop early and they have no summary). Raises ``ValueError`` when
    nothing is left, naming the paths searched.
    """
    path_list = _as_path_list(paths)
    records: list[RunRecord] = []
    unreadable = [f"{str(d)!r}: run.json is missing (it holds metrics.jsonl but no run record)"
                  for d in _runs_without_record(path_list)]
    for run_dir in find_runs(path_list):
        try:
            records.append(read_run(run_dir))
        except (ValueError, OSError) as e:  # one damaged run must not hide every other run under the folder
            unreadable.append(str(e))
    if unreadable:
        warnings.warn(f"skipping {len(unreadable)} unreadable run(s): {'; '.join(unreadable)}", stacklevel=2)
    searched = ", ".join(repr(str(p)) for p in path_list) or "(no paths given)"
    if not include_unfinished:
        skipped = [r for r in records if not r.finished]
        if skipped:
            listing = "; ".join(f"{str(r.path)!r} ({r.status})" for r in skipped)
            warnings.warn(f"skipping {len(skipped)} unfinished run(s): {listing}; tables and plots use finished runs "
                          f"(from Python: load_runs(..., include_unfinished=True) keeps them)", stacklevel=2)
        records = [r for r in records if r.finished]
        if not records and skipped:
            raise ValueError(f"no finished runs under {searched} ({len(skipped)} unfinished skipped: finish them "
                             f"with `ormo train --resume RUN_DIR` or rerun their sweep)")
    if not records:
        raise ValueError(f"no runs found under {searched} (a run directory holds run.json)"
                         + (f"; {len(unreadable)} unreadable" if unreadable else ""))
    return records
