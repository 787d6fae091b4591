"""The published evidence (README "Evidence on real data") is what its committed runs say: each folder's table.csv is
rebuilt by `ormo table` from the run records next to it, and every planned run is there and finished."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ormo.cli import main

EVIDENCE = Path(__file__).resolve().parent.parent / "docs" / "evidence"
FOLDERS = sorted(p.name for p in EVIDENCE.iterdir() if p.is_dir())


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", FOLDERS)
def test_each_published_table_is_rebuilt_from_its_runs(tmp_path, name, capsys):
    folder = EVIDENCE / name
    published = _rows(folder / "table.csv")
    metrics = ",".join(dict.fromkeys(r["metric"] for r in published))
    assert main(["table", str(folder), "--metrics", metrics, "--out", str(tmp_path)]) == 0
    rebuilt = _rows(tmp_path / "table.csv")
    assert len(rebuilt) == len(published)
    for a, b in zip(published, rebuilt, strict=True):
        assert (a["name"], a["label"], a["metric"], a["n"]) == (b["name"], b["label"], b["metric"], b["n"])
        assert float(a["mean"]) == pytest.approx(float(b["mean"]), rel=1e-9, nan_ok=True)
    runs = list(folder.glob("*/*/seed*/run.json"))
    assert runs and all(json.loads(r.read_text())["status"] == "finished" for r in runs)


def test_the_orlomo_evidence_covers_all_twelve_settings_with_three_seeds():
    rows = _rows(EVIDENCE / "fmnist-orlomo" / "table.csv")
    settings = {r["label"] for r in rows}
    assert len(settings) == 12 and all(r["n"] == "3" for r in rows)
