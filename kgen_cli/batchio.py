"""Reading batch inputs and writing batch outputs, with resume and in-order buffering.

Kept apart from the command so the file handling (line formats, per-line options, partial lines,
resume) is tested without a model. Everything here is lazy: a 100k-line input is read one line
at a time and only the results that finished ahead of an earlier one are held back.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator, Mapping

from kgen_cli.console import write_whole
from kgen_cli.errors import KgenError, OutputClosed, UsageError
from kgen_cli.sampling import SEED_MAX

LEVELS = ("very_short", "short", "long", "very_long")

# The longest prompt line (or stdin prompt of `kgen expand`) kgen reads, in bytes. A real prompt is
# well under 10 KB (TIPO's context is 1024 tokens); the bound keeps `kgen batch /dev/zero` or a
# binary file from growing one "line" without end (and PipeLines' queue of 1024 lines under 256 MB).
MAX_PROMPT_BYTES = 256 * 1024

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
    "expand_tags": (lambda v: isinstance(v, bool), "true or false"),
    "width": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "height": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "aspect_ratio": (lambda v: _is_num(v) and v > 0, "a positive number"),
    # A data file never names a file for kgen to read: @FILE templates come from the command line.
    "format": (lambda v: isinstance(v, str) and not v.startswith("@"),
               "a preset name or a template (@FILE is for the command line only)"),
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
    if len(raw.removesuffix(b"\n")) > MAX_PROMPT_BYTES:
        raise line_too_long(raw, f"line {number}")
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


def line_too_long(head: bytes, what: str) -> UsageError:
    """The error for input longer than MAX_PROMPT_BYTES (`head`: its first bytes): the input as a
    whole is unusable, as no line end is in sight; NUL bytes say it is binary (or UTF-16)."""
    if b"\x00" in head:
        return UsageError(f"{what} contains NUL bytes (a UTF-16 file? kgen reads UTF-8)")
    return UsageError(f"{what} is longer than {MAX_PROMPT_BYTES} bytes; kgen reads one prompt per line")


def bounded_lines(stream: IO[bytes]) -> Iterator[bytes]:
    """The lines of a binary stream, each cut at MAX_PROMPT_BYTES + 1 bytes: a longer line is
    yielded as its head (no newline) and ends the iteration, so memory stays bounded whatever
    the input (`read_records` turns that head into an error)."""
    while line := stream.readline(MAX_PROMPT_BYTES + 1):
        yield line
        if len(line) > MAX_PROMPT_BYTES and not line.endswith(b"\n"):
            return


def read_records(stream: Iterable[bytes | None], input_format: str | None, *, first_index: int = 0,
                 lines_before: int = 0) -> Iterator[InputRecord | None]:
    """Yield one record per prompt line, lazily (a 100k-line input is never held in memory).

    Blank lines and lines starting with `#` are skipped and take no index. A line that is not
    UTF-8 (or holds NUL bytes), not valid JSON, or has a bad option still gets its index (so
    seeds and resume stay aligned) and carries the reason in `error`. A None from `stream` ("no
    line ready yet", see `PipeLines`) is passed on as None. A line longer than MAX_PROMPT_BYTES
    raises UsageError: the input is not a prompt file (`stream` yields at most that much of a
    line, see `bounded_lines`). `first_index` and `lines_before` number a slice of a larger
    input as the whole input numbers it (`kgen batch --ray` shards)."""
    index = first_index
    fmt = input_format
    number = lines_before
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
                if len(pending) > MAX_PROMPT_BYTES:  # no line end in sight: its head, then stop
                    pending = pending[: MAX_PROMPT_BYTES + 1]
                    break
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


_SURROGATE = re.compile("[\ud800-\udfff]")


# The deepest nesting a JSONL line may have: options are flat (a `ban` list, an `id`); a deeper
# value could not be written back in its record without running out of stack.
MAX_JSON_DEPTH = 32
_TOO_DEEP = f"nested more than {MAX_JSON_DEPTH} levels deep"


def _text_problem(value: Any) -> str | None:
    """What makes a JSON line's value unusable, or None: nesting past MAX_JSON_DEPTH, a lone
    surrogate (a `\\ud800` escape: no UTF-8 can hold it, so writing it would fail) or NUL
    (rejected in raw lines too)."""
    todo = [(value, 0)]
    while todo:  # a loop, not recursion: any nesting json.loads took is walked
        item, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            return _TOO_DEEP
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return "contains a lone surrogate (\\ud800-\\udfff), which is not text"
            if "\x00" in item:
                return "contains NUL (\\u0000)"
        elif isinstance(item, list):
            todo.extend((v, depth + 1) for v in item)
        elif isinstance(item, dict):
            todo.extend((v, depth + 1) for v in [*item, *item.values()])
    return None


def _scrub(value: Any) -> Any:
    """`value` with lone surrogates replaced by U+FFFD, so that an error record can show it."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    return value


def parse_line(index: int, number: int, text: str, fmt: str) -> InputRecord:
    """One prompt line (already stripped) as a record; a bad line gets `error` set."""
    if fmt == "lines":
        return InputRecord(index, number, fields={"tags": text})
    try:
        obj = json.loads(text, parse_constant=_not_json, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        # json's messages may end in "at" ("Unterminated string starting at"): one "at" is enough.
        return InputRecord(index, number, error=f"invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})")
    except ValueError as exc:  # NaN, Infinity, 1e400: Python's json takes them, JSON does not
        return InputRecord(index, number, error=f"invalid JSON ({exc})")
    except RecursionError:
        return InputRecord(index, number, error="invalid JSON (nested too deeply)")
    if not isinstance(obj, dict):
        return InputRecord(index, number, error=f"expected a JSON object, got {type(obj).__name__}")
    return _record(index, number, obj)


def record_from(index: int, item: Any) -> InputRecord:
    """A record from the Python API: a tag string, or a mapping with a JSONL line's keys
    (checked as a line is); `line` is index + 1."""
    if isinstance(item, str):
        item = {"tags": item}
    if isinstance(item, Mapping):
        return _record(index, index + 1, dict(item))
    return InputRecord(index, index + 1, error=f"expected tags (a string) or a mapping of options, got {type(item).__name__}")


def _record(index: int, number: int, obj: dict) -> InputRecord:
    """A JSONL object's record: bad text, unknown keys and values of the wrong type set `error`."""
    if problem := _text_problem(obj):
        if problem == _TOO_DEEP:
            return InputRecord(index, number, error=f"invalid JSON ({problem})")
        obj = _scrub(obj)
    record = InputRecord(index, number, id=obj.get("id"))
    fields = {k: v for k, v in obj.items() if k != "id" and v is not None}
    record.fields = fields
    if problem:
        record.error = f"a JSON string {problem}"
        return record
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
    count = 0
    with open(path, "rb") as fh:
        try:
            for number, raw in enumerate(bounded_lines(fh), start=1):
                count += _classify(raw, number) != (None, None)
        except UsageError:  # an overlong line: the batch reports it when it gets there
            pass
    return count


# ---------------------------------------------------------------------------------------------
# Output


_LINE_BREAKS = re.compile(r"[ \t]*(?:\r\n|\r|\n)\s*")


def one_line(text: str) -> str:
    """A formatted prompt on one line (text output): a multi-line --format is joined with spaces."""
    return _LINE_BREAKS.sub(" ", text.strip())


def _record_head(rec: InputRecord, default_nl: str) -> dict:
    from kgen_cli.records import SCHEMA_VERSION, batch_input_json

    return {"schema_version": SCHEMA_VERSION, "index": rec.index, "id": rec.key, "line": rec.line,
            "input": batch_input_json(rec.fields, default_nl)}


def result_record(rec: InputRecord, result: dict, *, default_nl: str = "", timings: bool = True) -> str:
    """The JSONL line of a finished input (`kgen batch --output-format jsonl`, docs/json.md):
    index, id or line number, input (`default_nl`: the batch's --nl), seed and the result (or its
    variants), with timings unless `timings` is False (then a rerun gives a byte-identical line)."""
    body = _record_head(rec, default_nl)
    body["seed"] = result["seed"]
    variants = result["variants"]
    if result["n"] == 1:
        body.update(variants[0].to_dict())
    else:
        body["variants"] = [v.to_dict() for v in variants]
        body["duplicates_removed"] = result["duplicates"]
    if timings:
        body["timings"] = result["timings"]
    else:
        for v in body.get("variants", [body]):
            for call in v.get("calls", ()):
                call.pop("prompt_seconds", None)
                call.pop("generate_seconds", None)
    return json.dumps(body, ensure_ascii=False)


def error_record(rec: InputRecord, error: BaseException, *, default_nl: str = "") -> str:
    """The JSONL line of a failed input: what identifies it and the error message."""
    body = _record_head(rec, default_nl)
    body["error"] = str(error)
    return json.dumps(body, ensure_ascii=False)


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


class OutputFile:
    """`kgen batch -o FILE`, opened before the model loads and locked for the whole run.

    The exclusive lock (`fcntl.flock`, taken without waiting) keeps a second kgen from writing or
    resuming the same file at once, which would interleave both outputs; it is taken before
    --resume reads the file. Nothing is truncated until `open()` (after the model loaded), and a
    file that this run created is removed again by `discard()` when the run fails before that.
    Without fcntl (Windows) there is no lock."""

    def __init__(self, path: str, *, append: bool):
        self.path, self.append = path, append
        existed = os.path.lexists(path)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise UsageError(f"cannot write --output {path}: {exc.strerror or exc}") from None
        self.created = not existed
        try:
            import fcntl
        except ImportError:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise KgenError(f"{path} is being written by another kgen process") from None
        except OSError:  # a file system without locks: go on without one
            pass

    def open(self) -> IO[str]:
        """The file to write to: emptied first unless appending (--resume)."""
        if not self.append and stat.S_ISREG(os.fstat(self._fd).st_mode):  # not /dev/null
            os.ftruncate(self._fd, 0)
        return open(self.path, "a", encoding="utf-8", newline="\n")

    def discard(self) -> None:
        """The run failed before writing: remove the file if this run created it, release it."""
        if self.created:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.close()

    @staticmethod
    @contextlib.contextmanager
    def discard_on_error(sink: OutputFile | None) -> Iterator[None]:
        """`discard()` `sink` (if any) when the block fails: a failed model load leaves no file."""
        try:
            yield
        except BaseException:
            if sink is not None:
                sink.discard()
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock
            self._fd = -1


class OrderedWriter:
    """Writes results in input order; holds back the ones that finish early.

    `skip` holds the indices that are already in the output (--resume). Each record is written
    whole or not at all (`write_whole`), so neither a stop nor a full disk leaves a partial
    line. Memory is the reorder window only: results that finished while an earlier input was
    still running. `name` (default: the stream's) names the output in a write error."""

    def __init__(self, out: IO[str], skip: set[int] | None = None, name: str | None = None):
        self.out = out
        stream_name = getattr(out, "name", None)
        self.name = name or ("stdout" if stream_name in (None, "<stdout>") else str(stream_name))
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
            write_whole(self.out, "".join(line + "\n" for line in lines))
        except BrokenPipeError:
            raise OutputClosed() from None
        except OSError as exc:
            raise KgenError(f"cannot write {self.name}: {exc.strerror or exc}") from None
        self.written += 1

    def flush_out_of_order(self) -> int:
        """On a stop (JSONL only: records carry their index): write what finished early too.
        Returns how many records that was."""
        n = 0
        for index in sorted(self.pending):
            self._write(self.pending.pop(index))
            n += 1
        return n
