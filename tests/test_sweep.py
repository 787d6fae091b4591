"""Sweeps that never run the wrong experiment: isolated overrides, products of axes, unique folders, honest stops,
reports by method label. Each test reproduces a defect an audit found (issue 7)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ormo import ConfigError
from ormo.cli import main
from ormo.experiment.config import _toml_value, apply_overrides, from_dict, load_config, parse_value
from ormo.experiment.rundir import RunLock
from ormo.experiment.sweep import plan_sweep, record_plan, run_sweep
from ormo.report import load_runs, summarize

TINY = ('name = "tiny"\n[method]\nlr = 0.02\nmomentum = 0.9\n[model]\nname = "mlp"\n'
        '[data]\nbatch_size = 16\nsubset = 160\n[train]\nepochs = 0.5\nnum_workers = 4\neval_every = 0.25\n')


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# configs are values


def test_apply_overrides_never_touches_its_input():
    data = {"method": {"name": "ormo-da", "options": {"delay_rule": "inverse"}}, "schedule": {"milestones": [1.0]}}
    before = copy.deepcopy(data)
    out = apply_overrides(data, ["method.options.delay_rule=drop_above", "train.num_workers=8"])
    out["schedule"]["milestones"].append(2.0)  # the result shares no list or table with the input either
    assert data == before
    assert out["method"]["options"]["delay_rule"] == "drop_above" and out["train"]["num_workers"] == 8


def test_a_method_variant_does_not_leak_into_later_settings_or_methods(tmp_path):
    """The audit's reproduction: the plain ormo-da run of K=8 ran with drop_above on the slow pool."""
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = [{name = "ormo-da", label = "ormo-da-drop", '
                 'set = {"method.options.delay_rule" = "drop_above"}}, "ormo-da"]\n'
                 '[[sweep.settings]]\nlabel = "het"\nset = {"timing.model" = "slow_fraction", '
                 '"timing.fraction" = 0.25, "timing.slowdown" = 4.0}\n'
                 '[[sweep.settings]]\nlabel = "K=8"\nset = {"train.num_workers" = 8}\n')
    runs = {(r.label, r.method): r.config for r in plan_sweep(cfg, out=tmp_path / "out")}
    plain_k8 = runs[("K=8", "ormo-da")]
    assert plain_k8.method.options == {} and plain_k8.timing.model == "homogeneous"
    assert plain_k8.train.num_workers == 8
    assert runs[("K=8", "ormo-da-drop")].method.options == {"delay_rule": "drop_above"}
    assert runs[("K=8", "ormo-da-drop")].timing.model == "homogeneous"
    assert runs[("het", "ormo-da")].method.options == {} and runs[("het", "ormo-da")].train.num_workers == 4


def test_several_grid_flags_form_a_product_and_do_not_leak(tmp_path):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["ormo"]\n')
    runs = plan_sweep(cfg, out=tmp_path / "out", grid=["method.lr=0.01,0.03", "train.num_workers=2,8"])
    got = sorted((r.config.method.lr, r.config.train.num_workers, r.label) for r in runs)
    assert got == [(0.01, 2, "lr=0.01 num_workers=2"), (0.01, 8, "lr=0.01 num_workers=8"),
                   (0.03, 2, "lr=0.03 num_workers=2"), (0.03, 8, "lr=0.03 num_workers=8")]
    # two flags for one key: the first would be dropped without a word (a flag replaces only the config's axis)
    with pytest.raises(ConfigError, match=r"--grid method.lr is given twice \('method.lr=0.01' and 'method.lr=0.03'\); "
                                          r"list every value in one flag, e.g. --grid method.lr=0.01,0.03"):
        plan_sweep(cfg, out=tmp_path / "out", grid=["method.lr=0.01", "method.lr=0.03"])
    twice = _write(tmp_path, TINY + '[sweep]\ngrid = {"method.lr" = [0.1], "method . lr" = [0.2]}\n')
    with pytest.raises(ConfigError, match="sweep.grid sets method.lr twice"):
        plan_sweep(twice, out=tmp_path / "out")


def test_grid_axes_multiply_the_settings_and_the_config_can_declare_them(tmp_path):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd", "ormo"]\nseeds = [0, 1]\n'
                 'grid = {"method.lr" = [0.01, 0.1]}\n'
                 '[[sweep.settings]]\nlabel = "hom"\nset = {}\n'
                 '[[sweep.settings]]\nlabel = "het"\nset = {"timing.model" = "one_slow", "timing.ratio" = 4.0}\n')
    runs = plan_sweep(cfg, out=tmp_path / "out")
    assert len(runs) == 2 * 2 * 2 * 2
    assert list(dict.fromkeys(r.label for r in runs)) == ["hom lr=0.01", "hom lr=0.1", "het lr=0.01", "het lr=0.1"]
    # a --grid flag for the same key replaces the config's axis
    runs = plan_sweep(cfg, out=tmp_path / "out", grid=["method.lr=0.5"])
    assert {r.config.method.lr for r in runs} == {0.5}


_KEYS = {
    "method.lr": st.sampled_from([0.01, 0.02, 0.5]),
    "method.momentum": st.sampled_from([0.0, 0.5, 0.9]),
    "method.options.delay_rule": st.sampled_from(["inverse", "none", "drop_above"]),
    "train.num_workers": st.integers(1, 9),
    "train.weight_decay": st.sampled_from([0.0, 1e-4]),
    "timing.model": st.just("homogeneous"),
    "schedule.milestones": st.sampled_from([[], [0.5], [0.2, 0.4]]),
    "data.batch_size": st.integers(1, 64),
}
_override_tables = st.dictionaries(st.sampled_from(sorted(_KEYS)), st.none(), max_size=3).flatmap(
    lambda d: st.fixed_dictionaries({k: _KEYS[k] for k in d}))


def _expected(base: dict, layers: list[dict]) -> dict:
    """An independent nested merge: a fresh dict per run, built key by key."""
    out = json.loads(json.dumps(base))
    for layer in layers:
        for dotted, value in layer.items():
            node = out
            *path, last = dotted.split(".")
            for k in path:
                node = node.setdefault(k, {})
            node[last] = json.loads(json.dumps(value))
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    settings_=st.lists(_override_tables, min_size=1, max_size=3),
    variants=st.lists(_override_tables, min_size=1, max_size=3),
    cli=_override_tables,
    seeds=st.lists(st.integers(0, 5), min_size=1, max_size=2, unique=True),
)
def test_every_planned_run_is_base_plus_its_own_overrides_and_nothing_else(tmp_path, settings_, variants, cli, seeds):
    base = {"name": "p", "method": {"name": "ormo-da", "lr": 0.1, "options": {"delay_threshold": 3.0}},
            "model": {"name": "mlp"}, "train": {"epochs": 1.0, "num_workers": 4}}
    lines = ['name = "p"', "[method]", 'name = "ormo-da"', "lr = 0.1", "[method.options]", "delay_threshold = 3.0",
             "[model]", 'name = "mlp"', "[train]", "epochs = 1.0", "num_workers = 4", "[sweep]",
             f"seeds = {_toml_value(seeds)}"]
    def inline(t: dict) -> str:
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in t.items()) + "}"

    methods = [f'{{name = "ormo-da", label = "v{i}", set = {inline(t)}}}' for i, t in enumerate(variants)]
    lines.append(f"methods = [{', '.join(methods)}]")
    for i, t in enumerate(settings_):
        lines += ["[[sweep.settings]]", f'label = "s{i}"',
                  f"set = {inline(t)}"]
    path = tmp_path / "prop.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cli_args = [f"{k}={_toml_value(v)}" for k, v in cli.items()]
    runs = plan_sweep(path, out=tmp_path / "out", overrides=cli_args)
    assert len(runs) == len(settings_) * len(variants) * len(seeds)
    for run in runs:
        s, v = int(run.label[1:]), int(run.method[1:])
        layers = [settings_[s], {"method.name": "ormo-da", **variants[v], "method.label": f"v{v}"}, cli,
                  {"train.seed": run.seed, "train.label": run.label}]
        assert run.config == from_dict(_expected(base, layers)), (run.label, run.method, run.seed)


def test_labels_that_share_a_folder_are_an_error_at_planning_time(tmp_path):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["ormo"]\n'
                 '[[sweep.settings]]\nlabel = "K=4 het."\nset = {}\n[[sweep.settings]]\nlabel = "K4 het"\nset = {}\n')
    with pytest.raises(ConfigError, match=r"'K=4 het\.' and 'K4 het' would share the folder 'K4-het'"):
        plan_sweep(cfg, out=tmp_path / "out")
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = [{name = "ormo", label = "a b"}, '
                 '{name = "asgd", label = "a/b"}]\n')
    with pytest.raises(ConfigError, match="method labels 'a b' and 'a/b' would share the folder 'a-b'"):
        plan_sweep(cfg, out=tmp_path / "out")
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["ormo"]\n'
                 '[[sweep.settings]]\nlabel = "x"\nset = {}\n[[sweep.settings]]\nlabel = "x"\nset = {}\n')
    with pytest.raises(ConfigError, match="setting label 'x' is given twice"):
        plan_sweep(cfg, out=tmp_path / "out")


@pytest.mark.parametrize(("label", "folder"), [("sweep.json", "sweep.json"), ("table.md", "table.md"),
                                               ("K=16 het.png", "K16-het.png")])
def test_a_setting_whose_folder_is_a_file_the_sweep_writes_is_an_error_at_planning_time(tmp_path, label, folder):
    # "sweep.json" failed every run of the setting; "x.png" (next to a setting "x", whose plot is x.png) ran every run
    # and failed when the plots were written
    cfg = _write(tmp_path, TINY + f'[sweep]\nmethods = ["ormo"]\n[[sweep.settings]]\nlabel = "{label}"\nset = {{}}\n')
    with pytest.raises(ConfigError, match=f"setting label '{label}' would put its runs in the folder '{folder}', the "
                                          f"name of the sweep's own"):
        plan_sweep(cfg, out=tmp_path / "out")
    with pytest.raises(ConfigError, match=f"setting label '{label}' would put its runs in the folder '{folder}'"):
        plan_sweep(_write(tmp_path, TINY), out=tmp_path / "out", overrides=[f"train.label={_toml_value(label)}"])


def test_an_empty_config_and_a_sweep_without_one_are_errors(tmp_path, capsys):
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="is empty: it sets nothing"):
        load_config(empty)
    with pytest.raises(ConfigError, match="is empty"):
        plan_sweep(empty, out=tmp_path / "out")
    with pytest.raises(ConfigError, match="a sweep needs a CONFIG file"):
        plan_sweep(None, out=tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "config" in capsys.readouterr().err


def test_bad_sweep_values_name_the_key(tmp_path):
    for text, pattern in [
        ('[sweep]\nmethods = []\n', "sweep.methods must be a non-empty list"),
        ('[sweep]\nseeds = [1, 1]\n', "list a seed twice"),
        ('[sweep]\nseeds = 3\n', "sweep.seeds must be a non-empty list"),
        ('[sweep]\ngrid = {"method.lr" = []}\n', r"sweep.grid.method.lr: expected a non-empty list"),
        ('[sweep]\nmethods = [{name = "ormo", set = 3}]\n', "set must be a table of overrides"),
        ('[sweep]\n[[sweep.settings]]\nlabel = "a"\nset = {"train.num_workers" = 0}\n',
         r"setting 'a', method 'ormo': .*train.num_workers"),
        ('[sweep]\n[[sweep.settings]]\nlabel = "a"\nsets = {}\n', "unknown key 'sets'"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            plan_sweep(_write(tmp_path, TINY + text), out=tmp_path / "out")
    with pytest.raises(ConfigError, match="--grid 'method.lr' must look like section.key=v1,v2"):
        plan_sweep(_write(tmp_path, TINY), out=tmp_path / "out", grid=["method.lr"])
    with pytest.raises(ConfigError, match="method.options is 3 in the config, not a table"):
        apply_overrides({"method": {"options": 3}}, ["method.options.x=1"])
    with pytest.raises(ConfigError, match="method is 'ormo' in the config, not a table"):
        apply_overrides({"method": "ormo"}, ["method.lr=1"])


def test_dry_run_prints_each_run_with_its_config_difference(tmp_path, capsys):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd", {name = "ormo", label = "ormo-fast", '
                 'set = {"method.lr" = 0.05}}]\nseeds = [3]\n')
    args = ["sweep", str(cfg), "--out", str(tmp_path / "out"), "--dry-run", "--grid", "train.num_workers=2,4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("# 4 runs = 2 settings × 2 methods × 1 seeds")
    block = out.split(str(tmp_path / "out" / "num-workers2" / "ormo-fast" / "seed3"))[1].split("\n" + str(tmp_path))[0]
    assert "[new]" in block and "method.lr = 0.05   (base: 0.02)" in block
    assert "method.name" not in block and "train.num_workers = 2   (base: 4)" in block  # the base rule is ormo
    assert 'method.name = "asgd"   (base: "ormo")' in out
    assert "train.seed = 3   (base: 0)" in block
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "out"), "--print-config"]) == 0
    full = capsys.readouterr().out
    assert full.count('name = "tiny"') == 2 and "[method]" in full


def test_one_sweep_per_folder_and_an_out_that_is_a_file(tmp_path, capsys):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd"]\n')
    out = tmp_path / "out"
    out.mkdir()
    with RunLock(out):  # another sweep is writing into this folder
        assert main(["sweep", str(cfg), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "is in use by another ormo process (pid" in err and "Traceback" not in err
    assert not list(out.rglob("run.json"))
    (tmp_path / "file").write_text("x")
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "file"), "--quiet"]) == 1
    assert "is a file, not a folder: choose another --out" in capsys.readouterr().err
    # a run directory as --out: `ormo table OUT` would show that one run and never the sweep's (dry run included)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"status": "finished"}')
    for flags in ([], ["--dry-run"]):
        assert main(["sweep", str(cfg), "--out", str(run), "--quiet", *flags]) == 2
        assert f"--out {run} is a run directory (it holds run.json), not a sweep folder" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]


def test_bad_seeds_are_a_clear_error_when_the_plan_is_made(tmp_path, capsys):
    cfg = _write(tmp_path, TINY)
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--seeds", "0,x", "--dry-run"]) == 2
    assert "--seeds '0,x': expected comma-separated integers" in capsys.readouterr().err
    # a seed torch cannot take is refused with the plan (the dry run said [new], the run failed once started)
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--seeds", "0,18446744073709551616",
                 "--dry-run"]) == 2
    assert "invalid train.seed: 18446744073709551616 (must be an integer in [0, 2**64))" in capsys.readouterr().err
    tuned = _write(tmp_path, TINY + '[sweep]\n[sweep.tune]\ngrid = {"train.epochs" = [0.25, 0.5]}\n'
                   'metric = "final_train_loss"\nseeds = [18446744073709551616]\n')
    with pytest.raises(ConfigError, match=r"tuning run of setting .*invalid train.seed: 18446744073709551616"):
        plan_sweep(tuned, out=tmp_path / "o")
    assert load_config(None, ["train.seed=18446744073709551615"]).train.seed == 2**64 - 1


def test_parse_value_bare_words_are_strings():
    assert parse_value("drop_above") == "drop_above" and parse_value("[1, 2]") == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# reports by method label, sweep.json across reruns


@pytest.fixture(scope="module")
def variant_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("variants")
    cfg = _write(tmp, TINY + '[sweep]\nmethods = ["ormo-da", {name = "ormo-da", label = "ormo-da-drop", '
                 'set = {"method.options.delay_rule" = "drop_above", "method.options.delay_threshold" = 2.0}}]\n'
                 'seeds = [0]\n'
                 '[[sweep.settings]]\nlabel = "hom"\nset = {}\n'
                 '[[sweep.settings]]\nlabel = "het"\nset = {"timing.model" = "one_slow", "timing.ratio" = 8.0}\n')
    out = tmp / "out"
    # the README's scale-down advice: one setting first, then the other
    assert main(["sweep", str(cfg), "--out", str(out), "--settings", "het", "--quiet", "--jobs", "2"]) == 0
    assert main(["sweep", str(cfg), "--out", str(out), "--settings", "hom", "--quiet", "--jobs", "2"]) == 0
    return cfg, out


def test_variants_of_one_rule_are_reported_by_label(variant_sweep, capsys):
    _, out = variant_sweep
    records = load_runs(out)
    assert sorted((r.method, r.rule) for r in records) == [("ormo-da", "ormo-da"), ("ormo-da", "ormo-da"),
                                                          ("ormo-da-drop", "ormo-da"), ("ormo-da-drop", "ormo-da")]
    summary = summarize(records)
    assert summary.methods == ("ormo-da", "ormo-da-drop") and summary.rules["ormo-da-drop"] == "ormo-da"
    table = (out / "table.md").read_text()
    assert "| OrMo-DA |" in table and "| ormo-da-drop |" in table


def test_a_rerun_with_a_subset_of_settings_keeps_the_others(variant_sweep, capsys):
    _, out = variant_sweep
    assert json.loads((out / "sweep.json").read_text())["labels"] == ["het", "hom"]
    header = (out / "table.md").read_text().splitlines()[0]
    assert "het train loss" in header and "hom train loss" in header  # the sweep's own final table
    capsys.readouterr()
    assert main(["table", str(out)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.index("het train loss") < header.index("hom train loss")


def test_table_and_plot_write_next_to_the_runs_by_default(variant_sweep, tmp_path, monkeypatch, capsys):
    _, out = variant_sweep
    monkeypatch.chdir(tmp_path)
    for name in ("table.md", "table.csv", "het.png", "hom.png"):
        (out / name).unlink()
    assert main(["table", str(out)]) == 0 and main(["plot", str(out)]) == 0
    assert (out / "table.md").is_file() and (out / "het.png").is_file() and (out / "hom.png").is_file()
    assert not list(tmp_path.iterdir())  # nothing in the current directory
    one_run = out / "het" / "ormo-da" / "seed0"
    assert main(["table", str(one_run)]) == 0 and (one_run.parent / "table.md").is_file()


def test_warnings_are_one_line_without_source(variant_sweep, tmp_path, capsys):
    _, out = variant_sweep
    broken = tmp_path / "runs"
    broken.mkdir()
    shutil.copytree(out / "het", broken / "a")
    running = broken / "b"
    running.mkdir()
    (running / "run.json").write_text('{"method": "ormo", "seed": 0, "status": "running"}')
    assert main(["table", str(broken), "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    warning_lines = [x for x in err.splitlines() if "warning:" in x]
    assert len(warning_lines) == 1 and warning_lines[0].startswith("ormo: warning: skipping 1 unfinished run")
    assert "warnings.warn" not in err and "UserWarning" not in err


def test_rerunning_a_finished_sweep_skips_every_run(variant_sweep):
    cfg, out = variant_sweep
    runs = plan_sweep(cfg, out=out)
    assert sorted(o for _, o in run_sweep(runs, jobs=2, progress=False)) == ["skipped (finished)"] * 4


# ---------------------------------------------------------------------------------------------------------------
# stops: Ctrl-C and SIGTERM stop queueing, running runs checkpoint, no child outlives the sweep


def _children_of(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


@pytest.fixture
def reap():
    """Sweep processes a test started: killed with their children if the test fails half-way."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        for pid in _children_of(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


SLOW = ('name = "slow"\n[method]\nlr = 0.02\n[model]\nname = "mlp"\n[data]\nbatch_size = 8\nsubset = 400\n'
        '[train]\nepochs = 400\nnum_workers = 4\neval_every = 10\ncheckpoint_every = 2\n'
        '[sweep]\nmethods = ["asgd", "ormo", "ssgdm"]\nseeds = [0, 1]\n')


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_sweep_and_a_rerun_continues(tmp_path, sig, code, reap):
    cfg = _write(tmp_path, SLOW)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "ormo", "sweep", str(cfg), "--out", str(out), "--jobs", "2",
                             "--quiet", "--no-report"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    reap.append(proc)
    deadline = time.time() + 120
    while len(list(out.rglob("checkpoint.pt"))) < 2:  # both running runs have checkpointed once
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.time() < deadline
        time.sleep(0.05)
    children = _children_of(proc.pid)
    assert len(children) == 2
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == code, err
    assert "run the same command again to continue" in err and "4 not started" in err, err
    assert not _alive(children)
    started = sorted(p.parent.parent.name for p in out.rglob("run.json"))
    assert len(started) == 2  # queued runs never started
    for info in (json.loads(p.read_text()) for p in out.rglob("run.json")):
        assert info["status"] == "interrupted"


def test_a_killed_sweep_leaves_no_child_behind(tmp_path, reap):
    cfg = _write(tmp_path, SLOW)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ormo", "sweep", str(cfg), "--out", str(out), "--jobs", "2",
                             "--quiet", "--no-report"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reap.append(proc)
    deadline = time.time() + 120
    while len(list(out.rglob("checkpoint.pt"))) < 2:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    children = _children_of(proc.pid)
    assert len(children) == 2
    proc.kill()
    proc.wait()
    deadline = time.time() + 30  # a run alone would take minutes
    while _alive(children):  # they got SIGTERM from the kernel, checkpoint and exit
        assert time.time() < deadline, _alive(children)
        time.sleep(0.1)
    statuses = [json.loads(p.read_text())["status"] for p in out.rglob("run.json")]
    assert statuses and set(statuses) == {"interrupted"}  # each checkpointed on its way out


# ---------------------------------------------------------------------------------------------------------------
# an audit's findings: keys the sweep owns, tables where values belong, damaged sweep.json, commas in labels


@pytest.mark.parametrize(("extra", "kwargs", "pattern"), [
    ("", {"overrides": ["method.name=asgd"]}, "--set sets method.name"),
    ("", {"overrides": ["train.seed=7"]}, "--set sets train.seed"),
    ("", {"overrides": ["method.label=x"]}, "--set sets method.label"),
    ("[[sweep.settings]]\nlabel = \"a\"\nset = {}\n", {"overrides": ["train.label=mine"]},
     "--set sets train.label"),
    ("", {"grid": ["method.name=asgd,ormo"]}, "grid axis method.name sets method.name"),
    ("", {"grid": ["train.seed=3,4"]}, "grid axis train.seed sets train.seed"),
    ("grid = {\"method.label\" = [\"x\", \"y\"]}\n", {}, "grid axis method.label sets method.label"),
    ("[[sweep.settings]]\nlabel = \"a\"\nset = {\"method.name\" = \"asgd\"}\n", {},
     "sweep.settings entry 'a' sets method.name"),
], ids=["set-name", "set-seed", "set-method-label", "set-label", "grid-name", "grid-seed", "toml-grid", "setting"])
def test_keys_the_sweep_sets_for_each_run_are_refused_not_ignored(tmp_path, extra, kwargs, pattern):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["ormo", "ssgdm"]\nseeds = [0]\n' + extra)
    with pytest.raises(ConfigError, match=pattern + ", which the sweep sets for each run"):
        plan_sweep(cfg, out=tmp_path / "out", **kwargs)


@pytest.mark.parametrize(("extra", "kwargs", "pattern"), [
    ("", {"overrides": ["train . seed=7"]}, "--set sets train.seed"),
    ("", {"grid": ["train .seed=3,4"]}, "grid axis train.seed sets train.seed"),
    ("[[sweep.settings]]\nlabel = \"a\"\nset = {\"method. name\" = \"asgd\"}\n", {},
     "sweep.settings entry 'a' sets method.name"),
], ids=["set", "grid", "setting"])
def test_a_key_spelled_with_spaces_around_its_dot_is_the_same_key(tmp_path, extra, kwargs, pattern):
    # apply_overrides reads "train . seed" as train.seed: the checks must see the key that takes effect
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["ormo", "ssgdm"]\nseeds = [0]\n' + extra)
    with pytest.raises(ConfigError, match=pattern + ", which the sweep sets for each run"):
        plan_sweep(cfg, out=tmp_path / "out", **kwargs)


def test_a_grid_flag_spelled_with_spaces_replaces_the_configs_axis(tmp_path):
    cfg = _write(tmp_path, TINY + '[sweep]\ngrid = {"method.lr" = [0.1, 0.2]}\n')
    runs = plan_sweep(cfg, out=tmp_path / "out", grid=["method . lr=0.3"])
    assert [(r.label, r.config.method.lr) for r in runs] == [("lr=0.3", 0.3)]


def test_a_variant_cannot_set_its_seed_or_label_but_a_sweep_without_lists_takes_them_from_set(tmp_path):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = [{name = "ormo", label = "v", set = {"train.seed" = 5}}]\n')
    with pytest.raises(ConfigError, match="sweep.methods entry 'v' sets train.seed"):
        plan_sweep(cfg, out=tmp_path / "out")
    cfg = _write(tmp_path, TINY)  # no [sweep]: --set chooses the one method and the one seed
    runs = plan_sweep(cfg, out=tmp_path / "out", overrides=["method.name=asgd", "train.seed=7"])
    assert [(r.method, r.seed, r.config.method.name, r.config.train.seed) for r in runs] == [("asgd", 7, "asgd", 7)]


def test_an_unquoted_dotted_key_is_a_clear_error(tmp_path):
    for text in ('[[sweep.settings]]\nlabel = "x"\nset = {train.num_workers = 2}\n',
                 'grid = {"method.options" = [{a = 1}]}\n'):
        cfg = _write(tmp_path, TINY + "[sweep]\n" + text)
        with pytest.raises(ConfigError, match=r"is a table, not a value; quote dotted keys"):
            plan_sweep(cfg, out=tmp_path / "out")


def test_duplicate_grid_values_are_compared_as_values(tmp_path):
    with pytest.raises(ConfigError, match="lists a value twice: 0.1, 1e-1"):
        plan_sweep(_write(tmp_path, TINY), out=tmp_path / "out", grid=["method.lr=0.1,1e-1"])


def test_a_damaged_sweep_json_is_rebuilt(tmp_path):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd"]\n')
    runs = plan_sweep(cfg, out=tmp_path / "out")
    (tmp_path / "out").mkdir()
    for text in ('{"labels": "ab", "methods": 5}', "[1, 2]", "{not json"):
        (tmp_path / "out" / "sweep.json").write_text(text)
        record_plan(tmp_path / "out", runs)
        assert json.loads((tmp_path / "out" / "sweep.json").read_text()) == {"labels": ["default"],
                                                                               "methods": ["asgd"],
                                                                               "base": runs[0].base_toml}


def test_settings_flag_takes_a_label_with_a_comma_whole_and_refuses_an_empty_list(tmp_path, capsys):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd"]\n[[sweep.settings]]\nlabel = "K=2, hom"\nset = {}\n'
                 '[[sweep.settings]]\nlabel = "het"\nset = {}\n')
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--settings", "K=2, hom", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("# 1 runs = 1 settings")
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--settings", ",", "--dry-run"]) == 2
    assert "--settings ',' lists nothing" in capsys.readouterr().err
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--settings", "het,,K=2, hom", "--dry-run"]) == 2
    assert "--settings 'het,,K=2, hom' has an empty entry between commas" in capsys.readouterr().err
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--jobs", "0"]) == 2
    err = capsys.readouterr().err
    assert "invalid --jobs: 0" in err and "at a time" not in err


def test_a_sweep_run_replays_bit_identically_and_leaves_no_plan_behind(variant_sweep, capsys):
    """Sweep runs use fewer torch threads than a lone run: replay must use the run's own count (run.json)."""
    _, out = variant_sweep
    assert main(["replay", str(out / "het" / "ormo-da-drop" / "seed0")]) == 0
    assert json.loads(capsys.readouterr().out)["bit_identical"] is True
    assert not (out / ".plan").exists()


def test_a_mismatched_folder_names_the_differing_keys_with_their_section(variant_sweep):
    cfg, out = variant_sweep
    runs = plan_sweep(cfg, out=out, overrides=["method.lr=0.05"], settings=["het"])
    with pytest.raises(ConfigError, match=r"this sweep has: method.lr = 0.05   \(there: 0.02\)"):
        run_sweep(runs, jobs=1, progress=False)


@pytest.mark.parametrize("delay", [0.3, 1.5])
def test_ctrl_c_while_the_cli_starts_is_one_line_and_130(tmp_path, delay):
    """torch is imported inside the commands, where the CLI handles Ctrl-C: no traceback from inside an import."""
    cmd = [sys.executable, "-m", "ormo", "sweep", str(_write(tmp_path, TINY)), "--out", str(tmp_path / "o"), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1].decode()
    if proc.returncode == 0:
        pytest.skip("the sweep finished before the signal arrived")
    # 130, or death by SIGINT when the signal cut torch's import short (the shell reports that as 130 too)
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("ormo sweep: ")
    assert "run the same command again" in err


def test_importing_ormo_and_its_cli_does_not_import_torch():
    code = "import sys, ormo, ormo.cli; assert 'torch' not in sys.modules; print(ormo.make_rule('ormo'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "OrMo(lr=0.1, momentum=0.9)", out.stderr


def test_a_sweep_whose_runs_all_fail_lists_them_without_a_table_error(tmp_path, capsys):
    cfg = _write(tmp_path, TINY.replace("subset = 160\n", f'subset = 160\nname = "cifar10"\ndata_dir = "{tmp_path}"\n')
                 + '[sweep]\nmethods = ["asgd", "ormo"]\n')
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "no finished run under" in err and "ormo sweep: error: 2 of 2 runs failed" in err
    assert "ValueError" not in err and "DatasetError" not in err and "cifar-10-python.tar.gz" in err


def test_sweep_metrics_a_malformed_one_is_refused_before_any_run_and_a_missing_one_keeps_the_runs(tmp_path, capsys):
    cfg = _write(tmp_path, TINY.replace("epochs = 0.5", "epochs = 0.25") + '[sweep]\nmethods = ["asgd"]\n')
    out = tmp_path / "out"
    assert main(["sweep", str(cfg), "--out", str(out), "--quiet", "--metrics", "time_to_acc:200"]) == 2
    assert "ormo sweep: error: --metrics: metric 'time_to_acc:200': expected" in capsys.readouterr().err
    assert not out.exists()  # found before anything ran
    # a metric these runs do not hold is known only once they ran: one line (no class name), and the runs are kept
    assert main(["sweep", str(cfg), "--out", str(out), "--quiet", "--metrics", "val_acc"]) == 1
    err = capsys.readouterr().err
    assert "ormo sweep: error: run " in err and "has no validation split for metric 'val_acc'" in err
    assert "ValueError" not in err and f"the runs are kept: make the table with `ormo table {out}`" in err
    assert [r.finished for r in load_runs(out)] == [True]


def test_gpu_slots_spread_cuda_runs_over_every_gpu_and_refuse_what_cannot_apply(tmp_path):
    """Issue 10: runs on "cuda" get one GPU each (CUDA_VISIBLE_DEVICES), N per GPU; anything else is refused clearly."""
    from ormo.experiment.sweep import gpu_slots

    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd", "ormo"]\nseeds = [0, 1]\n')
    cpu = plan_sweep(cfg, out=tmp_path / "a")
    cuda = plan_sweep(cfg, out=tmp_path / "b", overrides=["train.device=cuda"])
    indexed = plan_sweep(cfg, out=tmp_path / "c", overrides=["train.device=cuda:1"])
    assert gpu_slots(cpu, None) is None and gpu_slots(indexed, None) is None
    assert gpu_slots(cuda, None, visible=2) == [0, 1]
    assert gpu_slots(cuda, 3, visible=2) == [0, 1, 0, 1, 0, 1]
    with pytest.raises(ConfigError, match=r"--runs-per-device 2: the runs train on cpu, not on a GPU"):
        gpu_slots(cpu, 2)
    with pytest.raises(ConfigError, match=r"--runs-per-device 2: the runs name devices \['cuda:1'\]"):
        gpu_slots(indexed, 2)
    with pytest.raises(ConfigError, match=r"invalid --runs-per-device: 0"):
        gpu_slots(cuda, 0, visible=1)
    with pytest.raises(ConfigError, match=r'train.device = "cuda" but this machine has no usable CUDA GPU'):
        gpu_slots(cuda, None, visible=0)


def test_a_sweep_pins_each_worker_to_the_least_busy_gpu(tmp_path, monkeypatch):
    """The workers of a GPU sweep each see one GPU (recorded in run.json); shown on CPU runs by handing the runner
    two slots, as a 2-GPU machine would."""
    from ormo.experiment import sweep as S

    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd", "ormo"]\nseeds = [0, 1]\n')
    runs = plan_sweep(cfg, out=tmp_path / "out")
    monkeypatch.setattr(S, "gpu_slots", lambda runs, per, **kw: [0, 1])
    run_sweep(runs, jobs=None, progress=False)
    seen = [json.loads((r.run_dir / "run.json").read_text())["cuda_visible_devices"] for r in runs]
    assert sorted(set(seen)) == ["0", "1"]  # two workers, one per GPU; each takes the next run when it is free


def test_free_gpu_prefers_the_gpu_with_most_free_slots():
    from types import SimpleNamespace

    from ormo.experiment.sweep import _free_gpu

    live = SimpleNamespace(poll=lambda: None)
    dead = SimpleNamespace(poll=lambda: 1)
    workers = [SimpleNamespace(gpu=0, proc=live), SimpleNamespace(gpu=0, proc=dead), SimpleNamespace(gpu=1, proc=live),
               SimpleNamespace(gpu=0, proc=live)]
    assert _free_gpu([0, 1, 0, 1, 0, 1], workers) == 1  # GPU 0: 2 live of 3, GPU 1: 1 live of 3
    assert _free_gpu([0, 1], []) == 0


def test_runs_per_device_on_cpu_runs_is_one_clear_line(tmp_path, capsys):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["ormo"]\n')
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--runs-per-device", "2"]) == 2
    err = capsys.readouterr().err
    assert "--runs-per-device 2: the runs train on cpu, not on a GPU" in err and "Traceback" not in err


def test_gpu_placement_keeps_the_users_mask_and_jobs_alone_packs_that_many(tmp_path, monkeypatch):
    """The review's cases: a worker's CUDA_VISIBLE_DEVICES is the user's own entry (an index, a UUID), and --jobs N
    without --runs-per-device packs N runs spread evenly over the GPUs."""
    from ormo.experiment.sweep import _visible_device, gpu_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, GPU-abc")
    assert [_visible_device(0), _visible_device(1)] == ["2", "GPU-abc"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _visible_device(1) == "1"
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["ormo"]\n')
    cuda = plan_sweep(cfg, out=tmp_path / "b", overrides=["train.device=cuda"])
    assert gpu_slots(cuda, None, visible=1, jobs=4) == [0, 0, 0, 0]
    assert gpu_slots(cuda, None, visible=2, jobs=3) == [0, 1, 0, 1]
    assert gpu_slots(cuda, 1, visible=2, jobs=3) == [0, 1]  # --runs-per-device wins; --jobs then caps


def test_a_bad_runs_per_device_is_refused_even_in_a_dry_run(tmp_path, capsys):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["ormo"]\n')
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--runs-per-device", "0", "--dry-run"]) == 2
    assert "invalid --runs-per-device: 0 (must be an integer >= 1)" in capsys.readouterr().err


def test_a_sweep_refuses_a_folder_whose_other_seeds_ran_another_configuration(tmp_path, capsys):
    """Seeds run with another --set (or an edited sweep file) would share one table cell with the planned ones."""
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd"]\n')
    out = tmp_path / "out"
    assert main(["sweep", str(cfg), "--out", str(out), "--seeds", "0", "--quiet", "--no-report"]) == 0
    assert main(["sweep", str(cfg), "--out", str(out), "--seeds", "1", "--set", "method.lr=0.05", "--quiet"]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert len(errors) == 1
    err = errors[0]
    assert f"{out / 'default' / 'asgd' / 'seed0'} holds a run of setting 'default', method 'asgd' whose config " \
           f"differs from this sweep's in more than the seed (this sweep has: method.lr = 0.05   (there: 0.02))" in err
    assert "use another --out, or delete those runs" in err
    assert not (out / "default" / "asgd" / "seed1").exists()  # refused before anything ran
    assert main(["sweep", str(cfg), "--out", str(out), "--seeds", "1", "--set", "method.lr=0.05", "--dry-run"]) == 0
    assert "# THE SWEEP WILL REFUSE THIS PLAN: " in capsys.readouterr().out
    # the same config with another seed is one experiment: planned, not refused
    runs = plan_sweep(cfg, out=out, seeds=[1])
    from ormo.experiment.sweep import check_other_seeds

    check_other_seeds(runs)


@pytest.mark.parametrize("flag", ["--settings", "--methods"])
def test_a_partial_sweep_refuses_a_folder_whose_other_cells_ran_another_configuration(tmp_path, capsys, flag):
    """Found by an adversarial read: run one setting (or method), edit the config file, run the other: the folder's
    one table put the two configurations side by side without a word."""
    sweep = ('[sweep]\nmethods = ["asgd", "ormo"]\n[[sweep.settings]]\nlabel = "hom"\n'
             '[[sweep.settings]]\nlabel = "het"\nset = {"timing.model" = "slow_fraction", "timing.fraction" = 0.25, '
             '"timing.slowdown" = 4.0}\n')
    cfg = _write(tmp_path, TINY + sweep)
    out = tmp_path / "out"
    first, second = ("hom", "het") if flag == "--settings" else ("asgd", "ormo")
    if flag == "--methods":  # a second setting would only double the runs
        cfg = _write(tmp_path, TINY + sweep.split("[[sweep.settings]]")[0])
    args = ["sweep", str(cfg), "--out", str(out), "--quiet", "--no-report"]
    assert main([*args, flag, first]) == 0
    cfg.write_text(cfg.read_text().replace("lr = 0.02", "lr = 0.05"))
    capsys.readouterr()
    assert main([*args, flag, second]) == 2
    err = capsys.readouterr().err
    cell = out / "hom" / "asgd" if flag == "--settings" else out / "default" / "asgd"
    assert f"{cell / 'seed0'} holds a run of setting {cell.parent.name!r}, method 'asgd' made with another " \
           f"configuration than this sweep now gives it (now: method.lr = 0.05   (there: 0.02)), so the table of " \
           f"{out} would mix the two; use another --out, or delete those runs and run that setting and method " \
           f"again" in err and "Traceback" not in err and len([x for x in err.splitlines() if "error" in x]) == 1
    assert sorted(p.name for p in (out / cell.parent.name).iterdir()) == (["asgd", "ormo"] if flag == "--settings"
                                                                          else ["asgd"])  # nothing new ran
    assert not (out / "het").exists()
    assert main([*args, flag, second, "--dry-run"]) == 0
    assert "# THE SWEEP WILL REFUSE THIS PLAN: " in capsys.readouterr().out
    # the unchanged configuration continues the folder
    cfg.write_text(cfg.read_text().replace("lr = 0.05", "lr = 0.02"))
    assert main([*args, flag, second]) == 0


def test_a_partial_tuned_sweep_refuses_a_folder_whose_other_cells_ran_another_configuration(tmp_path, capsys):
    """Found by an adversarial read: a tuned cell not run now was never compared (its values are chosen by its own
    tuning), so editing the config between --methods asgd and --methods ormo still mixed the table. Its runs must have
    one of the tune's candidates."""
    cfg = _write(tmp_path, TINY.replace("lr = 0.02\n", "") + '[sweep]\nmethods = ["asgd", "ormo"]\n[sweep.tune]\n'
                 'grid = {"method.lr" = [0.01, 0.02]}\nmetric = "final_train_loss"\nseeds = [7]\n')
    out = tmp_path / "out"
    args = ["sweep", str(cfg), "--out", str(out), "--quiet", "--no-report"]
    assert main([*args, "--methods", "asgd"]) == 0
    capsys.readouterr()
    assert main([*args, "--methods", "ormo", "--dry-run"]) == 0  # unchanged: whichever lr asgd chose fits
    assert "WILL REFUSE" not in capsys.readouterr().out
    for old, new in (("momentum = 0.9", "momentum = 0.5"), ("[0.01, 0.02]", "[0.03, 0.04]")):
        cfg.write_text(cfg.read_text().replace(old, new))
        assert main([*args, "--methods", "ormo"]) == 2
        err = capsys.readouterr().err
        assert f"{out / 'default' / 'asgd' / 'seed0'} holds a run of setting 'default', method 'asgd' made with " \
               f"another configuration than this sweep now gives it (now: method." in err and "Traceback" not in err
        assert not (out / "default" / "ormo").exists() and not (out / ".tuning" / "default" / "ormo").exists()
        cfg.write_text(cfg.read_text().replace(new, old))


def test_a_sweep_on_another_base_is_refused_while_the_folder_holds_cells_it_cannot_check(tmp_path, capsys):
    """An adversarial read: a cell made by --methods X (X not in the config) is outside every plan of the config, so
    an edited config's sweep into the folder put the two bases side by side. sweep.json records the base."""
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd"]\n')
    out = tmp_path / "out"
    args = ["sweep", str(cfg), "--out", str(out), "--quiet", "--no-report"]
    assert main([*args, "--methods", "ormo"]) == 0
    assert "lr = 0.02" in json.loads((out / "sweep.json").read_text())["base"]
    cfg.write_text(cfg.read_text().replace("lr = 0.02", "lr = 0.05"))
    capsys.readouterr()
    assert main([*args, "--methods", "asgd"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'default' / 'ormo' / 'seed0'} was made by a sweep into {out} on another base config than this " \
           f"one (this sweep has: method.lr = 0.05   (there: 0.02)), so the folder's table would mix the two; use " \
           f"another --out, or delete the runs of the old base" in err and "Traceback" not in err
    assert not (out / "default" / "asgd").exists()
    assert main([*args, "--methods", "asgd", "--dry-run"]) == 0
    assert "# THE SWEEP WILL REFUSE THIS PLAN: " in capsys.readouterr().out
    shutil.rmtree(out / "default" / "ormo")  # the old base's runs gone: the folder takes the new base
    assert main([*args, "--methods", "asgd"]) == 0
    assert "lr = 0.05" in json.loads((out / "sweep.json").read_text())["base"]


def test_grid_values_equal_as_numbers_are_one_value(tmp_path):
    with pytest.raises(ConfigError, match="grid axis method.lr lists a value twice: 1, 1.0"):
        plan_sweep(_write(tmp_path, TINY), out=tmp_path / "out", grid=["method.lr=1,1.0"])
    with pytest.raises(ConfigError, match=r"grid axis method.lr lists a value twice: 1, 1.0"):
        plan_sweep(_write(tmp_path, TINY + '[sweep]\ngrid = {"method.lr" = [1, 1.0]}\n'), out=tmp_path / "out")
    # inside a list too: a float field reads [1] and [1.0] alike, so the two points would be one experiment twice
    with pytest.raises(ConfigError, match=r"grid axis schedule.milestones lists a value twice: \[1\], \[1.0\]"):
        plan_sweep(_write(tmp_path, TINY + '[sweep]\ngrid = {"schedule.milestones" = [[1], [1.0]]}\n'),
                   out=tmp_path / "out")


def test_empty_entries_in_grid_and_seeds_flags_are_refused_not_dropped(tmp_path, capsys):
    cfg = _write(tmp_path, TINY)
    with pytest.raises(ConfigError, match=r"--grid 'method.lr=0.1,,0.2' has an empty value between commas"):
        plan_sweep(cfg, out=tmp_path / "out", grid=["method.lr=0.1,,0.2"])
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--seeds", "0,,1", "--dry-run"]) == 2
    assert "--seeds '0,,1' has an empty entry between commas; list each one once, e.g. --seeds 0,1" in \
        capsys.readouterr().err


def test_a_huge_grid_is_refused_from_its_sizes_before_it_is_expanded(tmp_path):
    values = ",".join(str(i) for i in range(1, 1001))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"would plan 2,000,000 runs \(1 × 2 × 1000 × 1000 × 1 × 1: settings × "
                                          r"grid axes × methods × seeds\), more than 100,000"):
        plan_sweep(_write(tmp_path, TINY), out=tmp_path / "out",
                   grid=["method.lr=0.1,0.2", f"train.num_workers={values}", f"data.batch_size={values}"])
    assert time.perf_counter() - start < 5
