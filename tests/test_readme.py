"""The README's Python example runs as written, and its opening lines give the two commands."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_opens_with_the_two_commands():
    head = "\n".join(README.read_text().splitlines()[:12])
    assert "make demo" in head and "make test" in head


def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["result"].params.dtype == scope["params0"].dtype
    assert len(scope["result"].events) == 2000
    assert (scope["again"].params == scope["result"].params).all()  # the replay is bit-identical
