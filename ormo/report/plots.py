"""Learning curves per setting: the task's primary metric (test accuracy for image classification, perplexity for the
language model) and the training loss, against epochs and against simulated time.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``) without pyplot, so the
user's backend and pyplot's figure list are left alone. Each method is one line, the mean over its seeds, with a
shaded band from the seeds' minimum to their maximum. Seeds are first interpolated onto a common grid that ends where
the shortest seed ends (a seed that diverged ends at its last finite value), so the mean never mixes in fewer seeds.
Lower-is-better panels (losses, perplexity, errors) use a log axis, as in the papers (a linear one when some value
drawn there is not positive); one legend below the panels serves all four, since a method has the same colour in each.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .runs import RunRecord, check_one_experiment_per_cell, higher_is_better, metric_label, primary_metric
from .tables import display_name, method_order, select_labels

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("ormo.report.plots needs matplotlib (pip install matplotlib)") from e

#: the x axes: (key, title) of the top and bottom rows
_X_AXES = (("epoch", "epochs"), ("sim_time_s", "simulated wall-clock time (s)"))
#: y axis titles of the columns that have their own
_Y_TITLES = {"test_acc": "test accuracy (%)", "val_acc": "validation accuracy (%)", "train_loss": "training loss"}


def plotted_metric(records: Sequence[RunRecord]) -> str:
    """The left panels' column: the task's primary metric on the test split, or on the validation split when no run
    has a test value (tuning runs), e.g. ``test_acc``."""
    primary = primary_metric(records[0])
    has_test = any(np.isfinite(np.array([r.get(f"test_{primary}", np.nan) for r in rec.metrics], dtype=float)).any()
                   for rec in records)
    return f"test_{primary}" if has_test else f"val_{primary}"


def _y_title(records: Sequence[RunRecord], key: str) -> str:
    if key in _Y_TITLES:
        return _Y_TITLES[key]
    split, _, name = key.partition("_")
    return f"{'validation' if split == 'val' else split} {metric_label(records[0], name)}"


def _panels(records: Sequence[RunRecord], metric: str | None) -> dict[tuple[int, int], tuple[str, str, str, str]]:
    """(row, column) of each panel: (y metric, y axis title, x key, x axis title)."""
    left = metric or plotted_metric(records)
    return {(row, col): (y, _y_title(records, y), x, x_title)
            for row, (x, x_title) in enumerate(_X_AXES) for col, y in enumerate((left, "train_loss"))}

#: points of the common simulated-time grid
_TIME_GRID_POINTS = 200


def slugify(label: str) -> str:
    """A file-name stem for a setting label: ``"K=16 het."`` -> ``"k-16-het"``."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "setting"


def _finite_curve(rows: Sequence[dict], x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One seed's (x, y) points, sorted by x, up to its first non-finite y after the first finite one.

    Leading NaNs (the epoch-0 row has no training loss) are dropped; a NaN later on means the run diverged there,
    so the curve stops (later points would only be interpolated across the divergence).
    """
    x = np.array([r.get(x_key, np.nan) for r in rows], dtype=np.float64)
    y = np.array([r.get(y_key, np.nan) for r in rows], dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.any():
        return x[:0], y[:0]
    start = int(np.argmax(finite))
    gaps = np.flatnonzero(~finite[start:])
    stop = start + int(gaps[0]) if gaps.size else len(finite)
    x, y = x[start:stop], y[start:stop]
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def mean_band(
    curves: Sequence[tuple[np.ndarray, np.ndarray]], *, time_grid: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(grid, mean, min, max) over seeds' curves, each interpolated linearly onto one grid.

    The grid spans the range every curve covers (latest start .. earliest end). With ``time_grid`` it is
    ``_TIME_GRID_POINTS`` evenly spaced times; otherwise it is the union of the curves' own x values in that range
    (evaluation epochs, which usually coincide, so no value is interpolated). Empty arrays if the range is empty.
    """
    curves = [c for c in curves if len(c[0])]
    if not curves:
        empty = np.empty(0)
        return empty, empty, empty, empty
    lo = max(float(x[0]) for x, _ in curves)
    hi = min(float(x[-1]) for x, _ in curves)
    if lo > hi:
        empty = np.empty(0)
        return empty, empty, empty, empty
    if time_grid:
        grid = np.linspace(lo, hi, _TIME_GRID_POINTS) if hi > lo else np.array([lo])
    else:
        xs = np.concatenate([x for x, _ in curves])
        grid = np.unique(xs[(xs >= lo) & (xs <= hi)])
    stacked = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, stacked.mean(axis=0), stacked.min(axis=0), stacked.max(axis=0)


def setting_figure(label: str, records: Sequence[RunRecord], *, metric: str | None = None) -> Figure:
    """The four-panel figure of one setting's runs (see ``plot_runs``), drawn on an Agg canvas, not saved."""
    fig = Figure(figsize=(11.0, 8.0), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to fig: savefig renders with Agg whatever the user's backend is
    axes = fig.subplots(2, 2, squeeze=False)
    fig.suptitle(label)
    methods = method_order((r.method for r in records), {r.method: r.rule for r in records})
    legend: dict[str, object] = {}  # label -> line, first seen; a method missing from one panel is in another
    for (row, col), (y_key, y_title, x_key, x_title) in _panels(records, metric).items():
        ax = axes[row][col]
        lowest = np.inf  # the smallest value drawn in this panel (band included) decides the loss axis scale
        for index, method in enumerate(methods):
            seeds = [r for r in records if r.method == method]
            curves = [_finite_curve(r.metrics, x_key, y_key) for r in seeds]
            grid, mean, low, high = mean_band(curves, time_grid=(x_key == "sim_time_s"))
            if not len(grid):
                continue
            color = f"C{index % 10}"  # the same colour for a method in all four panels
            (line,) = ax.plot(grid, mean, color=color, marker="o" if len(grid) == 1 else None,
                              label=f"{display_name(method)} (n={len(seeds)})")
            legend.setdefault(line.get_label(), line)
            lowest = min(lowest, float(low.min()))
            if len(seeds) > 1:
                ax.fill_between(grid, low, high, color=color, alpha=0.2, linewidth=0)
        lower_better = not higher_is_better(records[0], y_key)
        if lower_better and 0.0 < lowest < np.inf:  # log of a non-positive value would hide the curve
            ax.set_yscale("log")
        ax.set_xlabel(x_title)
        ax.set_ylabel(y_title)
        ax.set_title(f"{label}: {y_title} vs {'epochs' if x_key == 'epoch' else 'simulated time'}", fontsize=10)
        ax.grid(True, alpha=0.3, which="both" if ax.get_yscale() == "log" else "major")
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=min(len(legend), 4),
                   fontsize="small")
    return fig


def _draw_setting(label: str, records: Sequence[RunRecord], path: Path, *, dpi: int, metric: str | None) -> None:
    setting_figure(label, records, metric=metric).savefig(path, dpi=dpi)


def plot_runs(
    records: Sequence[RunRecord], out_dir: str | Path, *, labels: Sequence[str] | None = None, dpi: int = 100,
    metric: str | None = None,
) -> list[Path]:
    """One PNG per setting label, ``<out_dir>/<slug>.png``, in first-seen label order (or that of ``labels``, which
    also keeps only those settings); returns their paths.

    Each figure has four panels: ``metric`` (default: the task's primary metric on the test split, e.g. test
    accuracy, see :func:`plotted_metric`) and the training loss against epochs (top) and against simulated
    wall-clock time ``sim_time_s`` (bottom); lower-is-better metrics on a log axis; one legend below them. Labels
    whose slugs collide get ``-2``, ``-3``, ... appended. With ``metric`` given, the files are
    ``<slug>.<metric>.png`` (a slug holds no ".", so it never lands on another setting's default plot).
    """
    if not records:
        raise ValueError("plot_runs() needs at least one run record, got none")
    records = select_labels(records, labels)
    check_one_experiment_per_cell(records)  # a line is one experiment's mean over seeds
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    used: set[str] = set()
    for label in dict.fromkeys(r.label for r in records):
        stem, k = slugify(label), 1
        while (stem if k == 1 else f"{stem}-{k}") in used:
            k += 1
        stem = stem if k == 1 else f"{stem}-{k}"
        used.add(stem)
        # another metric than the default gets its own files: it never replaces the folder's default plots
        path = out / (f"{stem}.png" if metric is None else f"{stem}.{slugify(metric)}.png")
        _draw_setting(label, [r for r in records if r.label == label], path, dpi=dpi, metric=metric)
        paths.append(path)
    return paths
