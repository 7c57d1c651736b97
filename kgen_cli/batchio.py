"""Reading batch inputs and writing batch outputs, with resume and in-order buffering.

Kept apart from the command so the file handling (line formats, per-line options, partial lines,
resume) is tested without a model. Everything here is lazy: a 100k-line input is read one line
at a time and only the results that finished ahead of an earlier one are held back.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator

from kgen_cli.errors import OutputClosed, UsageError
from kgen_cli.sampling import SEED_MAX

LEVELS = ("very_short", "short", "long", "very_long")

# Per-line keys of a JSONL input (besides `id`), each with a check of its JSON value. They are
# `expand`'s options under their long names (`prompt` is an alias of `tags`); `null` means "not
# set" (the command-line default applies).
_STR = (str,)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_ban(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


LINE_OPTIONS: dict[str, tuple[Any, str]] = {
    "tags": (lambda v: isinstance(v, str), "a string"),
    "prompt": (lambda v: isinstance(v, str), "a string"),
    "nl": (lambda v: isinstance(v, str), "a string"),
    "seed": (lambda v: _is_int(v) and 0 <= v <= SEED_MAX, f"an integer in [0, {SEED_MAX}]"),
    "tag_length": (lambda v: v in LEVELS, "one of " + ", ".join(LEVELS)),
    "nl_length": (lambda v: v in LEVELS, "one of " + ", ".join(LEVELS)),
    "operation": (lambda v: isinstance(v, str), "a TIPO operation name"),
    "width": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "height": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "aspect_ratio": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "format": (lambda v: isinstance(v, str), "a preset name or a template"),
    "ban": (_check_ban, "a string or a list of strings"),
    "retries": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
    "temperature": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
    "min_p": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "repeat_penalty": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "max_tokens": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "escape_parens": (lambda v: isinstance(v, bool), "true or false"),
}
JSONL_KEYS = frozenset(LINE_OPTIONS) | {"id"}


@dataclass
class InputRecord:
    index: int  # 0-based position among the prompts (blank and comment lines do not count)
    line: int  # 1-based line number in the input
    id: Any = None
    fields: dict = field(default_factory=dict)  # the line's options (JSONL) or {"tags": line}
    error: str | None = None  # set when the line itself is bad (invalid JSON, not UTF-8, bad option)

    @property
    def key(self):
        """What identifies the input in JSONL output: its `id`, else its line number."""
        return self.id if self.id is not None else self.line


def detect_format(first_line: str) -> str:
    """JSONL when the first prompt line is a JSON object (or plainly meant as one: it starts with
    `{"`); anything else, NovelAI-style `{emphasis}` included, is one prompt per line."""
    text = first_line.strip()
    if not text.startswith("{"):
        return "lines"
    if text[1:].lstrip().startswith('"'):
        return "jsonl"
    try:
        return "jsonl" if isinstance(json.loads(text), dict) else "lines"
    except ValueError:
        return "lines"


def _classify(raw: bytes, number: int) -> tuple[str | None, str | None]:
    """One input line as (text, error): (None, None) for a line that is skipped (blank, `#`),
    text for a prompt line (stripped), error for a line that takes an index but cannot be read.
    The one rule for `read_records` and `count_prompts`."""
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte order mark
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not raw.strip() or raw.lstrip().startswith(b"#"):
            return None, None
        if number == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            return None, "the input is UTF-16; kgen reads UTF-8 (convert it, e.g. with iconv)"
        return None, f"not valid UTF-8 (byte {exc.start + 1})"
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None, None
    if "\x00" in stripped:  # a UTF-16 file without its BOM, or binary data
        return None, "contains NUL bytes (a UTF-16 file? kgen reads UTF-8)"
    return stripped, None


def read_records(stream: Iterable[bytes | None], input_format: str | None) -> Iterator[InputRecord | None]:
    """Yield one record per prompt line, lazily (a 100k-line input is never held in memory).

    Blank lines and lines starting with `#` are skipped and take no index. A line that is not
    UTF-8 (or holds NUL bytes), not valid JSON, or has a bad option still gets its index (so
    seeds and resume stay aligned) and carries the reason in `error`. A None from `stream` ("no
    line ready yet", see `PipeLines`) is passed on as None."""
    index = 0
    fmt = input_format
    number = 0
    for raw in stream:
        if raw is None:
            yield None
            continue
        number += 1
        text, error = _classify(raw, number)
        if error is not None:
            yield InputRecord(index, number, error=error)
        elif text is not None:
            if fmt is None:
                fmt = detect_format(text)
            yield parse_line(index, number, text, fmt)
        else:
            continue
        index += 1


class PipeLines:
    """The lines of a pipe or terminal, read by a background thread into a bounded queue, so that
    a batch fed slowly (`tail -f`, a producer process, typing) decodes what it has instead of
    blocking on its input. Iterating yields each line (bytes, newline kept), or None when no line
    is ready and `busy()` says there is other work; when there is none it waits for the input.
    `wait` wraps the blocking waits (the command makes them interruptible by its signals)."""

    _END = object()

    def __init__(self, fd: int, *, max_lines: int = 1024, chunk: int = 65536):
        import queue
        import threading

        self._queue: Any = queue.Queue(maxsize=max_lines)
        self._fd, self._chunk = fd, chunk
        self.busy: Callable[[], bool] = lambda: False
        self.wait: Callable[[Callable[[], Any]], Any] = lambda get: get()
        # A daemon thread on the raw fd: no buffered-file lock is held when the process exits.
        threading.Thread(target=self._read, name="kgen-input", daemon=True).start()

    def _read(self) -> None:
        pending = b""
        try:
            while True:
                data = os.read(self._fd, self._chunk)
                if not data:
                    break
                pending += data
                if b"\n" in data:
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        self._queue.put(line + b"\n")
            if pending:
                self._queue.put(pending)
            self._queue.put(self._END)
        except BaseException as exc:  # an unreadable input: the batch sees the error
            self._queue.put(exc)

    def __iter__(self) -> Iterator[bytes | None]:
        import queue

        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if self.busy():
                    yield None
                    continue
                item = self.wait(self._queue.get)
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def parse_line(index: int, number: int, text: str, fmt: str) -> InputRecord:
    """One prompt line (already stripped) as a record; a bad line gets `error` set."""
    if fmt == "lines":
        return InputRecord(index, number, fields={"tags": text})
    try:
        obj = json.loads(text, parse_constant=_not_json, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        return InputRecord(index, number, error=f"invalid JSON ({exc.msg} at column {exc.colno})")
    except ValueError as exc:  # NaN, Infinity, 1e400: Python's json takes them, JSON does not
        return InputRecord(index, number, error=f"invalid JSON ({exc})")
    except RecursionError:
        return InputRecord(index, number, error="invalid JSON (nested too deeply)")
    if not isinstance(obj, dict):
        return InputRecord(index, number, error=f"expected a JSON object, got {type(obj).__name__}")
    record = InputRecord(index, number, id=obj.get("id"))
    fields = {k: v for k, v in obj.items() if k != "id" and v is not None}
    record.fields = fields
    unknown = sorted(set(obj) - JSONL_KEYS)
    if unknown:
        record.error = f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(JSONL_KEYS))}"
        return record
    for key, value in fields.items():
        check, expected = LINE_OPTIONS[key]
        if not check(value):
            record.error = f"{key} must be {expected}, not {json.dumps(value, ensure_ascii=False)[:80]}"
            return record
    if "prompt" in fields:
        if "tags" in fields:
            record.error = "give either tags or prompt, not both"
            return record
        fields["tags"] = fields.pop("prompt")
    if ("width" in fields) != ("height" in fields):
        record.error = "width and height go together"
    elif "width" in fields and "aspect_ratio" in fields:
        record.error = "give either width/height or aspect_ratio, not both"
    return record


def count_prompts(path: str) -> int:
    """Prompt lines in a file (the rule of `read_records`), for the progress total."""
    with open(path, "rb") as fh:
        return sum(1 for number, raw in enumerate(fh, start=1) if _classify(raw, number) != (None, None))


# ---------------------------------------------------------------------------------------------
# Output


_LINE_BREAKS = re.compile(r"[ \t]*(?:\r\n|\r|\n)\s*")


def one_line(text: str) -> str:
    """A formatted prompt on one line (text output): a multi-line --format is joined with spaces."""
    return _LINE_BREAKS.sub(" ", text.strip())


def scan_done(path: str, output_format: str, variants: int) -> set[int]:
    """Indices of inputs already in an output file (for --resume); cuts a partial last line.

    JSONL records carry their `index`. Text output holds one line per input, in input order (a
    failed input leaves an empty line), so N lines mean inputs 0..N-1 are done; with `-n` > 1
    the line count says nothing, so text resume needs `-n 1`."""
    if output_format == "text" and variants != 1:
        raise UsageError("--resume with text output needs -n 1; use --output-format jsonl")
    if not os.path.exists(path):
        return set()
    if not os.path.isfile(path):
        raise UsageError(f"cannot --resume into {path}: not a regular file")
    truncate_partial_line(path)
    done: set[int] = set()
    with open(path, "rb") as fh:
        if output_format == "jsonl":
            for number, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue  # a blank line (an editor's, a concatenation's): no record
                try:
                    done.add(int(json.loads(raw)["index"]))
                except (ValueError, KeyError, TypeError):
                    raise UsageError(
                        f"{path} line {number} is not a kgen JSONL record (no 'index'); cannot --resume"
                    ) from None
        else:
            n = 0
            for raw in fh:
                if n == 0 and raw.startswith(b'{"index": '):
                    raise UsageError(f"{path} holds JSONL records; resume it with --output-format jsonl")
                n += 1
            done = set(range(n))
    return done


def truncate_partial_line(path: str) -> None:
    """Cut everything after the file's last newline (a record cut short by a crash)."""
    with open(path, "rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            step = min(65536, pos)
            fh.seek(pos - step)
            chunk = fh.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                fh.truncate(pos - step + nl + 1)
                return
            pos -= step
        fh.truncate(0)


class OrderedWriter:
    """Writes results in input order; holds back the ones that finish early.

    `skip` holds the indices that are already in the output (--resume). Each record is one
    write and one flush, so a stop between two records never leaves a partial line. Memory is
    the reorder window only: results that finished while an earlier input was still running."""

    def __init__(self, out: IO[str], skip: set[int] | None = None):
        self.out = out
        self.skip = set(skip or ())  # a copy: it shrinks as the output moves past it
        self.next_index = 0
        self.pending: dict[int, list[str]] = {}
        self.written = 0  # records written
        self.peak_pending = 0

    def add(self, index: int, lines: list[str]) -> None:
        self.pending[index] = lines
        self.peak_pending = max(self.peak_pending, len(self.pending))
        self._drain()

    def _drain(self) -> None:
        while True:
            if self.next_index in self.skip and self.next_index not in self.pending:
                self.skip.discard(self.next_index)  # behind us now; keeps `skip` shrinking
                self.next_index += 1
                continue
            lines = self.pending.pop(self.next_index, None)
            if lines is None:
                return
            self._write(lines)
            self.next_index += 1

    def _write(self, lines: list[str]) -> None:
        try:
            self.out.write("".join(line + "\n" for line in lines))
            self.out.flush()
        except BrokenPipeError:
            raise OutputClosed() from None
        self.written += 1

    def flush_out_of_order(self) -> int:
        """On a stop (JSONL only: records carry their index): write what finished early too.
        Returns how many records that was."""
        n = 0
        for index in sorted(self.pending):
            self._write(self.pending.pop(index))
            n += 1
        return n
