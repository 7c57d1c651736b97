"""Running kgen in-process: the console script's main(), with its error funnel."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

from kgen_cli.cli import main


def run_main(*args: str) -> tuple[int, str, str]:
    """main() with stdout/stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()
