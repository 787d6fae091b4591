"""`make bench` shows progress: the server-step benchmark prints a line per measured case before its table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

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


def test_gpu_throughput_measures_all_three_ways_and_projects_table_1(capsys, monkeypatch, tmp_path):
    """The prepared device script also runs on CPU: one tiny case of each way, and the projection lines."""
    monkeypatch.syspath_prepend(str(BENCH.parent))  # importable by name: the packed runs are spawned processes
    bench = importlib.import_module("gpu_throughput")
    monkeypatch.setattr(bench, "MODELS", ("resnet20",))
    monkeypatch.setattr(bench, "KS", (2, 3))
    out = tmp_path / "r.json"
    bench.main(["--seconds", "0.05", "--packed", "2", "--json", str(out)])
    text = capsys.readouterr().out
    import json

    rows = json.loads(out.read_text())
    assert [(r["model"], r["k"]) for r in rows] == [("resnet20", 2), ("resnet20", 3)]
    assert all(r["sequential_per_s"] > 0 and r["batched_per_s"] > 0 and r["packed_per_s"] > 0 for r in rows)
    assert "projected cpu-hours" in text and all(f"  {w}" in text for w in ("sequential", "batched", "packed"))


@pytest.mark.filterwarnings("ignore:train.num_workers = 16 is larger")  # 2 messages: most workers never report
def test_resnet20_run_compares_before_and_after_in_one_run(capsys, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    bench = importlib.import_module("resnet20_run")
    out = tmp_path / "r.json"
    bench.main(["--messages", "2", "--pairs", "1", "--json", str(out)])
    import json

    (row,) = json.loads(out.read_text())
    assert row["before_s"] > 0 and row["after_s"] > 0 and row["ratio"] == row["before_s"] / row["after_s"]
    assert "faster end to end" in capsys.readouterr().out
    from ormo.experiment import problem

    assert problem.EVAL_BATCH == {"cpu": 128}  # the "before" side's setting was put back


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run under the device tool (README)")
def test_a_run_on_cuda_trains_like_the_cpu_run(tmp_path):
    """The CUDA path end to end: the same short run on the GPU and on the CPU reach the same accuracy closely."""
    from ormo.experiment import load_config, train

    finals = []
    for device in ("cpu", "cuda"):
        cfg = load_config("preset:quickstart", ["train.epochs=2", "train.num_workers=4", f"train.device={device}"])
        finals.append(train(cfg, tmp_path / device, progress=False).final)
    assert abs(finals[0]["test_acc"] - finals[1]["test_acc"]) < 2.0
    assert abs(finals[0]["train_loss"] - finals[1]["train_loss"]) < 0.05


@pytest.mark.parametrize("args", [["--seconds", "-1"], ["--seconds", "nan"], ["--seconds", "0"], ["--packed", "0"]])
def test_gpu_throughput_refuses_bad_arguments_in_one_line(capsys, monkeypatch, args):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    bench = importlib.import_module("gpu_throughput")
    with pytest.raises(SystemExit) as info:
        bench.main(args)
    assert info.value.code == 2 and "must be" in capsys.readouterr().err
