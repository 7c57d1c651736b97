"""Every ```python block of docs/api.md runs, on the SmolLM2 test model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
PLACEHOLDER = 'MODEL = "tipo-500m-q8_0"'
BLOCKS = re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_page_has_examples_and_they_name_the_model_one_way():
    assert len(BLOCKS) >= 4
    for block in BLOCKS:
        assert "kgen.load(MODEL" not in block or PLACEHOLDER in block  # the test can point it at the test model


@pytest.mark.model
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index, model_path, capsys):
    code = BLOCKS[index].replace(PLACEHOLDER, f"MODEL = {str(model_path)!r}")
    exec(compile(code, f"docs/api.md block {index + 1}", "exec"), {"__name__": "__docs__"})  # noqa: S102
    assert capsys.readouterr().out.strip()  # every example prints what it shows
