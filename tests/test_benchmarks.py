"""`make bench` shows progress: the server-step benchmark prints a line per measured case before its table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "server_step.py"


def test_server_step_prints_a_line_per_case_as_it_goes(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("server_step_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # tiny tensors: the same plan of cases in well under a second
    monkeypatch.setattr(bench, "SIZES", {"0.27M": 4096, "11M": 8192})
    bench.main(["--quick"])
    lines = capsys.readouterr().out.splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("rule "))
    progress = [line for line in lines[:table] if "pairs of" in line and "ratio" in line and "s so far" in line]
    assert [line.split()[:2] for line in progress] == [
        ["ormo", "0.27M:"], ["orlomo", "0.27M:"], ["ormo", "11M:"], ["orlomo", "11M:"]]
