"""Running kgen under pseudo-terminals, to see what a screen receives on stdout and on stderr.

`run_in_terminal` gives the command real terminals: one shared by stdout and stderr (as in an
interactive shell), or one each, so that a test can tell which stream carried every byte.
`screen` replays carriage returns and newlines the way a terminal draws them.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TerminalRun:
    returncode: int
    stdout: str  # what the stdout terminal received (everything, when shared)
    stderr: str  # what the stderr terminal received ("" when shared)


def run_in_terminal(*args: str, shared: bool = True, stdin: bytes | None = None, env: dict | None = None,
                    timeout: float = 120.0, columns: int = 100) -> TerminalRun:  # fmt: skip
    """`python -m kgen_cli ARGS` with stdout (and stderr) on pseudo-terminals. stdin is the
    given bytes through a pipe, or a terminal of its own when None."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": str(columns), "TERM": "xterm-256color", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    out_master, out_slave = pty.openpty()
    err_master, err_slave = (out_master, out_slave) if shared else pty.openpty()
    for fd in {out_slave, err_slave}:  # a real terminal's size
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    in_master, in_slave = (None, None) if stdin is not None else pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kgen_cli", *args], cwd=ROOT, env=full_env,
        stdin=subprocess.PIPE if stdin is not None else in_slave, stdout=out_slave, stderr=err_slave,
    )  # fmt: skip
    for fd in {out_slave, err_slave, in_slave} - {None}:
        os.close(fd)
    if stdin is not None:
        proc.stdin.write(stdin)
        proc.stdin.close()
    received = {out_master: bytearray(), err_master: bytearray()}
    open_fds = set(received)
    deadline = time.monotonic() + timeout
    while open_fds and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_fds), [], [], 0.2)
        for fd in ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed its side
                chunk = b""
            if chunk:
                received[fd] += chunk
            else:
                open_fds.discard(fd)
        if not ready and proc.poll() is not None:
            break
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for fd in {out_master, err_master, in_master} - {None}:
        os.close(fd)
    decode = lambda data: data.decode("utf-8", "replace").replace("\r\n", "\n")  # the tty's ONLCR
    return TerminalRun(proc.returncode, decode(received[out_master]), "" if shared else decode(received[err_master]))


def strip_ansi(text: str) -> str:
    """`text` without its CSI escape sequences (colours, styles)."""
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def screen(text: str) -> list[str]:
    """The lines a terminal shows after drawing `text` (a carriage return moves to the start of
    the line, later characters overwrite earlier ones), trailing spaces removed."""
    lines = []
    for raw in text.split("\n"):
        cells: list[str] = []
        col = 0
        for ch in raw:
            if ch == "\r":
                col = 0
                continue
            if col < len(cells):
                cells[col] = ch
            else:
                cells.append(ch)
            col += 1
        lines.append("".join(cells).rstrip())
    while lines and not lines[-1]:
        lines.pop()
    return lines
