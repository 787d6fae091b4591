"""Experiment configs: TOML, extends, --set overrides, validation errors naming the key, and the round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ormo.engine.timing import Homogeneous, SlowFraction
from ormo.experiment import config as C
from ormo.rules.base import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_are_valid_and_build():
    cfg = C.load_config()
    assert cfg.method.name == "ormo" and cfg.data.name == "digits" and cfg.train.num_workers == 16
    assert cfg.method.build().name == "ormo"
    assert isinstance(cfg.timing.build(), Homogeneous)


def test_toml_file_with_extends_and_overrides(tmp_path):
    (tmp_path / "base.toml").write_text('name = "base"\n[method]\nname = "asgd"\nlr = 0.1\n[train]\nepochs = 5\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\nname = "child"\n[train]\nnum_workers = 4\n')
    overrides = ["method.lr=0.02", "train.label=K4", 'method.options.delay_rule="none"', "method.name=da-asgd"]
    cfg = C.load_config(tmp_path / "child.toml", overrides)
    assert cfg.name == "child" and cfg.train.epochs == 5 and cfg.train.num_workers == 4
    assert cfg.method.lr == 0.02 and cfg.train.label == "K4"  # a bare word is a string
    rule = cfg.method.build()
    assert rule.name == "da-asgd" and rule.delay_rule == "none" and rule.lr == 0.02


def test_common_hyperparameters_apply_where_the_rule_has_them():
    cfg = C.load_config(None, ["method.name=asgd", "method.momentum=0.9", "method.local_steps=4"])
    assert cfg.method.build().describe()["hyperparameters"] == {"lr": 0.1}


def test_round_trip_through_toml(tmp_path):
    cfg = C.load_config(None, ["method.name=orlomo", "method.local_steps=4", 'method.options.group_decay="beta_pow_H"',
                               "timing.model=slow_fraction", "timing.fraction=0.5", "schedule.milestones=[2, 3.5]",
                               "data.options.upsample=true", "train.label='K=8 het.'"])
    path = tmp_path / "resolved.toml"
    path.write_text(C.to_toml(cfg))
    assert C.load_config(path) == cfg
    assert isinstance(cfg.timing.build(), SlowFraction)


@pytest.mark.parametrize("preset", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.toml")))
def test_every_preset_is_valid(preset):
    C.load_config(CONFIGS / preset)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["method.lr"], r"override 'method.lr' must look like section.key=value"),
        (["optim.lr=1"], r"the key must be section.key with section in method, model"),
        (["method.learning_rate=1"], r"unknown key method.learning_rate; \[method\] accepts: name, lr, momentum"),
        (["train.epochs=ten"], r"train.epochs: expected a number, got 'ten'"),
        (["train.num_workers=2.5"], r"train.num_workers: expected an integer, got 2.5"),
        (["data.augment=1"], r"data.augment: expected true or false, got 1"),
        (["schedule.milestones=80"], r"schedule.milestones: expected a list, got 80"),
        (["method.name=ormo2"], r"unknown rule 'ormo2'; valid names"),
        (["method.momentum=1.5"], r"invalid momentum: 1.5 \(must be a number in \[0, 1\)\)"),
        (["method.options.delay_rule=fast", "method.name=ormo-da"], r"invalid delay_rule: 'fast'"),
        (["method.options.lr=0.1"], r"method.options.lr: set it as method.lr"),
        (["method.options.bogus=1"], r"rule 'ormo' has no hyperparameter 'bogus'"),
        (["train.num_workers=0"], r"invalid train.num_workers: 0 \(must be an integer >= 1\)"),
        (['data.data_dir=""'], r"invalid data.data_dir: '' \(must be a folder's path\); leave it out for \$ORMO_DATA"),
        (["train.num_workers=1000000"], r"invalid train.num_workers: 1000000 \(must be <= 100,000"),
        (["train.threads=100000"], r"invalid train.threads: 100000 \(must be <= 1024"),  # torch segfaults there
        (["schedule.milestones=[nan]"], r"invalid schedule.milestones: \[nan\] \(must be increasing finite positive"),
        (["schedule.milestones=[1.0, inf]"], r"invalid schedule.milestones: \[1.0, inf\]"),
        (["schedule.warmup_epochs=inf"], r"invalid schedule.warmup_epochs: inf \(must be a finite number >= 0\)"),
        (["schedule.warmup_epochs=nan"], r"invalid schedule.warmup_epochs: nan"),
        (["train.device='cuda:x'"], r"invalid train.device: 'cuda:x' \(must be 'cpu', 'cuda' or 'cuda:N'\)"),
        (["train.epochs=-1"], r"invalid train.epochs: -1.0 \(must be a finite number > 0\)"),
        (["train.device=tpu"], r"invalid train.device: 'tpu'"),
        (["data.batch_size=0"], r"invalid data.batch_size: 0"),
        (["timing.model=fast"], r"invalid timing.model: 'fast'"),
        (["timing.ratio=5"], r"timing.ratio does not apply to timing.model='homogeneous'"),
        (["timing.model=slow_fraction", "timing.fraction=2"], r"invalid fraction: 2.0"),
        (["schedule.milestones=[120, 80]"], r"invalid schedule.milestones: \[120.0, 80.0\] \(must be increasing"),
        (["train.epochs.x=1"], r"override 'train.epochs.x=1': train.epochs is a value, it has no key 'x'"),
        (["ray.workers_per_actor=0"], r"invalid ray.workers_per_actor: 0 \(must be an integer >= 1\)"),
        (["ray.server_timeout_s=0"], r"invalid ray.server_timeout_s: 0"),
        # an adversarial read: 2**64 passed the config (and a sweep's plan), to fail in the model as "invalid seed"
        (["train.seed=18446744073709551616"], r"invalid train.seed: 18446744073709551616 \(must be an integer in "
                                              r"\[0, 2\*\*64\)\)"),
        # an adversarial read: NaN and inf passed these checks, and worker_threads had no cap (train.threads has)
        (["ray.gpus_per_worker=nan"], r"invalid ray.gpus_per_worker: nan \(must be a finite number >= 0\)"),
        (["ray.gpus_per_worker=inf"], r"invalid ray.gpus_per_worker: inf \(must be a finite number >= 0\)"),
        (["ray.time_scale=nan"], r"invalid ray.time_scale: nan \(must be a finite number >= 0\)"),
        (["ray.time_scale=inf"], r"invalid ray.time_scale: inf \(must be a finite number >= 0\)"),
        (["ray.time_scale=-1"], r"invalid ray.time_scale: -1.0 \(must be a finite number >= 0\)"),
        (["ray.worker_threads=1000000000"], r"invalid ray.worker_threads: 1000000000 \(must be <= 1024"),
    ],
)
def test_bad_overrides_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        C.load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        C.load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[method\nname = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        C.load_config(tmp_path / "bad.toml")
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(ConfigError, match="loops back"):
        C.load_config(tmp_path / "loop.toml")
    (tmp_path / "sec.toml").write_text("[optimizer]\nlr = 1\n")
    with pytest.raises(ConfigError, match="unknown section or key 'optimizer'"):
        C.load_config(tmp_path / "sec.toml")


def test_schedule_factor():
    s = C.ScheduleConfig(warmup_epochs=2, warmup_start=0.5, milestones=[10, 20], decay=0.1)
    assert s.factor(0) == 0.5 and s.factor(1) == pytest.approx(0.75) and s.factor(2) == 1.0
    assert s.factor(9.99) == 1.0 and s.factor(10) == pytest.approx(0.1) and s.factor(25) == pytest.approx(0.01)


@pytest.mark.parametrize("address", ["", "garbage", "http://127.0.0.1:8265", "10.0.0.5:0", "10.0.0.5:99999", ":6379",
                                     "10.0.0.5:port"])
def test_a_ray_address_that_is_not_host_port_is_one_line(address):
    with pytest.raises(ConfigError, match=r"invalid ray.address: .*HOST:PORT") as info:
        C.load_config(None, [f"ray.address={json.dumps(address)}"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("address", ["auto", "local", "10.0.0.5:6379", "head.example:6379", "ray://10.0.0.5:10001",
                                     "[::1]:6379"])
def test_ray_addresses_ray_accepts_are_accepted(address):
    assert C.load_config(None, [f"ray.address={json.dumps(address)}"]).ray.address == address
