"""Reading batch inputs and writing batch outputs, with resume and in-order buffering.

Kept apart from the command so the file handling (line formats, partial lines, resume) is tested
without a model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import IO, Any, Iterator

from kgen_cli.errors import UsageError

# Per-line keys of a JSONL input, mapped to `expand` option names.
JSONL_KEYS = {
    "id", "tags", "prompt", "nl", "seed", "tag_length", "nl_length", "operation", "width", "height",
    "aspect_ratio", "format", "ban", "retries", "temperature", "top_p", "top_k", "min_p",
    "repeat_penalty", "max_tokens", "escape_parens",
}


@dataclass
class InputRecord:
    index: int  # 0-based position among the prompts (skipped lines do not count)
    line: int  # 1-based line number in the input
    id: Any = None
    fields: dict = field(default_factory=dict)
    error: str | None = None  # set when the line itself is bad (invalid JSON, not UTF-8, unknown key)

    @property
    def key(self):
        return self.id if self.id is not None else self.line


def detect_format(first_line: str) -> str:
    return "jsonl" if first_line.lstrip().startswith("{") else "lines"


def read_records(stream: IO[bytes], input_format: str | None) -> Iterator[InputRecord]:
    """Yield one record per prompt line, lazily (a 100k-line input is never held in memory)."""
    index = 0
    fmt = input_format
    for number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            yield InputRecord(index, number, error=f"line {number} is not valid UTF-8")
            index += 1
            continue
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if fmt is None:
            fmt = detect_format(stripped)
        yield _parse_line(index, number, stripped, fmt)
        index += 1


def _parse_line(index: int, number: int, text: str, fmt: str) -> InputRecord:
    if fmt == "lines":
        return InputRecord(index, number, fields={"tags": text})
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return InputRecord(index, number, error=f"line {number}: invalid JSON ({exc.msg})")
    if not isinstance(obj, dict):
        return InputRecord(index, number, error=f"line {number}: expected a JSON object")
    unknown = sorted(set(obj) - JSONL_KEYS)
    record = InputRecord(index, number, id=obj.get("id"), fields={k: v for k, v in obj.items() if k != "id"})
    if unknown:
        record.error = f"line {number}: unknown key(s) {', '.join(unknown)}"
    if "prompt" in record.fields and "tags" not in record.fields:
        record.fields["tags"] = record.fields.pop("prompt")
    return record


def scan_done(path: str, output_format: str, variants: int) -> set[int]:
    """Indices of inputs already in an output file (for --resume); drops a partial last line."""
    if not os.path.exists(path):
        return set()
    _truncate_partial_line(path)
    done: set[int] = set()
    with open(path, "rb") as fh:
        if output_format == "jsonl":
            for raw in fh:
                try:
                    done.add(int(json.loads(raw)["index"]))
                except (ValueError, KeyError, TypeError):
                    raise UsageError(f"{path} is not a kgen JSONL output (a line has no 'index'); cannot --resume") from None
        else:
            if variants != 1:
                raise UsageError("--resume with text output needs -n 1; use --output-format jsonl")
            done = set(range(sum(1 for _ in fh)))
    return done


def _truncate_partial_line(path: str) -> None:
    with open(path, "rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        # Walk back to the last newline; everything after it is a partial record.
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
    """Writes results in input order; holds back the ones that finish early."""

    def __init__(self, out: IO[str], skip: set[int] | None = None):
        self.out = out
        self.skip = skip or set()
        self.next_index = 0
        self.pending: dict[int, list[str]] = {}

    def add(self, index: int, lines: list[str]) -> None:
        self.pending[index] = lines
        self._drain()

    def _drain(self) -> None:
        while True:
            if self.next_index in self.skip and self.next_index not in self.pending:
                self.next_index += 1
                continue
            lines = self.pending.pop(self.next_index, None)
            if lines is None:
                return
            self._write(lines)
            self.next_index += 1

    def _write(self, lines: list[str]) -> None:
        if lines:
            # One write + flush per record: a kill between records never leaves a partial line.
            self.out.write("".join(line + "\n" for line in lines))
            self.out.flush()

    def flush_out_of_order(self) -> None:
        """On interrupt (JSONL only, records carry their index): write what finished early too."""
        for index in sorted(self.pending):
            self._write(self.pending.pop(index))
