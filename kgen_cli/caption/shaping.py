"""Tag shaping before a model sees the tags, and the caption's final wrapping (kohya conventions).

A tag file is read as an A1111 prompt (`formats.syntax.parse_prompt`): the user's weights,
escapes, BREAK and extra-network tokens are removed, and each tag is spelled as `kgen expand`
gives it to a model (`formats.tags.classify`: underscores to spaces except in short emoticons
such as ^_^, whitespace collapsed). Then, in this order: `--replace` (kohya's
`--tag_replacement "a,b;c,d"`, `\\,` and `\\;` for literal separators; an empty target removes the
tag), `--undesired-tags` (kgen's `--ban` patterns: whole tag, `*` wildcard, `re:` regex),
duplicates removed (first kept), `--always-first` tags moved to the front in the given order.

The written caption is `TRIGGER, PREPEND CAPTION APPEND` (each part only when given).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kgen_cli.errors import UsageError
from kgen_cli.formats.bans import BanList
from kgen_cli.formats.syntax import parse_prompt, tag_key
from kgen_cli.formats.tags import classify, split_tags


def model_tag(tag: str) -> str:
    """A bare tag as `kgen expand` hands it to a model."""
    return classify(" ".join(tag.split()))[1]


def parse_replacements(spec: str | None) -> list[tuple[str, str]]:
    """`"a,b;c,d"` -> [("a", "b"), ("c", "d")] (keys compared as tags: case, `_` and spaces ignored)."""
    if not spec:
        return []
    pairs = []
    for part in re.split(r"(?<!\\);", spec):
        if not part.strip():
            continue
        pieces = re.split(r"(?<!\\),", part)
        if len(pieces) != 2 or not pieces[0].strip():
            raise UsageError(f"--replace takes 'source,target;source,target', not {part!r}")
        source, target = (p.replace("\\,", ",").replace("\\;", ";").strip() for p in pieces)
        pairs.append((source, target))
    return pairs


@dataclass
class TagShaping:
    undesired: BanList = field(default_factory=lambda: BanList.parse([]))
    replacements: list[tuple[str, str]] = field(default_factory=list)
    always_first: list[str] = field(default_factory=list)
    trigger: str = ""
    prepend: str = ""
    append: str = ""

    @classmethod
    def from_options(cls, *, undesired: list[str] | None = None, replace: str | None = None,
                     always_first: str | None = None, trigger: str | None = None, prepend: str | None = None,
                     append: str | None = None) -> TagShaping:  # fmt: skip
        return cls(BanList.parse(undesired or []), parse_replacements(replace),
                   split_tags(always_first or ""), (trigger or "").strip(), prepend or "", append or "")

    def tags(self, text: str) -> list[str]:
        """The tags of a tag file's text, shaped (see the module doc)."""
        replacements = {tag_key(a): b for a, b in self.replacements}
        out: list[str] = []
        seen: set[str] = set()
        for raw in parse_prompt(text).tags:
            tag = model_tag(raw)
            key = tag_key(tag)
            if key in replacements:
                tag = model_tag(replacements[key]) if replacements[key] else ""
                key = tag_key(tag)
            if not tag or key in seen or self.undesired.matches(tag):
                continue
            seen.add(key)
            out.append(tag)
        if self.always_first:
            order = {tag_key(t): i for i, t in enumerate(self.always_first)}
            first = sorted((t for t in out if tag_key(t) in order), key=lambda t: order[tag_key(t)])
            out = first + [t for t in out if tag_key(t) not in order]
        return out

    def caption(self, body: str) -> str:
        """The caption as written: `TRIGGER, PREPEND BODY APPEND`."""
        text = " ".join(part for part in (self.prepend.strip(), body.strip(), self.append.strip()) if part)
        if self.trigger and not text.startswith(self.trigger):
            text = f"{self.trigger}, {text}" if text else self.trigger
        return text
