"""Tag categorisation: which field of the tag map each tag belongs to.

A tag goes to one of the eight fields of FIELDS. Four categories come from the large shipped lists
(`kgen_cli/data/tag-lists/*.txt`, ~957k lines); three are the small fixed sets below.

The large lists are never loaded into memory: each file is sorted in byte order and searched with a
binary search over an `mmap` of the file, opened on the first lookup. Importing this module opens
no file, so commands that do not categorise stay fast.

Decisions (see docs/deviations.md, "Tags and their identity"):
- lookup is case-insensitive (the lists are lower-case); the stored text keeps the user's case;
- every category is de-duplicated (keep first), special tags included; duplicates are compared
  by `syntax.tag_key` (case-insensitive, `_` = space, whitespace collapsed);
- `questionable` is not a rating tag (reference behaviour): it goes to `general`;
- user extensions of the quality/special sets (`extra_quality`, `extra_special`) are checked before
  the shipped lists, so they win when a tag is also in a list (explicit user intent).
"""

from __future__ import annotations

import mmap
import threading
from typing import Iterable

from kgen_cli.errors import KgenError
from kgen_cli.formats.syntax import tag_key

SPECIAL: frozenset[str] = frozenset({
    "1girl", "2girls", "3girls", "4girls", "5girls", "6+girls", "multiple girls",
    "1boy", "2boys", "3boys", "4boys", "5boys", "6+boys", "multiple boys", "male focus",
    "1other", "2others", "3others", "4others", "5others", "6+others", "multiple others",
})

QUALITY: frozenset[str] = frozenset({
    "masterpiece", "best quality", "great quality", "good quality", "normal quality", "low quality",
    "worse quality", "very aesthetic", "aesthetic", "displeasing", "very displeasing", "newest",
    "recent", "mid", "early", "old", "score_9", "score_8_up", "score_7_up", "score_6_up",
    "score_5_up", "score_4_up", "source_anime", "source_cartoon", "source_furry", "source_pony",
})

RATING: frozenset[str] = frozenset({"safe", "general", "sfw", "sensitive", "nsfw", "explicit"})

CATEGORY_ORDER = ("artist", "characters", "copyrights", "meta", "special", "quality", "rating")
FIELDS = ("special", "characters", "copyrights", "artist", "general", "quality", "meta", "rating")

LIST_NAMES = ("artist", "characters", "copyrights", "meta")
_FIXED = {"special": SPECIAL, "quality": QUALITY, "rating": RATING}


class SortedTagFile:
    """Membership test on a byte-sorted, one-entry-per-line file, by binary search over an mmap.

    Lines may end in LF or CRLF (a trailing CR is ignored). Opened lazily, once, thread-safely.
    """

    def __init__(self, name: str):
        self.name = name
        self._data: mmap.mmap | bytes | None = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._data is not None

    def _open(self) -> mmap.mmap | bytes:
        from kgen_cli.paths import package_data

        path = package_data("tag-lists", f"{self.name}.txt")
        try:
            with open(path, "rb") as f:
                # mmap refuses empty files; an empty list simply matches nothing.
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
        except OSError as exc:
            raise KgenError(f"cannot read the tag list {path}: {exc.strerror or exc}") from None

    def _buffer(self) -> mmap.mmap | bytes:
        if self._data is None:
            with self._lock:
                if self._data is None:
                    self._data = self._open()
        return self._data

    def __contains__(self, tag: str) -> bool:
        key = tag.encode("utf-8")
        if not key or b"\n" in key or b"\r" in key:
            return False
        data = self._buffer()
        lo, hi = 0, len(data)  # invariant: lo and hi are line starts (or the end)
        while lo < hi:
            mid = (lo + hi) // 2
            newline = data.rfind(b"\n", lo, mid)
            start = lo if newline < 0 else newline + 1
            end = data.find(b"\n", start, hi)
            if end < 0:
                end = hi
            line = data[start:end]
            if line.endswith(b"\r"):
                line = line[:-1]
            if key == line:
                return True
            if key < line:
                hi = start
            else:
                lo = end + 1
        return False


_LISTS: dict[str, SortedTagFile] = {name: SortedTagFile(name) for name in LIST_NAMES}


def lists_opened() -> list[str]:
    """Names of the shipped lists opened so far (for tests and diagnostics)."""
    return [name for name, table in _LISTS.items() if table.is_open]


def split_tags(text: str) -> list[str]:
    """Split on commas and newlines; strip each item; drop empty items; keep order."""
    return [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]


def _member(category: str, lowered: str) -> bool:
    fixed = _FIXED.get(category)
    return lowered in fixed if fixed is not None else lowered in _LISTS[category]


def classify(
    tag: str, *, extra_quality: frozenset[str] = frozenset(), extra_special: frozenset[str] = frozenset()
) -> tuple[str, str]:
    """(field, stored text) of one stripped tag, by the reference's rules.

    Each category is tried with the tag as written, then with "_" -> " "; the first hit wins and
    stores the form that hit. `extra_quality` / `extra_special` must be lower-case (see
    `categorize`); they are tried first.
    """
    # Stripped: a stray "_" at an end ("long_hair_", a typo) must not put a space into the
    # model's input ("long hair ,"); the reference keeps it. All underscores: nothing to space.
    spaced = tag.replace("_", " ").strip() or tag
    forms = [(tag, tag.lower())] if spaced == tag else [(tag, tag.lower()), (spaced, spaced.lower())]
    for category, members in (("special", extra_special), ("quality", extra_quality)):
        for form, lowered in forms:
            if lowered in members:
                return category, form
    for category in CATEGORY_ORDER:
        for form, lowered in forms:
            if _member(category, lowered):
                return category, form
    # Short unmatched tags keep "_" so that emoticons such as ^_^ and o_o survive.
    return "general", (tag if len(tag) < 4 else spaced)


def _normalise_extra(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.strip().lower() for v in values if v and v.strip())


def category_of(
    tag: str, *, extra_quality: Iterable[str] = frozenset(), extra_special: Iterable[str] = frozenset()
) -> str | None:
    """The category of one tag (a CATEGORY_ORDER name), or None when it is a general tag."""
    field, _ = classify(
        tag.strip(), extra_quality=_normalise_extra(extra_quality), extra_special=_normalise_extra(extra_special)
    )
    return None if field == "general" else field


def _classified(
    tags: Iterable[str], extra_quality: Iterable[str], extra_special: Iterable[str]
) -> Iterable[tuple[str, str]]:
    eq, es = _normalise_extra(extra_quality), _normalise_extra(extra_special)
    for raw in tags:
        tag = raw.strip()
        if tag:
            yield classify(tag, extra_quality=eq, extra_special=es)


def stored_forms(
    tags: Iterable[str], *, extra_quality: Iterable[str] = (), extra_special: Iterable[str] = ()
) -> list[str]:
    """Each non-empty tag in the form `categorize` stores it (`maid_` -> `maid`), in order."""
    return [text for _, text in _classified(tags, extra_quality, extra_special)]


def categorize(
    tags: Iterable[str], *, extra_quality: Iterable[str] = (), extra_special: Iterable[str] = ()
) -> dict[str, list[str]]:
    """Split tags into the eight FIELDS (all keys present), input order kept, each de-duplicated
    by `syntax.tag_key`, the one tag identity every module compares with."""
    result: dict[str, list[str]] = {field: [] for field in FIELDS}
    seen: dict[str, set[str]] = {field: set() for field in FIELDS}
    for field, text in _classified(tags, extra_quality, extra_special):
        key = tag_key(text)
        if key not in seen[field]:
            seen[field].add(key)
            result[field].append(text)
    return result
