"""The README's first steps work as written: the two opening commands, how to call `ormo` after them, the Python
example (run, and its printed result checked against the README), the spec link and every command's config."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import pytest

import ormo
from ormo.cli import main
from ormo.presets import preset_path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _python_example() -> str:
    return re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)


def _run_example(block: str) -> tuple[dict, str, list]:
    scope: dict = {}
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        exec(compile(block, "README.md", "exec"), scope)
    return scope, out.getvalue(), [w for w in caught if issubclass(w.category, ormo.GrowthWarning)]


def test_readme_opens_with_the_two_commands_then_says_how_to_call_ormo():
    head = "\n".join(README.read_text().splitlines()[:16])
    assert "make demo" in head and "make test" in head
    # `ormo` is not on PATH after `make`: the reader is told both ways to call it
    assert "source .venv/bin/activate" in head and ".venv/bin/ormo" in head


def test_readme_python_example_runs_and_converges_as_printed(tmp_path, monkeypatch):
    block = _python_example()
    monkeypatch.chdir(tmp_path)
    scope, printed, growth = _run_example(block)
    assert scope["result"].params.dtype == scope["params0"].dtype
    assert len(scope["result"].events) == 2000
    assert (scope["again"].params == scope["result"].params).all()  # the replay is bit-identical
    # what the example prints is what the README says it prints, on the line after the print
    lines = printed.splitlines()
    assert lines and all(f"\n# {line}\n" in block for line in lines)
    assert float(scope["result"].params.norm()) < 0.01 * float(scope["params0"].norm())  # converged
    assert growth == []


def test_readme_python_example_at_lr_0_1_diverges_with_the_growth_warning(tmp_path, monkeypatch):
    block = _python_example()
    assert 'make_rule("ormo", lr=0.01,' in block
    monkeypatch.chdir(tmp_path)
    scope, _, growth = _run_example(block.replace('make_rule("ormo", lr=0.01,', 'make_rule("ormo", lr=0.1,'))
    assert float(scope["result"].params.norm()) > 1e16  # "|w_T| ≈ 5e16"
    # once per run: the run and its replay (a second run) warn once each, at the iteration the README names
    assert ["t=767" in str(w.message) for w in growth] == [True, True]
    assert "after iteration 767" in README.read_text()


def test_readme_links_stay_inside_the_repository():
    text = README.read_text()
    links = re.findall(r"\]\(([^)#]+)\)", text)
    local = [x for x in links if not re.match(r"[a-z]+://", x)]
    assert "docs/ALGORITHMS.md" in local
    for link in local:
        assert (ROOT / link).resolve().is_relative_to(ROOT) and (ROOT / link).exists(), link
    spec = (ROOT / "docs" / "ALGORITHMS.md").read_text()
    assert spec.startswith("> Origin:") and "# ALGORITHMS.md" in spec


def test_every_config_and_preset_the_readme_names_exists():
    text = README.read_text()
    paths = set(re.findall(r"configs/[\w/]+\.toml", text))
    assert "configs/quickstart.toml" in paths and len(paths) >= 8
    for p in paths:
        assert (ROOT / p).is_file(), p
    presets = set(re.findall(r"preset:([\w/]+)", text))
    assert {"quickstart", "ormo/table1_cifar10"} <= presets
    for name in presets:
        if name != "NAME":
            assert preset_path(name).is_file()


def test_every_ormo_subcommand_the_readme_uses_exists(capsys):
    text = README.read_text()
    shell = "\n".join(re.findall(r"```sh\n(.*?)```", text, re.S))
    used = set(re.findall(r"^ormo ([a-z][a-z-]*)", shell, re.M)) | set(re.findall(r"`ormo ([a-z][a-z-]*)", text))
    assert {"train", "sweep", "demo", "presets", "table", "plot", "replay", "rules"} <= used
    for command in sorted(used):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0, command
    capsys.readouterr()


def test_readme_config_error_example_and_model_names_are_the_code_s():
    from ormo.experiment.config import load_config
    from ormo.models import model_names

    text = README.read_text()
    example = re.search(r"e\.g\.\n?`(unknown key method\.learning_rate; [^`]*)`", text).group(1)
    with pytest.raises(ormo.ConfigError) as info:
        load_config("preset:quickstart", overrides=["method.learning_rate=0.1"])
    assert str(info.value) == example
    row = re.search(r"^\| `\[model\]` \| `name`: (.*) \|$", text, re.M).group(1)
    assert set(re.findall(r"`([\w-]+)`", row)) == set(model_names())
