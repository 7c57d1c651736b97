"""One place that decides where text goes: stdout carries results only, everything else stderr.

`NO_COLOR` (any non-empty value, no-color.org) and `TERM=dumb` turn every escape code off:
colours, bold and dim, in kgen's own output and in the help. The batch progress line
(`StatusLine`) uses only carriage returns and spaces, so it needs no escape codes at all.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import select
import shutil
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from rich.console import Console

from kgen_cli.errors import KgenError, OutputClosed


def plain_output() -> bool:
    """NO_COLOR set (to anything but the empty string) or TERM=dumb: no escape codes at all."""
    return os.environ.get("NO_COLOR", "") != "" or os.environ.get("TERM") == "dumb"


def make_console(*, stderr: bool) -> Console:
    """A rich console that honours `plain_output()` (rich alone keeps bold and dim under NO_COLOR)."""
    return Console(stderr=stderr, highlight=False, color_system=None if plain_output() else "auto")


# Diagnostics and decoration. No colour when stderr is not a terminal.
err_console = make_console(stderr=True)


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
    with status_hidden():
        err_console.print(text, soft_wrap=True, markup=False, highlight=False, emoji=False)


def human_size(size: int | None) -> str:
    """Bytes for people, in decimal units as the hub shows them: 540.6 MB; '-' when unknown."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


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
    stream without a file descriptor (a StringIO) is written the plain way. The progress line,
    if one is up, is erased first and drawn again after (`status_hidden`)."""
    with status_hidden():
        _write_whole(out, text)


def _write_whole(out: IO[str], text: str) -> None:
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


class StatusLine:
    """One line of progress at the bottom of the terminal, on stderr only.

    It never ends in a newline, so a carriage return, spaces and a carriage return erase it: no
    escape codes (NO_COLOR and TERM=dumb need none). Everything else kgen writes while it is up
    (results on stdout, messages on stderr) goes through `status_hidden()`, which erases it first
    and draws it again after, so that results print cleanly above it even when stdout and
    stderr are the same terminal, and no part of it ever reaches stdout."""

    def __init__(self) -> None:
        self.text = ""
        self.drawn = 0  # characters on screen now

    def show(self, text: str) -> None:
        width = max(_stderr_columns() - 1, 10)  # never wrap: a carriage return reaches one line only
        self.text = text[:width]
        self._erase()
        self._write(self.text)
        self.drawn = len(self.text)

    def hide(self) -> None:
        self._erase()

    def redraw(self) -> None:
        if self.text and not self.drawn:
            self._write(self.text)
            self.drawn = len(self.text)

    def _erase(self) -> None:
        if self.drawn:
            self._write("\r" + " " * self.drawn + "\r")
            self.drawn = 0

    @staticmethod
    def _write(text: str) -> None:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _stderr_columns() -> int:
    """The width of the terminal stderr is on (stdout may be a file), else COLUMNS or 80."""
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns or shutil.get_terminal_size(fallback=(80, 24)).columns  # 0: a size never set


_status: StatusLine | None = None


@contextmanager
def status_line(enabled: bool = True) -> Iterator[StatusLine | None]:
    """The progress line for a block (None when disabled or stderr is not a terminal); erased
    when the block ends, however it ends."""
    global _status
    if not enabled or not stderr_is_tty():
        yield None
        return
    _status = StatusLine()
    try:
        yield _status
    finally:
        _status.hide()
        _status = None


@contextmanager
def status_hidden() -> Iterator[None]:
    """Erase the progress line (if one is up) around a write, then draw it again."""
    status = _status
    if status is None:
        yield
        return
    status.hide()
    try:
        yield
    finally:
        status.redraw()


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


def reflow(doc: str | None) -> str:
    """A docstring as command help: its paragraphs each on one line, so that the help wraps them
    at the terminal's width (Typer keeps a docstring's own line breaks)."""
    import inspect

    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def examples(*commands: str, note: str | None = None) -> str:
    """A command's help epilog: an optional note, then its examples, one command a line."""
    text = "Examples:\n" + "\n".join(f"  {command}" for command in commands)
    return f"{note}\n\n{text}" if note else text


def help_as_usage_error(ctx) -> None:
    """`kgen` or `kgen models` alone: the command's help once, on stderr, exit 2 (a usage error).

    Typer's rich help prints straight to stdout while it is formatted, so stdout is pointed at
    stderr for the call (click's plain help comes back as a string instead)."""
    import contextlib

    import typer

    with contextlib.redirect_stdout(sys.stderr):
        text = ctx.get_help()
    if text:
        typer.echo(text, err=True)
    raise typer.Exit(2)


def require_open(name: str, hint: str | None = None) -> None:
    """Fail before any work when the results' stream (or the input's) was closed at start."""
    if isinstance(getattr(sys, name), ClosedStream):
        raise KgenError(f"{name} is closed", hint=hint)
