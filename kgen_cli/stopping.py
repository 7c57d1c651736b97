"""Stopping a long run on SIGINT/SIGTERM without cutting a result in half (kgen batch, expand -n)."""

from __future__ import annotations

import signal
from contextlib import contextmanager

from kgen_cli.console import stdout_reader_gone
from kgen_cli.errors import OutputClosed, StopRequested


class Interrupted(StopRequested):
    """SIGINT/SIGTERM during a long run: stop, write what finished, exit 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 128 + signum


class SignalStop:
    """Signal handling that never cuts a write in half.

    The first SIGINT/SIGTERM only sets a flag; the run stops at its next safe point (before a
    decode step, see `check`), after every result finished so far has been written. The
    exception is raised at once when the run is blocked reading its input (kgen batch on a quiet
    pipe or a terminal), and on a second signal."""

    def __init__(self, *, watch_stdout: bool = False) -> None:
        self.signum: int | None = None
        self.reading = False
        self.finishing = False
        self.watch_stdout = watch_stdout  # check() also stops once a pipe reader has gone

    def handler(self, signum, _frame) -> None:
        if self.finishing:
            return
        if self.signum is not None or self.reading:
            self.signum = self.signum or signum
            raise Interrupted(self.signum)
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)
        if self.watch_stdout and stdout_reader_gone():
            raise OutputClosed()  # the CLI exits quietly (141)

    def blocking(self, wait):
        """Run a blocking wait for input (`wait()`) so that a signal interrupts it at once."""
        self.check()
        self.reading = True
        try:
            return wait()
        finally:
            self.reading = False

    def watch(self, stream):
        """The input's lines, with this stop able to interrupt a blocking read."""
        it = iter(stream)
        while True:
            try:
                line = self.blocking(lambda: next(it))
            except StopIteration:
                return
            yield line

    @contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
