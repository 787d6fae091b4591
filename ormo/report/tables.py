"""Mean ± std over seeds in the papers' layout: one row per method, one column per (setting, metric).

A metric is a column of the runs' metrics rows: ``train_loss``, and ``test_<name>``/``val_<name>`` for each metric
the run's task declares (image classification: ``loss`` and ``acc``; the bundled language model: ``loss`` and ``ppl``),
or a time to a target, ``time_to:<column>:<value>`` (honouring the metric's declared direction).

A cell summarises each seed's FINAL value of a metric (the last ``metrics.jsonl`` row) by its mean and its
population standard deviation (``ddof=0``, as the papers' 5-run standard deviations suggest). A NaN or infinite
mean (some seed diverged: the writer stores NaN as null) is shown as ``diverged``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .runs import RunRecord, check_one_experiment_per_cell, higher_is_better, primary_metric

#: registry name -> display name, in the papers' row order
METHOD_NAMES: dict[str, str] = {
    "asgd": "ASGD",
    "naive-asgdm": "naive ASGDm",
    "shifted-momentum": "shifted momentum",
    "smega2": "SMEGA2",
    "ormo": "OrMo",
    "ormo-da": "OrMo-DA",
    "ormo-vanilla": "OrMo (vanilla SGD step)",
    "ssgd": "SSGD",
    "ssgdm": "SSGDm",
    "da-asgd": "DA-ASGD",
    "prsgdm": "PRSGDm",
    "al-sgd": "AL-SGD",
    "local-ormo-da": "local OrMo-DA",
    "orlomo": "OrLoMo",
}

#: metric name -> column heading
METRIC_NAMES: dict[str, str] = {
    "train_loss": "train loss",
    "test_loss": "test loss",
    "test_acc": "test acc. (%)",
    "val_loss": "val. loss",
    "val_acc": "val. acc. (%)",
    "delay_mean": "mean delay",
    "delay_max": "max delay",
    "delay_p50": "median delay",
    "delay_p90": "p90 delay",
    "delay_p99": "p99 delay",
    "sim_time_s": "sim. time (s)",
}

#: metrics read from run.json ``summary.delay`` (over the whole run) rather than from the last metrics row
_SUMMARY_DELAY_METRICS = {"delay_mean": "mean", "delay_max": "max", "delay_p50": "p50", "delay_p90": "p90",
                          "delay_p99": "p99"}


#: ``time_to_acc:85`` -> the simulated time (s) of the first evaluation with test accuracy >= 85 %
TIME_TO_PREFIXES: dict[str, str] = {"time_to_acc": "test_acc", "time_to_val_acc": "val_acc"}
#: ``time_to:val_loss:1.5`` -> the simulated time (s) of the first evaluation with val_loss <= 1.5 (any column; the
#: comparison follows the metric's declared direction)
TIME_TO = "time_to"


def time_to_target(metric: str) -> tuple[str, float] | None:
    """(row key, threshold) of a ``time_to:<column>:X``, ``time_to_acc:X`` or ``time_to_val_acc:X`` metric; None for
    other metrics."""
    prefix, sep, value = metric.partition(":")
    if prefix == TIME_TO:
        key, sep, text = value.rpartition(":")
        try:
            threshold = float(text) if sep and key else math.nan
        except ValueError:
            threshold = math.nan
        if not math.isfinite(threshold):
            raise ValueError(f"metric {metric!r}: expected time_to:METRIC:VALUE, e.g. time_to:val_loss:1.5 (the "
                             f"simulated time at which METRIC first reaches VALUE, on its better side)")
        return key, threshold
    if prefix not in TIME_TO_PREFIXES:
        return None
    try:
        threshold = float(value) if sep else math.nan
    except ValueError:
        threshold = math.nan
    if not (math.isfinite(threshold) and 0 < threshold <= 100):
        raise ValueError(f"metric {metric!r}: expected {prefix}:PERCENT with 0 < PERCENT <= 100, e.g. {prefix}:85 (the "
                         f"simulated time at which the accuracy first reaches 85 %)")
    return TIME_TO_PREFIXES[prefix], threshold


def metric_heading(metric: str) -> str:
    """A column heading: ``test acc. (%)``, ``val. ppl``, ``time to 85 % test acc. (sim. s)``, ``time to val. loss
    1.5 (sim. s)``."""
    target = time_to_target(metric)
    if target is not None:
        if metric.startswith(TIME_TO + ":"):
            return f"time to {metric_heading(target[0])} {target[1]:g} (sim. s)"
        split = "test" if target[0] == "test_acc" else "val."
        return f"time to {target[1]:g} % {split} acc. (sim. s)"
    if metric in METRIC_NAMES:
        return METRIC_NAMES[metric]
    split, _, name = metric.partition("_")
    return f"{'val.' if split == 'val' else split} {name}" if split in ("test", "val") and name else metric


def default_metrics(records: Sequence[RunRecord]) -> tuple[str, ...]:
    """What a table shows unless told: the training loss and the task's primary metric on the test split (on the
    validation split when no run has a test value but some have a validation one: tuning runs, a task without a test
    split), e.g. ``("train_loss", "test_acc")``."""
    primary = primary_metric(records[0]) if records else "acc"
    on_test = any(r.metrics and isinstance(r.metrics[-1].get(f"test_{primary}"), int | float)
                  and math.isfinite(r.metrics[-1][f"test_{primary}"]) for r in records)
    on_val = any(r.metrics and isinstance(r.metrics[-1].get(f"val_{primary}"), int | float)
                 and math.isfinite(r.metrics[-1][f"val_{primary}"]) for r in records)
    return ("train_loss", f"val_{primary}" if on_val and not on_test else f"test_{primary}")


def display_name(method: str) -> str:
    """The papers' name of a rule (``"ormo-da"`` -> ``"OrMo-DA"``); other labels (variants, unknown rules) are
    returned as they are."""
    return METHOD_NAMES.get(method, method)


def method_order(methods: Iterable[str], rules: Mapping[str, str] | None = None) -> list[str]:
    """``methods`` (labels) without duplicates in the papers' row order of their rules (``rules``: label -> rule
    name; a label without one is its own rule); variants of one rule follow it in first-seen order, and labels of
    unknown rules come last, in first-seen order."""
    unique = list(dict.fromkeys(methods))
    known = list(METHOD_NAMES)
    rules = rules or {}

    def key(m: str) -> tuple[int, int, int]:
        rule = rules.get(m, m)
        rank = known.index(rule) if rule in METHOD_NAMES else len(known)
        return rank, 0 if m == rule else 1, unique.index(m)

    return sorted(unique, key=key)


def _rules_of(records: Iterable[RunRecord]) -> dict[str, str]:
    return {r.method: r.rule for r in records}


def final_value(record: RunRecord, metric: str) -> float:
    """The value of ``metric`` that a table reports for one run.

    ``delay_mean``, ``delay_max``, ``delay_p50``, ``delay_p90`` and ``delay_p99`` come from run.json
    ``summary.delay`` (the whole run); every other metric is the last metrics row's value (NaN if it is null).
    """
    target = time_to_target(metric)
    if target is not None:  # inf when the run never reaches it
        key, threshold = target
        final_value(record, key)  # the same errors as the metric itself (no validation split, a tuning run, ...)
        higher = higher_is_better(record, key)
        return next((float(r["sim_time_s"]) for r in record.metrics
                     if r.get(key) is not None and math.isfinite(float(r[key]))
                     and (float(r[key]) >= threshold if higher else float(r[key]) <= threshold)), math.inf)
    if metric in _SUMMARY_DELAY_METRICS:
        delay = record.summary.get("delay")
        key = _SUMMARY_DELAY_METRICS[metric]
        if not isinstance(delay, Mapping) or key not in delay:
            raise ValueError(f"run {str(record.path)!r} (status {record.status!r}) has no summary.delay.{key} "
                             f"for metric {metric!r}; delay metrics need finished runs")
        value = delay[key]
    else:
        if not record.metrics:
            raise ValueError(f"run {str(record.path)!r} has no metrics rows (metrics.jsonl missing or empty)")
        last = record.metrics[-1]
        if metric.startswith("test_") and (record.config.get("train") or {}).get("eval_test") is False:
            raise ValueError(f"run {str(record.path)!r} ran with train.eval_test = false (a tuning run never reads the "
                             f"test split): it has no {metric}; ask for {metric.replace('test_', 'val_', 1)} or "
                             f"train_loss")
        image = not (record.config.get("task") or {}).get("entry")  # image classification holds out data.validation
        if image and metric in ("val_loss", "val_acc") and not (record.config.get("data") or {}).get("validation"):
            raise ValueError(f"run {str(record.path)!r} has no validation split for metric {metric!r}: set "
                             f"data.validation (e.g. 5000) to hold one out of the training set")
        if metric not in last:
            raise ValueError(f"metric {metric!r} is not in the metrics rows of run {str(record.path)!r} "
                             f"(it has: {', '.join(sorted(last))})")
        value = last[metric]
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class CellStats:
    """One metric of one (method, setting) over its seeds."""

    mean: float
    #: population standard deviation (ddof=0)
    std: float
    #: number of seeds
    n: int
    #: time-to-target metrics: the seeds that reached the target (mean and std are over those); None otherwise
    reached: int | None = None


@dataclass(frozen=True)
class Summary:
    """The statistics behind a table. ``cells[(method, label)][metric]`` is a ``CellStats``."""

    metrics: tuple[str, ...]
    #: rows: methods in the papers' order, unknown ones after
    methods: tuple[str, ...]
    #: settings in the order the records first show them
    labels: tuple[str, ...]
    cells: dict[tuple[str, str], dict[str, CellStats]]
    #: seeds of each (method, label), sorted
    seeds: dict[tuple[str, str], tuple[int, ...]]
    #: the rule of each method label (a label of a variant -> its rule's registry name)
    rules: dict[str, str] = field(default_factory=dict)


def summarize(
    records: Sequence[RunRecord],
    metrics: Sequence[str] = ("train_loss", "test_acc"),
    *,
    labels: Sequence[str] | None = None,
) -> Summary:
    """Per (method, setting label): mean and population std over seeds of each metric's final value, and n.

    Settings come in the order the records first show them (``load_runs`` on a sweep folder: sorted by path), or in
    the order of ``labels``, which also keeps only those settings.

    Two runs with the same method, label and seed are an error (one would be counted twice): give them distinct
    labels or pass only one of them. So are two runs of one cell whose configs differ in anything but the seed
    (:func:`~ormo.report.runs.check_one_experiment_per_cell`).
    """
    if not records:
        raise ValueError("summarize() needs at least one run record, got none")
    if isinstance(metrics, str):
        metrics = (metrics,)
    records = select_labels(records, labels)
    check_one_experiment_per_cell(records)
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        group = groups.setdefault((r.method, r.label), [])
        twin = next((o for o in group if o.seed == r.seed), None)
        if twin is not None:
            raise ValueError(f"two runs of method {r.method!r}, label {r.label!r} and seed {r.seed}: "
                             f"{str(twin.path)!r} and {str(r.path)!r}; give the variants distinct method labels "
                             f"(method.label) or pass only one")
        group.append(r)
    cells: dict[tuple[str, str], dict[str, CellStats]] = {}
    for key, group in groups.items():
        cells[key] = {}
        for metric in metrics:
            values = np.array([final_value(r, metric) for r in group], dtype=np.float64)
            reached = None
            if time_to_target(metric) is not None:
                reached = int(np.isfinite(values).sum())
                values = values[np.isfinite(values)] if reached else np.array([math.inf])
            # errstate: a diverged seed (inf) gives a NaN std without a RuntimeWarning; the cell says "diverged".
            with np.errstate(invalid="ignore", over="ignore"):
                cells[key][metric] = CellStats(mean=float(np.mean(values)), std=float(np.std(values, ddof=0)),
                                               n=len(group), reached=reached)
    return Summary(
        metrics=tuple(metrics),
        methods=tuple(method_order((r.method for r in records), _rules_of(records))),
        labels=tuple(dict.fromkeys(r.label for r in records)),
        cells=cells,
        seeds={key: tuple(sorted(r.seed for r in group)) for key, group in groups.items()},
        rules=_rules_of(records),
    )


def select_labels(records: Sequence[RunRecord], labels: Sequence[str] | None) -> list[RunRecord]:
    """The records of the settings in ``labels``, settings in that order (all records, as they are, if None)."""
    if labels is None:
        return list(records)
    if isinstance(labels, str):
        labels = (labels,)
    present = list(dict.fromkeys(r.label for r in records))
    missing = [label for label in labels if label not in present]
    if missing:
        raise ValueError(f"labels {missing!r} match no run; the runs' labels are: {present!r}")
    rank = {label: i for i, label in enumerate(labels)}
    return sorted((r for r in records if r.label in rank), key=lambda r: rank[r.label])


def format_cell(stats: CellStats | None, *, decimals: int = 2) -> str:
    """``"90.95±0.27"``; ``"diverged"`` for a NaN or infinite mean; ``"—"`` where the method has no runs."""
    if stats is None:
        return "—"
    if stats.reached == 0:
        return "not reached"
    if not math.isfinite(stats.mean):
        return "diverged"
    text = f"{stats.mean:.{decimals}f}±{stats.std:.{decimals}f}"
    if stats.reached is not None and stats.reached < stats.n:
        text += f" ({stats.reached}/{stats.n} reached)"
    return text


def _decimals_for(decimals: int | Mapping[str, int], metric: str) -> int:
    return decimals if isinstance(decimals, int) else decimals.get(metric, 2)


def _md(text: str) -> str:
    """Text for one Markdown table cell: a ``|`` in a label would end the cell (and shift every column after it),
    a line break would end the row."""
    return " ".join(text.splitlines()).replace("|", "\\|")


def format_table(summary: Summary, *, decimals: int | Mapping[str, int] = 2,
                 tuned: Mapping[tuple[str, str], str] | None = None, relative_to: str | None = None) -> str:
    """A Markdown table in the papers' layout: one row per method, and for each setting (in first-seen order) one
    column per metric. A cell over fewer seeds than the fullest cell says ``(n=k)``. ``decimals`` is one count for all
    metrics or a per-metric mapping (default 2). ``tuned`` ((method, setting) -> e.g. ``"lr=0.03"``, from a tuned
    sweep) adds a "tuned" column per setting. ``relative_to`` (a method label) adds to each time-to-target cell how
    many times sooner than that method's mean time the method's mean time is (``2.10× sooner``)."""
    if relative_to is not None and relative_to not in summary.methods:
        raise ValueError(f"relative_to {relative_to!r} is not a method of these runs: {', '.join(summary.methods)}")
    if relative_to is not None and not any(time_to_target(m) for m in summary.metrics):
        raise ValueError(f"relative_to {relative_to!r} compares times to a target: add a metric such as "
                         f"time_to_acc:85")
    full = max((st.n for cell in summary.cells.values() for st in cell.values()), default=0)
    tuned = {k: v for k, v in (tuned or {}).items() if k in summary.cells}
    header = ["Method"]
    for label in summary.labels:
        header += [_md(f"{label} {metric_heading(m)}") for m in summary.metrics]
        header += [_md(f"{label} tuned")] if tuned else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for method in summary.methods:
        row = [_md(display_name(method))]
        for label in summary.labels:
            stats = summary.cells.get((method, label), {})
            for m in summary.metrics:
                cell = format_cell(stats.get(m), decimals=_decimals_for(decimals, m))
                if m in stats and stats[m].n < full:  # fewer seeds than the other cells: say so in the cell
                    cell += f" (n={stats[m].n})"
                ref = summary.cells.get((relative_to, label), {}).get(m) if relative_to is not None else None
                if (ref is not None and m in stats and time_to_target(m) is not None and method != relative_to
                        and stats[m].reached and math.isfinite(stats[m].mean) and stats[m].mean > 0):
                    ratio = ref.mean / stats[m].mean
                    cell += ((f" ({ratio:.2f}× sooner)" if ratio >= 1 else f" ({1 / ratio:.2f}× later)")
                             if ref.reached else f" ({display_name(relative_to)} never)")
                row.append(cell)
            if tuned:
                row.append(_md(tuned.get((method, label), "—")))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def format_csv(summary: Summary) -> str:
    """One line per method × setting × metric: method (label), name, label (setting), metric, mean, std, n (full
    precision), rule, and for a time-to-target metric the seeds that reached it (mean and std are over those)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "name", "label", "metric", "mean", "std", "n", "rule", "reached"])
    for method in summary.methods:
        for label in summary.labels:
            stats = summary.cells.get((method, label))
            if stats is None:
                continue
            for metric in summary.metrics:
                s = stats[metric]
                writer.writerow([method, display_name(method), label, metric, repr(s.mean), repr(s.std), s.n,
                                 summary.rules.get(method, method), "" if s.reached is None else s.reached])
    return buf.getvalue()


def write_table(
    records: Sequence[RunRecord],
    out_dir: str | Path,
    *,
    metrics: Sequence[str] = ("train_loss", "test_acc"),
    labels: Sequence[str] | None = None,
    decimals: int | Mapping[str, int] = 2,
    tuned: Mapping[tuple[str, str], str] | None = None,
    relative_to: str | None = None,
) -> str:
    """Summarise ``records`` (see ``summarize``), write ``table.md`` and ``table.csv`` into ``out_dir`` (created if
    needed), and return the Markdown text (``tuned``, ``relative_to``: as :func:`format_table`)."""
    summary = summarize(records, metrics, labels=labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = format_table(summary, decimals=decimals, tuned=tuned, relative_to=relative_to)
    (out / "table.md").write_text(text, encoding="utf-8")
    (out / "table.csv").write_text(format_csv(summary), encoding="utf-8")
    return text
