"""A1111 prompt syntax: parsing, lossless render, decorate, restore, NL weights (docs/deviations.md#k5)."""

from __future__ import annotations

import pytest

from kgen_cli.formats.syntax import (
    ParsedPrompt,
    PromptItem,
    escape,
    format_weight,
    parse_nl,
    parse_prompt,
    restore,
    restore_nl,
    tag_key,
    unescape,
)
from kgen_cli.formats.templates import PRESETS, apply_format


def summary(text: str) -> list[tuple]:
    """(kind, text, weight) of every item."""
    return [(i.kind, i.text, i.weight) for i in parse_prompt(text).items]


# ---------------------------------------------------------------------------------------------
# Lossless round trip (K5)

ROUND_TRIPS = [
    "",
    " ",
    ",,,",
    "(a:1.2), b BREAK c, <lora:x:0.5>",
    "1girl, solo",
    "  1girl ,solo,  ",
    "a\nb\r\nc",
    "((a)), [b], [[c]], (d:0.8), (e : 1.5 ), (f:-1)",
    "(red hair, blue eyes:1.2), smile",
    "((a), b), c",
    "ask \\(askzy\\), \\[x\\], back\\\\slash",
    "ask (askzy)",
    "BREAK a, b",
    "a, b BREAK",
    "a, BREAK, b",
    "a BREAK BREAK b",
    "<lora:x:1> a, <lyco:y:0.5>, b <hypernet:z:1>",
    "(a",
    "a)",
    "a]",
    "(a:1.2.3)",
    "(re:zero), rating:general",
    "( (x) )",
    "[(a:1.5)]",
    "([a)]",
    "\\m/, ^_^, >_<, :3, :)",
    "score_9, score_8_up, source_anime",
    "BREAKFAST, break, BREAK",
    "(a BREAK b:1.2)",
    "(<lora:x:1>)",
    "{a|b}, [a:b:0.5]",
    "<3, <not an extra>",
    "a,\tb",
]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_render_reproduces_input_exactly(text):
    assert parse_prompt(text).render() == text


def test_k5_example_items():
    parsed = parse_prompt("(a:1.2), b BREAK c, <lora:x:0.5>")
    assert parsed.items == [
        PromptItem("tag", "a", 1.2, "(a:1.2)", ""),
        PromptItem("tag", "b", None, "b", ", "),
        PromptItem("break", "BREAK", None, "BREAK", " "),
        PromptItem("tag", "c", None, "c", " "),
        PromptItem("extra", "<lora:x:0.5>", None, "<lora:x:0.5>", ", "),
    ]
    assert parsed.tags == ["a", "b", "c"]
    assert parsed.extras == ["<lora:x:0.5>"]
    assert parsed.tail == ""
    assert parsed.source == "(a:1.2), b BREAK c, <lora:x:0.5>"


def test_render_after_edit_uses_items():
    parsed = parse_prompt("a, b")
    parsed.items.append(PromptItem("tag", "c", None, "c", ", "))
    assert parsed.render() == "a, b, c"


# ---------------------------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a", [("tag", "a", None)]),
        ("(a)", [("tag", "a", 1.1)]),
        ("((a))", [("tag", "a", 1.21)]),
        ("(((a)))", [("tag", "a", 1.331)]),
        ("[a]", [("tag", "a", 0.909091)]),
        ("[[a]]", [("tag", "a", 0.826446)]),
        ("(a:1.2)", [("tag", "a", 1.2)]),
        ("(a: 1.2 )", [("tag", "a", 1.2)]),
        ("(a:0.5)", [("tag", "a", 0.5)]),
        ("(a:1)", [("tag", "a", 1.0)]),
        ("(a:-1)", [("tag", "a", -1.0)]),
        ("(a:.5)", [("tag", "a", 0.5)]),
        ("((a:1.2))", [("tag", "a", 1.32)]),
        ("[(a)]", [("tag", "a", 1.0)]),
        ("(a, b:1.5)", [("tag", "a", 1.5), ("tag", "b", 1.5)]),
        ("(red hair, blue eyes:1.2)", [("tag", "red hair", 1.2), ("tag", "blue eyes", 1.2)]),
        ("((a), b)", [("tag", "a", 1.21), ("tag", "b", 1.1)]),
        ("(a (b) c:1.2)", [("tag", "a", 1.2), ("tag", "b", 1.32), ("tag", "c", 1.2)]),
        ("(a", [("tag", "a", 1.1)]),  # unclosed: applies to the end
        ("(a, b", [("tag", "a", 1.1), ("tag", "b", 1.1)]),
        ("x, [y", [("tag", "x", None), ("tag", "y", 0.909091)]),
        ("a)", [("tag", "a)", None)]),  # unmatched closer: literal
        ("a]", [("tag", "a]", None)]),
        ("a:1.2)", [("tag", "a:1.2)", None)]),
        ("(a:1.2.3)", [("tag", "a:1.2.3", 1.1)]),  # not a number: text, ")" still closes
        ("(re:zero)", [("tag", "re:zero", 1.1)]),
        ("rating:general", [("tag", "rating:general", None)]),
        ("ask (askzy)", [("tag", "ask", None), ("tag", "askzy", 1.1)]),  # z-tipo #39, A1111 semantics
        ("(a)b", [("tag", "a", 1.1), ("tag", "b", None)]),
    ],
)
def test_weights(text, expected):
    assert summary(text) == expected


def test_raw_keeps_own_brackets_only_when_alone():
    items = parse_prompt("((a)), [b], (c:1.2), (d, e:1.3), ( f ), ((g), h)").items
    assert [(i.text, i.raw) for i in items] == [
        ("a", "((a))"), ("b", "[b]"), ("c", "(c:1.2)"), ("d", "d"), ("e", "e"), ("f", "( f )"),
        ("g", "g"), ("h", "h"),
    ]


def test_crossed_brackets_follow_a1111_pairing():
    # ")" closes the last "(" even when a "[" was opened after it.
    assert summary("([a)]") == [("tag", "a", 1.0)]
    assert summary("([a) b]") == [("tag", "a", 1.0), ("tag", "b", 0.909091)]


# ---------------------------------------------------------------------------------------------
# Escapes


@pytest.mark.parametrize(
    "text, tags",
    [
        ("ask \\(askzy\\)", ["ask (askzy)"]),
        ("\\(a\\)", ["(a)"]),
        ("\\[a\\]", ["[a]"]),
        ("a\\\\b", ["a\\b"]),
        ("\\m/", ["\\m/"]),  # a lone backslash is kept (A1111 drops it)
        ("(ask \\(askzy\\):1.2)", ["ask (askzy)"]),
        ("hatsune miku \\(cosplay\\), 1girl", ["hatsune miku (cosplay)", "1girl"]),
    ],
)
def test_escapes_are_literal(text, tags):
    assert parse_prompt(text).tags == tags


def test_escaped_weighted_tag():
    item = parse_prompt("(ask \\(askzy\\):1.2)").items[0]
    assert (item.text, item.weight, item.raw) == ("ask (askzy)", 1.2, "(ask \\(askzy\\):1.2)")


def test_escape_helpers():
    assert escape("ask (askzy)") == "ask \\(askzy\\)"
    assert escape("ask \\(askzy\\)") == "ask \\(askzy\\)"  # not escaped twice
    assert escape("[a] (b)", "()[]") == "\\[a\\] \\(b\\)"
    assert unescape("ask \\(askzy\\) \\[x\\] \\\\ \\m/") == "ask (askzy) [x] \\ \\m/"


# ---------------------------------------------------------------------------------------------
# BREAK and extra networks


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a BREAK b", [("tag", "a", None), ("break", "BREAK", None), ("tag", "b", None)]),
        ("a, BREAK, b", [("tag", "a", None), ("break", "BREAK", None), ("tag", "b", None)]),
        ("a,BREAK,b", [("tag", "a", None), ("break", "BREAK", None), ("tag", "b", None)]),
        ("BREAK a", [("break", "BREAK", None), ("tag", "a", None)]),
        ("a BREAK", [("tag", "a", None), ("break", "BREAK", None)]),
        ("a\nBREAK\nb", [("tag", "a", None), ("break", "BREAK", None), ("tag", "b", None)]),
        ("BREAKFAST, break, aBREAK", [("tag", "BREAKFAST", None), ("tag", "break", None), ("tag", "aBREAK", None)]),
        ("(a BREAK b:1.2)", [("tag", "a", 1.2), ("break", "BREAK", None), ("tag", "b", 1.2)]),
    ],
)
def test_break(text, expected):
    assert summary(text) == expected


def test_break_is_never_a_weighted_tag():
    parsed = parse_prompt("((a BREAK b))")
    assert "BREAK" not in parsed.tags
    assert [i.kind for i in parsed.items] == ["tag", "break", "tag"]
    assert parsed.items[1].weight is None


@pytest.mark.parametrize(
    "text, extras, tags",
    [
        ("<lora:x:0.5>", ["<lora:x:0.5>"], []),
        ("a, <lora:x:0.5>, b", ["<lora:x:0.5>"], ["a", "b"]),
        ("a <lora:x:0.5> b", ["<lora:x:0.5>"], ["a", "b"]),
        ("<lyco:y:1:0.5> <hypernet:z:1>", ["<lyco:y:1:0.5>", "<hypernet:z:1>"], []),
        ("(<lora:x:1>), a", ["<lora:x:1>"], ["a"]),
        ("<3, >_<", [], ["<3", ">_<"]),
        ("<not extra>", [], ["<not extra>"]),
    ],
)
def test_extra_networks(text, extras, tags):
    parsed = parse_prompt(text)
    assert parsed.extras == extras
    assert parsed.tags == tags


def test_whitespace_inside_tag_collapsed_for_the_model():
    assert parse_prompt("red   hair,\tblue eyes").tags == ["red hair", "blue eyes"]


# ---------------------------------------------------------------------------------------------
# decorate


def test_decorate():
    parsed = parse_prompt("(a:1.2), ((b)), [c], (d, e:1.3), f, (long_hair:1.1), (ask \\(askzy\\):1.2), ((g), h)")
    assert parsed.decorate("a") == "(a:1.2)"
    assert parsed.decorate("b") == "((b))"
    assert parsed.decorate("c") == "[c]"
    assert parsed.decorate("d") == "(d:1.3)"
    assert parsed.decorate("e") == "(e:1.3)"
    assert parsed.decorate("f") == "f"
    assert parsed.decorate("long hair") == "(long_hair:1.1)"  # matched through "_" = space
    assert parsed.decorate("ask (askzy)") == "(ask \\(askzy\\):1.2)"
    assert parsed.decorate("g") == "(g:1.21)"
    assert parsed.decorate("h") == "(h:1.1)"
    assert parsed.decorate("new tag") == "new tag"
    assert parsed.decorate("A") == "(a:1.2)"  # case-insensitive match


def test_decorate_escape_parens_only_for_plain_tags():
    parsed = parse_prompt("(x:1.5), (y \\(z\\), w:1.2)")
    assert parsed.decorate("ask (askzy)") == "ask (askzy)"
    assert parsed.decorate("ask (askzy)", escape_parens=True) == "ask \\(askzy\\)"
    assert parsed.decorate("x", escape_parens=True) == "(x:1.5)"
    assert parsed.decorate("y (z)") == "(y \\(z\\):1.2)"  # inside a weight: always escaped


def test_format_weight():
    assert format_weight(1.2) == "1.2"
    assert format_weight(1.2100000000000002) == "1.21"
    assert format_weight(1 / 1.1) == "0.9091"
    assert format_weight(2.0) == "2"
    assert format_weight(0.05) == "0.05"
    assert format_weight(-1.0) == "-1"


def test_tag_key():
    assert tag_key("Long_Hair") == tag_key("long hair") == tag_key(" long   hair ")
    assert tag_key("ask \\(askzy\\)") == tag_key("ask (askzy)")


# ---------------------------------------------------------------------------------------------
# restore


def test_restore_k5_example_without_generation():
    parsed = parse_prompt("(a:1.2), b BREAK c, <lora:x:0.5>")
    assert restore(", ".join(parsed.tags), parsed) == "(a:1.2), b, BREAK c, <lora:x:0.5>"


def test_restore_with_new_tags_and_reordering():
    parsed = parse_prompt("(a:1.2), b BREAK c, <lora:x:0.5>")
    assert restore("c, a, new, b, more", parsed) == "c, (a:1.2), new, b, BREAK more, <lora:x:0.5>"


def test_restore_break_at_end_of_output_is_not_followed_by_a_comma():
    parsed = parse_prompt("a, b BREAK c, <lora:x:0.5>")
    out = restore("c, a, b", parsed)
    assert out == "c, a, b BREAK <lora:x:0.5>"
    assert "BREAK," not in out


def test_restore_break_never_weighted():
    parsed = parse_prompt("((a)), BREAK, (b:1.2) BREAK c")
    out = restore("a, b, c", parsed)
    assert out == "((a)), BREAK (b:1.2), BREAK c"
    assert "(BREAK" not in out and "BREAK," not in out


def test_restore_break_at_start():
    parsed = parse_prompt("BREAK a, b")
    assert restore("a, b", parsed) == "BREAK a, b"
    assert restore("", parsed) == "BREAK"


def test_restore_break_follows_nearest_present_tag():
    parsed = parse_prompt("a, gone BREAK b")
    assert restore("a, b", parsed) == "a, BREAK b"
    parsed = parse_prompt("gone BREAK b")
    assert restore("b, x", parsed) == "BREAK b, x"


def test_restore_break_after_extra_uses_previous_tag():
    parsed = parse_prompt("a, <lora:x:1> BREAK b")
    assert restore("a, b", parsed) == "a, BREAK b, <lora:x:1>"


def test_restore_two_breaks_after_same_tag():
    parsed = parse_prompt("a BREAK BREAK b")
    assert restore("a, b", parsed) == "a, BREAK BREAK b"


@pytest.mark.parametrize("source, expected", [
    ("BREAK BREAK", "BREAK BREAK"),
    ("BREAK, BREAK BREAK", "BREAK BREAK BREAK"),
    ("BREAK BREAK <lora:x:1>", "BREAK BREAK <lora:x:1>"),
    ("gone BREAK BREAK", "BREAK BREAK"),
])  # fmt: skip
def test_restore_breaks_on_an_empty_output_stay_separate(source, expected):
    """Issue 20 item 8: `BREAKBREAK` is not a BREAK to A1111."""
    assert restore("", parse_prompt(source)) == expected


def test_restore_matches_whole_tags_not_substrings():
    parsed = parse_prompt("(hair:1.2), (red:1.1)")
    assert restore("red hair, long hair, hair, red", parsed) == "red hair, long hair, (hair:1.2), (red:1.1)"


def test_restore_group_weights_split_across_fields():
    parsed = parse_prompt("(1girl, hatsune miku:1.2), smile")
    assert restore("1girl, \nhatsune miku, \n\nsmile", parsed) == "(1girl:1.2), \n(hatsune miku:1.2), \n\nsmile"


def test_restore_extras_appended_in_order():
    parsed = parse_prompt("<lora:a:1>, x, <lyco:b:0.5>, y <hypernet:c:1>")
    assert restore("x, y", parsed) == "x, y, <lora:a:1>, <lyco:b:0.5>, <hypernet:c:1>"
    assert restore("", parsed) == "<lora:a:1>, <lyco:b:0.5>, <hypernet:c:1>"
    assert restore("A girl smiles.", parsed) == "A girl smiles. <lora:a:1>, <lyco:b:0.5>, <hypernet:c:1>"


def test_restore_nothing_to_do_is_identity():
    parsed = parse_prompt("a, b, c")
    text = "a, b, \n\nc, new,\n\nA sentence, with commas.\n\nmasterpiece"
    assert restore(text, parsed) == text


def test_restore_escape_parens_applies_to_every_tag_but_not_nl():
    parsed = parse_prompt("(ask \\(askzy\\):1.2), 1girl")
    text = "1girl, ask (askzy), hatsune miku (cosplay), A girl (smiling) waves"
    out = restore(text, parsed, escape_parens=True, nl=["A girl (smiling) waves"])
    assert out == "1girl, (ask \\(askzy\\):1.2), hatsune miku \\(cosplay\\), A girl (smiling) waves"
    assert restore(text, parsed, nl=["A girl (smiling) waves"]).startswith("1girl, (ask \\(askzy\\):1.2), hatsune miku (cosplay)")


def test_restore_does_not_touch_nl_fragments():
    parsed = parse_prompt("(smiling:1.3), 1girl BREAK solo")
    nl = "A girl, smiling, waves"
    text = apply_format({"special": ["1girl"], "general": ["solo", "smiling"], "extended": nl}, PRESETS["both-tag-first"])
    out = restore(text, parsed, nl=[nl])
    assert out == "1girl, BREAK \n\nsolo, (smiling:1.3),\n\nA girl, smiling, waves."
    # Without the nl hint the fragment would be taken for the tag:
    assert "A girl, (smiling:1.3)" in restore(text, parsed)


def test_restore_nl_hint_tolerates_whitespace_changes_and_the_template_period():
    parsed = parse_prompt("(masterpiece:1.2), smile")
    nl = "A girl\nsmiles.  She waves"
    text = apply_format({"general": ["smile"], "extended": nl, "quality": ["masterpiece"]}, PRESETS["oneline"])
    assert text == "smile, A girl smiles. She waves. masterpiece"
    assert restore(text, parsed, nl=[nl]) == "smile, A girl smiles. She waves. (masterpiece:1.2)"


def test_restore_full_pipeline_like_example():
    user = "1girl, (hatsune miku:1.2), ask \\(askzy\\) BREAK ((smile)), <lora:miku:0.8>"
    parsed = parse_prompt(user)
    assert parsed.tags == ["1girl", "hatsune miku", "ask (askzy)", "smile"]
    tag_map = {
        "special": ["1girl"], "characters": ["hatsune miku"], "copyrights": ["vocaloid"],
        "artist": ["ask (askzy)"], "general": ["smile", "twintails"], "quality": ["masterpiece"],
        "meta": [], "rating": ["general"], "extended": "", "generated": "A girl smiles",
    }
    text = apply_format(tag_map, PRESETS["both-tag-first"])
    out = restore(text, parsed, escape_parens=True, nl=["A girl smiles"])
    assert out == (
        "1girl, (hatsune miku:1.2), vocaloid, \nask \\(askzy\\), BREAK \n\n((smile)), twintails,\n\n"
        "A girl smiles.\n\nmasterpiece, general, <lora:miku:0.8>"
    )


# ---------------------------------------------------------------------------------------------
# NL weights


def test_parse_nl_plain():
    assert parse_nl("A girl smiles, happily. BREAK <lora:x:1>") == ("A girl smiles, happily. BREAK <lora:x:1>", [])
    assert parse_nl("") == ("", [])


def test_parse_nl_weighted_spans():
    bare, spans = parse_nl("A girl with (red hair:1.2) and [blue eyes] smiles, ((brightly)).")
    assert bare == "A girl with red hair and blue eyes smiles, brightly."
    assert spans == [
        ("red hair", 1.2, "(red hair:1.2)"),
        ("blue eyes", 0.909091, "[blue eyes]"),
        ("brightly", 1.21, "((brightly))"),
    ]


def test_parse_nl_escapes_and_spacing():
    bare, spans = parse_nl("She is \\(happy\\) and ( very  tall :1.5) now")
    assert bare == "She is (happy) and very tall now"
    assert spans == [("very  tall", 1.5, "( very  tall :1.5)")]


def test_parse_nl_nested_spans():
    bare, spans = parse_nl("(a big (red) ball:1.2)")
    assert bare == "a big red ball"
    assert spans == [("a big", 1.2, "(a big:1.2)"), ("red", 1.32, "(red:1.32)"), ("ball", 1.2, "(ball:1.2)")]


def test_restore_nl_reapplies_surviving_spans():
    _, spans = parse_nl("A girl with (red hair:1.2) and [blue eyes].")
    out = restore_nl("A girl with red hair smiles. Her blue eyes shine. A red hairband.", spans)
    assert out == "A girl with (red hair:1.2) smiles. Her [blue eyes] shine. A red hairband."


def test_restore_nl_missing_span_skipped_and_whole_words_only():
    _, spans = parse_nl("(red:1.5) ball")
    assert restore_nl("A reddish ball.", spans) == "A reddish ball."
    assert restore_nl("A red ball and a red box.", spans) == "A (red:1.5) ball and a red box."


def test_restore_nl_case_difference():
    _, spans = parse_nl("a girl with (red hair:1.2)")
    assert restore_nl("Red hair flows.", spans) == "(Red hair:1.2) flows."


def test_restore_nl_escape_parens():
    _, spans = parse_nl("(smile:1.1)")
    assert restore_nl("A smile (wide).", spans, escape_parens=True) == "A (smile:1.1) \\(wide\\)."
    assert restore_nl("A smile (wide).", spans) == "A (smile:1.1) (wide)."


def test_nl_round_trip_without_generation():
    text = "A girl with (red hair:1.2) and [blue eyes] smiles."
    bare, spans = parse_nl(text)
    assert restore_nl(bare, spans) == text


def test_parsed_prompt_default_is_empty():
    parsed = ParsedPrompt()
    assert parsed.tags == [] and parsed.extras == [] and parsed.render() == ""


def test_user_escaped_tag_stays_escaped_without_escape_parens():
    parsed = parse_prompt("ask \\(askzy\\), hatsune miku")
    assert parsed.decorate("ask (askzy)") == "ask \\(askzy\\)"
    assert parsed.decorate("ask_(askzy)") == "ask_\\(askzy\\)"
    assert restore("ask (askzy), x (y)", parsed) == "ask \\(askzy\\), x (y)"
    assert restore("ask (askzy), x (y)", parsed, escape_parens=True) == "ask \\(askzy\\), x \\(y\\)"


def test_weighted_prefers_the_weighted_occurrence():
    parsed = parse_prompt("a, b, (a:1.3)")
    assert parsed.weighted()["a"].weight == 1.3
    assert parsed.decorate("a") == "(a:1.3)"
    assert parsed.weighted()["b"].weight is None
