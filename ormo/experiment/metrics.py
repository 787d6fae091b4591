"""Metrics files of a run: ``metrics.jsonl`` (one JSON object per evaluation) and ``metrics.csv`` (the same rows),
optionally TensorBoard scalars. Rows are rewritten whole on resume, so the files never hold rows from a timeline
that a resumed run did not follow."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def metric_fields(metric_names: Sequence[str]) -> tuple[str, ...]:
    """The columns of a run's metrics rows for a task whose metrics are ``metric_names``: the progress, the training
    loss, ``test_<metric>`` then ``val_<metric>`` for each, and the delays and rate factor."""
    return ("epoch", "iteration", "gradients", "sim_time_s", "train_loss",
            *(f"{split}_{name}" for split in ("test", "val") for name in metric_names),
            "delay_mean", "delay_max", "lr_scale")


#: image classification's columns (metrics ``loss`` and ``acc``): what every run directory before tasks holds
METRIC_FIELDS: tuple[str, ...] = metric_fields(("loss", "acc"))


def metrics_row(
    t: int,
    *,
    messages_per_epoch: float,
    local_steps: int,
    sim_time_s: float,
    train_loss: float,
    evaluation: Mapping[str, float | None],
    delay_mean: float,
    delay_max: int | None,
    lr_scale: float,
) -> dict[str, Any]:
    """One evaluation row after ``t`` server iterations: the fixed columns and ``evaluation`` (``test_<metric>``,
    ``val_<metric>``, from ``ormo.task.evaluate_all``), in :func:`metric_fields` order."""
    row: dict[str, Any] = {
        "epoch": t / messages_per_epoch,
        "iteration": t,
        "gradients": t * local_steps,
        "sim_time_s": sim_time_s,
        "train_loss": train_loss,
    }
    row.update(evaluation)
    row.update(delay_mean=delay_mean, delay_max=delay_max, lr_scale=lr_scale)
    return row


def _atomic_write(path: Path, text: str) -> None:
    from .rundir import write_text

    write_text(path, text)


def _jsonable(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricsWriter:
    """Keeps every row in memory and rewrites both files atomically after each new row (they are small). ``fields``:
    the columns (:func:`metric_fields` of the task's metrics)."""

    def __init__(self, run_dir: Path, *, fields: Sequence[str] = METRIC_FIELDS, tensorboard: bool = False) -> None:
        self.run_dir = run_dir
        self.fields = tuple(fields)
        self.rows: list[dict[str, Any]] = []
        self._tb = None
        self._tb_logged: dict[Any, dict[str, Any]] = {}  # iteration -> the scalars logged there
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the environment
                msg = "train.tensorboard = true needs the tensorboard package (pip install tensorboard)"
                raise RuntimeError(msg) from e
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def reset(self, rows: list[dict[str, Any]]) -> None:
        self.rows = [dict(r) for r in rows]
        self._flush()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))
        self._flush()
        if self._tb is not None:
            scalars = {key: row[key] for key in self.fields[4:] if row.get(key) is not None}  # not progress columns
            if self._tb_logged.get(row["iteration"]) == scalars:  # a row run again (after a reset): logged already
                return
            self._tb_logged[row["iteration"]] = scalars
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, row["iteration"])
            self._tb.flush()

    def _flush(self) -> None:
        _atomic_write(self.run_dir / "metrics.jsonl",
                      "".join(json.dumps({k: _jsonable(r.get(k)) for k in self.fields}) + "\n" for r in self.rows))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(self.fields), lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: r.get(k) for k in self.fields})
        _atomic_write(self.run_dir / "metrics.csv", buf.getvalue())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (NaN written as null comes back as NaN, in every column)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        rows.append({k: (math.nan if v is None else v) for k, v in r.items()})
    return rows
