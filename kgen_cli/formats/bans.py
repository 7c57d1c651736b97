"""The ban list: one documented semantics for every model family (docs/deviations.md#k6).

Patterns (each `--ban` value may hold several, separated by commas):
- a plain pattern matches a **whole tag**, case-insensitively, with `_` equal to a space and runs of
  whitespace equal to one space; `*` matches any run of characters (`official*`, `*text`);
- `re:REGEX` is a Python regular expression, case-insensitive, that must match the **whole** tag
  (`re.fullmatch`), tried on the tag as written and on its `_` -> space form. A `--ban` value that
  starts with `re:` is one regex and is not split on commas (so `re:a{1,3}` works); inside a
  comma list, `re:` items cannot contain commas.
- Sentences (`filter_sentences`, optional NL filtering): a sentence is dropped when a pattern
  matches a whole word or run of words in it (word boundaries on both sides); there `*` stays
  inside one word (`umbrella*` bans "umbrellas", not "umbrella and a hat"), and `re:` patterns
  must also start and end on word boundaries.

Callers apply bans to model-generated tags only, never to the user's own input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from kgen_cli.errors import UsageError

REGEX_PREFIX = "re:"


def _normalise(text: str) -> str:
    return " ".join(text.replace("_", " ").split()).casefold()


@dataclass(frozen=True)
class _Ban:
    pattern: str  # as the user wrote it (stripped), for metadata
    tag_re: re.Pattern[str]  # fullmatch against a normalised tag (plain) or the tag (regex)
    nl_re: re.Pattern[str]  # search in a normalised sentence
    is_regex: bool


def _compile_plain(pattern: str) -> _Ban:
    words = _normalise(pattern).split(" ")
    tag_body = " ".join(words)
    tag_re = ".*".join(re.escape(part) for part in tag_body.split("*"))
    # In sentences words are separated by any whitespace and "*" stays within a word.
    nl_words = [r"\S*?".join(re.escape(p) for p in word.split("*")) for word in words]
    nl_re = r"(?<!\w)" + r"\s+".join(nl_words) + r"(?!\w)"
    return _Ban(pattern, re.compile(tag_re, re.S), re.compile(nl_re), False)


def _compile_regex(pattern: str, from_list: bool = False) -> _Ban:
    body = pattern[len(REGEX_PREFIX) :]
    if not body.strip():
        raise UsageError(f"empty regular expression in --ban {pattern!r}")
    try:
        tag_re = re.compile(body, re.I)
        nl_re = re.compile(r"(?<!\w)(?:" + body + r")(?!\w)", re.I)
    except re.error as exc:
        hint = " (a regex containing commas must be a --ban value of its own)" if from_list else ""
        raise UsageError(f"invalid regular expression in --ban {pattern!r}: {exc}{hint}") from None
    return _Ban(pattern, tag_re, nl_re, True)


def _split_value(value: str) -> list[str]:
    value = value.strip()
    if value.startswith(REGEX_PREFIX):
        return [value]
    return [item.strip() for item in value.split(",") if item.strip()]


class BanList:
    """Parsed ban patterns; see the module doc for the semantics."""

    def __init__(self, bans: Iterable[_Ban] = ()):
        self._bans = list(bans)

    @classmethod
    def parse(cls, patterns: Iterable[str] | None) -> "BanList":
        """From CLI values; raises UsageError for an invalid regular expression."""
        bans, seen = [], set()
        for value in patterns or ():
            items = _split_value(value)
            for item in items:
                if item in seen or not _normalise(item):
                    continue
                seen.add(item)
                if item.startswith(REGEX_PREFIX):
                    bans.append(_compile_regex(item, from_list=len(items) > 1))
                else:
                    bans.append(_compile_plain(item))
        return cls(bans)

    @property
    def patterns(self) -> list[str]:
        """The patterns as given (split, stripped, de-duplicated), for JSON metadata."""
        return [ban.pattern for ban in self._bans]

    def __bool__(self) -> bool:
        return bool(self._bans)

    def __len__(self) -> int:
        return len(self._bans)

    def __repr__(self) -> str:
        return f"BanList({self.patterns!r})"

    def matches(self, tag: str) -> bool:
        """Whether a tag is banned."""
        tag = tag.strip()
        normalised = _normalise(tag)
        for ban in self._bans:
            if ban.is_regex:
                if ban.tag_re.fullmatch(tag) or ban.tag_re.fullmatch(tag.replace("_", " ")):
                    return True
            elif ban.tag_re.fullmatch(normalised):
                return True
        return False

    def filter(self, tags: Iterable[str]) -> list[str]:
        """The tags that are not banned, in order."""
        return [tag for tag in tags if not self.matches(tag)]

    def sentence_matches(self, sentence: str) -> bool:
        """Whether a ban matches a whole word or run of words of the sentence."""
        spaced = sentence.replace("_", " ")
        folded = spaced.casefold()
        return any(ban.nl_re.search(spaced if ban.is_regex else folded) for ban in self._bans)

    def filter_sentences(self, sentences: Iterable[str]) -> list[str]:
        """The sentences in which no ban matches, in order."""
        return [s for s in sentences if not self.sentence_matches(s)]
