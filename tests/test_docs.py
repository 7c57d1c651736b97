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


def test_defaults_written_into_help_survive_rich_markup():
    # Rich reads "[default: ...]" as a style tag and drops it unless the bracket is escaped.
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for shown in ("[default: TIPO 10, DTG 20]", "[default: tgts when -n &gt; 1]", "[default: 0.95]"):
        assert shown in committed


def test_retries_range_in_help_matches_the_pipeline():
    from kgen_cli.commands._options import RetriesOpt
    from kgen_cli.pipeline import MAX_RETRIES

    assert RetriesOpt.__metadata__[0].max == MAX_RETRIES
