"""The TIPO prompt format: length tables, operations and their plan, the prompt builder, the output
parser and post-processing, as the reference (KGen 0.3.1) defines them.

Pure functions, no model: `kgen_cli.pipeline` runs the retry loop around them.

Where this module departs from the reference, on purpose (each point, with the reference's
behaviour and the reason, is in docs/deviations.md under the same label or name):

- K1: `parse_output` removes the exact strings `<s>` / `</s>`; it never strips characters, so an
  output ending in `glasses`, `boss` or `blue eyes` keeps its last `s`.
- K2: new general tags are capped by `TARGET_TIPO_MAX[tag_level]` (the tag level, whatever the
  operation), counting special + general; input tags are never dropped. NL sentences are capped by
  `TARGET_TIPO_NL_MAX[nl_level]`.
- K3: a field that already holds text is never written twice: with `expand=False` the prompt ends
  inside that field (the model continues it); an empty `key:` is appended only for an empty field.
  A retry therefore really extends the NL, and its name (`generated` / `extended`) stays the same
  across the attempts of one operation.
- K4: without input sentences there is no "completed the user's sentence" merge; all are new.
- K6: the ban list is a parameter and applies to model-written tags and sentences only.
- known keys: the parser accepts only known keys as section starts (an NL line holding a colon
  stays in its section); tag lines are split on newlines too.
- input tags, carried categories, de-duplication: the tags an attempt was built from are never
  dropped; tags the model put in any category are kept; every category is de-duplicated by the
  one `syntax.tag_key`.
- sentence count: sentences are counted without empty pieces.
- plan: the plan never runs the same NL operation twice in a row, and an NL operation always gets
  the NL level.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from kgen_cli.errors import UsageError
from kgen_cli.formats.syntax import tag_key
from kgen_cli.formats.tags import FIELDS, categorize, split_tags

if TYPE_CHECKING:
    from kgen_cli.formats.bans import BanList

LEVELS = ("very_short", "short", "long", "very_long")

# Length targets. Units: tags (special + general) for TIPO, sentences for TIPO_NL.
TARGET_TIPO = {"very_short": 6, "short": 18, "long": 36, "very_long": 54}
TARGET_TIPO_MAX = {"very_short": 18, "short": 36, "long": 54, "very_long": 72}
TARGET_TIPO_NL = {"very_short": 1, "short": 2, "long": 4, "very_long": 8}
TARGET_TIPO_NL_MAX = {"very_short": 2, "short": 4, "long": 8, "very_long": 10000}
UPPER_BOUND = 1000  # the reference's upper bound of every pass condition

OPERATIONS = (
    "None",
    "short_to_tag",
    "short_to_tag_to_long",
    "tag_to_long",
    "tag_to_long_to_short",
    "tag_to_short",
    "tag_to_short_to_long",
    "long_to_tag",
)

# Meta lines in prompt order; `aspect_ratio` follows them.
META_KEYS = ("meta", "rating", "artist", "characters", "copyrights", "quality")
NL_NAMES = {"short": "extended", "long": "generated"}
KNOWN_KEYS = frozenset(META_KEYS + ("aspect_ratio", "target", "tag") + tuple(NL_NAMES))


@dataclass(frozen=True)
class Operation:
    """One planned model operation: `mode` None is the tag-only operation ("None")."""

    mode: str | None
    level: str
    expand: bool

    @property
    def name(self) -> str:
        return self.mode or "None"

    @property
    def order(self) -> tuple[str, ...]:
        """Content fields in prompt order: the mode split on `_to_`."""
        return tuple(self.mode.split("_to_")) if self.mode else ("tag",)

    @property
    def target(self) -> str:
        """The field the retry check tests."""
        return self.order[-1]

    @property
    def nl_key(self) -> str | None:
        """The content field that receives the current NL; None when it is not written."""
        if self.mode is None:
            return None
        return "short" if "short" in self.mode else "long"

    def to_dict(self) -> dict:
        return {"operation": self.name, "level": self.level, "expand": self.expand}


# ---------------------------------------------------------------------------------------------
# Plans


def plan(
    has_tags: bool,
    has_nl: bool,
    tag_len: str,
    nl_len: str,
    *,
    expand_tags: bool = True,
    expand_prompt: bool = True,
    tag_first: bool = True,
    extra_nl: bool = True,
) -> list[Operation]:
    """The automatic operation plan, chosen from what the user gave and the switches.

    Deviations ("plan" in docs/deviations.md): an NL operation always gets the NL level, and the
    extra NL operation is not appended when it equals the last planned one (the reference runs it
    twice)."""
    op = Operation
    if not has_tags and not has_nl:
        ops, extra = [op(None, tag_len, True)], op("tag_to_long", nl_len, True)
    elif not has_nl:
        ops = [op(None, tag_len, True)] if expand_tags else []
        extra = op("tag_to_long", nl_len, False)
    elif not has_tags:
        ops, extra = [op("long_to_tag", tag_len, expand_prompt)], op("short_to_tag_to_long", nl_len, False)
    elif not expand_tags and not expand_prompt:
        ops, extra = [], op("short_to_tag_to_long", nl_len, False)
    elif not expand_prompt:
        ops = [op("short_to_tag", tag_len, True), op("short_to_tag_to_long", nl_len, False)]
        extra = ops[-1]
    elif not expand_tags:
        ops = [op("tag_to_long", nl_len, True), op("tag_to_short_to_long", nl_len, False)]
        extra = ops[-1]
    elif tag_first:
        ops = [op("short_to_tag", tag_len, True), op("tag_to_long", nl_len, True)]
        extra = op("short_to_tag_to_long", nl_len, False)
    else:
        ops = [op("tag_to_long", nl_len, True), op("long_to_tag", tag_len, True)]
        extra = op("tag_to_short_to_long", nl_len, False)
    if extra_nl and (not ops or ops[-1] != extra):
        ops.append(extra)
    return ops


def single_operation(name: str, tag_len: str, nl_len: str) -> list[Operation]:
    """The one-operation plan: `expand=True`, the NL level unless it ends in `to_tag` or is None."""
    if name not in OPERATIONS:
        raise UsageError(f"unknown TIPO operation {name!r}; choose one of: {', '.join(OPERATIONS)}")
    mode = None if name == "None" else name
    level = tag_len if mode is None or mode.endswith("to_tag") else nl_len
    return [Operation(mode, level, True)]


# ---------------------------------------------------------------------------------------------
# Prompt


def format_ratio(aspect_ratio: float) -> str:
    """Width / height with one decimal, as both extensions write it."""
    return f"{aspect_ratio:.1f}"


def _joined(value: str | Iterable[str] | None) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else ", ".join(value)


def build_prompt(
    meta: Mapping[str, str | Iterable[str] | None],
    tags: list[str],
    nl: str,
    op: Operation,
    *,
    aspect_ratio: float,
    gen_meta: bool = False,
) -> str:
    """The exact TIPO prompt (without BOS): meta lines, `aspect_ratio`, `target`, content fields.

    `meta` is a tag map (lists or strings); only its META_KEYS are written, in that order.
    `tags` are special + general tags, `nl` the current NL."""
    lines = [f"{key}: {_joined(meta.get(key))}" for key in META_KEYS if _joined(meta.get(key))]
    lines.append(f"aspect_ratio: {format_ratio(aspect_ratio)}")
    target = [f"<|{op.level}|>"] + ([f"<|{op.mode}|>"] if op.mode else []) + (["<|gen_meta|>"] if gen_meta else [])
    lines.append("target: " + " ".join(target))

    content = {"tag": ", ".join(tags)}
    if op.nl_key and nl.strip():
        content[op.nl_key] = nl
    last = op.order[-1]
    for key in op.order:
        if content.get(key, "").strip():
            lines.append(f"{key}: {content[key]}")
        elif key != last:
            lines.append(f"{key}: ")  # an empty middle field keeps its trailing space
    prompt = "\n".join(lines)
    # K3: a last field that has text is continued, never repeated as an empty key.
    if op.expand or content.get(last, "").strip():
        return prompt.strip()
    return f"{prompt}\n{last}:"


# ---------------------------------------------------------------------------------------------
# Parsing

_SECTION_START = re.compile(r"([^:\n]+):(.*)")


def _split_list(text: str) -> list[str]:
    """A list field's items. Split on newlines too: a section runs on over lines that are not
    `key:` lines, and the reference kept such a line break inside a tag ("horns\nfoo"),
    which then reached the next call's prompt, the bans and the output."""
    return split_tags(text)


def dedupe_tags(tags: Iterable[str]) -> list[str]:
    """Tags in order, first occurrence of each `tag_key` kept."""
    seen: set[str] = set()
    out = []
    for tag in tags:
        key = tag_key(tag)
        if key not in seen:
            seen.add(key)
            out.append(tag)
    return out


def _sections(text: str) -> list[tuple[str, str]]:
    """(key, stripped content) pairs. Only a line starting with a KNOWN key opens a section;
    every other line, colon or not, continues the current one. Text before the first key is dropped."""
    sections: list[tuple[str, list[str]]] = []
    for line in text.split("\n"):
        match = _SECTION_START.match(line)
        if match and match.group(1).strip() in KNOWN_KEYS:
            sections.append((match.group(1).strip(), [match.group(2)]))
        elif sections:
            sections[-1][1].append(line)
    return [(key, "\n".join(body).strip()) for key, body in sections]


def parse_output(text: str, *, extra_quality: Iterable[str] = (), extra_special: Iterable[str] = ()) -> dict:
    """Read a TIPO output (prompt + completion) back into a tag map.

    List fields for the meta lines, `target`, `aspect_ratio`, the categories of `tag:` (merged into
    the meta lines of the same name) and `tag` (the raw list); `extended` (`short:`) and `generated`
    (`long:`) as strings. The first occurrence of a key wins."""
    # K1: remove exact marker strings; str.strip("<s>") would eat trailing "s" characters.
    text = text.replace("</s>", "").replace("<s>", "")
    result: dict = {}
    for key, content in _sections(text):
        name = NL_NAMES.get(key, key)
        if name in result:
            continue
        if key == "tag":
            tags = _split_list(content)
            categories = categorize(tags, extra_quality=tuple(extra_quality), extra_special=tuple(extra_special))
            for category, values in categories.items():
                result[category] = dedupe_tags(list(result.get(category, [])) + list(values))
            result["tag"] = tags
        elif key in NL_NAMES:
            if content and content != "<|empty|>":
                result[name] = content
        else:
            result[key] = _split_list(content)
    return result


# ---------------------------------------------------------------------------------------------
# Sentences and pass conditions


def sentences(text: str) -> list[str]:
    """Non-empty sentences of `text` split on `.`, stripped (empty text has none)."""
    return [part.strip() for part in text.split(".") if part.strip()]


def count_sentences(text: str) -> int:
    return len(sentences(text))


def passes(target: str, result: Mapping, level: str) -> bool:
    """The retry check for `target` ("tag", "short" or "long") at `level`.

    A `long` target without any generated text is checked on `extended`, as in the reference."""
    if target == "long" and not result.get("generated"):
        target = "short"
    if target == "tag":
        count, low = len(result.get("special", [])) + len(result.get("general", [])), TARGET_TIPO[level]
    else:
        text = result.get("extended" if target == "short" else "generated") or ""
        count, low = count_sentences(text), TARGET_TIPO_NL[level]
    return low <= count <= UPPER_BOUND


# ---------------------------------------------------------------------------------------------
# Post-processing


def _dedupe_exact(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _ban_tags(tags: list[str], bans: BanList | None) -> list[str]:
    return list(bans.filter(tags)) if bans else tags


def _ban_sentences(items: list[str], bans: BanList | None) -> list[str]:
    return list(bans.filter_sentences(items)) if bans else items


def _new_tags(parsed: Mapping, before: Mapping, category: str, bans) -> list[str]:
    """Tags of `category` the model added: not in `before`, ban-filtered, de-duplicated."""
    known = {tag_key(t) for t in before.get(category, [])}
    if category == "general":
        known |= {tag_key(t) for t in before.get("special", [])}
    new = [t for t in parsed.get(category, []) if tag_key(t) not in known]
    return dedupe_tags(_ban_tags(new, bans))


def _process_tags(parsed: Mapping, before: Mapping, tag_level: str, rng: random.Random, bans) -> dict:
    """Every category: the tags of `before` first (never dropped), then the model's new ones.
    New general tags are shuffled, then capped (K2: tag level, counting special + general)."""
    out = {
        category: dedupe_tags(list(before.get(category, [])) + _new_tags(parsed, before, category, bans))
        for category in FIELDS
        if category != "general"
    }
    inputs = list(before.get("general", []))
    new = _new_tags(parsed, before, "general", bans)
    rng.shuffle(new)
    cap = TARGET_TIPO_MAX[tag_level]
    n_input = len(out["special"]) + len(inputs)
    if n_input + len(new) > cap:
        new = new[: max(cap - n_input, 0)]
    out["general"] = dedupe_tags(inputs + new)
    return {category: out[category] for category in FIELDS}


def _continued_nl(inputs: list[str], text: str, nl_level: str, rng: random.Random, bans) -> tuple[list[str], str]:
    """The field that holds the input NL: input sentences, then the new ones, shuffled but the last, capped.

    Returns the input sentences after the merge (the user's last one replaced by the model's
    completion of it, if any) and the field's text."""
    inputs = list(inputs)
    new = _ban_sentences([s for s in sentences(text) if s not in inputs], bans)
    # The model completed the user's last sentence (K4: only when there is one).
    if new and inputs and inputs[-1] in new[0]:
        inputs[-1] = new.pop(0)
    if new:
        last = new.pop()
        rng.shuffle(new)
        new.append(last)
    cap = TARGET_TIPO_NL_MAX[nl_level]
    if len(inputs) + len(new) > cap:
        new = new[: max(cap - len(inputs), 0)]
    return inputs, ". ".join(_dedupe_exact(inputs + new))


def _fresh_nl(inputs: list[str], text: str, nl_level: str, bans) -> str:
    """A field written from scratch next to the input NL: its sentences minus the input ones.

    `inputs` are the input sentences after the merge of `_continued_nl`, as in the reference: a
    sentence the model completed counts as input (not printed twice by a template showing both
    fields), while the user's unfinished original no longer does (kept when the model repeats it)."""
    new = _ban_sentences([s for s in sentences(text) if s not in inputs], bans)
    return ". ".join(_dedupe_exact(new[: TARGET_TIPO_NL_MAX[nl_level]]))


def _process_nl(parsed: Mapping, op: Operation, nl: str, user_nl: str, nl_level: str, rng, bans) -> tuple[str, str]:
    """(extended, generated) after post-processing."""
    mode = op.mode or ""
    # Step 1: drop the NL fields the operation did not ask for.
    extended = parsed.get("extended", "") if "short" in mode else ""
    generated = parsed.get("generated", "") if "long" in mode else ""
    inputs = sentences(nl)
    if op.nl_key == "long" and inputs and not user_nl.strip():
        # K3: a retry continuing the model's own `long:` text; it stays `generated`.
        return "", _continued_nl(inputs, generated, nl_level, rng, bans)[1]
    if generated and user_nl.strip() and not extended.strip():
        # Step 2: the user's NL continued inside `long:` is read back as `extended`.
        extended, generated = generated, ""
    merged, extended = _continued_nl(inputs, extended, nl_level, rng, bans)
    return extended, _fresh_nl(merged, generated, nl_level, bans)


def post_process(
    parsed: Mapping,
    op: Operation,
    *,
    before: Mapping,
    nl: str,
    user_nl: str,
    tag_level: str,
    nl_level: str,
    rng: random.Random,
    bans: BanList | None = None,
) -> dict:
    """Post-process one parsed attempt (K2, K4, K6 fixed).

    `before`: the tag map this attempt was built from (its special + general made the `tag:` line);
    `nl`: the NL written into this attempt's prompt; `user_nl`: the NL the operation started with
    (decides the `extended` / `generated` naming). Shuffles draw from `rng` only.

    Returns every FIELDS list plus `extended` and `generated` strings (sentences joined by ". ",
    no final period) and the parsed `tag`, `target`, `aspect_ratio` lists when present."""
    out = _process_tags(parsed, before, tag_level, rng, bans)
    out["extended"], out["generated"] = _process_nl(parsed, op, nl, user_nl, nl_level, rng, bans)
    out.update({key: parsed[key] for key in ("tag", "target", "aspect_ratio") if key in parsed})
    return out
