"""A1111 / ComfyUI prompt syntax: weights, BREAK, extra networks (defect K5 in docs/deviations.md).

The models see bare tags only. This module parses the user's prompt into an ordered list of items,
hands out the bare tag texts, and puts weights, BREAK and extra-network tokens back on the output.

Syntax (A1111 attention parser semantics, `modules/prompt_parser.py`):
- `(x)` multiplies the weight by 1.1, `[x]` divides it by 1.1, `(x:1.3)` multiplies it by 1.3;
  nesting multiplies; an unclosed bracket applies to the rest of the prompt; an unmatched closing
  bracket is a literal character. A weight that is not a number (`(a:1.2.3)`) is literal text.
- `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters; any other backslash is kept literally
  (A1111 silently drops it, which would turn the tag `\\m/` into `m/`).
- `BREAK` (upper case, whole word) separates chunks; `<name:…>` is an extra-network token
  (`<lora:…>`, `<lyco:…>`, `<hypernet:…>`, …).
- Tags are separated by commas, newlines, BREAK, extra networks and bracket boundaries, so
  `ask (askzy)` is the two tags `ask` and `askzy`×1.1 (as in A1111); `ask \\(askzy\\)` is one tag.

Changes to the signatures given in the design brief (all additive):
- `PromptItem.sep`: the exact source text between the previous item and this one (commas, spaces,
  the brackets of a group); with `ParsedPrompt.tail` it makes `render()` lossless.
- `ParsedPrompt.extras`, `ParsedPrompt.source`, `ParsedPrompt.weighted()`: conveniences.
- `decorate` also keeps the escapes of a tag the user escaped (`ask \\(askzy\\)` stays escaped
  in the output even without `escape_parens`, since unescaped it would read as emphasis).
- `restore(..., nl=())`: the NL strings as they were placed in the formatted text; their text is
  never treated as tags (an NL fragment between commas could otherwise equal a user tag).
- `restore_nl(..., escape_parens=False)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

_TOKEN = re.compile(
    r"""
      (?P<esc>\\[()\[\]\\])
    | (?P<extra><\w+:[^>]+>)
    | (?P<brk>\bBREAK\b)
    | (?P<wclose>:\s*(?P<w>[+-]?[.\d]+)\s*\))
    | (?P<open>[(\[])
    | (?P<close>[)\]])
    | (?P<sep>[,\n])
    | (?P<text>[^\\()\[\]:,\n<B]+|.)
    """,
    re.X | re.S,
)
_ROUND, _SQUARE = 1.1, 1 / 1.1
_UNESCAPE = re.compile(r"\\([()\[\]\\])")


@dataclass
class PromptItem:
    """One element of a parsed prompt.

    kind: "tag", "break" or "extra". text: what the model sees (bare tag; "BREAK"; the token).
    weight: None for an unweighted tag (and for BREAK / extras), else the effective weight.
    raw: the exact source text of the item; for a weighted tag that is alone in its brackets this
    includes the brackets (`(tag:1.2)`, `((tag))`); for a tag inside a group (`(a, b:1.2)`) it is
    the tag's own text and the group brackets live in the neighbouring `sep`s.
    sep: the exact source text before this item (after the previous one).
    """

    kind: Literal["tag", "break", "extra"]
    text: str
    weight: float | None
    raw: str
    sep: str = ""


@dataclass
class _Unit:
    """Lexer output: one character of text, or one structural token."""

    kind: str  # "c" (character), "open", "close", "sep", "brk", "extra"
    value: str
    start: int
    end: int


@dataclass
class _Pair:
    open: int
    close: int | None  # None: never closed, applies to the end
    mult: float


def escape(text: str, brackets: str = "()") -> str:
    """Escape the given bracket characters (default parentheses) that are not escaped yet."""
    return re.sub(r"(?<!\\)([" + re.escape(brackets) + "])", r"\\\1", text)


def unescape(text: str) -> str:
    """`\\(` -> `(` etc.; other backslashes are kept."""
    return _UNESCAPE.sub(r"\1", text)


def tag_key(tag: str) -> str:
    """Comparison key for tags: escapes resolved, "_" = space, whitespace collapsed, case folded."""
    return " ".join(unescape(tag).replace("_", " ").split()).casefold()


def format_weight(weight: float) -> str:
    """1.2 -> "1.2", 1.2100000000000002 -> "1.21", 1/1.1 -> "0.9091", 2.0 -> "2"."""
    return f"{weight:.4f}".rstrip("0").rstrip(".")


def _weighted_form(text: str, weight: float) -> str:
    return f"({escape(text, '()[]')}:{format_weight(weight)})"


# ---------------------------------------------------------------------------------------------
# Lexing and bracket matching


def _lex(text: str, *, nl_mode: bool = False) -> tuple[list[_Unit], list[_Pair]]:
    """Units in source order, and the bracket pairs (A1111 matching rules)."""
    units: list[_Unit] = []
    pairs: dict[int, _Pair] = {}
    stacks: dict[str, list[int]] = {"(": [], "[": []}

    def chars(start: int, end: int) -> None:
        units.extend(_Unit("c", text[i], i, i + 1) for i in range(start, end))

    def close(kind: str, start: int, end: int, mult: float | None) -> None:
        stack = stacks[kind]
        if not stack:
            chars(start, end)  # unmatched closing bracket: literal
            return
        opener = stack.pop()
        pairs[opener] = _Pair(opener, len(units), mult if mult is not None else pairs[opener].mult)
        units.append(_Unit("close", text[start:end], start, end))

    for m in _TOKEN.finditer(text):
        kind, start, end = m.lastgroup, m.start(), m.end()
        if kind == "esc":
            units.append(_Unit("c", m.group()[1], start, end))
        elif kind == "open":
            stacks[m.group()].append(len(units))
            pairs[len(units)] = _Pair(len(units), None, _ROUND if m.group() == "(" else _SQUARE)
            units.append(_Unit("open", m.group(), start, end))
        elif kind == "close":
            close("(" if m.group() == ")" else "[", start, end, None)
        elif kind == "wclose":
            try:
                weight = float(m.group("w"))
            except ValueError:
                weight = None
            if weight is None or not stacks["("]:
                chars(start, end - 1)  # `:x` is text; the `)` is an ordinary bracket
                close("(", end - 1, end, None)
            else:
                close("(", end - 1, end, weight)
                units[-1].start = start
        elif kind in ("brk", "extra", "sep") and not nl_mode:
            units.append(_Unit(kind, m.group(), start, end))
        else:
            chars(start, end)
    return units, list(pairs.values())


def _enclosing(pairs: list[_Pair], index: int) -> list[_Pair]:
    return [p for p in pairs if p.open < index and (p.close is None or index < p.close)]


def _weight(enclosing: list[_Pair]) -> float | None:
    if not enclosing:
        return None
    weight = 1.0
    for pair in enclosing:
        weight *= pair.mult
    return round(weight, 6)


def _own_brackets(units: list[_Unit], enclosing: list[_Pair], first: int, last: int) -> tuple[int, int] | None:
    """Source span of the brackets around units[first..last] if they enclose nothing else."""
    if not enclosing or any(p.close is None for p in enclosing):
        return None
    lo, hi = min(p.open for p in enclosing), max(p.close for p in enclosing)  # type: ignore[type-var]
    mine = {p.open for p in enclosing} | {p.close for p in enclosing}
    for i in range(lo, hi + 1):
        if first <= i <= last or i in mine:
            continue
        if not (units[i].kind == "c" and units[i].value.isspace()):
            return None
    return units[lo].start, units[hi].end


def _runs(units: list[_Unit]) -> Iterable[tuple[int, int]]:
    """(first, last) unit indices of each maximal run of characters, without edge whitespace."""
    i = 0
    while i < len(units):
        if units[i].kind != "c":
            i += 1
            continue
        j = i
        while j + 1 < len(units) and units[j + 1].kind == "c":
            j += 1
        first, last = i, j
        while first <= last and units[first].value.isspace():
            first += 1
        while last >= first and units[last].value.isspace():
            last -= 1
        if first <= last:
            yield first, last
        i = j + 1


# ---------------------------------------------------------------------------------------------
# Tag prompts


@dataclass
class ParsedPrompt:
    """A user's tag prompt as an ordered sequence of items (see PromptItem)."""

    items: list[PromptItem] = field(default_factory=list)
    tail: str = ""  # source text after the last item

    @property
    def tags(self) -> list[str]:
        """Bare tag texts in input order: what the model sees."""
        return [item.text for item in self.items if item.kind == "tag"]

    @property
    def extras(self) -> list[str]:
        """Extra-network tokens, verbatim, in input order."""
        return [item.raw for item in self.items if item.kind == "extra"]

    @property
    def source(self) -> str:
        return self.render()

    def weighted(self) -> dict[str, PromptItem]:
        """tag_key -> the user's item for that tag (a weighted one preferred, else the first)."""
        found: dict[str, PromptItem] = {}
        for item in self.items:
            if item.kind == "tag":
                key = tag_key(item.text)
                if key not in found or (found[key].weight is None and item.weight is not None):
                    found[key] = item
        return found

    def decorate(self, tag: str, *, escape_parens: bool = False) -> str:
        """`tag` as it should appear in the output.

        A tag the user weighted gets its original bracket form when that form holds only this tag
        (`(a:1.2)`, `((a))`, `[a]`), else `(tag:weight)`. Any other tag is returned as is, with its
        parentheses escaped when `escape_parens`, or when the user escaped them in the input.
        """
        return _decorate(tag, self.weighted(), escape_parens)

    def render(self) -> str:
        """The prompt text back: exactly the parsed input as long as the items are unchanged."""
        return "".join(item.sep + item.raw for item in self.items) + self.tail


def _decorate(tag: str, known: dict[str, PromptItem], escape_parens: bool) -> str:
    item = known.get(tag_key(tag))
    if item is None or item.weight is None:
        user_escaped = item is not None and ("\\(" in item.raw or "\\)" in item.raw)
        return escape(tag) if escape_parens or user_escaped else tag
    if item.raw[:1] in ("(", "["):
        return item.raw
    return _weighted_form(unescape(tag), item.weight)


def _tag_item(text: str, units: list[_Unit], pairs: list[_Pair], first: int, last: int) -> tuple[PromptItem, int, int]:
    enclosing = _enclosing(pairs, first)
    bare = " ".join("".join(u.value for u in units[first : last + 1]).split())
    span = _own_brackets(units, enclosing, first, last) or (units[first].start, units[last].end)
    item = PromptItem("tag", bare, _weight(enclosing), text[span[0] : span[1]])
    return item, span[0], span[1]


def parse_prompt(text: str) -> ParsedPrompt:
    """Parse a tag prompt written in A1111 syntax; `render()` of the result gives `text` back."""
    units, pairs = _lex(text)
    located: list[tuple[int, int, PromptItem]] = []
    for first, last in _runs(units):
        item, start, end = _tag_item(text, units, pairs, first, last)
        located.append((start, end, item))
    for unit in units:
        if unit.kind == "brk":
            located.append((unit.start, unit.end, PromptItem("break", "BREAK", None, unit.value)))
        elif unit.kind == "extra":
            located.append((unit.start, unit.end, PromptItem("extra", unit.value, None, unit.value)))
    located.sort(key=lambda entry: entry[0])
    items, pos = [], 0
    for start, end, item in located:
        item.sep = text[pos:start]
        items.append(item)
        pos = end
    return ParsedPrompt(items, text[pos:])


# ---------------------------------------------------------------------------------------------
# Restoring weights, BREAK and extra networks on a formatted output


def _nl_ranges(text: str, nl: Iterable[str]) -> list[tuple[int, int]]:
    """Where the NL texts occur; whitespace may differ (templates collapse spaces and newlines)."""
    ranges = []
    for part in nl:
        words = part.split() if part else []
        if words:
            pattern = r"\s+".join(re.escape(word) for word in words)
            ranges.extend(m.span() for m in re.finditer(pattern, text))
    return sorted(ranges)


def _free_intervals(length: int, masked: list[tuple[int, int]]) -> Iterable[tuple[int, int, bool]]:
    """(start, end, follows_nl) of the text outside the masked ranges."""
    pos, follows_nl = 0, False
    for lo, hi in masked:
        if lo > pos:
            yield pos, lo, follows_nl
        if hi >= pos:
            pos, follows_nl = hi, True
    yield pos, length, follows_nl


def _segments(text: str, masked: list[tuple[int, int]]) -> list[tuple[int, int, str]]:
    """(start, end, text) of every stripped comma/newline separated piece outside the NL ranges."""
    found = []
    for lo, hi, follows_nl in _free_intervals(len(text), masked):
        if follows_nl and text.startswith(".", lo):
            lo += 1  # the template's own "." after an NL placeholder
        for m in re.finditer(r"[^,\n]+", text[lo:hi]):
            piece = m.group()
            stripped = piece.strip()
            if stripped:
                start = lo + m.start() + len(piece) - len(piece.lstrip())
                found.append((start, start + len(stripped), stripped))
    return found


def _break_anchors(parsed: ParsedPrompt, tag_ends: dict[str, int]) -> list[int | None]:
    """For each BREAK: the end of the output tag it followed in the input (None: the start)."""
    anchors: list[int | None] = []
    for index, item in enumerate(parsed.items):
        if item.kind != "break":
            continue
        anchor = None
        for previous in reversed(parsed.items[:index]):
            if previous.kind == "tag" and tag_key(previous.text) in tag_ends:
                anchor = tag_ends[tag_key(previous.text)]
                break
        anchors.append(anchor)
    return anchors


def restore(text: str, parsed: ParsedPrompt, *, escape_parens: bool = False, nl: Iterable[str] = (),
            decorated: dict[str, str] | None = None) -> str:  # fmt: skip
    """Put the user's syntax back on a formatted output (tags joined by ", ").

    - a tag the user weighted gets its weight back (`decorate`); other tags stay plain
      (parentheses escaped when `escape_parens`, for every tag, the model's included);
    - each BREAK goes right after the tag it followed in the input, WebUI style: `tag, BREAK next`
      (never `BREAK,`, never a weighted `(BREAK:-1)`); when that tag is missing, after the
      nearest earlier one present; with none, at the start;
    - extra-network tokens are appended at the end, verbatim, in input order.
    Whole comma/newline-separated pieces are matched, never substrings; the `nl` texts (and a
    "." right after one) are left alone.

    `decorated` (decorated text -> tag_key of the tag): the tags were decorated before the
    template placed them, which holds for any template, whatever separates its placeholders.
    Pieces are then not decorated again; only BREAK and the extra networks are put back.
    """
    edits: list[tuple[int, int, str]] = []
    tag_ends: dict[str, int] = {}
    known = parsed.weighted()
    for start, end, piece in _segments(text, _nl_ranges(text, nl)):
        if decorated is not None:
            tag_ends.setdefault(decorated.get(piece, tag_key(piece)), end)
            continue
        tag_ends.setdefault(tag_key(piece), end)
        new = _decorate(piece, known, escape_parens)
        if new != piece:
            edits.append((start, end, new))
    for anchor in _break_anchors(parsed, tag_ends):
        if anchor is None:
            edits.append((0, 0, "BREAK "))
        elif text[anchor : anchor + 1] == ",":
            edits.append((anchor + 1, anchor + 1, " BREAK"))
        else:
            edits.append((anchor, anchor, " BREAK"))
    out, pos = [], 0
    for start, end, new in sorted(edits, key=lambda e: (e[0], e[1])):
        out.append(text[pos:start] + new)
        pos = end
    result = "".join(out) + text[pos:]
    if not text:
        result = result.rstrip()  # BREAKs alone: "BREAK BREAK", never "BREAKBREAK" (not a BREAK to A1111)
    return _append_extras(result, parsed.extras)


def _append_extras(text: str, extras: Sequence[str]) -> str:
    if not extras:
        return text
    tokens = ", ".join(extras)
    body = text.rstrip()
    if not body:
        return tokens
    # No comma after a sentence end, an existing comma, or a BREAK (which must not become "BREAK,").
    plain_space = body.endswith((".", "!", "?", ",")) or re.search(r"\bBREAK$", body)
    return body + (" " if plain_space else ", ") + tokens


# ---------------------------------------------------------------------------------------------
# Natural language with weighted spans


def parse_nl(text: str) -> tuple[str, list[tuple[str, float, str]]]:
    """NL text in A1111 syntax -> (bare text for the model, [(span text, weight, raw form)]).

    Only brackets and escapes are syntax here; commas, BREAK and `<…>` are plain text. The raw form
    is the user's bracket text when it holds only that span, else `(span:weight)`. Runs of spaces
    left by removed brackets are collapsed.
    """
    units, pairs = _lex(text, nl_mode=True)
    bare = "".join(u.value for u in units if u.kind == "c")
    spans: list[tuple[str, float, str]] = []
    for first, last in _runs(units):
        enclosing = _enclosing(pairs, first)
        weight = _weight(enclosing)
        if weight is None:
            continue
        span_text = "".join(u.value for u in units[first : last + 1])
        own = _own_brackets(units, enclosing, first, last)
        raw = text[own[0] : own[1]] if own else _weighted_form(span_text, weight)
        spans.append((span_text, weight, raw))
    return re.sub(r"[ \t]{2,}", " ", bare), spans


def restore_nl(text: str, spans: Iterable[tuple[str, float, str]], *, escape_parens: bool = False) -> str:
    """Re-apply NL weights to the spans found in `text` (whole words, first free occurrence).

    A span that no longer occurs is skipped. A case-insensitive hit whose case differs (e.g. at
    the start of a sentence) is written as `(Found text:weight)`. With `escape_parens`, the other
    parentheses of the text are escaped.
    """
    edits: list[tuple[int, int, str]] = []
    for span, weight, raw in spans:
        pattern = re.compile(r"(?<!\w)" + re.escape(span) + r"(?!\w)", re.I)
        for m in pattern.finditer(text):
            if all(m.end() <= s or m.start() >= e for s, e, _ in edits):
                edits.append((m.start(), m.end(), raw if m.group() == span else _weighted_form(m.group(), weight)))
                break
    out, pos = [], 0
    for start, end, new in sorted(edits):
        plain = text[pos:start]
        out.append((escape(plain) if escape_parens else plain) + new)
        pos = end
    rest = text[pos:]
    return "".join(out) + (escape(rest) if escape_parens else rest)
