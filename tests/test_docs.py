"""docs/cli.md is generated from the Typer app; this fails when it is stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "python -m typer kgen_cli.cli utils docs --name kgen --output docs/cli.md"


def test_cli_reference_is_up_to_date(tmp_path):
    out = tmp_path / "cli.md"
    subprocess.run(
        [sys.executable, "-m", "typer", "kgen_cli.cli", "utils", "docs", "--name", "kgen", "--output", str(out)],
        cwd=ROOT, check=True, capture_output=True,
    )
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert out.read_text(encoding="utf-8") == committed, f"docs/cli.md is stale; run: {REGENERATE}"
