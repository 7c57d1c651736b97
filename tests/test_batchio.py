"""Batch input and output without a model: line formats, per-line options, resume, ordering."""

from __future__ import annotations

import io
import itertools
import os
import time
import tracemalloc

import pytest

from kgen_cli.batchio import (
    OrderedWriter,
    PipeLines,
    count_prompts,
    detect_format,
    one_line,
    read_records,
    scan_done,
    truncate_partial_line,
)
from kgen_cli.errors import UsageError


def records(text: bytes | str, fmt=None):
    data = text.encode() if isinstance(text, str) else text
    return list(read_records(io.BytesIO(data), fmt))


# -- reading -------------------------------------------------------------------------------------


def test_lines_skip_blanks_and_comments_and_keep_line_numbers():
    recs = records("\ufeff1girl, solo\r\n\n# a comment\n   \n  cat ears  \n#x\nlast")
    assert [(r.index, r.line, r.fields["tags"]) for r in recs] == [
        (0, 1, "1girl, solo"), (1, 5, "cat ears"), (2, 7, "last")]
    assert all(r.error is None for r in recs)
    assert recs[1].key == 5  # no id: the line number identifies it


@pytest.mark.parametrize("first, fmt", [
    ('{"tags": "1girl"}', "jsonl"),
    ('{ "tags": "1girl", oops', "jsonl"),  # meant as JSON: reported as a bad line, not run as tags
    ("{}", "jsonl"),
    ("{masterpiece}, 1girl, {{best quality}}", "lines"),  # NovelAI emphasis
    ("1girl, {solo}", "lines"),
    ("[1, 2]", "lines"),
])
def test_format_detection(first, fmt):
    assert detect_format(first) == fmt


def test_detection_uses_the_first_prompt_line_and_input_format_overrides_it():
    text = '# header\n\n{"tags": "a"}\n{"tags": "b", "id": "x"}\n'
    recs = records(text)
    assert [r.fields["tags"] for r in recs] == ["a", "b"] and recs[1].key == "x"
    forced = records(text, "lines")
    assert [r.fields["tags"] for r in forced] == ['{"tags": "a"}', '{"tags": "b", "id": "x"}']


def test_jsonl_options_ids_aliases_and_nulls():
    recs = records(
        '{"id": 7, "tags": "1girl", "nl": "A girl.", "seed": 5, "tag_length": "short", "width": 832, '
        '"height": 1216, "format": "tag-only", "ban": "hat", "escape_parens": true}\n'
        '{"prompt": "cat", "seed": null, "temperature": 0, "top_p": 1, "max_tokens": 8}\n'
        '{"id": null, "nl": "only words", "aspect_ratio": 0.7, "ban": ["a", "re:b.*"]}\n'
    )
    assert all(r.error is None for r in recs), [r.error for r in recs]
    assert recs[0].id == 7 and recs[0].fields["seed"] == 5 and recs[0].fields["width"] == 832
    assert recs[1].fields == {"tags": "cat", "temperature": 0, "top_p": 1, "max_tokens": 8}  # null = not set
    assert recs[2].key == 3 and "tags" not in recs[2].fields


@pytest.mark.parametrize("line, expected", [
    ('{"tags": "a", "colour": 1}', "unknown key(s) 'colour'"),
    ('{"tags": 5}', "tags must be a string"),
    ('{"tags": "a", "seed": -1}', "seed must be an integer"),
    ('{"tags": "a", "seed": 4294967295}', "seed must be an integer"),
    ('{"tags": "a", "seed": 1.5}', "seed must be an integer"),
    ('{"tags": "a", "seed": true}', "seed must be an integer"),
    ('{"tags": "a", "tag_length": "huge"}', "tag_length must be one of"),
    ('{"tags": "a", "width": "832", "height": 1216}', "width must be a positive integer"),
    ('{"tags": "a", "width": 832}', "width and height go together"),
    ('{"tags": "a", "width": 8, "height": 8, "aspect_ratio": 1}', "either width/height or aspect_ratio"),
    ('{"tags": "a", "top_p": 0}', "top_p must be a number in (0, 1]"),
    ('{"tags": "a", "temperature": "hot"}', "temperature must be a number"),
    ('{"tags": "a", "max_tokens": 0}', "max_tokens must be a positive integer"),
    ('{"tags": "a", "ban": [1]}', "ban must be a string or a list"),
    ('{"tags": "a", "escape_parens": 1}', "escape_parens must be true or false"),
    ('{"tags": "a", "prompt": "b"}', "either tags or prompt"),
    ('{"tags": "a",}', "invalid JSON"),
    ('{"tags": "a"', "invalid JSON"),
    ('["a"]', "expected a JSON object"),
])
def test_bad_jsonl_lines_are_records_with_an_error(line, expected):
    recs = records('{"tags": "fine"}\n' + line + '\n{"tags": "fine too"}\n', "jsonl")
    assert [r.index for r in recs] == [0, 1, 2]
    assert recs[0].error is None and recs[2].error is None
    assert recs[1].error is not None and expected in recs[1].error, recs[1].error


def test_non_utf8_line_is_an_error_that_keeps_its_index():
    recs = records(b"first\n\xff\xfe bad bytes\n# \xff comment is skipped\nthird\n")
    assert [(r.index, r.line) for r in recs] == [(0, 1), (1, 2), (2, 4)]
    assert "not valid UTF-8" in recs[1].error and recs[2].fields == {"tags": "third"}


def test_reading_is_lazy():
    pulled = itertools.count()

    def endless():
        for i in itertools.count():
            next(pulled)
            yield b"# comment\n" if i % 3 == 2 else f"prompt {i}\n".encode()

    it = read_records(endless(), None)
    first = [next(it) for _ in range(4)]
    assert [r.fields["tags"] for r in first] == ["prompt 0", "prompt 1", "prompt 3", "prompt 4"]
    assert next(pulled) == 5  # 5 lines read for 4 prompts (one comment between): nothing ahead


def test_pipe_lines_never_wait_on_the_input_while_there_is_work():
    r, w = os.pipe()
    lines = PipeLines(r)
    busy = [True]
    lines.busy = lambda: busy[0]
    it = iter(lines)
    os.write(w, b"a\nb")
    deadline = time.monotonic() + 10
    item = next(it)
    while item is None and time.monotonic() < deadline:  # busy: polls return at once
        time.sleep(0.001)
        item = next(it)
    assert item == b"a\n"
    assert next(it) is None  # "b" has no newline yet: not a line, and we are busy
    busy[0] = False  # idle: now it waits for the input
    os.write(w, b"\nc")
    os.close(w)
    assert list(it) == [b"b\n", b"c"]
    os.close(r)


def test_100k_lines_stream_through_reader_and_writer_in_bounded_memory():
    n = 100_000

    class Sink(io.TextIOBase):
        lines = 0

        def write(self, s):
            self.lines += s.count("\n")
            return len(s)

    def lines():
        for i in range(n):
            yield b"1girl, solo, tag %d\n" % i

    sink = Sink()
    writer = OrderedWriter(sink)
    tracemalloc.start()
    try:
        window: list = []
        for rec in read_records(lines(), None):
            # Results finish out of order inside a small window, as with --parallel 8.
            window.append(rec)
            if len(window) == 8:
                for r in reversed(window):
                    writer.add(r.index, [r.fields["tags"]])
                window.clear()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.lines == n and writer.written == n
    assert writer.peak_pending == 8
    assert peak < 1_000_000, f"peak {peak} bytes: something holds the whole input"


@pytest.mark.parametrize("data", [
    b"\xef\xbb\xbfa\n\n# c\n  b\n\xff\n",
    # a BOM before a comment; lines of Unicode whitespace only (NBSP, LINE SEPARATOR): skipped
    "\ufeff# header\n1girl\n\u2028\n\u00a0\n1boy\n".encode(),
    b"a\n\x00b\x00\n",  # a NUL line is an error line: it counts
])  # fmt: skip
def test_count_prompts_follows_the_reader(tmp_path, data):
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    assert count_prompts(str(path)) == len(records(data))


def test_utf16_and_nul_lines_are_error_lines_not_prompts():
    utf16 = records("1girl\n1boy\n".encode("utf-16"))
    assert utf16[0].error.startswith("the input is UTF-16")
    assert all(r.error for r in utf16) and not any(r.fields for r in utf16)  # never run as prompts
    nul = records(b"ok\n1\x00b\x00o\x00y\x00\n")
    assert nul[0].error is None and nul[1].error.startswith("contains NUL bytes")


@pytest.mark.parametrize("line, why", [
    ('{"tags": "x", "id": NaN}', "NaN is not a JSON value"),
    ('{"tags": "x", "seed": Infinity}', "Infinity is not a JSON value"),
    ('{"tags": "x", "top_p": -Infinity}', "-Infinity is not a JSON value"),
    ('{"tags": "x", "aspect_ratio": 1e400}', "1e400 is out of range"),
])  # fmt: skip
def test_jsonl_non_finite_numbers_are_invalid_json(line, why):
    (rec,) = records(line + "\n")
    assert rec.error == f"invalid JSON ({why})"


# -- output --------------------------------------------------------------------------------------


def test_one_line_joins_multi_line_formats():
    assert one_line("1girl, \n\nsolo, hat,\n\nmasterpiece\n") == "1girl, solo, hat, masterpiece"
    assert one_line("a\r\nb") == "a b" and one_line("plain, tags") == "plain, tags"


def test_writer_keeps_input_order_one_write_per_record():
    writes: list[str] = []

    class Out:
        def write(self, s):
            writes.append(s)

        def flush(self):
            writes.append("<flush>")

    w = OrderedWriter(Out())
    w.add(2, ["c"])
    w.add(1, ["b1", "b2"])
    assert writes == [] and w.pending.keys() == {1, 2}
    w.add(0, [""])  # a failed text input: an empty line keeps the alignment
    assert writes == ["\n", "<flush>", "b1\nb2\n", "<flush>", "c\n", "<flush>"]
    assert w.peak_pending == 3 and not w.pending


def test_writer_skips_resumed_indices_and_flushes_out_of_order_on_stop():
    out = io.StringIO()
    done = {0, 2, 5}
    w = OrderedWriter(out, skip=done)
    w.add(1, ["one"])
    w.add(4, ["four"])
    w.add(6, ["six"])
    assert out.getvalue() == "one\n"
    assert w.flush_out_of_order() == 2
    assert out.getvalue() == "one\nfour\nsix\n"
    assert done == {0, 2, 5}  # the caller's set is not consumed (its reader still filters with it)


def test_truncate_partial_line(tmp_path):
    path = tmp_path / "o.txt"
    for data, kept in [(b"a\nb\npart", b"a\nb\n"), (b"a\n", b"a\n"), (b"", b""), (b"part", b""),
                       (b"x\n" + b"y" * 200_000, b"x\n")]:
        path.write_bytes(data)
        truncate_partial_line(str(path))
        assert path.read_bytes() == kept


def test_scan_done_jsonl_reads_indices_and_cuts_a_partial_record(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text('{"index": 0, "x": 1}\n{"index": 3, "error": "bad"}\n{"index": 1}\n{"index": 2, "form')
    assert scan_done(str(path), "jsonl", 1) == {0, 1, 3}
    assert path.read_text().endswith('{"index": 1}\n')
    assert scan_done(str(tmp_path / "missing.jsonl"), "jsonl", 4) == set()


def test_scan_done_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"index": 0}\n\n{"index": 2}\n  \n')
    assert scan_done(str(path), "jsonl", 1) == {0, 2}


def test_scan_done_text_counts_lines(tmp_path):
    path = tmp_path / "o.txt"
    path.write_text("a, b\n\nc, d\ne, f, par")
    assert scan_done(str(path), "text", 1) == {0, 1, 2}
    assert path.read_text() == "a, b\n\nc, d\n"


@pytest.mark.parametrize("content, fmt, variants, message", [
    ("a\n", "text", 2, "needs -n 1"),
    ('{"index": 0}\n', "text", 1, "--output-format jsonl"),
    ("plain text\n", "jsonl", 1, "not a kgen JSONL record"),
    ('{"id": 1}\n', "jsonl", 1, "not a kgen JSONL record"),
])
def test_scan_done_refuses_what_it_cannot_resume(tmp_path, content, fmt, variants, message):
    path = tmp_path / "o"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        scan_done(str(path), fmt, variants)
