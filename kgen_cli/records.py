"""What every JSON document and JSONL record kgen writes shares (docs/json.md is the schema):
the schema version and the `input` object. Library code: `kgen batch`, `kgen batch --ray` and
`kgen expand --json` build their records from these."""

from __future__ import annotations

from typing import Any

# Raised when a field is renamed, removed or changes meaning; adding a field keeps it.
SCHEMA_VERSION = 1


def input_json(tags: str, nl: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `input` object, the same in `expand --json` and a batch record: the tags and NL as
    given, and a batch line's own options (`{}` for expand, whose options are in the document)."""
    return {"tags": tags, "nl": nl, "options": dict(options or {})}


def batch_input_json(fields: dict[str, Any], default_nl: str) -> dict[str, Any]:
    """`input_json` of a batch line's fields (a text line: {"tags": line})."""
    rest = {k: v for k, v in fields.items() if k not in ("tags", "nl")}
    return input_json(fields.get("tags", ""), fields.get("nl", default_nl), rest)
