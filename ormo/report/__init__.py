"""Tables and plots from run directories. Reads files only: nothing here imports training code.

``plot_runs`` needs matplotlib; it is imported on first use, so tables work without it.
"""

from typing import Any

from .runs import RunRecord, derived_label, find_runs, load_runs, read_run
from .tables import (
    METHOD_NAMES,
    CellStats,
    Summary,
    display_name,
    final_value,
    format_table,
    method_order,
    select_labels,
    summarize,
    write_table,
)

__all__ = [
    "METHOD_NAMES",
    "CellStats",
    "RunRecord",
    "Summary",
    "derived_label",
    "display_name",
    "final_value",
    "find_runs",
    "format_table",
    "load_runs",
    "method_order",
    "plot_runs",
    "read_run",
    "select_labels",
    "summarize",
    "write_table",
]


def __getattr__(name: str) -> Any:
    if name == "plot_runs":
        from .plots import plot_runs

        return plot_runs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
