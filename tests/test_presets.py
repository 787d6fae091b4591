"""Presets ship inside the package: ``preset:NAME`` resolves from any directory, and a built wheel holds the files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ormo.cli import main
from ormo.experiment import load_config
from ormo.experiment.config import read_toml
from ormo.presets import PRESETS_DIR, preset_description, preset_names, preset_path
from ormo.rules.base import ConfigError

ROOT = Path(__file__).resolve().parent.parent

# every file a user can name, written out by hand so that a preset that disappears (or is not packaged) fails here
EXPECTED = {
    "quickstart",
    "ormo/base", "ormo/table1_cifar10", "ormo/table2_cifar100", "ormo/vanilla_step",
    "orlomo/base", "orlomo/table1_squeezenet_cifar10", "orlomo/table1_squeezenet_cifar100",
    "orlomo/table2_resnet20_cifar10", "orlomo/table2_resnet20_cifar100", "orlomo/table3_extreme_delay",
    "orlomo/table6_tinyimagenet",
    "fmnist/base", "fmnist/table1", "fmnist/vanilla_step", "fmnist/orlomo", "fmnist/table3",
    "lm/stdlib",
}


def test_presets_live_in_the_package_and_the_repository_link_points_there():
    assert set(preset_names()) == EXPECTED
    assert PRESETS_DIR == ROOT / "ormo" / "configs"
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == PRESETS_DIR


@pytest.mark.parametrize("ref", ["preset:ormo/table1_cifar10", "preset:ormo/table1_cifar10.toml"])
def test_a_preset_reads_like_its_file_with_extends_followed(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nowhere near the repository
    data = read_toml(ref)
    assert data == read_toml(PRESETS_DIR / "ormo" / "table1_cifar10.toml")
    assert "extends" not in data and data["name"] == "table1_cifar10"
    assert data["model"]["name"] == "resnet20"  # from base.toml, through extends


def test_load_config_takes_a_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("preset:quickstart", ["train.epochs=2"])
    assert cfg.name == "quickstart" and cfg.train.epochs == 2 and cfg.method.lr == 0.01


def test_an_unknown_preset_names_the_value_and_lists_the_presets():
    with pytest.raises(ConfigError) as err:
        preset_path("preset:quickstrat")
    message = str(err.value)
    assert "'quickstrat'" in message and "quickstart" in message and "ormo/table1_cifar10" in message
    with pytest.raises(ConfigError, match="unknown preset"):  # only the listed files: no way out of the folder
        read_toml("preset:../../pyproject")


def test_ormo_presets_lists_each_preset_with_its_first_comment_line(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(EXPECTED)
    first = (PRESETS_DIR / "quickstart.toml").read_text().splitlines()[0].lstrip("# ")
    assert preset_description("quickstart") == first
    row = next(line for line in lines if line.startswith("preset:quickstart "))
    assert row.endswith(first)


def test_ormo_train_and_sweep_accept_a_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "preset:nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    from ormo.experiment.sweep import plan_sweep

    runs = plan_sweep("preset:quickstart", out=tmp_path / "sw", seeds=[0], methods=["ormo"])
    assert [r.label for r in runs] == ["K=16 hom.", "K=16 het."]


def test_a_built_wheel_holds_the_presets_and_resolves_them_from_anywhere(tmp_path):
    # build from a copy of the sources (fast: no isolation, no dependencies), so the worktree gets no build/ folder
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "ormo", src / "ormo", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(out)!r})"],
                   cwd=src, check=True, capture_output=True)
    (wheel,) = out.glob("ormo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"ormo/configs/{n}.toml" for n in EXPECTED} <= names
    assert "ormo/demo.py" not in names  # the old fallback demo is gone: `ormo demo` is the packaged quickstart

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import ormo.experiment as e, ormo.presets as p; c = e.load_config('preset:ormo/table1_cifar10'); "
            "print(p.PRESETS_DIR, c.name, c.model.name)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, check=True, capture_output=True,
                         text=True)
    assert res.stdout.split() == [str(site / "ormo" / "configs"), "table1_cifar10", "resnet20"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_preset_plans_its_sweep_and_tuning_without_error(name, tmp_path):
    """Every preset's [sweep] and [sweep.tune] resolve to valid configs (no dataset is read to plan)."""
    from ormo.experiment.sweep import plan_sweep, plan_tuning

    runs = plan_sweep(f"preset:{name}", out=tmp_path / "sw")
    tuning = plan_tuning(runs)
    assert runs and all(r.config.train.eval_test for r in runs)
    # image classification holds out data.validation; a task of its own (the language model) has its own split
    assert all(not t.config.train.eval_test and (t.config.data.validation or t.config.task.entry) for t in tuning)
    if "orlomo" in name and name != "orlomo/base" or name == "fmnist/table3":
        readings = {r.config.method.options.get("lr_scaling", "none") for r in runs if r.config.method.name == "orlomo"}
        assert "1/K" in readings, name
