"""Output format templates (docs/design.md#templates).

A template is text with `<|key|>` placeholders, filled from the final tag map by `apply_format`.
The reference presets are kept byte for byte under short CLI names; `oneline` (the CLI default)
is kgen's own: one line, so that pipes stay line-oriented.

`apply_format` follows the reference's rules in order (docs/design.md#templates), with three
documented additions (docs/deviations.md#d1 to #d3):
- D1: with no `extended` text, a template that also has `<|generated|>` (the "Both + generated
  NL" preset) does not print the generated NL twice: `<|extended|>` and a `.` or `,` right after
  it are dropped instead of being turned into `<|generated|>`.
- D2: an NL placeholder whose text is empty takes a `.` right after it along (the reference leaves
  a lone `.`, e.g. the whole output of "NL only" with no NL is `.`).
- D3: a one-line template gives one line: newlines inside values become spaces.
Other small robustness points: a placeholder missing from the map counts as empty (its comma goes
with it, rule 2, instead of being left behind by rule 3); whitespace-only strings and empty list
items count as empty.

NL values are expected post-processed, without a final period (the templates add it;
docs/deviations.md#nl-rendering).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from kgen_cli.errors import UsageError

_TAGS_HEAD = "<|special|>, <|characters|>, <|copyrights|>, \n<|artist|>, \n\n"
_TAGS_TAIL = "<|quality|>, <|meta|>, <|rating|>"

PRESETS: dict[str, str] = {
    # The WebUI presets, byte-exact (lines 1 and 2 end with a space).
    "tag-only": _TAGS_HEAD + "<|general|>,\n\n" + _TAGS_TAIL,
    "nl-only": "<|extended|>.",
    "both-tag-first": _TAGS_HEAD + "<|general|>,\n\n<|extended|>.\n\n" + _TAGS_TAIL,
    "both-nl-first": _TAGS_HEAD + "<|extended|>.\n\n<|general|>,\n\n" + _TAGS_TAIL,
    "both-generated": _TAGS_HEAD + "<|generated|>.\n\n<|general|>,\n\n<|extended|>.\n\n" + _TAGS_TAIL,
    # The ComfyUI node default (lines 1-3 end with a space) and the tree-sampler line.
    "comfyui": "<|special|>, \n<|characters|>, <|copyrights|>, \n<|artist|>, \n\n<|general|>,\n\n<|extended|>.\n\n"
    + _TAGS_TAIL,
    "tree": "<|special|>, <|characters|>, <|copyrights|>, <|artist|>, <|general|>, " + _TAGS_TAIL,
    # kgen default: tags, the NL as sentences (extended, else generated: rule 1), then quality/meta/
    # rating. Each tag placeholder is followed by ", " so that an empty one vanishes with its comma.
    "oneline": "<|special|>, <|characters|>, <|copyrights|>, <|artist|>, <|general|>, <|extended|>. " + _TAGS_TAIL,
}

# The reference UI names of the presets (the WebUI dropdown), also accepted by resolve_format.
PRESET_TITLES: dict[str, str] = {
    "tag only (dtg mode)": "tag-only",
    "nl only (tag to nl)": "nl-only",
    "both, tag first (recommend)": "both-tag-first",
    "both, nl first (recommend)": "both-nl-first",
    "both + generated nl": "both-generated",
}

DEFAULT_FORMAT = "oneline"

# The largest --format @FILE kgen reads: a template is a few hundred bytes, so this is room to
# spare, and a bound on what a mistaken path (a log, a model file) makes kgen read.
MAX_TEMPLATE_BYTES = 64 * 1024

PLACEHOLDERS: frozenset[str] = frozenset({
    "special", "characters", "copyrights", "artist", "general", "quality", "meta", "rating",
    "extended", "generated", "tag", "target", "aspect_ratio",
})
_ORDER = ("special", "characters", "copyrights", "artist", "general", "quality", "meta", "rating",
          "extended", "generated", "tag", "target", "aspect_ratio")  # fixed order for rule 2

_MARKER = re.compile(r"<\|([^<>|\n]*)\|>")
_LEFTOVER = re.compile(r"<\|.*?\|>")


def _validate(template: str, origin: str) -> str:
    names = _MARKER.findall(template)
    unknown = sorted({n for n in names if n not in PLACEHOLDERS})
    if unknown:
        known = ", ".join(f"<|{n}|>" for n in _ORDER)
        raise UsageError(f"unknown placeholder <|{unknown[0]}|> in {origin}; known: {known}")
    residue = _MARKER.sub("", template)
    for token in ("<|", "|>"):
        at = residue.find(token)
        if at >= 0:
            near = residue[max(at - 10, 0) : at + 12].replace("\n", "\\n")
            raise UsageError(f"malformed placeholder in {origin} near {near!r}: write <|name|>")
    if not names:
        raise UsageError(f"{origin} contains no <|placeholder|>")
    return template


def _read_template_file(path_text: str) -> str:
    """A template file: a regular file of at most MAX_TEMPLATE_BYTES, UTF-8 (a BOM is dropped);
    @/dev/zero, @/dev/stdin or a fifo is refused at once (`paths.read_small_file`)."""
    if path_text == "-":
        raise UsageError("--format @- (stdin) is not supported: give @FILE, a preset name or a template")
    if not path_text:
        raise UsageError("--format @ needs a file path: @FILE")
    from kgen_cli.paths import read_small_file

    text = read_small_file(Path(path_text).expanduser(), "format file", MAX_TEMPLATE_BYTES)
    return _validate(text[:-1] if text.endswith("\n") else text, f"format file {path_text}")


def resolve_format(spec: str) -> str:
    """The template text for --format: a preset name, @FILE, or a literal template with <|…|>."""
    if spec in PRESETS:
        return PRESETS[spec]
    title = PRESET_TITLES.get(spec.strip().lower())
    if title:
        return PRESETS[title]
    if spec.startswith("@"):
        return _read_template_file(spec[1:])
    if "<|" in spec or "|>" in spec:
        return _validate(spec, "the format")
    raise UsageError(f"unknown format {spec!r}: use a preset ({', '.join(PRESETS)}), @FILE, or a template with <|placeholders|>")


def _as_text(value: Any, single_line: bool) -> str:
    """A map value as the text that replaces its placeholder ('' means empty)."""
    if value is None:
        return ""
    if isinstance(value, str):
        text = value if value.strip() else ""
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value if str(v).strip())
    else:
        text = str(value)
    return re.sub(r"\s*\n\s*", " ", text) if single_line else text


def apply_format(tag_map: Mapping[str, Any], template: str) -> str:
    """Fill `template` from `tag_map` by the reference's rules 1-5 (docs/design.md#templates) plus D1-D3."""
    single_line = "\n" not in template
    keys = list(_ORDER) + [k for k in tag_map if k not in PLACEHOLDERS]
    values = {key: _as_text(tag_map.get(key), single_line) for key in keys}
    text = template
    # Rule 1, or D1 when the generated NL is printed by its own placeholder anyway.
    if "<|extended|>" in text and not values["extended"]:
        if "<|generated|>" in text:
            text = re.sub(r"<\|extended\|>[.,]?", "", text)
        else:
            text = text.replace("<|extended|>", "<|generated|>")
    for key in ("extended", "generated"):  # D2
        if not values[key]:
            text = text.replace(f"<|{key}|>.", "")
    # Rule 2.
    for key, value in values.items():
        marker = f"<|{key}|>"
        if marker in text:
            text = text.replace(marker, value) if value else text.replace(marker + ",", "").replace(marker, "")
    # Rules 3-5.
    text = _LEFTOVER.sub("", text)
    text = re.sub(r"\n +", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    text = re.sub(r" {2,}", " ", text)
    return text.strip().strip(",")


def wants_extra_nl(template: str, has_user_nl: bool) -> bool:
    """Whether the format needs an extra NL pass (the automatic plan, docs/design.md#tipo)."""
    return (not has_user_nl and "<|extended|>" in template) or "<|generated|>" in template
