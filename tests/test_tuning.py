"""A sweep's tuning protocol (issue 8): values chosen per method and setting (or shared) on the validation split,
never on the test split, recorded, resumable; and the tables' time-to-accuracy metric."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ormo import ConfigError
from ormo.cli import main
from ormo.experiment.config import from_dict, load_config
from ormo.experiment.metrics import read_metrics
from ormo.experiment.problem import TrainProblem
from ormo.experiment.sweep import plan_sweep, plan_tuning
from ormo.experiment.tuning import Choice, TuneSpec, choose, format_tuning_record, run_score, tuning_record
from ormo.report import load_runs, summarize
from ormo.report.runs import RunRecord
from ormo.report.tables import final_value, format_table

TINY = ('name = "tiny"\n[method]\nlr = 0.02\nmomentum = 0.9\n[model]\nname = "mlp"\n'
        '[data]\nbatch_size = 16\nsubset = 240\nvalidation = 60\n[train]\nepochs = 0.5\nnum_workers = 4\n'
        'eval_every = 0.25\n')
TUNE = '[sweep.tune]\ngrid = {"method.lr" = [0.002, 0.05]}\nseeds = [11]\n'


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# planning and its errors


def test_a_huge_tuning_grid_counts_against_the_run_cap_before_it_is_expanded(tmp_path):
    import time

    values = ", ".join(str(i) for i in range(1, 1001))
    text = (TINY + '[sweep]\nmethods = ["asgd", "ormo"]\n[sweep.tune]\n'
            f'grid = {{"method.lr" = [{", ".join(str(i / 1000) for i in range(1, 1001))}], '
            f'"train.num_workers" = [{values}]}}\nseeds = [11]\n')
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"would plan 2 runs and up to 2,000,000 tuning runs \(1 × 2 × 1000 × 1000 × "
                                          r"1: settings × grid axes × methods × candidates per tuned key × tuning "
                                          r"seeds\), more than 100,000 in all"):
        plan_sweep(_write(tmp_path, text), out=tmp_path / "out")
    assert time.perf_counter() - start < 5
    assert len(plan_sweep(_write(tmp_path, TINY + TUNE), out=tmp_path / "ok")) == 1  # a small one plans


def test_a_tuned_plan_has_tuning_runs_that_never_evaluate_the_test_split(tmp_path):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd", "ormo"]\nseeds = [0, 1]\n' + TUNE
                 + 'set = {"train.epochs" = 0.25}\n')
    runs = plan_sweep(cfg, out=tmp_path / "out")
    tuning = plan_tuning(runs)
    assert len(runs) == 4 and len(tuning) == 4  # 2 methods × 2 candidates × 1 tuning seed
    for r in tuning:
        assert r.config.train.eval_test is False and r.config.train.seed == 11 and r.config.train.epochs == 0.25
        assert r.run_dir.relative_to(tmp_path / "out").parts[0] == ".tuning"
        assert r.config.method.lr in (0.002, 0.05)
    assert {r.config.train.label for r in tuning} == {"default lr=0.002", "default lr=0.05"}
    for r in runs:  # the real runs evaluate the test split and keep the base value until tuning chose
        assert r.config.train.eval_test is True and r.config.method.lr == 0.02


@pytest.mark.parametrize("extra, pattern", [
    ('[sweep.tune]\n', "sweep.tune.grid must be a non-empty table"),
    ('[sweep.tune]\ngrid = {"method.lr" = []}\n', "non-empty list of candidate values"),
    ('[sweep.tune]\ngrid = {"method.lr" = [0.1, 1e-1]}\n', "lists a value twice"),
    ('[sweep.tune]\ngrid = {"method.lr" = [1, 1.0]}\n', "lists a value twice"),
    ('[sweep.tune]\ngrid = {"method.lr" = [0.1], "method . lr" = [0.2]}\n', "sweep.tune.grid sets method.lr twice"),
    ('[sweep.tune]\ngrid = {"schedule.milestones" = [[1], [1.0]]}\n', "lists a value twice"),
    (TUNE + 'metric = "test_acc"\n', "invalid sweep.tune.metric 'test_acc'.*never reads the test split"),
    (TUNE + 'scope = "everything"\n', "invalid sweep.tune.scope"),
    (TUNE + 'reference = "asgd"\n', "scope = \"shared\""),
    (TUNE + 'scope = "shared"\nreference = "sgd"\n', "reference 'sgd' is not one of this sweep's methods"),
    (TUNE + 'seeds = []\n', None),  # TOML: a key given twice is the file's error
    (TUNE.replace("seeds = [11]", "seeds = [1, 1]"), "lists a seed twice"),
    (TUNE + 'set = {"method.lr" = 0.1}\n', "sweep.tune.set sets method.lr, which sweep.tune.grid tunes"),
    (TUNE + 'set = {"train.eval_test" = true}\n', "which the tuning runs set themselves"),
    (TUNE + 'colour = 1\n', "unknown key sweep.tune.colour"),
    (TUNE + 'metric = ["final_val_acc"]\n', "invalid sweep.tune.metric"),
    (TUNE + 'set = {"method.lr " = 0.3}\n', "sweep.tune.set sets method.lr, which sweep.tune.grid tunes"),
    (TUNE + 'set = {"method . name" = "ormo"}\n', "sweep.tune.set sets method.name, which the tuning runs set"),
    ('[sweep.tune]\ngrid = {"train .seed" = [1, 2]}\n', "train.seed"),
    (TUNE + 'budget = 0\n', "invalid sweep.tune.budget 0"),
    (TUNE + 'budget = 1.5\n', "a number in \\(0, 1\\]"),
    ('[sweep.tune]\ngrid = {"train.seed" = [1, 2]}\n', "train.seed"),
])
def test_bad_tune_sections_are_one_clear_error(tmp_path, extra, pattern):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd", "ormo"]\n' + extra)
    with pytest.raises(ConfigError, match=pattern):
        plan_sweep(cfg, out=tmp_path / "out")


@pytest.mark.parametrize("where", ["--set", "--set spaced", "setting", "method"])
def test_a_tuned_key_set_elsewhere_is_refused_not_silently_replaced(tmp_path, where):
    sweep = '[sweep]\nmethods = ["asgd"]\n'
    overrides = []
    if where == "--set":
        overrides = ["method.lr=0.3"]
    elif where == "--set spaced":  # apply_overrides reads "method . lr" as method.lr
        overrides = ["method . lr=0.3"]
    elif where == "setting":
        sweep += '[[sweep.settings]]\nlabel = "a"\nset = {"method.lr" = 0.3}\n'
    else:
        sweep = '[sweep]\nmethods = [{name = "asgd", label = "fast", set = {"method.lr" = 0.3}}]\n'
    cfg = _write(tmp_path, TINY + sweep + TUNE)
    with pytest.raises(ConfigError, match="sets method.lr, which sweep.tune.grid tunes"):
        plan_sweep(cfg, out=tmp_path / "out", overrides=overrides)


def test_a_validation_metric_without_a_validation_split_is_an_error_naming_the_fix(tmp_path):
    cfg = _write(tmp_path, TINY.replace("validation = 60\n", "") + '[sweep]\nmethods = ["asgd"]\n' + TUNE)
    with pytest.raises(ConfigError, match="set data.validation"):
        plan_sweep(cfg, out=tmp_path / "out")
    # the training loss needs none
    plan_sweep(_write(tmp_path, TINY.replace("validation = 60\n", "") + '[sweep]\nmethods = ["asgd"]\n' + TUNE
                      + 'metric = "final_train_loss"\n'), out=tmp_path / "out")


def test_a_tuning_budget_shortens_the_tuning_runs_and_scales_their_schedule(tmp_path):
    cfg = _write(tmp_path, TINY.replace("[train]", "[schedule]\nmilestones = [0.3, 0.4]\nwarmup_epochs = 0.1\n[train]")
                 + '[sweep]\nmethods = ["asgd"]\n' + TUNE + 'budget = 0.5\n')
    runs = plan_sweep(cfg, out=tmp_path / "o", overrides=["train.epochs=0.8"])  # --set scales too
    for r in plan_tuning(runs):
        assert r.config.train.epochs == 0.4
        assert r.config.schedule.milestones == [0.15, 0.2] and r.config.schedule.warmup_epochs == 0.05
    assert runs[0].config.train.epochs == 0.8 and runs[0].config.schedule.milestones == [0.3, 0.4]


def test_tune_scope_off_runs_the_base_values_and_a_scope_without_a_section_is_an_error(tmp_path):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd"]\n' + TUNE)
    assert plan_tuning(plan_sweep(cfg, out=tmp_path / "o", tune_scope="off")) == []
    bare = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd"]\n')
    with pytest.raises(ConfigError, match="needs a \\[sweep.tune\\] section"):
        plan_sweep(bare, out=tmp_path / "o", tune_scope="shared")


def test_shared_scope_with_a_reference_tunes_the_reference_alone(tmp_path):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd", "ormo"]\n' + TUNE
                 + 'scope = "shared"\nreference = "asgd"\n')
    tuning = plan_tuning(plan_sweep(cfg, out=tmp_path / "o"))
    assert {r.method for r in tuning} == {"asgd"} and len(tuning) == 2


# ---------------------------------------------------------------------------------------------------------------
# choosing


def _spec(scope: str = "method", reference: str | None = None, metric: str = "final_val_acc",
          seeds: tuple[int, ...] = (1, 2)) -> TuneSpec:
    return TuneSpec(axes=(("method.lr", ("0.01", "0.1", "1.0")),), seeds=seeds, metric=metric, scope=scope,
                    reference=reference, extra=())


def _cells(scores: dict[str, list[list[float]]]) -> dict:
    labels = ["lr=0.01", "lr=0.1", "lr=1.0"]
    return {("s", m): {lab: dict(zip((1, 2), per, strict=True)) for lab, per in zip(labels, rows, strict=True)}
            for m, rows in scores.items()}


def test_choose_per_method_takes_the_best_mean_and_a_diverged_seed_never_wins():
    cells = _cells({"a": [[50, 60], [70, 72], [99, math.nan]],   # lr=1.0 diverged on one seed: never chosen
                    "b": [[80, 80], [80, 80], [10, 10]]})         # a tie: the first listed wins
    choices = choose(_spec(), cells, {"s": ["a", "b"]})
    assert [(c.method, c.label) for c in choices] == [("a", "lr=0.1"), ("b", "lr=0.01")]
    assert choices[0].scores[1][2] == pytest.approx(71.0) and math.isnan(choices[0].scores[2][2])
    assert choices[0].overrides == ("method.lr=0.1",)


def test_choose_lower_is_better_for_losses_and_none_when_everything_diverged():
    cells = _cells({"a": [[0.5, 0.7], [0.2, 0.4], [0.1, 2.0]], "b": [[math.nan] * 2] * 3})
    choices = choose(_spec(metric="final_train_loss"), cells, {"s": ["a", "b"]})
    assert choices[0].label == "lr=0.1"  # mean 0.3 < 0.6 < 1.05
    assert choices[1].chosen is None and choices[1].overrides == ()


def test_choose_shared_uses_the_mean_over_methods_or_the_reference_alone():
    cells = _cells({"a": [[90, 90], [50, 50], [10, 10]], "b": [[10, 10], [60, 60], [95, 95]]})
    shared = choose(_spec("shared"), cells, {"s": ["a", "b"]})
    assert len(shared) == 1 and shared[0].method is None and shared[0].label == "lr=0.1"  # 55 > 52.5 > 50
    ref = choose(_spec("shared", "a"), cells, {"s": ["a", "b"]})
    assert ref[0].label == "lr=0.01"
    assert isinstance(ref[0], Choice)


def test_a_pipe_in_a_method_label_stays_inside_its_cell_of_tuning_md():
    cells = {("K=4 | hom", "ormo|b"): _cells({"m": [[50, 60], [70, 72], [10, 10]]})[("s", "m")]}
    text = format_tuning_record(tuning_record(_spec(), choose(_spec(), cells, {"K=4 | hom": ["ormo|b"]})))
    assert "| ormo\\|b | 55 | **71** | 10 | lr=0.1 |" in text.splitlines()


# ---------------------------------------------------------------------------------------------------------------
# a real tuned sweep


@pytest.fixture(scope="module")
def tuned_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tuned")
    cfg = _write(tmp, TINY + '[sweep]\nmethods = ["asgd", "ormo"]\nseeds = [0, 1]\n' + TUNE)
    out = tmp / "out"
    assert main(["sweep", str(cfg), "--out", str(out), "--quiet", "--jobs", "2"]) == 0
    return cfg, out


def _independent_choice(out: Path, method: str) -> tuple[str, dict[str, float]]:
    """The choice recomputed from the tuning runs' own metrics files: the last row's val_acc, best first."""
    scores = {}
    for run in sorted((out / ".tuning" / "default" / method).glob("*/seed11")):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        scores[run.parent.name] = rows[-1]["val_acc"]
    best = max(scores.values())
    return next(k for k, v in scores.items() if v == best), scores


def test_a_tuned_sweep_runs_the_real_seeds_at_the_value_its_validation_scores_pick(tuned_sweep):
    _, out = tuned_sweep
    record = json.loads((out / "sweep.json").read_text())["tuning"]
    assert record["metric"] == "final_val_acc" and record["scope"] == "method"
    for method in ("asgd", "ormo"):
        slug, scores = _independent_choice(out, method)
        choice = next(c for c in record["choices"] if c["method"] == method)
        assert choice["chosen"].replace("=", "") == slug
        assert [c["score"] for c in choice["candidates"]] == [scores["lr0.002"], scores["lr0.05"]]
        for seed in (0, 1):
            real = load_config(out / "default" / method / f"seed{seed}" / "config.toml")
            assert real.method.lr == float(choice["values"]["method.lr"]) and real.train.eval_test is True
    text = (out / "tuning.md").read_text()
    assert "| asgd |" in text and "**" in text
    table = (out / "table.md").read_text()
    assert "default tuned" in table and "lr=" in table


def test_tuning_runs_hold_no_test_metric_and_tables_skip_them(tuned_sweep):
    _, out = tuned_sweep
    tuning_dirs = sorted(p.parent for p in (out / ".tuning").rglob("run.json"))
    assert len(tuning_dirs) == 4
    for d in tuning_dirs:
        rows = read_metrics(d)
        assert rows and all(math.isnan(r["test_acc"]) and math.isnan(r["test_loss"]) for r in rows)
        assert all(math.isfinite(r["val_acc"]) for r in rows)
    assert len(load_runs(out)) == 4  # the real runs only
    with pytest.raises(ValueError, match="eval_test = false"):
        summarize(load_runs(out / ".tuning"), ("test_acc",))
    assert summarize(load_runs(out / ".tuning"), ("val_acc",)).labels == ("default lr=0.002", "default lr=0.05")


def test_rerunning_a_tuned_sweep_runs_nothing_again(tuned_sweep, capsys):
    cfg, out = tuned_sweep
    before = {p: p.stat().st_mtime_ns for p in out.rglob("final.pt")}
    assert len(before) == 8
    assert main(["sweep", str(cfg), "--out", str(out), "--quiet", "--no-report"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("final.pt")} == before


def test_a_tuned_sweep_with_another_scope_in_the_same_folder_is_refused(tuned_sweep, capsys):
    cfg, out = tuned_sweep
    record = json.loads((out / "sweep.json").read_text())["tuning"]
    if all(c["chosen"] == "lr=0.02" for c in record["choices"]):  # pragma: no cover - the base value is no candidate
        pytest.skip("the tuned value equals the base value")
    assert main(["sweep", str(cfg), "--out", str(out), "--quiet", "--tune-scope", "off"]) == 2
    assert "holds a run of another configuration" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the test split is never read while choosing


def _idx(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _fashion_files(folder: Path, *, test_seed: int) -> None:
    """Full-size Fashion-MNIST IDX files: the same training images in every folder, test images and labels from
    ``test_seed`` (learnable: each class brightens its own band of rows)."""
    folder.mkdir(parents=True)
    for prefix, per_class, seed in (("train", 6000, 0), ("t10k", 1000, test_seed)):
        rng = np.random.default_rng(seed)
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        images = rng.integers(0, 120, (labels.size, 28, 28), dtype=np.uint8)
        for c in range(10):
            images[labels == c, 2 * c + 4: 2 * c + 7, :] += 120
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(2051, images))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(2049, labels))


def test_selection_is_identical_whatever_the_test_split_holds(tmp_path):
    """Two sweeps that differ only in the test split's files: the tuning scores and choices are equal bit for bit,
    while the real runs' test metrics differ (so they did read their own test split)."""
    base = TINY.replace('name = "mlp"', 'name = "mlp-small"').replace("subset = 240", "subset = 600")
    results = {}
    for name, test_seed in (("a", 1), ("b", 2)):
        _fashion_files(tmp_path / name / "fashion-mnist", test_seed=test_seed)
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(base.replace("[data]\n", f'[data]\nname = "fashion-mnist"\ndata_dir = '
                                    f'"{tmp_path / name}"\n') + '[sweep]\nmethods = ["ormo"]\nseeds = [0]\n' + TUNE)
        out = tmp_path / f"out-{name}"
        assert main(["sweep", str(cfg), "--out", str(out), "--quiet", "--no-report"]) == 0
        record = json.loads((out / "sweep.json").read_text())["tuning"]["choices"]
        final = read_metrics(next((out / "default").rglob("metrics.jsonl")).parent)
        results[name] = (record, [r["test_loss"] for r in final])
    assert results["a"][0] == results["b"][0]
    assert results["a"][1] != results["b"][1]


def test_a_problem_without_test_evaluation_never_keeps_the_test_split():
    cfg = from_dict({"model": {"name": "mlp"}, "data": {"name": "digits", "subset": 100, "validation": 20},
                     "train": {"num_workers": 2, "eval_test": False}})
    problem = TrainProblem(cfg)
    assert problem.test_x is None and problem.test_y is None
    assert problem.evaluate(problem.params0) == (None, None)
    loss, acc = problem.evaluate_validation(problem.params0)
    assert loss is not None and 0 <= acc <= 100
    with pytest.raises(ConfigError, match="train.eval_test"):
        from_dict({"train": {"eval_test": "no"}})


def test_run_score_reads_the_rows_and_a_diverged_run_scores_nan(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    rows = [{"val_acc": 10.0, "val_loss": 2.0, "train_loss": 3.0}, {"val_acc": 40.0, "val_loss": 1.0,
                                                                     "train_loss": 1.5},
            {"val_acc": 30.0, "val_loss": 1.2, "train_loss": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "run.json").write_text(json.dumps({"status": "finished"}))
    assert run_score(run, "final_val_acc") == 30.0 and run_score(run, "best_val_acc") == 40.0
    assert run_score(run, "final_val_loss") == 1.2 and run_score(run, "final_train_loss") == 1.0
    (run / "run.json").write_text(json.dumps({"status": "finished", "diverged": "at iteration 3"}))
    assert math.isnan(run_score(run, "final_val_acc"))
    # a metrics.jsonl cut short would score an earlier evaluation as final (the tables refuse it too)
    rows = [{**r, "iteration": 10 * i} for i, r in enumerate(rows)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (run / "run.json").write_text(json.dumps({"status": "finished", "final": rows[-1]}))
    with pytest.raises(ConfigError, match=r"the last row of metrics.jsonl has iteration = 10 but run.json's final "
                                          r"row says 20 \(metrics.jsonl is cut short or damaged\)"):
        run_score(run, "final_val_acc")


# ---------------------------------------------------------------------------------------------------------------
# time to a target accuracy


def _record(method: str, seed: int, accs: list[float], times: list[float]) -> RunRecord:
    rows = [{"test_acc": a, "sim_time_s": t, "val_acc": a} for a, t in zip(accs, times, strict=True)]
    return RunRecord(path=Path(f"/r/{method}/{seed}"), name="x", method=method, rule=method, label="s", seed=seed,
                     status="finished", config={"data": {"validation": 10}}, metrics=rows, summary={})


def test_time_to_accuracy_is_the_first_evaluation_at_the_target_and_ratios_compare_means():
    recs = [_record("ormo", 0, [10, 50, 80, 90], [0, 1, 2, 3]), _record("ormo", 1, [10, 85, 70, 90], [0, 1, 2, 3]),
            _record("ssgdm", 0, [10, 20, 30, 80], [0, 2, 4, 6]), _record("ssgdm", 1, [10, 20, 30, 40], [0, 2, 4, 6])]
    assert final_value(recs[0], "time_to_acc:80") == 2.0 and final_value(recs[1], "time_to_acc:80") == 1.0
    assert final_value(recs[3], "time_to_acc:80") == math.inf
    summary = summarize(recs, ("time_to_acc:80", "time_to_val_acc:85"))
    cell = summary.cells[("ormo", "s")]["time_to_acc:80"]
    assert (cell.mean, cell.reached, cell.n) == (1.5, 2, 2)
    text = format_table(summary, relative_to="ssgdm")
    assert "1.50±0.50 (4.00× sooner)" in text            # SSGDm's mean over the seeds that got there: 6.0
    assert "6.00±0.00 (1/2 reached)" in text
    assert "not reached" in text                          # SSGDm never reaches 85 %
    assert "time to 80 % test acc. (sim. s)" in text
    for bad in ("time_to_acc:eighty", "time_to_acc:0", "time_to_acc:-5", "time_to_acc:101", "time_to_acc"):
        with pytest.raises(ValueError, match="time_to_acc:PERCENT"):
            final_value(recs[0], bad)
    with pytest.raises(ValueError, match="add a metric such as time_to_acc"):
        format_table(summarize(recs, ("test_acc",)), relative_to="ssgdm")
    slower = format_table(summary, relative_to="ormo")
    assert "6.00±0.00 (1/2 reached) (4.00× later)" in slower
    with pytest.raises(ValueError, match="relative_to 'sgd'"):
        format_table(summary, relative_to="sgd")


def test_lr_scaling_one_over_k_is_lr_divided_by_k_bit_for_bit():
    import ormo

    params0 = torch.linspace(-1, 1, 6, dtype=torch.float64)

    def grad(p, worker, index, step):
        g = torch.Generator().manual_seed(worker * 1000 + index * 10 + step)
        return p * 0.5 + torch.randn(p.shape, generator=g, dtype=p.dtype)

    for name in ("orlomo", "local-ormo-da"):
        a = ormo.simulate(ormo.make_rule(name, lr=1.0, lr_scaling="1/K", local_steps=3), params0, grad,
                          num_workers=4, num_iterations=40, seed=3)
        b = ormo.simulate(ormo.make_rule(name, lr=0.25, local_steps=3), params0, grad, num_workers=4,
                          num_iterations=40, seed=3)
        assert torch.equal(a.params, b.params), name
        c = ormo.simulate(ormo.make_rule(name, lr=1.0, local_steps=3), params0, grad, num_workers=4,
                          num_iterations=40, seed=3)
        assert not torch.equal(a.params, c.params), name
    with pytest.raises(ConfigError, match="lr_scaling"):
        ormo.make_rule("orlomo", lr_scaling="K")


@pytest.mark.parametrize("tuning", ['"x"', '{"choices": 3}', '{"choices": [1, {"setting": 2}, {"setting": "default"}]}',
                                    '{"choices": [{"setting": "default", "method": null, "chosen": "lr=1"}]}'])
def test_a_hand_edited_tuning_record_never_breaks_the_table(tuned_sweep, tmp_path, tuning, capsys):
    import shutil

    _, out = tuned_sweep
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.pt", "events.jsonl", ".tuning"))
    data = json.loads((copy / "sweep.json").read_text())
    data["tuning"] = json.loads(tuning)
    data["methods"] = 7 if "null" in tuning else data["methods"]
    (copy / "sweep.json").write_text(json.dumps(data))
    assert main(["table", str(copy)]) == 0
    assert "| ASGD |" in capsys.readouterr().out


def test_a_cell_whose_candidates_all_diverge_is_reported_and_its_real_runs_do_not_start(tmp_path, capsys):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd"]\nseeds = [0]\n'
                 '[sweep.tune]\ngrid = {"method.lr" = [1e25, 1e30]}\nseeds = [11]\n')
    out = tmp_path / "out"
    assert main(["sweep", str(cfg), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "every tuning candidate diverged" in err and "default/asgd/seed0" in err
    assert not (out / "default").exists()
    record = json.loads((out / "sweep.json").read_text())["tuning"]["choices"][0]
    assert record["chosen"] is None and all(c["score"] is None for c in record["candidates"])
    assert "none (no candidate has a score)" in (out / "tuning.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# what an adversarial review found


def test_shared_scope_without_a_reference_refuses_a_method_subset(tmp_path):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd", "ormo"]\n' + TUNE + 'scope = "shared"\n')
    with pytest.raises(ConfigError, match="--methods: with sweep.tune scope \"shared\""):
        plan_sweep(cfg, out=tmp_path / "o", methods=["asgd"])
    plan_sweep(cfg, out=tmp_path / "o", methods=["asgd", "ormo"])  # all of them: fine
    plan_sweep(cfg, out=tmp_path / "o", methods=["asgd"], tune_scope="method")


def test_a_tuned_key_with_a_stray_space_is_still_the_key(tmp_path):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd"]\n[sweep.tune]\ngrid = {"method.lr " = [0.1, 0.2]}\n')
    with pytest.raises(ConfigError, match="sets method.lr, which sweep.tune.grid tunes"):
        plan_sweep(cfg, out=tmp_path / "o", overrides=["method.lr=0.3"])


def test_the_budget_scales_each_candidates_own_epochs(tmp_path):
    cfg = _write(tmp_path, TINY + '[sweep]\nmethods = ["asgd"]\n[sweep.tune]\ngrid = {"train.epochs" = [0.25, 0.5]}\n'
                 'budget = 0.5\n')
    assert sorted(r.config.train.epochs for r in plan_tuning(plan_sweep(cfg, out=tmp_path / "o"))) == [0.125, 0.25]


def _copy(out: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(out, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def _other_candidate_wins(out: Path, dest: Path) -> tuple[Path, tuple[str, str]]:
    """A copy of the tuned sweep in which asgd's other candidate now scores best (its metrics and run.json's final
    row), with the copy's tuning record as it was."""
    copy = _copy(out, dest)
    before = ((copy / "sweep.json").read_text(), (copy / "tuning.md").read_text())
    chosen = next(c for c in json.loads(before[0])["tuning"]["choices"] if c["method"] == "asgd")["chosen"]
    other = "lr0.05" if chosen == "lr=0.002" else "lr0.002"
    metrics = copy / ".tuning" / "default" / "asgd" / other / "seed11" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows[-1]["val_acc"] = 100.0
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = json.loads((metrics.parent / "run.json").read_text())
    info["final"]["val_acc"] = 100.0
    (metrics.parent / "run.json").write_text(json.dumps(info))
    return copy, before


def test_a_refused_rerun_leaves_the_tuning_record_as_it_was(tuned_sweep, tmp_path, capsys):
    cfg, out = tuned_sweep
    # the other candidate now wins: the real runs of the old choice are in the way
    copy, before = _other_candidate_wins(out, tmp_path / "copy")
    assert main(["sweep", str(cfg), "--out", str(copy), "--quiet"]) == 2
    assert "holds a run of another configuration" in capsys.readouterr().err
    assert ((copy / "sweep.json").read_text(), (copy / "tuning.md").read_text()) == before


def test_a_dry_run_after_tuning_shows_the_real_runs_with_their_chosen_values(tuned_sweep, capsys):
    cfg, out = tuned_sweep
    assert main(["sweep", str(cfg), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "ANOTHER CONFIGURATION" not in text and "tuning is finished" in text
    assert text.count("[finished]") == 8  # 4 tuning runs and 4 real runs


@pytest.mark.parametrize("choices", ["5", "null", '[{"setting": ["x"], "method": "asgd"}, 7]'])
def test_a_damaged_tuning_record_is_replaced_on_a_rerun(tuned_sweep, tmp_path, choices, capsys):
    cfg, out = tuned_sweep
    copy = _copy(out, tmp_path / "copy")
    data = json.loads((copy / "sweep.json").read_text())
    data["tuning"]["choices"] = json.loads(choices)
    (copy / "sweep.json").write_text(json.dumps(data))
    assert main(["sweep", str(cfg), "--out", str(copy), "--quiet", "--no-report"]) == 0
    fixed = json.loads((copy / "sweep.json").read_text())["tuning"]["choices"]
    assert sorted(c["method"] for c in fixed) == ["asgd", "ormo"]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_tuning_run_is_one_line_naming_it_and_the_fix(tuned_sweep, tmp_path, damage, capsys):
    cfg, out = tuned_sweep
    copy = _copy(out, tmp_path / "copy")
    metrics = copy / ".tuning" / "default" / "asgd" / "lr0.05" / "seed11" / "metrics.jsonl"
    if damage == "truncate":
        metrics.write_text(metrics.read_text() + '{"epoch": 0.1, "val_acc": ')
    else:
        metrics.unlink()
    assert main(["sweep", str(cfg), "--out", str(copy), "--quiet", "--no-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ormo sweep: error:") and "seed11 cannot be scored" in err and "delete that directory" in err


def test_a_new_seed_whose_choice_differs_from_the_finished_seeds_is_refused(tuned_sweep, tmp_path, capsys):
    """A rerun whose tuning now chooses another value must not add seeds at that value next to the old ones."""
    cfg, out = tuned_sweep
    copy, before = _other_candidate_wins(out, tmp_path / "copy")
    assert main(["sweep", str(cfg), "--out", str(copy), "--seeds", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "asgd/seed0 holds a run of setting 'default', method 'asgd' whose config differs" in err
    assert "method.lr" in err
    assert not (copy / "default" / "asgd" / "seed2").exists()
    assert ((copy / "sweep.json").read_text(), (copy / "tuning.md").read_text()) == before


@pytest.mark.parametrize(("key", "values"), [("train.eval_test", "[true, false]"), ("data.validation", "[100, 200]")])
def test_keys_the_tuning_protocol_relies_on_cannot_be_tuned(tmp_path, key, values):
    cfg = _write(tmp_path, TINY + f'[sweep]\nmethods = ["asgd"]\n[sweep.tune]\ngrid = {{"{key}" = {values}}}\n')
    with pytest.raises(ConfigError, match=rf"sweep.tune.grid.{key} cannot be tuned: "):
        plan_sweep(cfg, out=tmp_path / "o")
