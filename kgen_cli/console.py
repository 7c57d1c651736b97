"""One place that decides where text goes: stdout carries results only, everything else stderr."""

from __future__ import annotations

import os
import sys

from rich.console import Console

# Diagnostics, progress and streaming decoration. No colour when stderr is not a terminal.
err_console = Console(stderr=True, highlight=False)


def stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def debug_enabled() -> bool:
    return os.environ.get("KGEN_DEBUG", "") not in ("", "0")


def info(text: str) -> None:
    """One diagnostic line on stderr, as is: never wrapped at the terminal width (a model path
    stays whole for copy and paste and for `grep`), never read as rich markup or highlighted."""
    err_console.print(text, soft_wrap=True, markup=False, highlight=False, emoji=False)


def write_result(text: str) -> None:
    """Write one result to stdout, newline-terminated, flushed (pipes see whole lines)."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()
