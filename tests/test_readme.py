"""The README's library example is real code: extract it and run it."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.model


def test_readme_python_example_runs(capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "FP16" in out or "INT8" in out  # plan.counts() was printed
