"""Ban list semantics (docs/deviations.md#k6): whole tag, case-insensitive, _ = space, *, re: prefix."""

from __future__ import annotations

import pytest

from kgen_cli.errors import UsageError
from kgen_cli.formats.bans import BanList


def bans(*values: str) -> BanList:
    return BanList.parse(values)


# ---------------------------------------------------------------------------------------------
# parse


def test_empty():
    empty = BanList.parse([])
    assert not empty and len(empty) == 0 and empty.patterns == []
    assert BanList.parse(None).patterns == []
    assert BanList.parse(["", " , ,"]).patterns == []
    assert empty.filter(["a", "b"]) == ["a", "b"]
    assert not empty.matches("anything")


def test_values_split_on_commas_and_stripped():
    parsed = bans("umbrella, official*", " text ", "umbrella")
    assert parsed.patterns == ["umbrella", "official*", "text"]  # de-duplicated
    assert bool(parsed) and len(parsed) == 3


def test_regex_value_not_split():
    parsed = bans("re:a{1,3}b", "x, re:y+")
    assert parsed.patterns == ["re:a{1,3}b", "x", "re:y+"]
    assert parsed.matches("aab") and parsed.matches("yyy") and parsed.matches("x")


@pytest.mark.parametrize("value", ["re:(", "re:[a-", "re:*x", "x, re:a[1", "re:", "re:   "])
def test_invalid_regex_is_a_usage_error(value):
    with pytest.raises(UsageError) as info:
        bans(value)
    assert "--ban" in str(info.value)
    assert "\n" not in str(info.value)


def test_regex_with_comma_in_a_list_gets_a_hint():
    with pytest.raises(UsageError, match="its own"):
        bans("x, re:(a,b)")
    assert bans("re:(a,b)").matches("a,b")


def test_repr():
    assert repr(bans("a")) == "BanList(['a'])"


# ---------------------------------------------------------------------------------------------
# matches: plain patterns


@pytest.mark.parametrize(
    "pattern, tag, expected",
    [
        ("umbrella", "umbrella", True),
        ("umbrella", "Umbrella", True),
        ("UMBRELLA", "umbrella", True),
        ("umbrella", "umbrellas", False),  # whole tag, not substring
        ("umbrella", "holding umbrella", False),
        ("umbrella", " umbrella ", True),
        ("long_hair", "long hair", True),
        ("long hair", "long_hair", True),
        ("long  hair", "long hair", True),
        ("long hair", "long hair ornament", False),
        ("official*", "official art", True),
        ("official*", "official", True),
        ("official*", "unofficial art", False),
        ("*text", "english text", True),
        ("*text", "text", True),
        ("*text", "textless", False),
        ("*hair*", "long hair ornament", True),
        ("a*c", "abbbc", True),
        ("a*c", "abcd", False),
        ("*", "anything at all", True),
        ("ask (askzy)", "ask (askzy)", True),  # regex metacharacters are literal
        ("ask (askzy)", "ask askzy", False),
        (".*", "anything", False),  # a plain pattern is not a regex
        (".*", ".*", True),
        ("^_^", "^_^", True),
        ("^_^", "^ ^", True),
        ("score_9", "score 9", True),
    ],
)
def test_plain_patterns(pattern, tag, expected):
    assert bans(pattern).matches(tag) is expected


# ---------------------------------------------------------------------------------------------
# matches: regex patterns


@pytest.mark.parametrize(
    "pattern, tag, expected",
    [
        ("re:.*text", "english text", True),
        ("re:.*text", "text", True),
        ("re:.*text", "textless", False),  # fullmatch, not match
        ("re:text", "english text", False),  # not a search either
        ("re:official.*", "official art", True),
        ("re:official.*", "Official Art", True),  # case-insensitive
        ("re:long hair", "long_hair", True),  # tried on the spaced form too
        ("re:long_hair", "long_hair", True),  # and on the tag as written
        ("re:(red|blue) (hair|eyes)", "blue eyes", True),
        ("re:(red|blue) (hair|eyes)", "green eyes", False),
        ("re:\\d+girls?", "2girls", True),
        ("re:\\d+girls?", "multiple girls", False),
    ],
)
def test_regex_patterns(pattern, tag, expected):
    assert bans(pattern).matches(tag) is expected


def test_filter_keeps_order():
    parsed = bans("umbrella, *text", "re:official.*")
    tags = ["1girl", "umbrella", "english text", "smile", "official art", "umbrellas", "text"]
    assert parsed.filter(tags) == ["1girl", "smile", "umbrellas"]
    assert parsed.filter(iter(tags)) == ["1girl", "smile", "umbrellas"]


# ---------------------------------------------------------------------------------------------
# sentences


@pytest.mark.parametrize(
    "pattern, sentence, dropped",
    [
        ("umbrella", "She holds an umbrella.", True),
        ("umbrella", "She holds an Umbrella in the rain", True),
        ("umbrella", "Umbrellas everywhere.", False),  # whole words only
        ("umbrella*", "Umbrellas everywhere.", True),  # * within a word
        ("umbrella*", "An umbrella and a hat.", True),
        ("*brella", "An umbrella.", True),
        ("long_hair", "Her long hair flows.", True),
        ("long hair", "Her long\n  hair flows.", True),
        ("long hair", "Her long hairband.", False),
        ("official*", "The official art book.", True),
        ("re:red (hair|eyes)", "She has red eyes.", True),
        ("re:red (hair|eyes)", "She has reddish eyes.", False),
        ("re:red", "Reddish light.", False),  # word boundaries on both sides
        ("re:red.*", "Reddish light.", True),
        ("text", "No text here.", True),
        ("text", "Textures.", False),
    ],
)
def test_sentence_matching(pattern, sentence, dropped):
    assert bans(pattern).sentence_matches(sentence) is dropped
    assert bans(pattern).filter_sentences([sentence]) == ([] if dropped else [sentence])


def test_filter_sentences_keeps_order():
    parsed = bans("umbrella")
    sentences = ["A girl stands.", "She holds an umbrella.", "It rains."]
    assert parsed.filter_sentences(sentences) == ["A girl stands.", "It rains."]
    assert BanList.parse([]).filter_sentences(sentences) == sentences
