"""DTG format (docs/design.md#dtg): the reference's exact prompts (D1-D3 here name three worked
examples, not the formatter deviations), new-tag parsing and the retry prompt."""

from __future__ import annotations

from kgen_cli.formats import dtg
from kgen_cli.formats.bans import BanList
from kgen_cli.formats.tags import FIELDS, categorize


def tag_map(text: str) -> dict:
    return categorize([t.strip() for t in text.split(",") if t.strip()])


D1 = """quality: masterpiece
rating: sensitive
artist: ask (askzy)
characters: hatsune miku
copyrights: vocaloid
aspect ratio: 1.0
target: <|long|>
general: 1girl, solo<|input_end|>"""


def test_d1_delta_rev2_long():
    m = tag_map("1girl, hatsune miku, vocaloid, ask (askzy), solo, masterpiece, absurdres, sensitive")
    assert dtg.build_prompt(m, level="long", aspect_ratio=1.0, quality_line=True) == D1


def test_d2_no_special_empty_quality_very_short():
    m = tag_map("no humans, scenery, sky")
    prompt = dtg.build_prompt(m, level="very_short", aspect_ratio=832 / 1216, quality_line=True)
    assert prompt == (
        "quality: \nrating: <|empty|>\nartist: <|empty|>\ncharacters: <|empty|>\ncopyrights: <|empty|>\n"
        "aspect ratio: 0.7\ntarget: <|very_short|>\ngeneral: , no humans, scenery, sky<|input_end|>"
    )


def test_d3_beta_no_quality_line():
    m = tag_map("2girls, yuri, masterpiece, explicit")
    prompt = dtg.build_prompt(m, level="short", aspect_ratio=16 / 9, quality_line=False)
    assert prompt == (
        "rating: explicit\nartist: <|empty|>\ncharacters: <|empty|>\ncopyrights: <|empty|>\n"
        "aspect ratio: 1.8\ntarget: <|short|>\ngeneral: 2girls, yuri<|input_end|>"
    )


def test_no_general_tags_ends_with_comma_space():
    prompt = dtg.build_prompt(tag_map("1girl"), aspect_ratio=1.0)
    assert prompt.endswith("target: <|long|>\ngeneral: 1girl, <|input_end|>")


def test_meta_tags_never_written():
    prompt = dtg.build_prompt(tag_map("1girl, absurdres, highres, masterpiece"), quality_line=False)
    assert "absurdres" not in prompt and "highres" not in prompt and "masterpiece" not in prompt


def test_retry_prompt_of_9_2():
    output = D1 + "twintails, smile, aqua hair"
    prompt = dtg.retry_prompt(output, ["smile", "aqua hair", "twintails"])
    assert prompt == D1 + "smile, aqua hair, twintails"


def test_retry_prompt_uses_the_first_marker_and_no_trailing_comma():
    output = D1 + "smile, aqua hair, twintails, long hair, "
    assert dtg.retry_prompt(output, ["a", "b"]) == D1 + "a, b"
    assert dtg.retry_prompt(output, []) == D1


def test_retry_prompt_double_space_before_marker_collapsed():
    prompt = dtg.retry_prompt("general: 1girl,  <|input_end|>x", [])
    assert prompt == "general: 1girl, <|input_end|>"


def test_parse_new_tags():
    assert dtg.parse_new_tags(D1 + ", aqua hair, , smile, aqua hair,</s>") == ["aqua hair", "smile"]
    assert dtg.parse_new_tags("<s>" + D1 + "glasses, boss, blue eyes</s>") == ["glasses", "boss", "blue eyes"]
    # Everything after the LAST marker.
    assert dtg.parse_new_tags("a<|input_end|>b<|input_end|> c, d") == ["c", "d"]
    assert dtg.parse_new_tags(D1) == []
    assert dtg.parse_new_tags("no marker, at all") == []


def test_new_tags_deduplicated_against_input_and_banned():
    m = tag_map("1girl, hatsune miku, solo")
    out = D1 + ", solo, Solo, hatsune_miku, smile, gun, 1girl, aqua hair"
    assert dtg.new_tags(out, m, bans=BanList.parse(["gun"])) == ["smile", "aqua hair"]
    assert dtg.new_tags(out, m) == ["smile", "gun", "aqua hair"]


def test_new_tags_are_in_the_form_merge_keeps():
    """Issue 19: one tag key; `maid_` is the input's `maid`, `Long_Hair_` is stored as `Long Hair`."""
    m = tag_map("1girl, maid")
    out = D1 + "smile, maid_, MAID, Long_Hair_, long  hair, ^_^, score_9"
    new = dtg.new_tags(out, m)
    assert new == ["smile", "Long Hair", "^_^", "score_9"]
    merged = dtg.merge(m, new)
    assert merged["general"] == ["maid", "smile", "Long Hair", "^_^"] and merged["quality"] == ["score_9"]
    assert len(m["special"]) + len(m["general"]) + len(new) == sum(map(len, merged.values()))
    assert dtg.new_tags(D1 + "my_tag", m, extra_special=["my_tag"]) == ["my_tag"]
    assert dtg.new_tags(D1 + "my_tag", m) == ["my tag"]


def test_merge_recategorises_new_tags():
    m = tag_map("1girl, solo, sensitive")
    merged = dtg.merge(m, ["kagamine rin", "smile", "2girls", "absurdres", "solo"])
    assert list(merged) == list(FIELDS)
    assert merged["characters"] == ["kagamine rin"]
    assert merged["special"] == ["1girl", "2girls"]
    assert merged["general"] == ["solo", "smile"]
    assert merged["meta"] == ["absurdres"] and merged["rating"] == ["sensitive"]
    assert m["characters"] == []  # the input map is not modified


def test_passes_counts_input_special_general_and_new():
    m = tag_map("1girl, solo, masterpiece, hatsune miku")
    assert dtg.TARGET == {"very_short": 8, "short": 16, "long": 32, "very_long": 48}
    assert not dtg.passes(m, ["a"] * 5, "very_short")
    assert dtg.passes(m, ["a"] * 6, "very_short")


def test_new_tags_never_hold_a_line_break():
    assert dtg.parse_new_tags("<|input_end|>a, b\nc,\n\nd, a") == ["a", "b", "c", "d"]
