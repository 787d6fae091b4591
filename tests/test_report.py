"""The reporting layer on hand-written run directories: finding and loading runs, the mean ± std table, and plots.

The sweep below has 3 methods × 2 settings × 3 seeds; each run's final metrics row holds values chosen here, so every
number in the table can be checked against numpy on those values.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from ormo.report import display_name, find_runs, format_table, load_runs, method_order, summarize, write_table
from ormo.report.plots import mean_band, plot_runs, setting_figure, slugify

SETTINGS = ("K=16 hom.", "K=16 het.")
SEEDS = (0, 1, 2)
# (method, setting) -> per-seed final (train_loss, test_acc). Methods are written in an order that is not the papers'.
FINAL = {
    ("ssgd", "K=16 hom."): [(0.03, 90.60), (0.04, 90.95), (0.05, 91.30)],
    ("ssgd", "K=16 het."): [(0.10, 88.00), (0.12, 88.50), (0.14, 89.00)],
    ("ormo", "K=16 hom."): [(0.02, 91.50), (0.02, 91.70), (0.05, 91.60)],
    ("ormo", "K=16 het."): [(0.06, 90.10), (0.07, 90.30), (0.08, 90.20)],
    ("asgd", "K=16 hom."): [(0.20, 85.00), (0.25, 86.00), (0.30, 87.00)],
    ("asgd", "K=16 het."): [(0.50, 80.00), (0.60, 79.00), (0.70, 81.00)],
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(
    root: Path,
    *,
    method: str,
    label: str | None,
    seed: int,
    final_loss: float,
    final_acc: float,
    epochs: int = 3,
    seconds_per_epoch: float = 10.0,
    status: str = "finished",
    delay_max: int = 30,
    num_workers: int = 16,
    timing: str = "slow_fraction",
) -> Path:
    """One run directory under ``root/<method>/<slug>/seed<k>``: rows at epochs 0..epochs, the last one holding the
    chosen final values (NaN is written as null, as the metrics writer does)."""
    run_dir = root / method / slugify(label or "nolabel") / f"seed{seed}"
    run_dir.mkdir(parents=True)
    rows = []
    for epoch in range(epochs + 1):
        frac = epoch / epochs
        rows.append({
            "epoch": float(epoch), "iteration": 100 * epoch, "gradients": 100 * epoch,
            "sim_time_s": seconds_per_epoch * epoch,
            "train_loss": None if epoch == 0 else 2.0 + frac * (final_loss - 2.0),
            "test_loss": 2.3 - frac, "test_acc": 10.0 + frac * (final_acc - 10.0),
            "delay_mean": 15.0, "delay_max": 20, "lr_scale": 1.0,
        })
    for key, value in (("train_loss", final_loss), ("test_acc", final_acc)):
        rows[-1][key] = None if math.isnan(value) else value
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    info = {"name": "sweep", "label": label, "method": method, "seed": seed, "status": status}
    if status == "finished":
        info["summary"] = {"delay": {"mean": 15.0, "max": delay_max, "p50": 15, "p90": 25, "p99": 29},
                           "sim_time_s": rows[-1]["sim_time_s"]}
        info["final"] = rows[-1]
    (run_dir / "run.json").write_text(json.dumps(info), encoding="utf-8")
    (run_dir / "config.toml").write_text(
        f'name = "sweep"\n\n[method]\nname = "{method}"\nlr = 0.1\nmomentum = 0.9\n\n[model]\nname = "mlp"\n\n'
        f'[data]\nname = "digits"\nbatch_size = 64\n\n[timing]\nmodel = "{timing}"\n\n'
        f"[train]\nepochs = {float(epochs)}\nnum_workers = {num_workers}\nseed = {seed}\n",
        encoding="utf-8",
    )
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for (method, label), finals in FINAL.items():
        for seed, (loss, acc) in zip(SEEDS, finals, strict=True):
            write_run(root, method=method, label=label, seed=seed, final_loss=loss, final_acc=acc,
                      delay_max=30 + 10 * seed)
    return root


# ---- find / load -------------------------------------------------------------------------------------------------


def test_find_runs_searches_folders_recursively_and_drops_duplicates(sweep: Path) -> None:
    found = find_runs(sweep)
    assert len(found) == 18
    assert found == sorted(found)
    one = sweep / "ormo" / "k-16-het" / "seed1"
    assert find_runs(one) == [one]
    assert find_runs(one / "run.json") == [one]
    assert find_runs([one, sweep]) == [one] + [p for p in found if p != one]
    assert find_runs([str(sweep / "asgd")]) == [p for p in found if p.parts[-3] == "asgd"]


def test_find_runs_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_runs(tmp_path / "nowhere")


def test_load_runs_reads_run_config_and_metrics(sweep: Path) -> None:
    records = load_runs(sweep)
    assert len(records) == 18
    r = next(r for r in records if r.path == sweep / "ormo" / "k-16-het" / "seed2")
    assert (r.name, r.method, r.label, r.seed, r.status) == ("sweep", "ormo", "K=16 het.", 2, "finished")
    assert r.config["train"]["num_workers"] == 16 and r.config["method"]["lr"] == 0.1
    assert len(r.metrics) == 4
    assert math.isnan(r.metrics[0]["train_loss"])  # null at epoch 0 comes back as NaN
    assert r.metrics[-1]["test_acc"] == 90.20
    assert r.summary["delay"]["max"] == 50


def test_load_runs_skips_unfinished_with_a_warning_naming_them(sweep: Path) -> None:
    write_run(sweep, method="ormo", label="K=16 het.", seed=7, final_loss=1.0, final_acc=50.0, status="interrupted")
    with pytest.warns(UserWarning, match=r"seed7.*interrupted"):
        records = load_runs(sweep)
    assert len(records) == 18 and all(r.seed != 7 for r in records)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = load_runs(sweep, include_unfinished=True)
    assert len(kept) == 19
    assert next(r for r in kept if r.seed == 7).summary == {}


def test_load_runs_without_runs_says_where_it_looked(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no runs found under '.*empty'"):
        load_runs([empty])
    only_running = tmp_path / "running"
    write_run(only_running, method="asgd", label="x", seed=0, final_loss=1.0, final_acc=1.0, status="running")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"1 unfinished skipped: finish them with "
                                                                      r"`ormo train --resume RUN_DIR`"):
        load_runs(only_running)
    assert len(load_runs(only_running, include_unfinished=True)) == 1


def test_an_unreadable_run_is_skipped_with_a_warning_not_an_error(sweep: Path) -> None:
    broken = next(sweep.rglob("run.json"))
    broken.write_text("{not json")
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable run\(s\): .*is not valid JSON"):
        records = load_runs(sweep)
    assert broken.parent not in [r.path for r in records] and len(records) == len(list(sweep.rglob("run.json"))) - 1


def test_a_cell_over_fewer_seeds_says_so(sweep: Path) -> None:
    records = load_runs(sweep)
    one_less = [r for r in records if not (r.method == records[0].method and r.label == records[0].label
                                            and r.seed == records[0].seed)]
    text = format_table(summarize(one_less))
    assert text.count("(n=") == 2  # the two metrics of the one short cell, nothing else


def test_label_falls_back_to_workers_and_timing_model(tmp_path: Path) -> None:
    write_run(tmp_path, method="asgd", label=None, seed=0, final_loss=0.5, final_acc=80.0, num_workers=4,
              timing="one_slow")
    (record,) = load_runs(tmp_path)
    assert record.label == "K=4 one_slow"


# ---- tables ------------------------------------------------------------------------------------------------------


def test_display_names_and_row_order() -> None:
    assert display_name("ormo-vanilla") == "OrMo (vanilla SGD step)"
    assert display_name("my-rule") == "my-rule"
    assert method_order(["my-rule", "ssgd", "orlomo", "asgd", "ormo-da", "ssgd", "another"]) == [
        "asgd", "ormo-da", "ssgd", "orlomo", "my-rule", "another"]


def test_summarize_matches_numpy_on_the_final_values(sweep: Path) -> None:
    summary = summarize(load_runs(sweep))
    assert summary.methods == ("asgd", "ormo", "ssgd")
    assert summary.labels == ("K=16 het.", "K=16 hom.")  # first seen in sorted path order: k-16-het < k-16-hom
    for key, finals in FINAL.items():
        losses, accs = np.array(finals).T
        cell = summary.cells[key]
        assert cell["train_loss"].mean == pytest.approx(np.mean(losses), abs=1e-12)
        assert cell["train_loss"].std == pytest.approx(np.std(losses), abs=1e-12)  # population std, ddof=0
        assert cell["test_acc"].mean == pytest.approx(np.mean(accs), abs=1e-12)
        assert cell["test_acc"].std == pytest.approx(np.std(accs), abs=1e-12)
        assert cell["train_loss"].n == cell["test_acc"].n == 3
        assert summary.seeds[key] == SEEDS


def test_delay_max_comes_from_the_run_summary(sweep: Path) -> None:
    # The metrics rows say delay_max = 20; the run summaries say 30, 40, 50 (seeds 0, 1, 2).
    cell = summarize(load_runs(sweep), metrics=("delay_max",)).cells[("ormo", "K=16 hom.")]["delay_max"]
    assert (cell.mean, cell.std, cell.n) == (40.0, pytest.approx(np.std([30, 40, 50])), 3)


def test_summarize_rejects_the_same_seed_twice(sweep: Path, tmp_path: Path) -> None:
    copy = write_run(tmp_path / "other", method="asgd", label="K=16 hom.", seed=0, final_loss=0.2, final_acc=85.0)
    with pytest.raises(ValueError, match=r"method 'asgd', label 'K=16 hom\.' and seed 0.*seed0"):
        summarize(load_runs([sweep, copy]))


def test_labels_select_and_order_the_settings(sweep: Path) -> None:
    records = load_runs(sweep)
    assert summarize(records, labels=["K=16 hom."]).labels == ("K=16 hom.",)
    with pytest.raises(ValueError, match=r"labels \['K=8'\] match no run; the runs' labels are"):
        summarize(records, labels=["K=8", "K=16 hom."])


def test_labels_flag_takes_a_label_with_a_comma_whole_and_refuses_an_empty_entry(tmp_path: Path, capsys) -> None:
    from ormo.cli import main

    for seed in (0, 1):
        write_run(tmp_path, method="ormo", label="K=4, het", seed=seed, final_loss=0.5, final_acc=50.0 + seed)
        write_run(tmp_path, method="ormo", label="hom", seed=seed, final_loss=0.5, final_acc=60.0)
    for command in ("table", "plot"):
        assert main([command, str(tmp_path), "--labels", "K=4, het", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr()
    assert "| Method | K=4, het train loss | K=4, het test acc. (%) |" in out.out and "hom" not in out.out
    assert (tmp_path / "o" / "k-4-het.png").is_file() and not (tmp_path / "o" / "hom.png").exists()
    assert main(["table", str(tmp_path), "--labels", "hom,,K=4"]) == 2
    assert "--labels 'hom,,K=4' has an empty entry between commas" in capsys.readouterr().err


def test_markdown_table_cells_and_layout(sweep: Path) -> None:
    text = format_table(summarize(load_runs(sweep), labels=SETTINGS))  # settings in the papers' order
    lines = text.splitlines()
    assert lines[0] == ("| Method | K=16 hom. train loss | K=16 hom. test acc. (%) | K=16 het. train loss "
                        "| K=16 het. test acc. (%) |")
    assert lines[1] == "|:---|---:|---:|---:|---:|"
    # Hand-computed: ssgd hom. loss 0.03/0.04/0.05 -> 0.04 ± 0.0082; acc 90.60/90.95/91.30 -> 90.95 ± 0.286.
    assert lines[2:] == [
        "| ASGD | 0.25±0.04 | 86.00±0.82 | 0.60±0.08 | 80.00±0.82 |",
        "| OrMo | 0.03±0.01 | 91.60±0.08 | 0.07±0.01 | 90.20±0.08 |",
        "| SSGD | 0.04±0.01 | 90.95±0.29 | 0.12±0.02 | 88.50±0.41 |",
    ]


def test_a_pipe_or_line_break_in_a_label_stays_inside_its_markdown_cell(tmp_path: Path) -> None:
    write_run(tmp_path, method="a|b", label="K=4 | hom\nfast", seed=0, final_loss=0.5, final_acc=50.0)
    lines = format_table(summarize(load_runs(tmp_path))).splitlines()
    assert lines == ["| Method | K=4 \\| hom fast train loss | K=4 \\| hom fast test acc. (%) |",
                     "|:---|---:|---:|",
                     "| a\\|b | 0.50±0.00 | 50.00±0.00 |"]


def test_unknown_methods_come_last_and_missing_cells_show_a_dash(sweep: Path, tmp_path: Path) -> None:
    extra = write_run(tmp_path / "extra", method="my-rule", label="K=16 het.", seed=0, final_loss=0.3,
                      final_acc=70.0)
    lines = format_table(summarize(load_runs([extra, sweep]))).splitlines()
    assert lines[0].startswith("| Method | K=16 het. train loss")  # settings in first-seen order
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| ASGD", "| OrMo", "| SSGD", "| my-rule"]
    assert lines[-1] == "| my-rule | 0.30±0.00 (n=1) | 70.00±0.00 (n=1) | — | — |"  # one seed, the others have more


def test_write_table_writes_markdown_and_csv(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    text = write_table(load_runs(sweep), out, labels=SETTINGS)
    assert (out / "table.md").read_text(encoding="utf-8") == text
    with (out / "table.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2  # methods × settings × metrics
    assert list(rows[0]) == ["method", "name", "label", "metric", "mean", "std", "n", "rule", "reached"]
    assert [(r["method"], r["label"], r["metric"]) for r in rows[:4]] == [
        ("asgd", "K=16 hom.", "train_loss"), ("asgd", "K=16 hom.", "test_acc"),
        ("asgd", "K=16 het.", "train_loss"), ("asgd", "K=16 het.", "test_acc")]
    for r in rows:
        values = np.array(FINAL[(r["method"], r["label"])])[:, 0 if r["metric"] == "train_loss" else 1]
        assert float(r["mean"]) == pytest.approx(np.mean(values), abs=1e-12)
        assert float(r["std"]) == pytest.approx(np.std(values), abs=1e-12)
        assert r["n"] == "3" and r["name"] == display_name(r["method"])


def test_a_nan_final_value_shows_diverged(tmp_path: Path) -> None:
    for seed, loss in enumerate([0.1, math.nan, 0.2]):
        write_run(tmp_path, method="naive-asgdm", label="K=32", seed=seed, final_loss=loss, final_acc=10.0)
    out = tmp_path / "report"
    text = write_table(load_runs(tmp_path), out)
    assert text.splitlines()[-1] == "| naive ASGDm | diverged | 10.00±0.00 |"
    rows = list(csv.DictReader((out / "table.csv").open(newline="", encoding="utf-8")))
    assert rows[0]["metric"] == "train_loss" and math.isnan(float(rows[0]["mean"]))


# ---- plots -------------------------------------------------------------------------------------------------------


def test_mean_band_on_hand_values() -> None:
    a = (np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.0]))
    b = (np.array([0.0, 2.0, 3.0]), np.array([0.0, 4.0, 9.0]))  # b at x=1 interpolates to 2
    grid, mean, low, high = mean_band([a, b], time_grid=False)
    np.testing.assert_allclose(grid, [0.0, 1.0, 2.0])  # stops where the shorter curve stops
    np.testing.assert_allclose(mean, [0.0, 1.5, 3.0])
    np.testing.assert_allclose(low, [0.0, 1.0, 2.0])
    np.testing.assert_allclose(high, [0.0, 2.0, 4.0])
    grid, *_ = mean_band([a, b], time_grid=True)
    assert grid[0] == 0.0 and grid[-1] == 2.0 and len(grid) == 200


def test_plot_runs_writes_one_png_per_setting(sweep: Path, tmp_path: Path) -> None:
    backend = matplotlib.get_backend()
    paths = plot_runs(load_runs(sweep), tmp_path / "plots")
    assert [p.name for p in paths] == ["k-16-het.png", "k-16-hom.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE
        assert len(data) > 20_000  # four panels with lines, not an empty canvas
    assert matplotlib.get_backend() == backend
    # another metric writes its own files next to these, never over them
    before = {p.name: p.read_bytes() for p in paths}
    other = plot_runs(load_runs(sweep), tmp_path / "plots", metric="test_loss")
    assert [p.name for p in other] == ["k-16-het.test-loss.png", "k-16-hom.test-loss.png"]
    assert {p.name: p.read_bytes() for p in paths} == before
    # nor over another setting's default plot: "hom" at val_acc would have been hom-val-acc.png, the plot of a
    # setting labelled "hom val acc" (an adversarial read); a slug holds no "."
    from ormo.report.plots import slugify

    assert slugify("hom val acc") == "hom-val-acc" and "." not in slugify("K=16 het. v1.2")


def test_plot_runs_with_seeds_of_different_lengths(tmp_path: Path) -> None:
    # Seeds end at different epochs and times (as a run that diverges ends where it diverged); one ormo seed's last
    # loss is NaN. They are one experiment: the same config but for the seed.
    for seed, (epochs, seconds) in enumerate([(2, 10.0), (3, 12.0), (4, 9.0)]):
        for method, loss in (("asgd", 0.5), ("ormo", math.nan if seed == 1 else 0.3)):
            run_dir = write_run(tmp_path, method=method, label="uneven", seed=seed, final_loss=loss,
                                final_acc=80.0, epochs=epochs, seconds_per_epoch=seconds)
            config = run_dir / "config.toml"
            config.write_text(config.read_text().replace(f"epochs = {float(epochs)}", "epochs = 4.0"))
    records = load_runs(tmp_path)
    (path,) = plot_runs(records, tmp_path / "plots")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 20_000


def test_loss_panels_are_log_scaled_and_the_figure_has_one_legend(sweep: Path) -> None:
    records = [r for r in load_runs(sweep) if r.label == "K=16 het."]
    fig = setting_figure("K=16 het.", records)
    axes = fig.axes
    assert [ax.get_yscale() for ax in axes] == ["linear", "log", "linear", "log"]  # acc, loss (epochs, then time)
    assert all(ax.get_legend() is None for ax in axes)
    (legend,) = fig.legends
    # one entry per method, in the papers' order, whatever the order of the files
    assert [t.get_text() for t in legend.get_texts()] == ["ASGD (n=3)", "OrMo (n=3)", "SSGD (n=3)"]


def test_a_loss_curve_at_zero_keeps_the_linear_axis(tmp_path: Path) -> None:
    write_run(tmp_path, method="ormo", label="zero", seed=0, final_loss=0.0, final_acc=99.0)
    fig = setting_figure("zero", load_runs(tmp_path))
    assert [ax.get_yscale() for ax in fig.axes] == ["linear"] * 4


# ---- the CLI's errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["table", "plot"])
def test_table_and_plot_errors_are_the_message_without_a_class_name(tmp_path: Path, command: str, capsys) -> None:
    from ormo.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([command, str(empty)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ormo {command}: error: no runs found under") and "Error" not in err
    assert len(err.splitlines()) == 1


# ---- damaged finished runs are skipped with a warning naming the run and what is wrong ------------------------------


def _edit_run_json(run_dir: Path, **fields) -> None:
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, **fields}))


def _cut_last_row(run_dir: Path) -> None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[:-1]))


@pytest.mark.parametrize(("damage", "pattern"), [
    (lambda d: (d / "config.toml").unlink(), r"seed1': config.toml is missing"),
    (lambda d: (d / "metrics.jsonl").unlink(), r"seed1': metrics.jsonl is missing or has no rows"),
    (lambda d: (d / "metrics.jsonl").write_text(""), r"seed1': metrics.jsonl is missing or has no rows"),
    (_cut_last_row, r"seed1': the last row of metrics.jsonl has iteration = 200 but run.json's final row says 300"),
    (lambda d: (d / "metrics.jsonl").write_text((d / "metrics.jsonl").read_text()
                                                + '{"epoch": "x", "test_acc": "abc"}\n'),
     r"metrics.jsonl' line 5: epoch = 'x' is not a number"),
    (lambda d: (d / "run.json").unlink(), r"seed1': run.json is missing"),
    # fields of the wrong type: one line naming the field, never a TypeError or a seed of 1.7 read as 1
    (lambda d: _edit_run_json(d, summary=[1, 2]), r"run.json': summary = \[1, 2\] is not a JSON object"),
    (lambda d: _edit_run_json(d, seed=1.7), r"run.json': seed = 1.7 is not an integer >= 0"),
    (lambda d: _edit_run_json(d, label=["K=16 het."]), r"run.json': label = \['K=16 het.'\] is not a string"),
    (lambda d: _edit_run_json(d, task={"metrics": [{"name": "acc"}]}), r"run.json': task.metrics = .* is not a list"),
    (lambda d: (d / "config.toml").write_text("train = 5\n"), r"config.toml': train = 5 is not a \[train\] table"),
])
def test_a_damaged_finished_run_is_skipped_with_a_warning_naming_it(sweep: Path, tmp_path: Path, damage,
                                                                     pattern: str) -> None:
    damaged = sweep / "ormo" / "k-16-het" / "seed1"
    damage(damaged)
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable run\(s\): '.*" + pattern):
        records = load_runs(sweep)
    assert len(records) == 17 and damaged not in [r.path for r in records]
    summary = summarize(records)  # the table and the plots go on with the other runs
    assert summary.cells[("ormo", "K=16 het.")]["test_acc"].n == 2
    assert summary.cells[("ormo", "K=16 het.")]["test_acc"].mean == pytest.approx((90.10 + 90.20) / 2)
    assert len(plot_runs(records, tmp_path / "plots", labels=["K=16 het."])) == 1


# ---- one cell, one experiment --------------------------------------------------------------------------------------


def test_runs_of_one_cell_whose_configs_differ_beyond_the_seed_are_refused(sweep: Path, tmp_path: Path,
                                                                           capsys) -> None:
    from ormo.cli import main

    other = sweep / "ormo" / "k-16-het" / "seed2"
    config = other / "config.toml"
    config.write_text(config.read_text().replace("lr = 0.1", "lr = 0.05"))
    records = load_runs(sweep)
    pattern = r"seed0' and '.*seed2' would share the cell of method 'ormo', setting 'K=16 het.', but their " \
              r"configs differ in method.lr \(0.1 vs 0.05\), not only in train.seed"
    with pytest.raises(ValueError, match=pattern):
        summarize(records)
    with pytest.raises(ValueError, match=pattern):
        plot_runs(records, tmp_path / "plots")
    summarize(records, labels=["K=16 hom."])  # the other setting alone is one experiment per cell
    for command in ("table", "plot"):
        assert main([command, str(sweep), "--out", str(tmp_path / command)]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "differ in method.lr" in err
    assert not (tmp_path / "table" / "table.md").exists()


# ---- a filtered table never replaces the folder's own ----------------------------------------------------------------


@pytest.mark.parametrize("flags", [["--labels", "K=16 hom."], ["--metrics", "test_acc"]])
def test_a_filtered_table_without_out_is_printed_and_leaves_the_folders_table(sweep: Path, tmp_path: Path,
                                                                            flags: list[str], capsys) -> None:
    from ormo.cli import main

    assert main(["table", str(sweep)]) == 0
    before = ((sweep / "table.md").read_text(), (sweep / "table.csv").read_text())
    capsys.readouterr()
    assert main(["table", str(sweep), *flags]) == 0
    out, err = capsys.readouterr()
    assert "| Method |" in out and "printed only" in err
    assert ((sweep / "table.md").read_text(), (sweep / "table.csv").read_text()) == before
    assert main(["table", str(sweep), *flags, "--out", str(tmp_path / "t")]) == 0  # --out writes it
    assert (tmp_path / "t" / "table.md").read_text() == out.rstrip("\n") + "\n"
