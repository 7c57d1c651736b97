"""The DanTagGen (DTG) prompt format: prompt builder, reading the new tags back, the retry prompt
as the reference (KGen 0.3.1) defines them; departures are listed in docs/deviations.md.

Pure functions, no model: `kgen_cli.pipeline` runs the retry loop around them.

Kept byte-compatible on purpose (which forms the models prefer is unverified): the `general:`
value starts with `, ` when there are no special tags and ends with `, ` when there are no general
tags, and a quality-info model with no quality tags gets the line `quality: `.

Departures from the reference: new tags are re-categorised, de-duplicated against the input and
empty items are dropped; the ban list is a parameter (K6); new tags are taken in the form
categorisation stores (`maid_` -> `maid`) and compared by the one `syntax.tag_key`, so the stop
rule counts exactly the tags the result keeps and retry prompts never carry the `tag_` form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

from kgen_cli.formats.syntax import tag_key
from kgen_cli.formats.tags import FIELDS, categorize, split_tags, stored_forms
from kgen_cli.formats.tipo import LEVELS, dedupe_tags, format_ratio

if TYPE_CHECKING:
    from kgen_cli.formats.bans import BanList

__all__ = ["LEVELS", "TARGET", "INPUT_END", "build_prompt", "parse_new_tags", "retry_prompt", "new_tags", "merge"]

# Minimum tag count (input special + general + new) per level.
TARGET = {"very_short": 8, "short": 16, "long": 32, "very_long": 48}
INPUT_END = "<|input_end|>"
EMPTY = "<|empty|>"


def build_prompt(tag_map: Mapping[str, list[str]], *, level: str = "long", aspect_ratio: float = 1.0,
                 quality_line: bool = False) -> str:
    """The exact DTG prompt (without BOS). `quality_line` for models trained with quality
    info (DanTagGen-delta, -delta-rev2); meta tags are never written."""

    def joined(key: str) -> str:
        return ", ".join(tag_map.get(key, []))

    lines = [f"quality: {joined('quality')}"] if quality_line else []
    lines += [f"{key}: {joined(key) or EMPTY}" for key in ("rating", "artist", "characters", "copyrights")]
    lines.append(f"aspect ratio: {format_ratio(aspect_ratio)}")
    lines.append(f"target: <|{level}|>")
    lines.append(f"general: {joined('special')}, {joined('general')}{INPUT_END}")
    return "\n".join(lines)


def parse_new_tags(text: str) -> list[str]:
    """Tags after the last `<|input_end|>` of an output (prompt + completion): stripped, empties
    dropped, de-duplicated in order. No marker means no new tags."""
    text = text.replace("</s>", "").replace("<s>", "")
    if INPUT_END not in text:
        return []
    extra = text.rsplit(INPUT_END, 1)[1].strip().strip(",")
    return dedupe_tags(split_tags(extra))  # newlines split too: a tag never holds a line break


def new_tags(text: str, tag_map: Mapping[str, list[str]], *, bans: BanList | None = None,
             extra_quality: Iterable[str] = (), extra_special: Iterable[str] = ()) -> list[str]:
    """The model's new tags in `text`, in the form `merge` keeps (`maid_` -> `maid`), minus banned
    tags and tags already in `tag_map` (any category, compared by `tag_key`).

    Exactly these tags are counted by `passes`, written into the retry prompt and kept by `merge`,
    so a tag that only differs from an input tag by `_`, case or spacing never counts as new."""
    known = {tag_key(t) for category in FIELDS for t in tag_map.get(category, [])}
    forms = stored_forms(parse_new_tags(text), extra_quality=extra_quality, extra_special=extra_special)
    found = [t for t in forms if tag_key(t) not in known]
    return list(bans.filter(found)) if bans else found


def retry_prompt(output: str, tags: list[str]) -> str:
    """The next attempt's prompt: the echoed prompt up to the first `<|input_end|>`, the
    marker, then `tags` (already shuffled) with no trailing comma."""
    echoed = output.split(INPUT_END, 1)[0]
    return f"{echoed}{INPUT_END}{', '.join(tags)}".strip().replace("  <|", " <|")


def passes(tag_map: Mapping[str, list[str]], tags: list[str], level: str) -> bool:
    """Enough tags: input special + general + new reach TARGET[level]."""
    return len(tag_map.get("special", [])) + len(tag_map.get("general", [])) + len(tags) >= TARGET[level]


def merge(tag_map: Mapping[str, list[str]], tags: list[str], *, extra_quality: Iterable[str] = (),
          extra_special: Iterable[str] = ()) -> dict[str, list[str]]:
    """`tag_map` with `tags` categorised and appended to their categories, de-duplicated."""
    added = categorize(list(tags), extra_quality=tuple(extra_quality), extra_special=tuple(extra_special))
    return {c: dedupe_tags(list(tag_map.get(c, [])) + list(added.get(c, []))) for c in FIELDS}
