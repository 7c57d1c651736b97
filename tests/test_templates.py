"""Output format templates (docs/design.md#templates): presets byte-exact, rules 1-5, oneline, resolve."""

from __future__ import annotations

import json

import os

import pytest

from kgen_cli.errors import UsageError
from kgen_cli.formats.templates import (
    DEFAULT_FORMAT,
    PLACEHOLDERS,
    PRESET_TITLES,
    PRESETS,
    apply_format,
    resolve_format,
    wants_extra_nl,
)

# The reference's presets as JSON strings, copied verbatim (kept apart from templates.PRESETS).
SPEC_JSON = {
    "tag-only": r'"<|special|>, <|characters|>, <|copyrights|>, \n<|artist|>, \n\n<|general|>,\n\n<|quality|>, <|meta|>, <|rating|>"',
    "nl-only": r'"<|extended|>."',
    "both-tag-first": r'"<|special|>, <|characters|>, <|copyrights|>, \n<|artist|>, \n\n<|general|>,\n\n<|extended|>.\n\n<|quality|>, <|meta|>, <|rating|>"',
    "both-nl-first": r'"<|special|>, <|characters|>, <|copyrights|>, \n<|artist|>, \n\n<|extended|>.\n\n<|general|>,\n\n<|quality|>, <|meta|>, <|rating|>"',
    "both-generated": r'"<|special|>, <|characters|>, <|copyrights|>, \n<|artist|>, \n\n<|generated|>.\n\n<|general|>,\n\n<|extended|>.\n\n<|quality|>, <|meta|>, <|rating|>"',
    "comfyui": r'"<|special|>, \n<|characters|>, <|copyrights|>, \n<|artist|>, \n\n<|general|>,\n\n<|extended|>.\n\n<|quality|>, <|meta|>, <|rating|>"',
}
TREE = "<|special|>, <|characters|>, <|copyrights|>, <|artist|>, <|general|>, <|quality|>, <|meta|>, <|rating|>"

NL = "A girl with aqua twintails smiles. She wears a headset"

# The reference's parse example (docs/design.md#tipo).
FULL = {
    "special": ["1girl"], "general": ["solo", "twintails", "aqua hair", "long hair", "smile"],
    "characters": ["hatsune miku"], "copyrights": ["vocaloid"], "artist": ["ask (askzy)"],
    "quality": ["masterpiece"], "meta": ["absurdres"], "rating": ["sensitive"], "aspect_ratio": ["1.0"],
    "target": ["<|long|> <|tag_to_long|>"], "tag": ["1girl", "solo", "twintails", "aqua hair", "long hair", "smile"],
    "generated": NL,
}
EMPTY = {k: [] for k in ("special", "characters", "copyrights", "artist", "general", "quality", "meta", "rating")}
EMPTY.update(extended="", generated="")

TAGS_A = "1girl, hatsune miku, vocaloid, \nask (askzy), \n\n"
GEN = "solo, twintails, aqua hair, long hair, smile"
TAIL = "masterpiece, absurdres, sensitive"


# ---------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("name", list(SPEC_JSON))
def test_presets_byte_exact(name):
    assert PRESETS[name] == json.loads(SPEC_JSON[name])


def test_tree_preset_and_names():
    assert PRESETS["tree"] == TREE
    assert set(PRESETS) == {"tag-only", "nl-only", "both-tag-first", "both-nl-first", "both-generated",
                            "comfyui", "tree", "oneline"}
    assert DEFAULT_FORMAT == "oneline" and DEFAULT_FORMAT in PRESETS
    assert "\n" not in PRESETS["oneline"]


def test_placeholders():
    assert PLACEHOLDERS == {"special", "characters", "copyrights", "artist", "general", "quality", "meta",
                            "rating", "extended", "generated", "tag", "target", "aspect_ratio"}


def test_section_7_1_golden():
    assert apply_format(FULL, PRESETS["both-tag-first"]) == (
        "1girl, hatsune miku, vocaloid, \n"
        "ask (askzy), \n"
        "\n"
        "solo, twintails, aqua hair, long hair, smile,\n"
        "\n"
        "A girl with aqua twintails smiles. She wears a headset.\n"
        "\n"
        "masterpiece, absurdres, sensitive"
    )


def test_section_7_1_raw_nl_gives_double_period():
    assert "headset..\n" in apply_format(dict(FULL, generated=NL + "."), PRESETS["both-tag-first"])


FULL_GOLDEN = {
    "tag-only": TAGS_A + GEN + ",\n\n" + TAIL,
    "nl-only": NL + ".",
    "both-tag-first": TAGS_A + GEN + ",\n\n" + NL + ".\n\n" + TAIL,
    "both-nl-first": TAGS_A + NL + ".\n\n" + GEN + ",\n\n" + TAIL,
    "both-generated": TAGS_A + NL + ".\n\n" + GEN + ",\n\n" + TAIL,  # D1: printed once
    "comfyui": "1girl, \nhatsune miku, vocaloid, \nask (askzy), \n\n" + GEN + ",\n\n" + NL + ".\n\n" + TAIL,
    "tree": "1girl, hatsune miku, vocaloid, ask (askzy), " + GEN + ", " + TAIL,
    "oneline": "1girl, hatsune miku, vocaloid, ask (askzy), " + GEN + ", " + NL + ". " + TAIL,
}


@pytest.mark.parametrize("name", list(FULL_GOLDEN))
def test_every_preset_full_map(name):
    assert apply_format(FULL, PRESETS[name]) == FULL_GOLDEN[name]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_empty_map(name):
    assert apply_format(EMPTY, PRESETS[name]) == ""
    assert apply_format({}, PRESETS[name]) == ""


def test_both_generated_with_extended_prints_both():
    tag_map = dict(FULL, extended="The user's idea, extended")
    assert apply_format(tag_map, PRESETS["both-generated"]) == (
        TAGS_A + NL + ".\n\n" + GEN + ",\n\nThe user's idea, extended.\n\n" + TAIL
    )


def test_both_generated_only_extended():
    tag_map = dict(EMPTY, general=["smile"], extended="Extended")
    assert apply_format(tag_map, PRESETS["both-generated"]) == "smile,\n\nExtended."


def test_extended_preferred_over_generated():
    tag_map = dict(FULL, extended="Extended text")
    assert apply_format(tag_map, PRESETS["both-tag-first"]) == TAGS_A + GEN + ",\n\nExtended text.\n\n" + TAIL


def test_tag_only_with_few_fields():
    tag_map = dict(EMPTY, special=["1girl"], general=["solo"], rating=["general"])
    assert apply_format(tag_map, PRESETS["tag-only"]) == "1girl, \n\nsolo,\n\ngeneral"


def test_both_tag_first_without_nl_leaves_no_lone_period():  # D2
    tag_map = dict(EMPTY, general=["solo"], quality=["masterpiece"])
    assert apply_format(tag_map, PRESETS["both-tag-first"]) == "solo,\n\nmasterpiece"
    assert apply_format(dict(EMPTY, generated=""), PRESETS["nl-only"]) == ""


# ---------------------------------------------------------------------------------------------
# Rules 1-5 of docs/design.md#templates, one by one


def test_rule1_extended_falls_back_to_generated():
    assert apply_format({"extended": "", "generated": "G"}, "<|extended|> / <|extended|>") == "G / G"
    assert apply_format({"generated": "G"}, "<|extended|>!") == "G!"
    assert apply_format({"extended": "E", "generated": "G"}, "<|extended|>") == "E"


def test_rule1_d1_no_duplicate_when_generated_placeholder_present():
    assert apply_format({"extended": "", "generated": "G"}, "<|generated|>. <|extended|>. end") == "G. end"
    assert apply_format({"extended": "E", "generated": "G"}, "<|generated|>. <|extended|>.") == "G. E."


def test_rule2_empty_list_removes_placeholder_and_comma():
    assert apply_format({"a": [], "b": ["x"]}, "<|a|>, <|b|>") == "x"
    assert apply_format({"special": [], "general": ["x"]}, "<|special|>,<|general|>") == "x"
    # Only a directly following comma goes: "<|a|> ," keeps its comma (then rule 5 strips it).
    assert apply_format({"general": ["x"]}, "<|general|>, <|special|> , y") == "x, , y"


def test_rule2_list_joined_and_string_inserted():
    assert apply_format({"general": ["a", "b", "c"]}, "[<|general|>]") == "[a, b, c]"
    assert apply_format({"generated": "Some text"}, "<|generated|>!") == "Some text!"
    assert apply_format({"general": ["a", "", " "]}, "<|general|>") == "a"


def test_rule2_undocumented_placeholders():
    t = "<|tag|> | <|target|> | <|aspect_ratio|>"
    # The target's own <|…|> markers are then removed by rule 3 (reference behaviour).
    assert apply_format(FULL, t) == "1girl, solo, twintails, aqua hair, long hair, smile | | 1.0"
    assert apply_format({"aspect_ratio": 0.7}, "<|aspect_ratio|>") == "0.7"


def test_rule3_leftover_markers_deleted():
    assert apply_format({"general": ["x"]}, "<|general|> <|unknown|>end") == "x end"
    assert apply_format({}, "a <|nope|>, b") == "a , b"


def test_rule3_missing_known_key_takes_its_comma():
    assert apply_format({"general": ["x"]}, "<|special|>, <|general|>") == "x"


def test_rule4_spaces_after_newline_removed_before_newline_kept():
    assert apply_format({"general": ["x"]}, "a \n   <|general|>") == "a \nx"


def test_rule4_newline_runs_collapsed():
    assert apply_format({"general": ["x"]}, "a\n\n\n\n<|general|>") == "a\n\nx"
    assert apply_format({"general": ["x"]}, "a\n\n<|general|>") == "a\n\nx"


def test_rule4_space_runs_collapsed():
    assert apply_format({"general": ["x"]}, "a    <|general|>") == "a x"


def test_rule5_strip_whitespace_then_commas():
    assert apply_format({"general": ["x"]}, " <|general|>, \n") == "x"
    # Exactly strip() then strip(","): a space uncovered by the comma strip stays.
    assert apply_format({"general": ["x"]}, " , <|general|>, \n") == " x"
    assert apply_format({"general": ["x"]}, "<|general|>,,") == "x"
    assert apply_format({}, "  ,  ") == ""


# ---------------------------------------------------------------------------------------------
# oneline


def _oneline(**fields):
    return apply_format(dict(EMPTY, **fields), PRESETS["oneline"])


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({}, ""),
        ({"general": ["solo"]}, "solo"),
        ({"special": ["1girl"], "general": ["solo"]}, "1girl, solo"),
        ({"special": ["1girl"], "quality": ["masterpiece"]}, "1girl, masterpiece"),
        ({"generated": "A girl smiles"}, "A girl smiles."),
        ({"extended": "A girl smiles"}, "A girl smiles."),
        ({"generated": "A girl smiles", "quality": ["masterpiece"]}, "A girl smiles. masterpiece"),
        ({"general": ["solo"], "generated": "A girl smiles"}, "solo, A girl smiles."),
        ({"artist": ["kz oji"], "generated": "A girl smiles", "rating": ["general"]}, "kz oji, A girl smiles. general"),
        ({"characters": ["miku"], "artist": ["kz oji"]}, "miku, kz oji"),
        ({"quality": ["masterpiece"], "rating": ["general"]}, "masterpiece, general"),
        ({"quality": ["masterpiece"], "meta": ["absurdres"]}, "masterpiece, absurdres"),
        ({"meta": ["absurdres"]}, "absurdres"),
        ({"rating": ["general"]}, "general"),
        ({"special": ["1girl"], "generated": "A\ngirl.\n\nShe  smiles", "meta": ["absurdres"]},
         "1girl, A girl. She smiles. absurdres"),
        ({"generated": "   "}, ""),
    ],
)
def test_oneline(fields, expected):
    out = _oneline(**fields)
    assert out == expected
    assert "\n" not in out and ", ," not in out and ". ," not in out and "  " not in out


def test_oneline_full_order():
    tag_map = dict(FULL, extended="Extended")
    assert apply_format(tag_map, PRESETS["oneline"]) == (
        "1girl, hatsune miku, vocaloid, ask (askzy), " + GEN + ", Extended. " + TAIL
    )


def test_oneline_all_combinations_are_clean():
    import itertools

    fields = ["special", "characters", "copyrights", "artist", "general", "quality", "meta", "rating"]
    for mask in itertools.product([0, 1], repeat=len(fields) + 1):
        tag_map = {f: ([f + " tag"] if on else []) for f, on in zip(fields, mask)}
        tag_map["generated"] = "Line one.\nLine two" if mask[-1] else ""
        out = apply_format(tag_map, PRESETS["oneline"])
        assert "\n" not in out
        assert not out.startswith((",", " ", ".")) and not out.endswith((",", " "))
        for bad in (", ,", ". ,", ",,", "  ", " ,", ". .", ",."):
            assert bad not in out, (mask, out)


def test_single_line_templates_stay_single_line():
    assert apply_format({"general": ["a"], "generated": "x\ny"}, "<|general|> | <|generated|>") == "a | x y"
    # Multi-line templates keep newlines inside values.
    assert apply_format({"generated": "x\ny"}, "<|generated|>\n") == "x\ny"


# ---------------------------------------------------------------------------------------------
# resolve_format


@pytest.mark.parametrize("name", list(PRESETS))
def test_resolve_preset_names(name):
    assert resolve_format(name) == PRESETS[name]


@pytest.mark.parametrize("title, name", list(PRESET_TITLES.items()))
def test_resolve_reference_titles(title, name):
    assert resolve_format(title) == PRESETS[name]


def test_resolve_reference_title_case_insensitive():
    assert resolve_format("Both, tag first (recommend)") == PRESETS["both-tag-first"]


def test_resolve_literal_template():
    assert resolve_format("<|general|>, <|extended|>.") == "<|general|>, <|extended|>."
    assert resolve_format("<|tag|> <|target|> <|aspect_ratio|>") == "<|tag|> <|target|> <|aspect_ratio|>"


def test_resolve_file(tmp_path):
    path = tmp_path / "fmt.txt"
    path.write_text("<|special|>, \n<|general|>\n", encoding="utf-8")
    assert resolve_format(f"@{path}") == "<|special|>, \n<|general|>"
    path.write_text("\ufeff<|general|>\n", encoding="utf-8")  # a BOM from an editor is not template text
    assert resolve_format(f"@{path}") == "<|general|>"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tagonly", "unknown format"),
        ("", "unknown format"),
        ("<|genral|>", "unknown placeholder <|genral|>"),
        ("<|general|>, <|gen", "malformed placeholder"),
        ("<|general|> |>", "malformed placeholder"),
        ("general|>", "malformed placeholder"),
        ("@-", "not supported"),
        ("@", "needs a file path"),
        ("@/nonexistent/dir/fmt.txt", "cannot read format file"),
    ],
)
def test_resolve_errors(spec, message):
    with pytest.raises(UsageError, match=message.replace("|", r"\|").replace("(", r"\(")) as info:
        resolve_format(spec)
    assert "\n" not in str(info.value)


def test_resolve_file_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("<|nope|>", encoding="utf-8")
    with pytest.raises(UsageError, match="unknown placeholder"):
        resolve_format(f"@{bad}")
    empty = tmp_path / "plain.txt"
    empty.write_text("no placeholders here", encoding="utf-8")
    with pytest.raises(UsageError, match="no <\\|placeholder\\|>"):
        resolve_format(f"@{empty}")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe<|general|>")
    with pytest.raises(UsageError, match="UTF-8"):
        resolve_format(f"@{binary}")
    with pytest.raises(UsageError, match="not a regular file"):
        resolve_format(f"@{tmp_path}")  # a directory
    with pytest.raises(UsageError, match="cannot read"):
        resolve_format(f"@{tmp_path / 'missing.txt'}")


def test_format_file_is_bounded(tmp_path):
    """@FILE reads a regular file of at most MAX_TEMPLATE_BYTES: a larger one, a device or a
    fifo is refused before it is read (they used to be read without end, or block forever)."""
    from kgen_cli.formats.templates import MAX_TEMPLATE_BYTES

    fits = tmp_path / "fits.txt"
    fits.write_text("<|general|>" + " " * (MAX_TEMPLATE_BYTES - len("<|general|>")), encoding="utf-8")
    assert resolve_format(f"@{fits}").startswith("<|general|>")
    big = tmp_path / "big.txt"
    big.write_text("<|general|>" + " " * MAX_TEMPLATE_BYTES, encoding="utf-8")
    with pytest.raises(UsageError, match=f"at most {MAX_TEMPLATE_BYTES}"):
        resolve_format(f"@{big}")
    for device in ("/dev/zero", "/dev/urandom"):
        if os.path.exists(device):
            with pytest.raises(UsageError, match="not a regular file"):
                resolve_format(f"@{device}")
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)  # no writer: opening it for reading would block
        with pytest.raises(UsageError, match="not a regular file"):
            resolve_format(f"@{fifo}")


# ---------------------------------------------------------------------------------------------
# wants_extra_nl (docs/design.md#tipo)


@pytest.mark.parametrize(
    "name, has_nl, expected",
    [
        ("tag-only", False, False),
        ("tag-only", True, False),
        ("nl-only", False, True),
        ("nl-only", True, False),
        ("both-tag-first", False, True),
        ("both-tag-first", True, False),
        ("both-generated", True, True),
        ("both-generated", False, True),
        ("oneline", False, True),
        ("oneline", True, False),
        ("tree", False, False),
    ],
)
def test_wants_extra_nl(name, has_nl, expected):
    assert wants_extra_nl(PRESETS[name], has_nl) is expected
