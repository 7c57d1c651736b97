"""TIPO format: the reference's exact prompts, plans, parser and post-processing (docs/design.md#tipo; K1–K4)."""

from __future__ import annotations

import random

import pytest

from kgen_cli.errors import UsageError
from kgen_cli.formats import tipo
from kgen_cli.formats.bans import BanList
from kgen_cli.formats.tags import FIELDS, categorize
from kgen_cli.formats.tipo import Operation, build_prompt, parse_output, plan, post_process, single_operation


def tag_map(text: str) -> dict:
    return categorize([t.strip() for t in text.split(",") if t.strip()])


def tag_line(m: dict) -> list[str]:
    return m["special"] + m["general"]


T1 = "1girl, hatsune miku, vocaloid, ask (askzy), solo, twintails, masterpiece, absurdres, sensitive"
T1_META = (
    "meta: absurdres\nrating: sensitive\nartist: ask (askzy)\ncharacters: hatsune miku\n"
    "copyrights: vocaloid\nquality: masterpiece\naspect_ratio: 1.0\n"
)
T2 = "1girl, scenery, sunset, newest, safe"
T2_NL = "A girl standing on a hill."
T2_META = "rating: safe\nquality: newest\naspect_ratio: 1.0\n"


# ---------------------------------------------------------------------------------------------
# Golden prompts (the reference's bytes)


def test_t1_plan_and_prompts():
    m = tag_map(T1)
    ops = plan(True, False, "long", "short")
    assert ops == [Operation(None, "long", True), Operation("tag_to_long", "short", False)]
    assert build_prompt(m, tag_line(m), "", ops[0], aspect_ratio=1.0) == T1_META + "target: <|long|>\ntag: 1girl, solo, twintails"
    assert build_prompt(m, tag_line(m), "", ops[1], aspect_ratio=1.0) == (
        T1_META + "target: <|short|> <|tag_to_long|>\ntag: 1girl, solo, twintails\nlong:"
    )


def test_t2_plan_and_prompts():
    m = tag_map(T2)
    ops = plan(True, True, "short", "long")
    assert [op.name for op in ops] == ["short_to_tag", "tag_to_long", "short_to_tag_to_long"]
    assert [(op.level, op.expand) for op in ops] == [("short", True), ("long", True), ("long", False)]
    prompts = [build_prompt(m, tag_line(m), T2_NL, op, aspect_ratio=1.0) for op in ops]
    assert prompts[0] == T2_META + "target: <|short|> <|short_to_tag|>\nshort: A girl standing on a hill.\ntag: 1girl, scenery, sunset"
    assert prompts[1] == T2_META + "target: <|long|> <|tag_to_long|>\ntag: 1girl, scenery, sunset\nlong: A girl standing on a hill."
    assert prompts[2] == (
        T2_META + "target: <|long|> <|short_to_tag_to_long|>\nshort: A girl standing on a hill.\n"
        "tag: 1girl, scenery, sunset\nlong:"
    )


def test_t3_nl_only_prompts():
    ops = plan(False, True, "very_long", "long")
    assert ops == [Operation("long_to_tag", "very_long", True), Operation("short_to_tag_to_long", "long", False)]
    nl = "A cat sleeping on a windowsill"
    empty = tag_map("")
    assert build_prompt(empty, [], nl, ops[0], aspect_ratio=1.0) == (
        "aspect_ratio: 1.0\ntarget: <|very_long|> <|long_to_tag|>\nlong: A cat sleeping on a windowsill"
    )
    # The empty middle `tag: ` keeps its trailing space.
    assert build_prompt(empty, [], nl, ops[1], aspect_ratio=1.0) == (
        "aspect_ratio: 1.0\ntarget: <|long|> <|short_to_tag_to_long|>\n"
        "short: A cat sleeping on a windowsill\ntag: \nlong:"
    )


def test_t4_empty_input_prompts():
    ops = plan(False, False, "long", "long")
    assert ops == [Operation(None, "long", True), Operation("tag_to_long", "long", True)]
    empty = tag_map("")
    assert build_prompt(empty, [], "", ops[0], aspect_ratio=1.0) == "aspect_ratio: 1.0\ntarget: <|long|>"
    # The trailing space of `tag: ` is removed by the final strip.
    assert build_prompt(empty, [], "", ops[1], aspect_ratio=1.0) == "aspect_ratio: 1.0\ntarget: <|long|> <|tag_to_long|>\ntag:"


def test_retry_prompt_of_9_1_without_k3():
    """The second prompt of a `tag_to_long` operation: the previous NL is continued, `long:` once."""
    op = Operation("tag_to_long", "long", False)
    prompt = build_prompt({"rating": ["safe"]}, ["1girl", "solo"], "A girl smiles", op, aspect_ratio=1.0)
    assert prompt == "rating: safe\naspect_ratio: 1.0\ntarget: <|long|> <|tag_to_long|>\ntag: 1girl, solo\nlong: A girl smiles"
    assert prompt.count("long:") == 1


@pytest.mark.parametrize(("ratio", "text"), [(1.0, "1.0"), (0.7, "0.7"), (832 / 1216, "0.7"), (1.8, "1.8"), (16 / 9, "1.8")])
def test_aspect_ratio_one_decimal(ratio, text):
    prompt = build_prompt({}, ["1girl"], "", Operation(None, "long", True), aspect_ratio=ratio)
    assert prompt == f"aspect_ratio: {text}\ntarget: <|long|>\ntag: 1girl"


def test_meta_lines_order_and_strings():
    meta = {"quality": "masterpiece", "copyrights": [], "rating": ["general"], "meta": ["highres", "absurdres"],
            "artist": None, "characters": ["a", "b"], "general": ["ignored"]}
    prompt = build_prompt(meta, [], "", Operation(None, "short", True), aspect_ratio=1.0)
    assert prompt == (
        "meta: highres, absurdres\nrating: general\ncharacters: a, b\nquality: masterpiece\n"
        "aspect_ratio: 1.0\ntarget: <|short|>"
    )


def test_gen_meta_marker():
    prompt = build_prompt({}, ["1girl"], "x", Operation("short_to_tag_to_long", "long", True), aspect_ratio=1.0, gen_meta=True)
    assert "target: <|long|> <|short_to_tag_to_long|> <|gen_meta|>\n" in prompt


# All 8 operations x NL x expand (content lines only; the head is always the same).
HEAD = "rating: safe\naspect_ratio: 1.0\ntarget: <|long|>"
NL = "A girl smiles."
CASES = {
    # operation: (expand+NL, expand no NL, no-expand+NL, no-expand no NL)
    "None": ("tag: 1girl, solo",) * 4,
    "short_to_tag": (
        "short: A girl smiles.\ntag: 1girl, solo", "short: \ntag: 1girl, solo",
        "short: A girl smiles.\ntag: 1girl, solo", "short: \ntag: 1girl, solo",
    ),
    "short_to_tag_to_long": (
        "short: A girl smiles.\ntag: 1girl, solo", "short: \ntag: 1girl, solo",
        "short: A girl smiles.\ntag: 1girl, solo\nlong:", "short: \ntag: 1girl, solo\nlong:",
    ),
    "tag_to_long": (
        "tag: 1girl, solo\nlong: A girl smiles.", "tag: 1girl, solo",
        "tag: 1girl, solo\nlong: A girl smiles.", "tag: 1girl, solo\nlong:",
    ),
    "tag_to_long_to_short": (
        "tag: 1girl, solo\nlong: \nshort: A girl smiles.", "tag: 1girl, solo\nlong:",
        "tag: 1girl, solo\nlong: \nshort: A girl smiles.", "tag: 1girl, solo\nlong: \nshort:",
    ),
    "tag_to_short": (
        "tag: 1girl, solo\nshort: A girl smiles.", "tag: 1girl, solo",
        "tag: 1girl, solo\nshort: A girl smiles.", "tag: 1girl, solo\nshort:",
    ),
    "tag_to_short_to_long": (
        "tag: 1girl, solo\nshort: A girl smiles.", "tag: 1girl, solo\nshort:",
        "tag: 1girl, solo\nshort: A girl smiles.\nlong:", "tag: 1girl, solo\nshort: \nlong:",
    ),
    "long_to_tag": (
        "long: A girl smiles.\ntag: 1girl, solo", "long: \ntag: 1girl, solo",
        "long: A girl smiles.\ntag: 1girl, solo", "long: \ntag: 1girl, solo",
    ),
}


@pytest.mark.parametrize("name", tipo.OPERATIONS)
@pytest.mark.parametrize("variant", range(4))
def test_every_operation_prompt(name, variant):
    expand, nl = [(True, NL), (True, ""), (False, NL), (False, "")][variant]
    mode = None if name == "None" else name
    op = Operation(mode, "long", expand)
    target = HEAD if mode is None else HEAD + f" <|{mode}|>"
    prompt = build_prompt({"rating": ["safe"]}, ["1girl", "solo"], nl, op, aspect_ratio=1.0)
    assert prompt == f"{target}\n{CASES[name][variant]}"


@pytest.mark.parametrize("name", tipo.OPERATIONS)
def test_no_key_is_ever_written_twice(name):
    for expand in (True, False):
        for nl in ("", "Some text"):
            for tags in ([], ["1girl"]):
                op = Operation(None if name == "None" else name, "long", expand)
                lines = build_prompt({}, tags, nl, op, aspect_ratio=1.0).split("\n")
                keys = [line.split(":")[0] for line in lines]
                assert len(keys) == len(set(keys)), lines


def test_empty_middle_vs_empty_last_field():
    op = Operation("tag_to_short_to_long", "long", False)
    assert build_prompt({}, [], "", op, aspect_ratio=1.0).endswith("target: <|long|> <|tag_to_short_to_long|>\ntag: \nshort: \nlong:")
    op = Operation("tag_to_short_to_long", "long", True)
    # Last field empty: omitted; the middle `short: ` loses its space to the final strip.
    assert build_prompt({}, ["1girl"], "", op, aspect_ratio=1.0).endswith("tag: 1girl\nshort:")


# ---------------------------------------------------------------------------------------------
# Plans and single operations (docs/design.md#tipo)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((False, False, True, True, True), [(None, "T", True), ("tag_to_long", "N", True)]),
        ((True, False, True, True, True), [(None, "T", True), ("tag_to_long", "N", False)]),
        ((True, False, False, True, True), [("tag_to_long", "N", False)]),
        ((False, True, True, True, True), [("long_to_tag", "T", True), ("short_to_tag_to_long", "N", False)]),
        ((False, True, True, False, True), [("long_to_tag", "T", False), ("short_to_tag_to_long", "N", False)]),
        ((True, True, False, False, True), [("short_to_tag_to_long", "N", False)]),
        # docs/deviations.md#plan: the duplicated NL operation runs once.
        ((True, True, True, False, True), [("short_to_tag", "T", True), ("short_to_tag_to_long", "N", False)]),
        # docs/deviations.md#plan: tag_to_long gets the NL level; the repeated operation runs once.
        ((True, True, False, True, True), [("tag_to_long", "N", True), ("tag_to_short_to_long", "N", False)]),
        ((True, True, True, True, True),
         [("short_to_tag", "T", True), ("tag_to_long", "N", True), ("short_to_tag_to_long", "N", False)]),
        ((True, True, True, True, False),
         [("tag_to_long", "N", True), ("long_to_tag", "T", True), ("tag_to_short_to_long", "N", False)]),
    ],
)
def test_plan_table(args, expected):
    has_tags, has_nl, expand_tags, expand_prompt, tag_first = args
    levels = {"T": "very_long", "N": "short"}
    want = [Operation(mode, levels[level], expand) for mode, level, expand in expected]
    kwargs = dict(expand_tags=expand_tags, expand_prompt=expand_prompt, tag_first=tag_first)
    assert plan(has_tags, has_nl, "very_long", "short", **kwargs) == want
    # Without the extra NL operation the last one is dropped, except where it is part of the plan.
    without = plan(has_tags, has_nl, "very_long", "short", extra_nl=False, **kwargs)
    if (has_tags and has_nl and expand_tags != expand_prompt):
        assert without == want
    else:
        assert without == want[:-1]


@pytest.mark.parametrize(
    ("name", "level"),
    [("None", "T"), ("short_to_tag", "T"), ("long_to_tag", "T"), ("tag_to_long", "N"), ("short_to_tag_to_long", "N"),
     ("tag_to_long_to_short", "N"), ("tag_to_short", "N"), ("tag_to_short_to_long", "N")],
)
def test_single_operation_levels(name, level):
    ops = single_operation(name, "very_short", "very_long")
    assert ops == [Operation(None if name == "None" else name, {"T": "very_short", "N": "very_long"}[level], True)]


def test_single_operation_rejects_unknown():
    with pytest.raises(UsageError):
        single_operation("tag_to_everything", "long", "long")
    with pytest.raises(UsageError):
        single_operation("none", "long", "long")


def test_operation_properties():
    op = Operation("tag_to_long_to_short", "long", True)
    assert op.order == ("tag", "long", "short") and op.target == "short" and op.nl_key == "short"
    assert Operation(None, "long", True).order == ("tag",) and Operation(None, "long", True).nl_key is None
    assert Operation("long_to_tag", "long", True).nl_key == "long"
    assert Operation(None, "long", True).to_dict() == {"operation": "None", "level": "long", "expand": True}


def test_tables():
    assert tipo.TARGET_TIPO == {"very_short": 6, "short": 18, "long": 36, "very_long": 54}
    assert tipo.TARGET_TIPO_MAX == {"very_short": 18, "short": 36, "long": 54, "very_long": 72}
    assert tipo.TARGET_TIPO_NL == {"very_short": 1, "short": 2, "long": 4, "very_long": 8}
    assert tipo.TARGET_TIPO_NL_MAX == {"very_short": 2, "short": 4, "long": 8, "very_long": 10000}
    assert len(tipo.OPERATIONS) == 8


# ---------------------------------------------------------------------------------------------
# Parsing (docs/design.md#tipo)

PARSE_EXAMPLE = """quality: masterpiece
meta: absurdres
rating: sensitive
artist: ask (askzy)
characters: hatsune miku
copyrights: vocaloid
aspect_ratio: 1.0
target: <|long|> <|tag_to_long|>
tag: 1girl, solo, twintails, aqua hair, long hair, smile
long: A girl with aqua twintails smiles. She wears a headset."""


def test_parse_example_of_7_1():
    r = parse_output(PARSE_EXAMPLE)
    assert r["special"] == ["1girl"]
    assert r["general"] == ["solo", "twintails", "aqua hair", "long hair", "smile"]
    assert r["characters"] == ["hatsune miku"] and r["copyrights"] == ["vocaloid"] and r["artist"] == ["ask (askzy)"]
    assert r["quality"] == ["masterpiece"] and r["meta"] == ["absurdres"] and r["rating"] == ["sensitive"]
    assert r["aspect_ratio"] == ["1.0"] and r["target"] == ["<|long|> <|tag_to_long|>"]
    assert r["tag"] == ["1girl", "solo", "twintails", "aqua hair", "long hair", "smile"]
    assert r["generated"] == "A girl with aqua twintails smiles. She wears a headset."
    assert "extended" not in r


@pytest.mark.parametrize("ending", ["glasses", "boss", "blue eyes"])
@pytest.mark.parametrize("eos", ["", "</s>"])
def test_k1_trailing_s_is_kept_in_tags(ending, eos):
    r = parse_output(f"<s>target: <|long|>\ntag: 1girl, {ending}{eos}")
    assert r["general"][-1] == ending
    assert r["tag"] == ["1girl", ending]


@pytest.mark.parametrize("ending", ["glasses", "boss", "blue eyes"])
def test_k1_trailing_s_is_kept_in_nl(ending):
    r = parse_output(f"tag: 1girl\nshort: She meets the {ending}</s>")
    assert r["extended"] == f"She meets the {ending}"


def test_parse_only_known_keys_start_sections():
    text = "rating: safe\ntag: 1girl\nlong: She says: hello. It is late.\nTime: noon. She waits.\nmeta: highres"
    r = parse_output(text)
    assert r["generated"] == "She says: hello. It is late.\nTime: noon. She waits."
    assert "Time" not in r and r["rating"] == ["safe"]
    # A meta line after `tag:` is ignored: the tag categories already hold that key (first wins).
    assert r["meta"] == []


def test_parse_first_occurrence_wins_and_short_long_names():
    r = parse_output("short: first\nshort: second\nlong: <|empty|>\nlong: real\ntag: a\ntag: b")
    assert r["extended"] == "first"
    assert r["generated"] == "real"  # an empty / <|empty|> value is skipped, not kept
    assert r["tag"] == ["a"]


def test_parse_tag_categories_merge_with_meta_lines():
    r = parse_output("rating: safe\ncharacters: hatsune miku\ntarget: <|long|>\ntag: 1girl, 1girl, explicit, kagamine rin, smile")
    assert r["rating"] == ["safe", "explicit"]
    assert r["characters"] == ["hatsune miku", "kagamine rin"]
    assert r["special"] == ["1girl"]  # de-duplicated (docs/deviations.md#dedupe-categories)
    assert r["general"] == ["smile"]


def test_parse_ignores_text_before_first_key_and_empty_tag():
    r = parse_output("garbage line\ntarget: <|short|>\ntag:")
    assert r["tag"] == [] and all(r[c] == [] for c in FIELDS)
    assert r["target"] == ["<|short|>"]


def test_parse_prompt_plus_completion():
    prompt = T1_META + "target: <|long|>\ntag: 1girl, solo, twintails"
    r = parse_output(prompt + ", aqua hair, headset\nlong: A girl.")
    assert r["general"] == ["solo", "twintails", "aqua hair", "headset"]
    assert r["generated"] == "A girl."


# ---------------------------------------------------------------------------------------------
# Sentences and pass conditions


def test_sentences_count_non_empty():
    assert tipo.count_sentences("") == 0
    assert tipo.count_sentences("A girl.") == 1
    assert tipo.count_sentences("A. B. . C") == 3
    assert tipo.sentences(" A girl . She smiles. ") == ["A girl", "She smiles"]


def test_passes():
    tags = {"special": ["1girl"], "general": [f"t{i}" for i in range(5)]}
    assert tipo.passes("tag", tags, "very_short")  # 6 >= 6
    assert not tipo.passes("tag", tags, "short")
    assert tipo.passes("short", {"extended": "A. B"}, "short")
    assert not tipo.passes("short", {"extended": ""}, "very_short")
    assert tipo.passes("long", {"generated": "A", "extended": ""}, "very_short")
    # No generated text: the long target is checked on `extended`.
    assert tipo.passes("long", {"extended": "A. B. C. D", "generated": ""}, "long")
    assert not tipo.passes("long", {"extended": "A. B. C", "generated": ""}, "long")
    assert not tipo.passes("tag", {"special": [], "general": ["x"] * 1001}, "long")


# ---------------------------------------------------------------------------------------------
# Post-processing (docs/design.md#tipo)


def run_post(parsed, op, *, before=None, nl="", user_nl=None, tag_level="long", nl_level="long", seed=1, bans=None):
    before = before if before is not None else tag_map("")
    return post_process(parsed, op, before=before, nl=nl, user_nl=nl if user_nl is None else user_nl,
                        tag_level=tag_level, nl_level=nl_level, rng=random.Random(seed), bans=bans)


def test_post_new_tags_after_input_and_shuffled_deterministically():
    before = tag_map("1girl, solo, twintails")
    parsed = parse_output("target: <|long|>\ntag: 1girl, solo, twintails, " + ", ".join(f"znew{i}q" for i in range(10)))
    a = run_post(parsed, Operation(None, "long", True), before=before, seed=7)
    b = run_post(parsed, Operation(None, "long", True), before=before, seed=7)
    assert a == b
    assert a["special"] == ["1girl"] and a["general"][:2] == ["solo", "twintails"]
    assert sorted(a["general"][2:]) == sorted(f"znew{i}q" for i in range(10))
    others = [run_post(parsed, Operation(None, "long", True), before=before, seed=s)["general"] for s in range(5)]
    assert len({tuple(o) for o in others}) > 1


def test_post_k2_cap_uses_tag_level_and_counts_special():
    before = tag_map("1girl, " + ", ".join(f"zin{i}q" for i in range(10)))
    parsed = parse_output("tag: 1girl, " + ", ".join([f"zin{i}q" for i in range(10)] + [f"znew{i}q" for i in range(60)]))
    # An NL operation with a very_short NL level: the reference would cut new tags to 2 - 11.
    r = run_post(parsed, Operation("tag_to_long", "very_short", True), before=before, tag_level="long", nl_level="very_short")
    assert len(r["special"]) + len(r["general"]) == tipo.TARGET_TIPO_MAX["long"]
    assert r["general"][:10] == [f"zin{i}q" for i in range(10)]


def test_post_input_tags_never_dropped_even_above_the_cap():
    before = tag_map(", ".join(f"zin{i}q" for i in range(30)))
    parsed = parse_output("tag: " + ", ".join([f"zin{i}q" for i in range(30)] + ["new"]))
    r = run_post(parsed, Operation(None, "very_short", True), before=before, tag_level="very_short")
    assert r["general"] == [f"zin{i}q" for i in range(30)]


def test_post_input_tags_kept_when_model_mangles_the_last_one():
    before = tag_map("1girl, long")
    parsed = parse_output("tag: 1girl, long hair, smile")
    r = run_post(parsed, Operation(None, "long", True), before=before)
    assert r["general"][0] == "long" and set(r["general"]) == {"long", "long hair", "smile"}


def test_post_bans_apply_to_model_tags_only():
    before = tag_map("1girl, solo, hatsune miku")
    parsed = parse_output("characters: hatsune miku\ntag: 1girl, solo, smile, hat, kagamine rin, 2girls")
    r = run_post(parsed, Operation(None, "long", True), before=before, bans=BanList.parse(["solo", "hat", "kagamine rin", "2girls"]))
    assert r["general"] == ["solo", "smile"]
    assert r["characters"] == ["hatsune miku"] and r["special"] == ["1girl"]


def test_post_special_deduplicated_and_categories_kept_from_before():
    before = tag_map("1girl, solo")
    before["characters"] = ["carried character"]
    parsed = parse_output("tag: 1girl, 1girl, solo, 2girls")
    r = run_post(parsed, Operation(None, "long", True), before=before)
    assert r["special"] == ["1girl", "2girls"]
    assert r["characters"] == ["carried character"]
    assert list(r)[: len(FIELDS)] == list(FIELDS)


def test_post_mode_none_drops_model_nl_but_keeps_input_nl():
    parsed = parse_output("tag: 1girl\nshort: Model text.\nlong: More text.")
    r = run_post(parsed, Operation(None, "long", True), nl="User text.")
    assert r["extended"] == "User text" and r["generated"] == ""
    r = run_post(parsed, Operation(None, "long", True))
    assert r["extended"] == "" and r["generated"] == ""


def test_post_drops_fields_not_in_the_mode():
    parsed = parse_output("tag: 1girl\nshort: S one.\nlong: L one.")
    assert run_post(parsed, Operation("short_to_tag", "long", True))["generated"] == ""
    r = run_post(parsed, Operation("tag_to_long", "long", True))
    assert r["extended"] == "" and r["generated"] == "L one"


def test_post_generated_renamed_extended_with_user_nl():
    parsed = parse_output("tag: 1girl\nlong: A girl standing on a hill. The sun sets.")
    r = run_post(parsed, Operation("tag_to_long", "long", True), nl="A girl standing on a hill.")
    assert r["extended"] == "A girl standing on a hill. The sun sets" and r["generated"] == ""


def test_post_retry_without_user_nl_stays_generated():
    """K3: the retry continues the model's own `long:` text; the name and the old text stay."""
    parsed = parse_output("tag: 1girl\nlong: A girl smiles. She waves. Wind blows")
    r = run_post(parsed, Operation("tag_to_long", "long", False), nl="A girl smiles", user_nl="")
    assert r["extended"] == ""
    assert r["generated"].startswith("A girl smiles. ")
    assert sorted(r["generated"].split(". ")) == ["A girl smiles", "She waves", "Wind blows"]
    assert r["generated"].endswith("Wind blows")  # the last new sentence stays last


def test_post_user_sentence_completed_by_model():
    parsed = parse_output("short: A girl standing on a hill at sunset. Birds fly.\ntag: 1girl")
    r = run_post(parsed, Operation("short_to_tag", "long", True), nl="Clouds. A girl standing on a hill.")
    assert r["extended"] == "Clouds. A girl standing on a hill at sunset. Birds fly"


def test_post_new_sentences_shuffled_last_kept_last():
    text = ". ".join(f"S{i}" for i in range(7))
    parsed = parse_output(f"tag: x\nshort: U. {text}.")
    results = {run_post(parsed, Operation("tag_to_short", "very_long", True), nl="U", seed=s)["extended"] for s in range(6)}
    assert len(results) > 1
    for r in results:
        parts = r.split(". ")
        assert parts[0] == "U" and parts[-1] == "S6" and sorted(parts[1:-1]) == sorted(f"S{i}" for i in range(6))


@pytest.mark.parametrize("name", [n for n in tipo.OPERATIONS if "short" in n])
def test_post_k4_short_modes_without_nl(name):
    parsed = parse_output("tag: 1girl\nshort: She smiles. She waves.\nlong: Extra.")
    r = run_post(parsed, Operation(name, "long", True))
    assert sorted(r["extended"].split(". ")) == ["She smiles", "She waves"]


@pytest.mark.parametrize("name", tipo.OPERATIONS)
@pytest.mark.parametrize("nl", ["", "A girl."])
def test_post_every_operation_with_and_without_nl(name, nl):
    op = Operation(None if name == "None" else name, "long", True)
    before = tag_map("1girl, solo")
    prompt = build_prompt(before, tag_line(before), nl, op, aspect_ratio=1.0)
    output = prompt + " More text.\nshort: Short text. Second.\nlong: Long text.\ntag: extra"
    r = run_post(parse_output(output), op, before=before, nl=nl)
    assert r["special"] == ["1girl"] and r["general"][0] == "solo"
    assert isinstance(r["extended"], str) and isinstance(r["generated"], str)
    assert not r["extended"].endswith(".") and not r["generated"].endswith(".")
    if nl:
        assert "A girl" in r["extended"]


def test_post_nl_caps():
    many = ". ".join(f"S{i}" for i in range(12))
    parsed = parse_output(f"short: U1. U2. {many}\ntag: 1girl\nlong: {many}")
    r = run_post(parsed, Operation("short_to_tag_to_long", "short", False), nl="U1. U2", nl_level="short")
    ext = r["extended"].split(". ")
    assert ext[:2] == ["U1", "U2"] and len(ext) == tipo.TARGET_TIPO_NL_MAX["short"]
    assert r["generated"].split(". ") == [f"S{i}" for i in range(4)]
    r = run_post(parsed, Operation("short_to_tag_to_long", "short", False), nl="U1. U2", nl_level="very_long")
    assert len(r["extended"].split(". ")) == 14


def test_post_fresh_generated_excludes_input_sentences_and_bans_sentences():
    parsed = parse_output("short: A girl.\ntag: 1girl\nlong: A girl. She holds a gun. She smiles.")
    r = run_post(parsed, Operation("short_to_tag_to_long", "long", False), nl="A girl.", bans=BanList.parse(["gun"]))
    assert r["extended"] == "A girl" and r["generated"] == "She smiles"


def test_post_generated_filtered_against_the_merged_input_then_capped():
    """Issue 19: the user's sentence completed in `short:` replaces it in the input list that
    `generated` is filtered against; the cap (very_short: 2) then applies to what is left."""
    parsed = parse_output("tag: 1girl\nshort: The witch flies over the town beneath the signs.\n"
                          "long: The witch flies over the town. A woman waves. Lanterns glow.")
    r = run_post(parsed, Operation("tag_to_short_to_long", "very_short", True), nl="The witch flies over the town",
                 nl_level="very_short")
    assert r["extended"] == "The witch flies over the town beneath the signs"
    assert r["generated"] == "The witch flies over the town. A woman waves"
    parsed = parse_output("tag: 1girl\nshort: The witch flies over the town beneath the signs.\n"
                          "long: The witch flies over the town beneath the signs. A woman waves.")
    r = run_post(parsed, Operation("tag_to_short_to_long", "long", True), nl="The witch flies over the town")
    assert r["generated"] == "A woman waves"


def test_post_keeps_parsed_extras():
    parsed = parse_output("aspect_ratio: 1.0\ntarget: <|long|>\ntag: 1girl")
    r = run_post(parsed, Operation(None, "long", True))
    assert r["target"] == ["<|long|>"] and r["aspect_ratio"] == ["1.0"] and r["tag"] == ["1girl"]


def test_parse_example_rendered_with_both_tag_first():
    """The reference's parse example through the "Both, tag first" preset, NL as post-processing leaves it."""
    from kgen_cli.formats.templates import PRESETS, apply_format

    r = parse_output(PARSE_EXAMPLE)
    before = tag_map("1girl, solo, twintails, hatsune miku, vocaloid, ask (askzy), masterpiece, absurdres, sensitive")
    processed = run_post(r, Operation("tag_to_long", "long", False), before=before)
    assert processed["generated"] == "A girl with aqua twintails smiles. She wears a headset"
    processed["general"] = r["general"]  # the parsed order (post-processing shuffles the new tags)
    assert apply_format(processed, PRESETS["both-tag-first"]) == (
        "1girl, hatsune miku, vocaloid, \nask (askzy), \n\nsolo, twintails, aqua hair, long hair, smile,\n\n"
        "A girl with aqua twintails smiles. She wears a headset.\n\nmasterpiece, absurdres, sensitive"
    )


def test_a_tag_never_holds_a_line_break():
    # A line that is not a known `key:` continues the tag section (docs/deviations.md#known-keys); its items are tags of
    # their own, so the user's own tag is recognised again and de-duplicated.
    out = parse_output("tag: 1girl, dragon horns, Ai-Kai 2017\ndragon horns\nauthor: Tzara, 10\n```\nlong: A girl.")
    assert out["tag"] == ["1girl", "dragon horns", "Ai-Kai 2017", "dragon horns", "author: Tzara", "10", "```"]
    assert all("\n" not in t for field in FIELDS for t in out.get(field, []))
    assert out["general"].count("dragon horns") == 1 and out["generated"] == "A girl."
