"""One place that decides where text goes: stdout carries results only, everything else stderr."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import select
import stat
import sys
from typing import IO

from rich.console import Console

from kgen_cli.errors import KgenError, OutputClosed

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
    """Write one result to stdout, newline-terminated, whole or not at all (`write_whole`)."""
    try:
        write_whole(sys.stdout, text if text.endswith("\n") else text + "\n")
    except BrokenPipeError:
        raise OutputClosed() from None
    except OSError as exc:  # a full disk, /dev/full
        raise KgenError(f"cannot write stdout: {exc.strerror or exc}") from None


def write_whole(out: IO[str], text: str) -> None:
    """Write `text` completely or not at all: when the write fails (a full disk, a second signal)
    on a regular file, what it wrote is cut off again, so no partial line is left behind. A
    stream without a file descriptor (a StringIO) is written the plain way."""
    try:
        fd = out.fileno()
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError
        out.write(text)
        out.flush()
        return
    out.flush()
    data = memoryview(text.encode(getattr(out, "encoding", None) or "utf-8", getattr(out, "errors", None) or "strict"))
    try:
        start = os.lseek(fd, 0, os.SEEK_CUR) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except OSError:
        start = None
    try:
        while data:
            data = data[os.write(fd, data):]
    except BaseException:
        if start is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
                os.lseek(fd, start, os.SEEK_SET)
        raise


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (`kgen ... | head -3` once head has
    its lines). A write would raise BrokenPipeError; checking first lets a long run stop now
    instead of at its next result. Always False for a file or a terminal."""
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


class ClosedStream(io.TextIOBase):
    """Stands in for a standard stream the process was started without (`kgen ... >&-`), where
    Python leaves None: using it is a one-line error instead of an AttributeError."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    @property
    def buffer(self) -> ClosedStream:
        return self

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError(errno.EBADF, f"{self.name} is closed")

    def flush(self) -> None:  # called at exit too: nothing to flush
        pass

    def _closed(self, *_args, **_kwargs):
        raise KgenError(f"{self.name} is closed")

    read = readline = readlines = write = writelines = __next__ = _closed


def stand_in_for_closed_streams() -> None:
    """Started with stdin/stdout/stderr closed: keep their descriptors taken (by /dev/null), so
    that a file kgen opens never becomes fd 1 and receives what C code writes there, and give
    Python a stand-in. A closed stderr just discards diagnostics."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        setattr(sys, name, open(os.devnull, "w") if name == "stderr" else ClosedStream(name))


def require_open(name: str, hint: str | None = None) -> None:
    """Fail before any work when the results' stream (or the input's) was closed at start."""
    if isinstance(getattr(sys, name), ClosedStream):
        raise KgenError(f"{name} is closed", hint=hint)
