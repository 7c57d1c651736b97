"""Tag descriptions: Danbooru wiki text (DText) as plain text, and the SQLite cache of summaries.

A wiki table has one row per tag: the tag in `tag` (or `title`), the DText page in `body`; it is
a JSONL, CSV or parquet file, or `hf:OWNER/NAME[@REVISION]`, a dataset on the Hugging Face hub
(e.g. hf:isek-ai/danbooru-wiki-2024) fetched with huggingface_hub into its cache (only what is
cached is used with HF_HUB_OFFLINE=1). Only the rows of the tags a run needs are kept.

The summaries live in `<kgen home>/tag-descriptions.sqlite`, keyed by tag + wiki revision +
model + summarisation template: a rerun asks the model for no tag it already described. Two runs
may share the file (WAL journal, a busy timeout, one short transaction per summary).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kgen_cli.errors import KgenError, UsageError
from kgen_cli.formats.syntax import tag_key

WIKI_PROMPT_CHARS = 1500  # wiki text given to the summariser, at most
CACHE_FILE = "tag-descriptions.sqlite"
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Wiki:
    """A wiki table found (its files, and the revision the cache is keyed by); its pages are read
    only for the tags a run still needs described."""

    files: list[Path]
    revision: str  # a file's content hash, or the hub commit

    def pages(self, wanted: set[str]) -> dict[str, str]:
        """tag_key -> plain text of each `wanted` tag (tag_key form) that has a page."""
        pages: dict[str, str] = {}
        for path in self.files:
            for tag, body in _rows(path):
                key = tag_key(tag)
                if key in wanted and key not in pages and body:
                    pages[key] = strip_dtext(body)
        return pages


# -- DText ---------------------------------------------------------------------------------------

_DTEXT = [
    (re.compile(r"\[\[([^\]|]*)\|([^\]]*)\]\]"), r"\2"),  # [[target|label]]
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),  # [[target]]
    (re.compile(r"\{\{([^}]*)\}\}"), r"\1"),  # {{tag search}}
    (re.compile(r'"([^"\n]+)":\[([^\]]+)\]'), r"\1"),  # "label":[url]
    (re.compile(r'"([^"\n]+)":(?:https?://|/)\S+'), r"\1"),  # "label":url
    (re.compile(r"<(https?://[^>]+)>"), ""),  # <url>
    (re.compile(r"\[/?(?:b|i|u|s|tn|spoiler|quote|expand[^\]]*|code|nodtext|table|thead|tbody|tr|td|th|col"
                r"|colgroup|br|hr)\]", re.I), " "),
    (re.compile(r"^\s*h[1-6](?:#[\w-]+)?\.\s*", re.M), ""),  # h4. Heading
    (re.compile(r"^\s*\*+\s+", re.M), "- "),  # * list item
    (re.compile(r"\b(?:post|pool|topic|forum|comment|user|artist|note|wiki) #\d+\b"), ""),
]


def strip_dtext(text: str) -> str:
    """Danbooru DText markup to plain text, whitespace collapsed to single spaces."""
    for pattern, replacement in _DTEXT:
        text = pattern.sub(replacement, text)
    return " ".join(text.replace("_", " ").split()) if text else ""


# -- loading ------------------------------------------------------------------------------------


def check_wiki(spec: str) -> None:
    """Refuse, before any work, a --wiki file that does not exist or is not a table."""
    if spec.startswith("hf:"):
        if spec[3:].partition("@")[0].count("/") != 1:
            raise UsageError(f"--wiki {spec}: expected hf:OWNER/NAME[@REVISION]")
        return
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UsageError(f"--wiki {spec}: no such file")
    if path.suffix.lower() not in DATA_EXTENSIONS:
        raise UsageError(f"--wiki {spec}: expected a .jsonl, .csv or .parquet file")


def open_wiki(spec: str) -> Wiki:
    """A wiki file, or an `hf:` dataset (fetched into the hub cache unless offline)."""
    check_wiki(spec)
    if spec.startswith("hf:"):
        return Wiki(*_hub_files(spec[3:]))
    path = Path(spec).expanduser()
    return Wiki([path], _file_hash(path))


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def _rows(path: Path):
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            yield from _parquet_rows(path)
            return
        with open(path, encoding="utf-8-sig", newline="") as fh:
            if suffix == ".csv":
                csv.field_size_limit(sys.maxsize)
                for row in csv.DictReader(fh):
                    yield _tag_of(row, path), row.get("body") or ""
                return
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise KgenError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise KgenError(f"{path}:{number}: expected a JSON object")
                yield _tag_of(row, path), row.get("body") or ""
    except UnicodeDecodeError:
        raise KgenError(f"{path} is not UTF-8") from None
    except OSError as exc:
        raise KgenError(f"cannot read {path}: {exc.strerror}") from None


def _tag_of(row: dict, path: Path) -> str:
    tag = row.get("tag") or row.get("title")
    if tag is None and "body" not in row:
        raise KgenError(f"{path}: a wiki table needs 'tag' (or 'title') and 'body' columns")
    return str(tag or "")


def _parquet_rows(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise KgenError("reading a parquet wiki table needs pyarrow", hint="pip install pyarrow") from None
    table = pq.ParquetFile(path)
    names = set(table.schema_arrow.names)
    key = "tag" if "tag" in names else "title"
    if key not in names or "body" not in names:
        raise KgenError(f"{path}: a wiki table needs 'tag' (or 'title') and 'body' columns")
    for batch in table.iter_batches(columns=[key, "body"], batch_size=8192):
        for tag, body in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            yield tag or "", body or ""


def snapshot_download(**kwargs):
    """huggingface_hub's snapshot_download, imported on first use (the seam tests patch)."""
    from huggingface_hub import snapshot_download as impl

    return impl(**kwargs)


def _hub_files(spec: str) -> tuple[list[Path], str]:
    from kgen_cli.download import hf_cache_dir, is_offline

    repo, _, revision = spec.partition("@")
    offline = is_offline()
    try:
        folder = Path(snapshot_download(repo_id=repo, repo_type="dataset", revision=revision or None,
                                        allow_patterns=[f"*{ext}" for ext in DATA_EXTENSIONS],
                                        cache_dir=hf_cache_dir(), local_files_only=offline))
    except Exception as exc:  # huggingface_hub's errors (network, not found, offline cache miss)
        if offline:
            raise KgenError(f"the wiki dataset {repo} is not in the cache and HF_HUB_OFFLINE is set",
                            hint="unset HF_HUB_OFFLINE to download it") from None
        raise KgenError(f"cannot fetch the wiki dataset {repo}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_EXTENSIONS)
    if not files:
        raise KgenError(f"the dataset {repo} holds no .parquet, .jsonl or .csv file")
    return files, f"hf:{repo}@{folder.name}"  # the snapshot folder is named by its commit


# -- the cache ----------------------------------------------------------------------------------


class DescriptionCache:
    """Tag summaries on disk (SQLite), shared safely by concurrent runs."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._db = sqlite3.connect(str(path), timeout=60, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 60000")
            # Switching a new file to WAL while another run does the same can fail with
            # "database is locked" without waiting on the busy timeout: retry that step.
            deadline = time.monotonic() + 60
            while True:
                try:
                    self._db.execute("PRAGMA journal_mode = WAL")
                    self._db.execute(
                        "CREATE TABLE IF NOT EXISTS descriptions (tag TEXT NOT NULL, revision TEXT NOT NULL, "
                        "model TEXT NOT NULL, template TEXT NOT NULL, description TEXT NOT NULL, created REAL NOT NULL, "
                        "PRIMARY KEY (tag, revision, model, template))")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except sqlite3.Error as exc:
            raise KgenError(f"cannot open the tag-description cache {path}: {exc}") from None

    @staticmethod
    def template_key(template: str) -> str:
        return hashlib.sha256(template.encode()).hexdigest()[:16]

    def get_many(self, tags: list[str], revision: str, model: str, template: str) -> dict[str, str]:
        found: dict[str, str] = {}
        key = self.template_key(template)
        for start in range(0, len(tags), 500):
            chunk = tags[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT tag, description FROM descriptions WHERE revision = ? AND model = ? AND template = ? "
                f"AND tag IN ({marks})", (revision, model, key, *chunk))
            found.update(rows.fetchall())
        return found

    def put(self, tag: str, revision: str, model: str, template: str, description: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO descriptions VALUES (?, ?, ?, ?, ?, ?)",
                         (tag, revision, model, self.template_key(template), description, time.time()))

    def close(self) -> None:
        self._db.close()
