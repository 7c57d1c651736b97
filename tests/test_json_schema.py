"""docs/json.md (issue 18 item 13): schema_version in every document and record, one `input`
shape in expand and batch, `-o FILE.jsonl` chooses JSONL, and the doc names every field."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kgen_main import run_main

ROOT = Path(__file__).resolve().parent.parent
FAST = ("--family", "tipo", "--retries", "0", "--max-tokens", "8", "--format", "tag-only", "-t", "1")
DOC = (ROOT / "docs" / "json.md").read_text(encoding="utf-8")


def _kgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kgen_cli", *args], capture_output=True, text=True, cwd=ROOT,
                          stdin=subprocess.DEVNULL, timeout=240)  # fmt: skip


def _documented(doc: dict, where: str) -> None:
    for key in doc:
        assert f"`{key}`" in DOC, f"{where}: field '{key}' is not in docs/json.md"


def test_show_prompt_json_has_the_schema_version_and_the_input_shape():
    code, out, err = run_main("expand", "1girl, solo", "--nl", "A girl.", "-m", "x-tipo.gguf", "--show-prompt", "--json")
    doc = json.loads(out)
    assert doc["schema_version"] == 1
    assert doc["input"] == {"tags": "1girl, solo", "nl": "A girl.", "options": {}}
    _documented(doc, "--show-prompt --json")


@pytest.mark.model
def test_expand_json_and_batch_records_share_the_schema(model_path, tmp_path):
    single = json.loads(_kgen("expand", "1girl", "-m", str(model_path), *FAST, "--seed", "1", "--json").stdout)
    many = json.loads(_kgen("expand", "1girl", "-m", str(model_path), *FAST, "--seed", "1", "--json", "-n", "2").stdout)
    src = tmp_path / "in.jsonl"
    src.write_text('{"tags": "1girl", "tag_length": "short", "id": "a"}\n{"tags": 3}\nnot json\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"  # no --output-format: the extension chooses JSONL
    proc = _kgen("batch", str(src), "-o", str(out), "-m", str(model_path), *FAST, "--seed", "1", "--nl", "x")
    assert proc.returncode == 1  # two lines failed
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 3
    for doc in (single, many, *records):
        assert doc["schema_version"] == 1
        assert set(doc["input"]) == {"tags", "nl", "options"}
    assert single["input"] == {"tags": "1girl", "nl": "", "options": {}}
    assert records[0]["input"] == {"tags": "1girl", "nl": "x", "options": {"tag_length": "short"}}
    assert "error" in records[1] and records[1]["input"]["tags"] == 3
    assert "error" in records[2] and records[2]["input"] == {"tags": "", "nl": "x", "options": {}}
    assert "variants" in many and "totals" in many
    _documented(single, "expand --json")
    _documented(many, "expand -n --json")
    _documented(many["totals"], "totals")
    for record in records:
        _documented(record, "batch record")
    _documented(single["calls"][0], "a call")


@pytest.mark.model
@pytest.mark.parametrize(("name", "args", "jsonl"), [
    ("out.jsonl", (), True), ("out.NDJSON", (), True), ("out.txt", (), False),
    ("out.jsonl", ("--output-format", "text"), False),
])  # fmt: skip
def test_the_output_extension_chooses_jsonl_unless_told(model_path, tmp_path, name, args, jsonl):
    src = tmp_path / "in.txt"
    src.write_text("1girl\n", encoding="utf-8")
    out = tmp_path / name
    proc = _kgen("batch", str(src), "-o", str(out), "-m", str(model_path), *FAST, "--seed", "1", *args)
    assert proc.returncode == 0, proc.stderr
    line = out.read_text(encoding="utf-8").splitlines()[0]
    assert line.startswith('{"schema_version": 1,') is jsonl


def test_docs_json_says_where_variants_are():
    assert re.search(r"results are under `variants`", DOC)
