"""Training on the simulator end to end: a short run on digits, resume after a kill, divergence, sweeps and reports."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ormo.experiment import load_config, train
from ormo.experiment.metrics import METRIC_FIELDS, read_metrics
from ormo.experiment.run import read_run_info
from ormo.experiment.sweep import plan_sweep, run_sweep
from ormo.report import load_runs, plot_runs, summarize, write_table
from ormo.rules.base import ConfigError

SMALL = [
    "model.name=mlp",
    "data.batch_size=16",
    "train.num_workers=4",
    "train.epochs=2",
    "train.eval_every=0.5",
    "train.checkpoint_every=0.5",
    "method.lr=0.02",
    "method.momentum=0.9",
    "data.subset=320",
]


def test_short_run_writes_everything(tmp_path):
    cfg = load_config(None, SMALL)
    res = train(cfg, tmp_path / "run", progress=False)
    d = tmp_path / "run"
    for name in ("config.toml", "run.json", "metrics.jsonl", "metrics.csv", "events.jsonl", "checkpoint.pt",
                 "final.pt"):
        assert (d / name).is_file(), name
    info = read_run_info(d)
    assert info["status"] == "finished" and info["seed"] == 0 and info["versions"]["torch"] == torch.__version__
    rows = read_metrics(d)
    assert [r["epoch"] for r in rows] == pytest.approx([0, 0.5, 1.0, 1.5, 2.0], abs=0.05)
    assert set(rows[0]) == set(METRIC_FIELDS)
    assert math.isnan(rows[0]["train_loss"]) and rows[-1]["train_loss"] < rows[1]["train_loss"]
    assert rows[-1]["test_acc"] > 50  # it learns
    assert rows[-1]["iteration"] == len((d / "events.jsonl").read_text().splitlines()) - 1  # one header line
    assert torch.equal(torch.load(d / "final.pt")["params"], res.params)
    assert load_config(d / "config.toml") == cfg
    csv_lines = (d / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(METRIC_FIELDS) and len(csv_lines) == len(rows) + 1


def test_a_config_that_is_not_an_experiment_config_is_one_line(tmp_path):
    # an adversarial read: a path (or a dict) was an AttributeError: 'str' object has no attribute 'train'
    for cfg in ("configs/quickstart.toml", {"train": {}}):
        with pytest.raises(ConfigError, match=rf"invalid cfg: {type(cfg).__name__} \(must be an ExperimentConfig: "
                                              r"ormo.experiment.load_config\(path, overrides\) reads one"):
            train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_existing_run_directory_is_not_overwritten(tmp_path):
    cfg = load_config(None, [*SMALL, "train.epochs=0.25"])
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="already holds a run; continue it with `ormo train --resume"):
        train(cfg, tmp_path / "run", progress=False)
    again = train(None, tmp_path / "run", resume=True, progress=False)  # finished: returns its results
    assert again.final["iteration"] == read_metrics(tmp_path / "run")[-1]["iteration"]
    with pytest.raises(ConfigError, match="no config.toml there"):
        train(None, tmp_path / "elsewhere", resume=True, progress=False)


@pytest.mark.parametrize("method", ["ormo", "orlomo", "ssgdm"])
def test_resume_after_a_kill_at_a_random_point_is_bit_identical(tmp_path, method):
    overrides = [*SMALL, "data.subset=1400", f"method.name={method}", "train.epochs=6", "train.checkpoint_every=0.25",
                 "timing.model=slow_fraction", "timing.fraction=0.5", "timing.slowdown=3.0", "data.augment=true",
                 "method.local_steps=2"]
    reference = train(load_config(None, overrides), tmp_path / "reference", progress=False)

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ormo", "train", "--run-dir", str(run_dir), "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    config_file = tmp_path / "empty.toml"
    config_file.write_text('name = "t"\n')
    proc = subprocess.Popen([*cmd, str(config_file)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(random.Random(method).uniform(0.0, 0.3))  # somewhere after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if read_run_info(run_dir)["status"] == "finished":
        pytest.skip("the run finished before it could be killed (machine too fast for this test's timing)")

    resumed = train(None, run_dir, resume=True, progress=False)
    assert torch.equal(resumed.params, reference.params)
    ref_rows, rows = read_metrics(tmp_path / "reference"), read_metrics(run_dir)
    assert json.dumps(rows) == json.dumps(ref_rows)  # every evaluation, NaN included, bit for bit
    assert (run_dir / "events.jsonl").read_text().splitlines()[1:] == \
        (tmp_path / "reference" / "events.jsonl").read_text().splitlines()[1:]


def test_a_diverging_run_is_recorded_as_diverged(tmp_path):
    cfg = load_config(None, [*SMALL, "method.name=naive-asgdm", "method.lr=1e20", "train.epochs=1"])
    res = train(cfg, tmp_path / "run", progress=False)
    info = read_run_info(tmp_path / "run")
    assert info["status"] == "finished" and "NaN/Inf" in info["diverged"]
    assert math.isnan(res.final["train_loss"]) and 0 <= res.final["test_acc"] <= 100
    assert torch.isfinite(res.params).all()


def test_sweep_table_and_plot_round_trip(tmp_path):
    cfg_file = tmp_path / "sweep.toml"
    cfg_file.write_text(
        'name = "tiny"\n[method]\nlr = 0.02\nmomentum = 0.9\n[model]\nname = "mlp"\n'
        "[data]\nbatch_size = 16\nsubset = 160\n[train]\nepochs = 0.5\nnum_workers = 4\neval_every = 0.25\n"
        '[sweep]\nmethods = ["asgd", "ormo"]\nseeds = [0, 1]\n'
        '[[sweep.settings]]\nlabel = "K=4 hom."\nset = {"timing.model" = "homogeneous"}\n'
        '[[sweep.settings]]\nlabel = "K=4 het."\nset = {"timing.model" = "one_slow", "timing.ratio" = 4.0}\n'
    )
    runs = plan_sweep(cfg_file, out=tmp_path / "out")
    assert len(runs) == 8 and {r.label for r in runs} == {"K=4 hom.", "K=4 het."}
    assert runs[0].run_dir == tmp_path / "out" / "K4-hom" / "asgd" / "seed0"
    outcomes = run_sweep(runs, jobs=2, progress=False)
    assert sorted(o for _, o in outcomes) == ["done"] * 8
    assert sorted(o for _, o in run_sweep(runs, jobs=1, progress=False)) == ["skipped (finished)"] * 8

    records = load_runs([tmp_path / "out"])
    text = write_table(records, tmp_path / "report", labels=["K=4 hom.", "K=4 het."])
    summary = summarize(records)
    finals = [read_metrics(r.run_dir)[-1]["test_acc"] for r in runs if r.method == "ormo" and r.label == "K=4 het."]
    cell = summary.cells[("ormo", "K=4 het.")]["test_acc"]
    assert cell.mean == pytest.approx(sum(finals) / 2) and cell.n == 2
    assert f"{cell.mean:.2f}±{cell.std:.2f}" in text and "OrMo" in text and "ASGD" in text
    pngs = plot_runs(records, tmp_path / "report")
    assert len(pngs) == 2
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_sweep_plan_errors(tmp_path):
    cfg_file = tmp_path / "s.toml"
    cfg_file.write_text('[sweep]\nmethods = ["ormo"]\nrepeat = 3\n')
    with pytest.raises(ConfigError, match="unknown key sweep.repeat"):
        plan_sweep(cfg_file, out=tmp_path)
    cfg_file.write_text('[sweep]\nmethods = [1]\n')
    with pytest.raises(ConfigError, match="sweep.methods entries must be names"):
        plan_sweep(cfg_file, out=tmp_path)
    cfg_file.write_text('[sweep]\nmethods = ["ormo"]\n[[sweep.settings]]\nlabel = "a"\nset = {"train.epochs" = 1}\n')
    with pytest.raises(ConfigError, match="unknown setting 'b'; this sweep has: a"):
        plan_sweep(cfg_file, out=tmp_path, settings=["b"])
    with pytest.raises(ConfigError, match="unknown rule 'nope'"):
        plan_sweep(cfg_file, out=tmp_path, methods=["nope"])


def test_cli_train_and_errors(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('name = "t"\n')
    out = subprocess.run([sys.executable, "-m", "ormo", "train", str(cfg_file), "--run-dir", str(tmp_path / "r"),
                          "--quiet", *sum((["--set", o] for o in [*SMALL, "train.epochs=0.25"]), [])],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["run_dir"] == str(tmp_path / "r")
    bad = subprocess.run([sys.executable, "-m", "ormo", "train", str(cfg_file), "--set", "method.momentum=2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "invalid momentum: 2" in bad.stderr


def test_labels_are_recorded_for_reports(tmp_path):
    cfg = load_config(None, [*SMALL, "train.epochs=0.25", "train.label='K=4 hom.'"])
    train(cfg, tmp_path / "run", progress=False)
    assert read_run_info(tmp_path / "run")["label"] == "K=4 hom."
    assert Path(tmp_path / "run" / "run.json").is_file()


@pytest.mark.parametrize(
    ("preset", "setting", "extra"),
    [
        ("ormo/table1_cifar10.toml", "K=64 het.", []),
        ("orlomo/table2_resnet20_cifar10.toml", "het. K=8 H=8", ["method.local_steps=2"]),
        ("orlomo/table1_squeezenet_cifar100.toml", "hom. K=16 H=32", ["method.local_steps=2"]),
        ("orlomo/table3_extreme_delay.toml", "Slow/Fast=50", ["method.local_steps=2"]),
    ],
)
def test_paper_presets_run_scaled_down(tmp_path, preset, setting, extra):
    """Each paper preset, scaled down from the command line (synthetic 32×32 images in place of the archives, a
    fraction of an epoch), builds its real model and runs to the end."""
    configs = Path(__file__).resolve().parent.parent / "configs"
    overrides = ["data.name=synthetic", "data.options.train_size=256", "data.options.test_size=32",
                 "data.validation=32",  # the presets hold out 5,000 images: more than this scaled-down set has
                 "data.batch_size=16", "train.epochs=0.25", *extra]
    runs = plan_sweep(configs / preset, out=tmp_path, overrides=overrides, seeds=[0], settings=[setting])
    res = train(runs[-1].config, runs[-1].run_dir, progress=False)
    assert res.final["iteration"] > 0 and math.isfinite(res.final["test_loss"])
    assert read_run_info(runs[-1].run_dir)["label"] == setting


@pytest.mark.parametrize("method", ["ormo", "ssgdm"])
def test_ctrl_c_checkpoints_at_an_iteration_boundary_and_resume_is_bit_identical(tmp_path, method):
    """SIGINT mid-run: the run saves a checkpoint at the next iteration boundary and exits; resuming gives the
    uninterrupted result bit for bit (a BatchNorm model, so the BN state's checkpoint is exercised too)."""
    overrides = ["data.name=synthetic", "data.options.train_size=512", "data.options.test_size=32",
                 "data.options.image_shape=[3, 8, 8]", "model.name=resnet20", "data.batch_size=16",
                 f"method.name={method}", "train.num_workers=4", "train.epochs=6", "train.checkpoint_every=0.5",
                 "timing.model=slow_fraction", "timing.fraction=0.5", "method.lr=0.02"]
    reference = train(load_config(None, overrides), tmp_path / "reference", progress=False)
    run_dir = tmp_path / "interrupted"
    config_file = tmp_path / "empty.toml"
    config_file.write_text('name = "t"\n')
    cmd = [sys.executable, "-m", "ormo", "train", str(config_file), "--run-dir", str(run_dir), "--quiet",
           *sum((["--set", o] for o in overrides), [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(random.Random(method + "int").uniform(0.0, 0.2))
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=60)[1].decode()
    if read_run_info(run_dir)["status"] == "finished":
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, stderr
    assert "by SIGINT; checkpoint written; `ormo train --resume" in stderr
    assert read_run_info(run_dir)["status"] == "interrupted"
    resumed = train(None, run_dir, resume=True, progress=False)
    assert torch.equal(resumed.params, reference.params)
    ref_final = torch.load(tmp_path / "reference" / "final.pt")
    final = torch.load(run_dir / "final.pt")
    for key, value in ref_final["model_state"].items():  # BatchNorm statistics and counters included
        assert torch.equal(final["model_state"][key], value), key


def test_command_line_overrides_win_over_the_sweep_settings(tmp_path):
    configs = Path(__file__).resolve().parent.parent / "configs"
    runs = plan_sweep(configs / "orlomo/table2_resnet20_cifar10.toml", out=tmp_path, seeds=[0],
                      overrides=["method.local_steps=2", "train.num_workers=4"], settings=["hom. K=16 H=32"])
    assert runs[0].config.method.local_steps == 2 and runs[0].config.train.num_workers == 4
    assert runs[0].config.train.label == "hom. K=16 H=32"


def test_sweep_variants_of_one_rule_need_their_own_labels(tmp_path):
    cfg_file = tmp_path / "s.toml"
    cfg_file.write_text('[sweep]\nmethods = ["orlomo", {name = "orlomo", set = {"method.local_steps" = 2}}]\n')
    with pytest.raises(ConfigError, match="sweep.methods lists 'orlomo' twice; give each variant its own label"):
        plan_sweep(cfg_file, out=tmp_path)
    cfg_file.write_text('[sweep]\nmethods = ["orlomo", {name = "orlomo", label = "orlomo-H2", '
                        'set = {"method.local_steps" = 2}}]\n')
    runs = plan_sweep(cfg_file, out=tmp_path)
    assert [r.run_dir.parent.name for r in runs] == ["orlomo", "orlomo-H2"]
    assert [r.config.method.local_steps for r in runs] == [None, 2]


def test_a_sweep_refuses_a_directory_of_another_configuration_and_retries_failed_setups(tmp_path):
    cfg_file = tmp_path / "s.toml"
    cfg_file.write_text('[model]\nname = "mlp"\n[data]\nsubset = 64\nbatch_size = 16\n[train]\nepochs = 0.25\n'
                        'num_workers = 2\n[sweep]\nmethods = ["asgd"]\n')
    run_sweep(plan_sweep(cfg_file, out=tmp_path / "out"), jobs=1, progress=False)
    changed = plan_sweep(cfg_file, out=tmp_path / "out", overrides=["train.epochs=0.5"])
    with pytest.raises(ConfigError, match="holds a run of another configuration .*epochs = 0.5"):
        run_sweep(changed, jobs=1, progress=False)
    # a run that failed before its first checkpoint is simply started again
    run = plan_sweep(cfg_file, out=tmp_path / "out2")[0]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.toml").write_text((tmp_path / "out" / run.run_dir.relative_to(tmp_path / "out2") /
                                              "config.toml").read_text())
    (run.run_dir / "run.json").write_text('{"status": "failed", "error": "DatasetError: ..."}')
    assert run_sweep([run], jobs=1, progress=False) == [(str(run.run_dir), "done")]


def test_train_threads_sets_the_runs_thread_count_records_it_and_restores_the_callers(tmp_path):
    import json

    import torch

    from ormo import ConfigError
    from ormo.experiment import load_config
    from ormo.experiment.run import train

    before = torch.get_num_threads()
    cfg = load_config("preset:quickstart", ["train.epochs=0.2", "train.num_workers=2", "train.threads=1"])
    train(cfg, tmp_path / "r", progress=False)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["threads"] == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="train.threads"):
        load_config("preset:quickstart", ["train.threads=0"])


# ---------------------------------------------------------------------------------------------------------------
# an audit: what a resume takes from run.json is checked; a stop waits for no endless message; signals at once


# threads = 10**9 aborted the process in libgomp ("Out of memory allocating 216000001344 bytes"): an adversarial read
@pytest.mark.parametrize(("key", "value"), [("threads", 0), ("threads", [1]), ("threads", "abc"), ("threads", None),
                                            ("threads", 1025), ("threads", 10**9), ("engine", "foo"),
                                            ("engine", ["ray"]),
                                            ("batch_workers", "x"), ("batch_workers", {"mode": "batched"}),
                                            ("batch_workers", {"mode": "batched", "max": "a"}), ("task", "zzz")])
def test_a_hand_edited_run_json_is_refused_by_a_resume_in_one_line(tmp_path, key, value):
    from helpers import stopping_interrupt

    from ormo.experiment import run as run_module

    cfg = load_config(None, [*SMALL, "train.epochs=0.25"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "DeferredInterrupt", stopping_interrupt(run_module.DeferredInterrupt, 4))
        with pytest.raises(KeyboardInterrupt, match="stopped at iteration 5"):
            train(cfg, tmp_path / "r", progress=False)
    path = tmp_path / "r" / "run.json"
    info = json.loads(path.read_text())
    info.pop(key, None) if value is None else info.update({key: value})
    path.write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=rf"its run.json has {key} = .*restore the value the run recorded") as e:
        train(None, tmp_path / "r", resume=True, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["orlomo", "prsgdm", "local-ormo-da", "al-sgd"])
def test_local_steps_beyond_the_cap_are_one_line(name):
    from ormo.rules.base import MAX_LOCAL_STEPS

    with pytest.raises(ConfigError, match=r"invalid local_steps: 1000000 \(must be an integer in \[1, 100,000\]\)"):
        load_config(None, [f"method.name={name}", "method.local_steps=1000000"]).method.build()
    assert load_config(None, [f"method.name={name}", f"method.local_steps={MAX_LOCAL_STEPS}"]).method.build()


def test_a_config_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b'name = "x"\n\xff\n')
    with pytest.raises(ConfigError, match=r"c.toml: not UTF-8 text \(byte 0xff at offset 11\)"):
        load_config(path)


def test_two_signals_at_once_stop_at_once_without_a_traceback(monkeypatch):
    from ormo.experiment.runloop import DeferredInterrupt

    real = signal.signal

    def racy(sig, handler):  # what CPython does when the other signal is already pending
        if sig == signal.SIGTERM and handler is not stop._handle:
            raise OSError("Signal 15 ignored due to race condition")
        return real(sig, handler)

    with DeferredInterrupt() as stop:
        monkeypatch.setattr(signal, "signal", racy)
        stop._handle(signal.SIGINT, None)  # the first: noted, SIGTERM's handler stays ours
        assert stop.requested == signal.SIGINT and signal.SIGTERM in stop._old
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGTERM, None)  # the second: stops now
        monkeypatch.setattr(signal, "signal", real)
    assert signal.getsignal(signal.SIGTERM) is not stop._handle
