"""The newcomer's commands: ``ormo --version`` and ``ormo demo --out DIR`` (the packaged quickstart, into DIR)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ormo
from ormo.cli import main
from ormo.experiment import sweep


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"ormo {ormo.__version__}" == "ormo 0.1.0"


@pytest.mark.parametrize("argv, code", [(["ormo", "presets"], 0), (["ormo", "train", "/nonexistent.toml"], 2)])
def test_a_finished_program_ignores_ctrl_c_while_it_exits(argv, code, monkeypatch, capsys):
    # run as the program (argv None), successful or not: a Ctrl-C during the interpreter's exit keeps the status
    # (no traceback from an exit handler, no -2); main(argv) called from Python leaves SIGINT alone
    import signal
    import sys

    before = signal.getsignal(signal.SIGINT)
    try:
        monkeypatch.setattr(sys, "argv", argv)
        assert main() == code
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, before)
        assert main(argv[1:]) == code and signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, before)


def test_demo_runs_the_packaged_quickstart_into_out(tmp_path, monkeypatch):
    # the sweep itself is stubbed (the full quickstart takes ~30 s): what is checked is what it was asked to run
    planned, reported = [], []
    def fake_sweep(runs, **kw):  # "runs" the first run only: the report then covers what is there
        planned.extend(runs)
        import json

        from ormo.experiment import to_toml

        d = runs[0].run_dir
        d.mkdir(parents=True)  # a whole finished run: its config, metrics, and run.json's final row
        (d / "config.toml").write_text(to_toml(runs[0].config))
        row = {"iteration": 10, "epoch": 1.0, "train_loss": 0.5, "test_loss": 0.5, "test_acc": 80.0,
               "sim_time_s": 1.0}
        (d / "metrics.jsonl").write_text(json.dumps(row) + "\n")
        (d / "run.json").write_text(json.dumps({"method": "ormo", "seed": 0, "status": "finished", "final": row}))

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    monkeypatch.setattr("ormo.cli._report", lambda paths, out, **kw: reported.append(out))
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the preset comes from the package
    out = tmp_path / "my-demo"
    assert main(["demo", "--out", str(out), "--jobs", "1"]) == 0
    assert len(planned) == 7 * 2 * 5  # the quickstart's methods x settings x seeds
    assert {r.config.name for r in planned} == {"quickstart"}
    assert all(r.run_dir.is_relative_to(out) for r in planned)
    assert reported == [out]
    assert not (tmp_path / "runs").exists()  # nothing went to the default folder


def test_the_default_run_directory_is_one_folder_under_runs_and_never_taken(tmp_path, monkeypatch):
    # an adversarial read: a name with "../" put the run outside runs/; two runs in one second took one folder
    from ormo.cli import _default_run_dir
    from ormo.experiment import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config("preset:quickstart", ['name="../../../tmp/escape"'])
    first = _default_run_dir(cfg)
    assert first.parent == Path("runs") and "/" not in first.name and not first.name.startswith(".")
    first.mkdir(parents=True)
    second = _default_run_dir(cfg)
    assert second != first and second.parent == Path("runs") and second.name.startswith(first.name)
    long = _default_run_dir(load_config("preset:quickstart", [f'name="{"a" * 300}"']))  # a folder name: <= 255 bytes
    long.mkdir(parents=True)
    assert len(long.name.encode()) <= 255 and long.name.startswith("a" * 100 + "-ormo-")


def test_resuming_a_finished_run_prints_the_same_json_as_the_run(tmp_path, capsys):
    # an adversarial read: the resumed run's JSON gained "val_acc": null (NaN read back from metrics.jsonl)
    import json

    sets = ["--set", "train.epochs=0.1", "--quiet", "--run-dir", str(tmp_path / "r")]
    assert main(["train", "preset:quickstart", *sets]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again == first and "val_acc" not in again


@pytest.mark.parametrize(("damage", "says"), [
    (lambda d: torch.save({"x": 1}, d / "final.pt"), "final.pt holds no 'params' tensor"),
    (lambda d: (d / "metrics.jsonl").write_text(""), "metrics.jsonl has no final row"),
    (lambda d: (d / "metrics.jsonl").write_text("5\n"), "metrics.jsonl cannot be read"),
    (lambda d: (d / "metrics.jsonl").write_text('{"epoch": 1'), "metrics.jsonl cannot be read"),
    (lambda d: (d / "metrics.jsonl").unlink(), "metrics.jsonl: No such file or directory"),
])
def test_resuming_a_finished_run_with_damaged_results_is_one_line(tmp_path, capsys, damage, says):
    # an adversarial read: a final.pt without params was a KeyError traceback, an empty metrics.jsonl an IndexError
    d = tmp_path / "r"
    assert main(["train", "preset:quickstart", "--set", "train.epochs=0.1", "--quiet", "--run-dir", str(d)]) == 0
    damage(d)
    capsys.readouterr()
    assert main(["train", "--resume", str(d)]) == 1
    err = capsys.readouterr().err
    assert says in err and "restore the file, or run it again into a new directory" in err
    assert len(err.strip().splitlines()) == 1


def test_address_is_checked_and_moves_only_a_ray_run(tmp_path, capsys):
    import json

    code = main(["train", "preset:quickstart", "--engine", "ray", "--address", "", "--run-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "invalid ray.address: ''" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()
    assert main(["train", "preset:quickstart", "--set", "train.epochs=0.1", "--quiet", "--run-dir",
                 str(tmp_path / "r")]) == 0
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    (tmp_path / "r" / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))  # as if stopped
    capsys.readouterr()
    code = main(["train", "--resume", str(tmp_path / "r"), "--address", "10.0.0.5:6379"])
    err = capsys.readouterr().err
    assert code == 2 and "is a simulator run: resume it without --address" in err and "Traceback" not in err
