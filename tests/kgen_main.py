"""Running kgen in-process: the console script's main(), with its error funnel; and the thread
count model tests give kgen (KGEN_TEST_THREADS, default 1: see tests/conftest.py)."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout

from kgen_cli.cli import main

THREADS = os.environ.get("KGEN_TEST_THREADS", "1")  # a string: it goes on command lines as --threads


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
