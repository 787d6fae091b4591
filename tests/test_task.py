"""Bring your own task (issue 11): the README's example file end to end (train, exact resume, exact replay, sweep with
tuning, tables and plots in its own metric names), entries by reference and their one-line errors, modules whose
rules and models the CLI sees, and the bundled byte-level language model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ormo.cli import main
from ormo.engine import Simulator
from ormo.experiment import load_config, train
from ormo.experiment.config import from_dict
from ormo.experiment.metrics import metric_fields, read_metrics
from ormo.experiment.problem import ImageClassification, build_task
from ormo.report import load_runs
from ormo.report.plots import plotted_metric
from ormo.report.tables import final_value, summarize
from ormo.rules.asgd import ASGD
from ormo.rules.base import ConfigError, Rule, register, rule_class, rule_names
from ormo.task import Metric, ModelTask, TaskContext, check_task, evaluate_all
from ormo.tasks.stdlib_lm import ByteMLP, StdlibLM

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my_task.py"
ENTRY = f"{EXAMPLE}:make_task"  # absolute: the tests run from any directory
SMALL = [f"task.entry={ENTRY}", "task.options.train_size=512", "method.lr=0.01", "train.num_workers=4",
         "train.epochs=8", "train.eval_every=1", "train.checkpoint_every=1", "data.batch_size=32"]


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _module(tmp_path: Path, text: str) -> Path:
    """A user module under a fresh name (Python caches modules by name)."""
    path = tmp_path / f"user_{uuid.uuid4().hex[:10]}.py"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------------
# the example file


def test_the_readme_shows_the_example_file_word_for_word_and_it_is_short():
    text = EXAMPLE.read_text()
    assert len(text.splitlines()) <= 40
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert text in blocks


def test_the_example_trains_from_the_cli_resumes_exactly_and_replays_exactly(tmp_path, capsys, monkeypatch):
    sets = [x for o in SMALL for x in ("--set", o)]
    code, out, err = _main(["train", *sets, "--run-dir", str(tmp_path / "a"), "--quiet"], capsys)
    assert code == 0, err
    printed = json.loads(out)
    assert printed["status"] == "finished" and printed["test_mse"] is not None and "val_mse" in printed
    rows = read_metrics(tmp_path / "a")
    assert list(rows[0]) == list(metric_fields(["mse", "mae"]))  # its own columns, in order
    assert rows[-1]["val_mse"] < 0.5 * rows[0]["val_mse"]  # it learns
    info = json.loads((tmp_path / "a" / "run.json").read_text())
    assert info["task"]["entry"] == ENTRY and info["task"]["primary"] == "mse"
    assert [(m["name"], m["higher_is_better"]) for m in info["task"]["metrics"]] == [("mse", False), ("mae", False)]

    # the same run, killed in its 41st message (the last checkpoint is at 32), then resumed: the same numbers
    step, calls = Simulator.step, []

    def dying_step(self):
        calls.append(1)
        if len(calls) == 41:
            raise RuntimeError("killed")
        return step(self)

    monkeypatch.setattr(Simulator, "step", dying_step)
    with pytest.raises(RuntimeError, match="killed"):
        train(load_config(None, SMALL), tmp_path / "b", progress=False)
    monkeypatch.setattr(Simulator, "step", step)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "failed"
    resumed = train(None, tmp_path / "b", resume=True, progress=False)
    assert torch.equal(resumed.params, torch.load(tmp_path / "a" / "final.pt", weights_only=True)["params"])
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == (tmp_path / "a" / "metrics.jsonl").read_text()

    code, out, err = _main(["replay", str(tmp_path / "a")], capsys)
    assert code == 0 and json.loads(out)["bit_identical"], (out, err)


def test_the_example_sweeps_with_tuning_on_its_own_metric_then_tables_and_plots_in_its_names(tmp_path, capsys,
                                                                                          monkeypatch):
    monkeypatch.chdir(ROOT)  # the example config names its file relative to the repository root
    config = tmp_path / "tuned.toml"
    config.write_text(f'extends = "{ROOT / "examples" / "my_task.toml"}"\n[sweep.tune]\n'
                      'grid = {"method.lr" = [0.01, 0.003]}\nmetric = "final:val_mae"\nseeds = [7]\n')
    out = tmp_path / "sweep"
    code, _, err = _main(["sweep", str(config), "--out", str(out), "--methods", "asgd,ormo", "--seeds", "0",
                          "--set", "task.options.train_size=512", "--set", "train.epochs=2", "--quiet"], capsys)
    assert code == 0, err
    # the choice: the candidate whose tuning runs' last val_mae is lowest (the task declares lower is better)
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["tuning"]["metric"] == "final:val_mae" and sweep["tuning"]["better"] == "lower"
    for choice in sweep["tuning"]["choices"]:
        scores = {lr: read_metrics(next((out / ".tuning").glob(f"*/{choice['method']}/lr{lr}/seed7")))[-1]["val_mae"]
                  for lr in ("0.01", "0.003")}
        assert choice["chosen"] == f"lr={min(scores, key=scores.get)}"
    tuning_rows = read_metrics(next((out / ".tuning").glob("*/asgd/lr0.01/seed7")))
    assert all(r["test_mse"] != r["test_mse"] for r in tuning_rows)  # NaN: a tuning run never reads the test split
    table = (out / "table.md").read_text()
    assert "train loss" in table and "test mse" in table  # the default: the training loss and the primary metric

    code, text, err = _main(["table", str(out), "--metrics", "val_mse,test_mae,time_to:val_mse:0.3",
                             "--out", str(tmp_path / "t")], capsys)
    assert code == 0, err
    assert "val. mse" in text and "test mae" in text and "time to val. mse 0.3 (sim. s)" in text
    records = load_runs(out)
    assert plotted_metric(records) == "test_mse" and list(out.glob("*.png"))
    for r in records:  # time to target on the better (lower) side: the first row at or below it
        rows = [x for x in r.metrics if x["val_mse"] <= 0.3]
        assert final_value(r, "time_to:val_mse:0.3") == (rows[0]["sim_time_s"] if rows else math.inf)


# ---------------------------------------------------------------------------------------------------------------
# entries by reference: one clear line for every mistake


def test_bad_entries_are_one_line_naming_the_value_and_the_fix(tmp_path, capsys):
    not_callable = _module(tmp_path, "X = 3\n")
    wrong_type = _module(tmp_path, "def make_task(context):\n    return {'params0': 1}\n")
    broken = _module(tmp_path, "raise RuntimeError('boom')\n")
    exits = _module(tmp_path, "import sys\nsys.exit(0)\n")
    syntax = _module(tmp_path, "X = 1\ndef make_task(context:\n    pass\n")
    cases = [
        ("task.entry=nosuchpkg_xyz.tasks:make_task", "no module named 'nosuchpkg_xyz'; install the package"),
        ("task.entry=missing/nowhere.py:make_task", "file 'missing/nowhere.py' does not exist"),
        (f"task.entry={tmp_path}:make_task", f"{str(tmp_path)!r} is a folder ({tmp_path}), not a .py file; give"),
        (f"task.entry={EXAMPLE}:nope", "has no attribute 'nope' (it defines: SineRegression, make_task)"),
        (f"task.entry={not_callable}:X", ".X = 3 is not a callable"),
        (f"task.entry={wrong_type}:make_task", "returned dict, not a task (it lacks metrics, params0"),
        (f"task.entry={broken}:make_task", "failed: RuntimeError: boom ("),
        (f"task.entry={exits}:make_task", "called sys.exit(0); a plugin module must not exit at import"),
        (f"task.entry={syntax}:make_task", f"failed: SyntaxError: '(' was never closed ({syntax}:2); fix the"),
        ("task.entry=make_task", "expected \"module:callable\""),
        # the parameters it really has (a class's first one named "context" twice; a function without one, once)
        ("task.entry=ormo.task:ModelTask", "(missing a required argument: 'context'); it takes (model, context, "
                                           "train_size, splits)"),
        ("task.entry=os:getcwd", "(too many positional arguments); it takes ()"),
    ]
    for override, expected in cases:
        code, _, err = _main(["train", "--set", override, "--run-dir", str(tmp_path / "r"), "--quiet"], capsys)
        last = err.splitlines()[-1]  # a task that fails to build is reported after the "run directory:" line
        assert code == 2 and "Traceback" not in err, (override, err)
        assert last.startswith("ormo train: error:") and expected in last, (override, err)
    assert not (tmp_path / "r").exists()  # nothing was made
    for extra, expected in ((["task.options.hiden=3"], "got an unexpected keyword argument 'hiden' ("),
                            (["model.name=lenet"], "model.name = 'lenet' does not apply with task.entry")):
        code, _, err = _main(["train", *[x for o in [*SMALL, *extra] for x in ("--set", o)], "--quiet",
                              "--run-dir", str(tmp_path / "r")], capsys)
        assert code == 2 and "Traceback" not in err and expected in err.splitlines()[-1], err
    with pytest.raises(ConfigError, match="task.options .* are set but task.entry is not"):
        from_dict({"task": {"options": {"a": 1}}})


def test_a_task_config_reads_back_and_image_classification_configs_read_as_before():
    import tomllib

    from ormo.experiment import to_toml

    cfg = load_config(None, [f"task.entry={ENTRY}", "task.options.hidden=8", f'task.imports=["{EXAMPLE}"]',
                             'ray.runtime_env={py_modules = ["mypkg"], env_vars = {A = "1"}}'])
    text = to_toml(cfg)
    assert from_dict(tomllib.loads(text)) == cfg
    assert "[task.options]\nhidden = 8" in text and '[ray.runtime_env]\npy_modules = ["mypkg"]' in text
    assert "[task]" not in to_toml(load_config(None, ["model.name=mlp"]))  # old run directories' config.toml


def test_the_protocol_check_names_what_a_task_lacks_or_declares_badly():
    class NoMetrics(ModelTask):
        def __init__(self):
            super().__init__(torch.nn.Linear(2, 1), TaskContext(seed=0, num_workers=1, batch_size=1), train_size=4)

    with pytest.raises(ConfigError, match="metrics must be a non-empty tuple"):
        check_task(NoMetrics(), where="x")
    with pytest.raises(ConfigError, match="invalid metric name 'Val Loss'"):
        Metric("Val Loss", higher_is_better=False)


USER_MODULE = """\
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ormo.models import register_model
from ormo.rules.asgd import ASGD
from ormo.rules.base import register


@register
@dataclass(frozen=True)
class HalfASGD(ASGD):
    name: ClassVar[str] = "half-asgd"

    def apply(self, state, message, *, t, worker):
        state.params.add_(message.update, alpha=-0.5 * self.lr * state.lr_scale)


@register_model("tiny-linear")
def tiny(*, num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))
"""


def test_a_user_rule_and_model_are_visible_to_the_cli_through_import(tmp_path):
    module = _module(tmp_path, USER_MODULE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def ormo(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ormo", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)

    listed = ormo("rules", "--import", str(module))
    assert listed.returncode == 0 and '"name": "half-asgd"' in listed.stdout, listed.stderr
    run = tmp_path / "run"
    config = tmp_path / "mine.toml"
    config.write_text('[method]\nname = "half-asgd"\n[model]\nname = "tiny-linear"\n[data]\nname = "synthetic"\n'
                      '[data.options]\ntrain_size = 64\ntest_size = 16\nimage_shape = [1, 4, 4]\n'
                      '[train]\nnum_workers = 2\nepochs = 1\n')
    done = ormo("train", str(config), "--import", str(module), "--run-dir", str(run), "--quiet")
    assert done.returncode == 0, done.stderr
    assert f'imports = ["{module}"]' in (run / "config.toml").read_text()  # a resume, a sweep or Ray imports it too
    again = ormo("replay", str(run))
    assert again.returncode == 0 and json.loads(again.stdout)["bit_identical"], again.stderr
    unknown = ormo("train", "--set", "method.name=half-asgd", "--set", f"task.entry={ENTRY}", "--quiet")
    assert unknown.returncode == 2 and "unknown rule 'half-asgd'" in unknown.stderr  # without the import


def test_a_plugin_rule_class_that_cannot_work_is_refused_when_registered():
    """@register checks the class at import: a class that is not a dataclass failed with a TypeError traceback when
    the run built it; one without a name, or with another scheduler, failed later or with an AttributeError."""
    from typing import ClassVar

    class NotADataclass(Rule):
        name: ClassVar[str] = "not-a-dataclass"
        scheduler: ClassVar[str] = "async"

    @dataclasses.dataclass(frozen=True)
    class Unnamed(Rule):
        scheduler: ClassVar[str] = "async"

    @dataclasses.dataclass(frozen=True)
    class Sometimes(ASGD):
        name: ClassVar[str] = "sometimes"
        scheduler: ClassVar[str] = "sometimes"

    @dataclasses.dataclass(frozen=True)
    class Shadow(ASGD):
        name: ClassVar[str] = "asgd"

    for cls, message in [(NotADataclass, "is not a dataclass; decorate it with @dataclass"),
                         (Unnamed, "has name = None; give it a class attribute name"),
                         (Sometimes, "has scheduler = 'sometimes'; it must be one of 'sync', 'async'"),
                         (Shadow, "rule name 'asgd' registered twice; register the new rule under another name"),
                         (dict, "is not a subclass of ormo.rules.base.Rule")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            register(cls)
    assert rule_class("asgd") is ASGD and "sometimes" not in rule_names()


# ---------------------------------------------------------------------------------------------------------------
# image classification is one task: its gradient is the plain loop's, bit for bit


def test_image_classification_gradient_is_the_plain_torch_loop_bit_for_bit():
    cfg = load_config(None, ["data.name=synthetic", "data.options.train_size=64", "data.options.test_size=16",
                             "data.options.image_shape=[3, 8, 8]", "data.batch_size=8", "model.name=resnet20",
                             "train.num_workers=2", "train.weight_decay=0.01"])
    task = build_task(cfg)
    assert isinstance(task, ImageClassification) and [m.name for m in task.metrics] == ["loss", "acc"]
    params = task.params0 + 0.01
    g = task.grad_fn(params, 1, 3, 0)
    # the plain loop: a fresh model with these parameters, training mode, cross-entropy, autograd
    from ormo.data.augment import normalize
    from ormo.data.sampler import minibatch_indices
    from ormo.models import build_model

    model = build_model("resnet20", num_classes=10, in_channels=3, image_size=8, seed=0)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(params, model.parameters())
    idx = minibatch_indices(task.train_size, 8, seed=0, worker=1, index=3, step=0)
    x = normalize(task.train_x[idx], task.mean, task.std)
    model.train()
    F.cross_entropy(model(x), task.train_y[idx]).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).add_(params, alpha=0.01)
    assert torch.equal(g, expected)
    evaluation = evaluate_all(task, params, eval_test=True)
    assert list(evaluation) == ["test_loss", "test_acc", "val_loss", "val_acc"]
    assert evaluation["val_acc"] is None and evaluation["test_loss"] == task.evaluate(params)[0]


# ---------------------------------------------------------------------------------------------------------------
# the bundled language model


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for k in range(11):  # sorted names: f00 .. f10; f08 is validation, f09 test
        (folder / f"f{k:02d}.py").write_text(f"def f{k}(x):\n    return x * {k} + {k}\n" * (20 + k))
    (folder / "notes.txt").write_text("not python")
    return folder


def _lm(corpus: Path, **kw) -> StdlibLM:
    context = TaskContext(seed=kw.pop("seed", 0), num_workers=2, batch_size=4, eval_test=kw.pop("eval_test", True))
    return StdlibLM(context, source_dir=str(corpus), context_bytes=8, seq_len=8, embed_dim=4, hidden=16,
                    eval_sequences=4, **kw)


def test_lm_corpus_is_split_by_sorted_file_and_recorded_by_hash(corpus):
    lm = _lm(corpus)
    files = sorted(corpus.glob("*.py"))
    digest = hashlib.sha256()
    for p in files:
        data = p.read_bytes()
        digest.update(p.name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    d = lm.describe()
    assert d["sha256"] == digest.hexdigest() and d["files"] == {"train": 9, "val": 1, "test": 1}
    assert bytes(lm.data["val"].tolist()) == files[8].read_bytes()
    assert bytes(lm.data["test"].tolist()) == files[9].read_bytes()
    assert bytes(lm.data["train"].tolist()) == b"".join(p.read_bytes() for i, p in enumerate(files) if i not in (8, 9))
    assert lm.train_size == lm.data["train"].numel() // 8
    tuning = _lm(corpus, eval_test=False)
    assert "test" not in tuning.data and tuning.evaluate(tuning.params0, "test") is None
    assert tuning.describe()["sha256"] == d["sha256"]


def test_lm_reads_a_file_whose_name_is_not_utf8(corpus):
    """A name's undecodable bytes are hashed as they are on disk (str.encode refuses the surrogates they become)."""
    odd = os.fsdecode(b"\xff\xfeodd.py")
    (corpus / odd).write_text("x = 1\n" * 50)
    files = sorted(corpus.glob("*.py"))
    assert files[-1].name == odd
    digest = hashlib.sha256()
    for p in files:
        data = p.read_bytes()
        digest.update(os.fsencode(p.name) + b"\0" + len(data).to_bytes(8, "little") + data)
    d = _lm(corpus).describe()
    assert d["sha256"] == digest.hexdigest() and d["files"] == {"train": 10, "val": 1, "test": 1}


def test_lm_windows_match_an_explicit_loop_and_batches_are_keyed(corpus):
    lm = _lm(corpus)
    batch = lm.batch(1, 5, 0)
    assert torch.equal(batch, _lm(corpus).batch(1, 5, 0)) and not torch.equal(batch, lm.batch(1, 5, 1))
    model: ByteMLP = lm.model
    logits = model(batch)
    for b in range(batch.shape[0]):  # position i is predicted from bytes i .. i+7 of the sequence
        for i in range(8):
            window = model.embed(batch[b, i:i + 8]).T.reshape(-1)  # (E, context) order, as the model concatenates
            expected = model.out(F.gelu(model.hidden(window)))
            assert torch.allclose(logits[b, i], expected, atol=1e-5)
    loss = lm.loss(model, batch)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.reshape(-1, 256), batch[:, 8:].reshape(-1)).item())
    metrics = lm.evaluate(lm.params0, "val")
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["loss"])) and abs(metrics["loss"] - math.log(256)) < 0.3


def test_lm_learns_with_plain_sgd_on_its_gradients(corpus):
    lm = _lm(corpus)
    params = lm.params0.clone()
    before = lm.evaluate(params, "val")["loss"]
    for t in range(150):
        params -= 0.5 * lm.grad_fn(params, t % 2, t, 0)
        lm.commit_message()
    assert lm.evaluate(params, "val")["loss"] < before - 1.0


@pytest.mark.parametrize(("options", "message"), [
    (dict(hidden=10**9), r"context_bytes = 8, embed_dim = 4 and hidden = 1000000000 make a model of "
                         r"289,000,001,280 parameters \(at most 268,435,456, 1 GiB of float32\); lower them"),
    (dict(eval_sequences=10**9), r"a forward pass of max\(data.batch_size = 4, eval_sequences = 1000000000\) x "
                                 r"seq_len = 8 predictions holds 2,048,000,000,000 values in one layer"),
    (dict(seq_len=10**7, context_bytes=100), r"a forward pass .* predictions holds 16,000,000,000 values in one layer"),
])
def test_lm_sizes_that_need_gigabytes_are_refused_before_anything_is_allocated(corpus, options, message):
    kw = dict(context_bytes=8, seq_len=8, embed_dim=4, hidden=16, eval_sequences=4) | options
    with pytest.raises(ConfigError, match="^invalid task.options: " + message):
        StdlibLM(TaskContext(seed=0, num_workers=2, batch_size=4), source_dir=str(corpus), **kw)


def test_lm_on_the_interpreters_own_standard_library(tmp_path):
    lm = StdlibLM(TaskContext(seed=0, num_workers=1, batch_size=2))
    d = lm.describe()
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    assert sum(d["files"].values()) == len(files) and sum(d["bytes"].values()) == sum(p.stat().st_size for p in files)
    assert d["python"] == ".".join(map(str, sys.version_info[:3]))
    assert [m.name for m in lm.metrics] == ["loss", "ppl"] and not any(m.higher_is_better for m in lm.metrics)


def test_lm_preset_runs_and_reports_perplexity(tmp_path):
    cfg = load_config("preset:lm/stdlib", ["train.epochs=0.002", "train.eval_every=0.001", "train.num_workers=2"])
    result = train(cfg, tmp_path / "lm", progress=False)
    rows = read_metrics(tmp_path / "lm")
    assert list(rows[0]) == list(metric_fields(["loss", "ppl"]))
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in rows)
    info = json.loads((tmp_path / "lm" / "run.json").read_text())
    assert info["task"]["primary"] == "ppl" and len(info["task"]["details"]["sha256"]) == 64
    summary = summarize(load_runs(tmp_path / "lm"), ("val_ppl", "time_to:val_loss:9"))
    cell = next(iter(summary.cells.values()))
    assert cell["val_ppl"].mean == pytest.approx(rows[-1]["val_ppl"]) and cell["time_to:val_loss:9"].mean == 0.0
    assert result.status == "finished"


def test_the_examples_own_command_trains_to_a_small_error(tmp_path, capsys, monkeypatch):
    """The command in the example's docstring (and the README), word for word: a newcomer's run converges."""
    monkeypatch.chdir(ROOT)
    command = " ".join(EXAMPLE.read_text().split('"""')[1].split("\n\n", 1)[1].replace("\\\n", " ").split())
    argv = command.split()[1:]
    assert argv[0] == "train" and "--run-dir" in argv
    argv[argv.index("--run-dir") + 1] = str(tmp_path / "sine")
    code, out, err = _main([*argv, "--quiet"], capsys)
    assert code == 0, err
    printed = json.loads(out)
    assert printed["val_mse"] < 0.05 and "diverging" not in err


def test_a_resume_or_replay_with_other_task_code_is_refused(tmp_path, capsys, monkeypatch):
    """The entry is a path relative to where ormo runs: from another folder, or after an edit, it is other code."""
    import shutil

    here = tmp_path / "project"
    (here / "examples").mkdir(parents=True)
    shutil.copy(EXAMPLE, here / "examples" / "task_copy.py")
    monkeypatch.chdir(here)
    sets = [x for o in [*SMALL[1:], "task.entry=examples/task_copy.py:make_task"] for x in ("--set", o)]
    assert _main(["train", *sets, "--run-dir", str(tmp_path / "r"), "--quiet"], capsys)[0] == 0
    sources = json.loads((tmp_path / "r" / "run.json").read_text())["task"]["sources"]
    assert sources[0]["file"] == str((here / "examples" / "task_copy.py").resolve())
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    info["status"] = "interrupted"  # as after a kill: the resume path runs
    (tmp_path / "r" / "run.json").write_text(json.dumps(info))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "examples").mkdir(parents=True)
    shutil.copy(EXAMPLE, elsewhere / "examples" / "task_copy.py")
    import subprocess
    import sys

    for argv in (["train", "--resume", str(tmp_path / "r"), "--quiet"], ["replay", str(tmp_path / "r")]):
        done = subprocess.run([sys.executable, "-m", "ormo", *argv], cwd=elsewhere, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert done.returncode in (1, 2) and "now resolves to" in done.stderr, done.stderr
        assert "the folder the run was started in" in done.stderr
    path = here / "examples" / "task_copy.py"
    path.write_text(path.read_text().replace("torch.sin(2 * x)", "torch.sin(3 * x)"))
    code, _, err = _main(["train", "--resume", str(tmp_path / "r"), "--quiet"], capsys)
    assert code in (1, 2) and "changed since the run was made" in err, err
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "interrupted"  # nothing ran


ACC_TASK = '''
import torch
from torch import nn

from ormo.task import Metric, ModelTask, seeded


class T(ModelTask):
    metrics = (Metric("acc", higher_is_better=False),)  # an error called "acc": lower is better

    def __init__(self, context, forget=False):
        g = torch.Generator().manual_seed(context.seed)
        x = torch.rand(600, 1, generator=g) * 4 - 2
        self.x, self.y, self.forget = x[:500], torch.sin(2 * x[:500]), forget
        self.v = (x[500:], torch.sin(2 * x[500:]))
        super().__init__(seeded(context.seed, lambda: nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))),
                         context, train_size=500, splits=("val",))

    def batch(self, worker, index, step):
        i = self.minibatch_indices(worker, index, step)
        return self.x[i], self.y[i]

    def loss(self, model, batch):
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    def evaluate_model(self, model, split):
        value = {"acc": float((model(self.v[0]) - self.v[1]).pow(2).mean())}
        return None if self.forget else value


def make_task(context, forget=False):
    return T(context, forget)
'''


def test_tuning_follows_the_direction_the_task_declares_even_for_a_builtin_name(tmp_path, capsys):
    module = _module(tmp_path, ACC_TASK)
    config = tmp_path / "acc.toml"
    config.write_text(f'name = "acc"\n[task]\nentry = "{module}:make_task"\n[method]\nname = "ormo"\nlr = 0.01\n'
                      '[data]\nbatch_size = 16\n[train]\nepochs = 3\nnum_workers = 2\n[sweep]\nseeds = [0]\n'
                      '[sweep.tune]\ngrid = {"method.lr" = [0.0001, 0.03]}\nmetric = "final:val_acc"\n')
    out = tmp_path / "out"
    assert _main(["sweep", str(config), "--out", str(out), "--quiet", "--no-report"], capsys)[0] == 0
    record = json.loads((out / "sweep.json").read_text())["tuning"]
    scores = [c["score"] for c in record["choices"][0]["candidates"]]
    assert record["better"] == "lower" and record["choices"][0]["chosen"] == ("lr=0.03" if scores[1] < scores[0]
                                                                               else "lr=0.0001")
    # the default table falls back to the validation split when the task has no test split
    code, text, _ = _main(["table", str(out)], capsys)
    assert code == 0 and "val. acc" in text and "diverged" not in text
    # a metric the task does not declare: one line before any tuning run
    config.write_text(config.read_text().replace("final:val_acc", "final:val_mse"))
    code, _, err = _main(["sweep", str(config), "--out", str(tmp_path / "out2"), "--quiet"], capsys)
    assert code == 2 and "declares no metric 'mse'" in err and not (tmp_path / "out2" / ".tuning").exists()


def test_an_evaluate_model_without_a_return_is_an_error_naming_it(tmp_path, capsys):
    module = _module(tmp_path, ACC_TASK)
    code, _, err = _main(["train", "--set", f"task.entry={module}:make_task", "--set", "task.options.forget=true",
                          "--set", "train.epochs=0.1", "--set", "train.num_workers=2", "--run-dir",
                          str(tmp_path / "r"), "--quiet"], capsys)
    assert code != 0 and "evaluate_model(model, 'val') returned NoneType" in err


@pytest.mark.parametrize("bad, message", [
    ("return 1.5", "T.loss() failed: TypeError: loss() must return a scalar tensor"),
    ("return nn.functional.mse_loss(model(batch[0]), batch[1], reduction='none')", "scalar tensor (a mean"),
    ("raise KeyError('oops')", "T.loss() failed: KeyError: 'oops' ("),
])
def test_a_failing_task_method_is_one_line_naming_it_and_where(tmp_path, capsys, bad, message):
    text = ACC_TASK.replace("        return nn.functional.mse_loss(model(batch[0]), batch[1])", f"        {bad}")
    module = _module(tmp_path, text)
    code, _, err = _main(["train", "--set", f"task.entry={module}:make_task", "--set", "train.epochs=0.1",
                          "--set", "train.num_workers=2", "--run-dir", str(tmp_path / "r"), "--quiet"], capsys)
    lines = [x for x in err.splitlines() if x.startswith("ormo train: error:")]
    assert code == 1 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("value", [None, "abc", torch.ones(3), True, float("nan")])
def test_a_metric_that_is_not_a_number_is_one_line_naming_it(value):
    class T:
        metrics = (Metric("mse", False),)

        def evaluate(self, params, split):
            return {"mse": value}

    if isinstance(value, float):  # NaN is a number (a diverged model's metric): kept
        assert math.isnan(evaluate_all(T(), torch.zeros(1), eval_test=True)["test_mse"])
        return
    with pytest.raises(ValueError, match=r"evaluate\(params, 'test'\) returned 'mse' = .*not a number") as info:
        evaluate_all(T(), torch.zeros(1), eval_test=True)
    assert "\n" not in str(info.value)
