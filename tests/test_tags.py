"""Tag categorisation (docs/design.md#tags): fixed sets, mmap lists, lookup rules, laziness."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kgen_cli.errors import KgenError
from kgen_cli.formats import tags as T
from kgen_cli.formats.tags import (
    CATEGORY_ORDER,
    FIELDS,
    QUALITY,
    RATING,
    SPECIAL,
    SortedTagFile,
    categorize,
    category_of,
    classify,
    split_tags,
    stored_forms,
)
from kgen_cli.paths import package_data

# ---------------------------------------------------------------------------------------------
# Fixed sets, in full


def test_special_set_exact():
    assert SPECIAL == {
        "1girl", "2girls", "3girls", "4girls", "5girls", "6+girls", "multiple girls",
        "1boy", "2boys", "3boys", "4boys", "5boys", "6+boys", "multiple boys", "male focus",
        "1other", "2others", "3others", "4others", "5others", "6+others", "multiple others",
    }
    assert len(SPECIAL) == 22


def test_quality_set_exact():
    assert QUALITY == {
        "masterpiece", "best quality", "great quality", "good quality", "normal quality", "low quality",
        "worse quality", "very aesthetic", "aesthetic", "displeasing", "very displeasing", "newest",
        "recent", "mid", "early", "old", "score_9", "score_8_up", "score_7_up", "score_6_up",
        "score_5_up", "score_4_up", "source_anime", "source_cartoon", "source_furry", "source_pony",
    }
    assert len(QUALITY) == 26


def test_rating_set_exact():
    assert RATING == {"safe", "general", "sfw", "sensitive", "nsfw", "explicit"}
    assert "questionable" not in RATING


def test_orders():
    assert CATEGORY_ORDER == ("artist", "characters", "copyrights", "meta", "special", "quality", "rating")
    assert FIELDS == ("special", "characters", "copyrights", "artist", "general", "quality", "meta", "rating")


# ---------------------------------------------------------------------------------------------
# split_tags


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", []),
        ("   ", []),
        ("a", ["a"]),
        ("a, b,c", ["a", "b", "c"]),
        (" a ,, b ,", ["a", "b"]),
        ("a\nb, c\n\n d", ["a", "b", "c", "d"]),
        ("1girl, 1girl", ["1girl", "1girl"]),
        ("ask (askzy), ^_^", ["ask (askzy)", "^_^"]),
        ("a\r\nb", ["a", "b"]),
    ],
)
def test_split_tags(text, expected):
    assert split_tags(text) == expected


# ---------------------------------------------------------------------------------------------
# category_of / classify


@pytest.mark.parametrize(
    "tag, category",
    [
        ("1girl", "special"),
        ("multiple girls", "special"),
        ("multiple_girls", "special"),
        ("6+others", "special"),
        ("male_focus", "special"),
        ("masterpiece", "quality"),
        ("best quality", "quality"),
        ("best_quality", "quality"),
        ("score_9", "quality"),
        ("score_8_up", "quality"),
        ("source_pony", "quality"),
        ("newest", "quality"),
        ("general", "rating"),
        ("sensitive", "rating"),
        ("nsfw", "rating"),
        ("questionable", None),
        ("absurdres", "meta"),
        ("highres", "meta"),
        ("commentary request", "meta"),
        ("commentary_request", "meta"),
        ("hatsune miku", "characters"),
        ("hatsune_miku", "characters"),
        ("vocaloid", "copyrights"),
        ("ask (askzy)", "artist"),
        ("ask_(askzy)", "artist"),
        ("kz oji", "artist"),
        ("solo", None),
        ("long hair", None),
        ("^_^", None),
        ("", None),
    ],
)
def test_category_of(tag, category):
    assert category_of(tag) == category


@pytest.mark.parametrize(
    "tag, category",
    [
        ("Hatsune Miku", "characters"),
        ("HATSUNE_MIKU", "characters"),
        ("MasterPiece", "quality"),
        ("Score_9", "quality"),
        ("1GIRL", "special"),
        ("ABSURDRES", "meta"),
        ("General", "rating"),
    ],
)
def test_lookup_is_case_insensitive(tag, category):
    assert category_of(tag) == category


def test_classify_stores_the_form_that_hit():
    assert classify("hatsune_miku") == ("characters", "hatsune miku")
    assert classify("Hatsune_Miku") == ("characters", "Hatsune Miku")  # user's case kept
    assert classify("score_9") == ("quality", "score_9")  # matched as written
    assert classify("best_quality") == ("quality", "best quality")


@pytest.mark.parametrize(
    "tag, stored",
    [
        ("^_^", "^_^"),  # shorter than 4: "_" kept (emoticons)
        ("o_o", "o_o"),
        ("x_x", "x_x"),
        ("a_b", "a_b"),
        ("ab_c", "ab c"),  # 4 characters: spaced
        ("long_hair", "long hair"),
        ("Long_Hair", "Long Hair"),
        ("looking_at_viewer", "looking at viewer"),
        ("smile", "smile"),
    ],
)
def test_general_underscore_rule(tag, stored):
    assert classify(tag) == ("general", stored)


def test_first_and_last_entries_of_each_list():
    # Boundaries of the binary search, read straight from the files.
    for name in T.LIST_NAMES:
        lines = package_data("tag-lists", f"{name}.txt").read_bytes().decode().splitlines()
        table = T._LISTS[name]
        for line in (lines[0], lines[1], lines[len(lines) // 2], lines[-2], lines[-1]):
            assert line.strip() in table, (name, line)


def test_sampled_entries_found_and_near_misses_not_found():
    for name in T.LIST_NAMES:
        lines = package_data("tag-lists", f"{name}.txt").read_bytes().decode().splitlines()
        members = set(lines)
        table = T._LISTS[name]
        for line in lines[:: max(len(lines) // 400, 1)]:
            assert line in table
            for miss in (line + " x", line[:-1], "~" + line, line + "\x00"):
                if miss not in members:
                    assert miss not in table, (name, miss)


def test_lookup_rejects_strange_keys():
    table = T._LISTS["meta"]
    assert "" not in table
    assert "absurdres\nhighres" not in table
    assert "absurdres\r" not in table
    assert "\u00e9t\u00e9" not in table  # non-ASCII key, compared as UTF-8 bytes


# ---------------------------------------------------------------------------------------------
# SortedTagFile on custom files (CRLF / LF, empty, missing)


def _table(tmp_path, monkeypatch, name, content: bytes):
    (tmp_path / "tag-lists").mkdir(exist_ok=True)
    (tmp_path / "tag-lists" / f"{name}.txt").write_bytes(content)
    monkeypatch.setattr("kgen_cli.paths.package_data", lambda *parts: tmp_path.joinpath(*parts))
    return SortedTagFile(name)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_sorted_file_line_endings(tmp_path, monkeypatch, eol):
    words = sorted([b"a", b"ab", b"abc", b"b b", b"zz", b"\xc3\xa9t\xc3\xa9"])
    table = _table(tmp_path, monkeypatch, "x", eol.join(words) + eol)
    for w in words:
        assert w.decode() in table
    for miss in ("", "aa", "abcd", "b", "zzz", "0"):
        assert miss not in table


def test_sorted_file_without_final_newline(tmp_path, monkeypatch):
    table = _table(tmp_path, monkeypatch, "x", b"a\nb\nc")
    assert all(w in table for w in "abc")
    assert "d" not in table


def test_sorted_file_empty(tmp_path, monkeypatch):
    table = _table(tmp_path, monkeypatch, "x", b"")
    assert "a" not in table
    assert table.is_open


def test_sorted_file_missing(tmp_path, monkeypatch):
    monkeypatch.setattr("kgen_cli.paths.package_data", lambda *parts: tmp_path.joinpath(*parts))
    with pytest.raises(KgenError, match="tag list"):
        "a" in SortedTagFile("nope")  # noqa: B015


def test_sorted_file_opens_once(tmp_path, monkeypatch):
    table = _table(tmp_path, monkeypatch, "x", b"a\nb\n")
    assert not table.is_open
    assert "a" in table
    first = table._data
    assert "b" in table
    assert table._data is first


# ---------------------------------------------------------------------------------------------
# categorize


def test_categorize_all_fields_present_even_empty():
    assert categorize([]) == {field: [] for field in FIELDS}
    assert list(categorize(["solo"])) == list(FIELDS)


def test_categorize_reference_example():
    tags = ["1girl", "fukuro daizi", "kz oji", "henreader", "ask (askzy)", "aki99", "masterpiece",
            "newest", "absurdres", "loli", "solo", "dragon girl", ":3", "blue hair"]
    result = categorize(tags)
    assert result["special"] == ["1girl"]
    assert result["artist"] == ["fukuro daizi", "kz oji", "henreader", "ask (askzy)", "aki99"]
    assert result["quality"] == ["masterpiece", "newest"]
    assert result["meta"] == ["absurdres"]
    assert result["general"] == ["loli", "solo", "dragon girl", ":3", "blue hair"]
    assert result["characters"] == result["copyrights"] == result["rating"] == []


def test_categorize_section_7_1_tags():
    result = categorize(["1girl", "solo", "twintails", "aqua hair", "long hair", "smile", "hatsune miku",
                         "vocaloid", "ask (askzy)", "masterpiece", "absurdres", "sensitive"])
    assert result == {
        "special": ["1girl"], "characters": ["hatsune miku"], "copyrights": ["vocaloid"],
        "artist": ["ask (askzy)"], "general": ["solo", "twintails", "aqua hair", "long hair", "smile"],
        "quality": ["masterpiece"], "meta": ["absurdres"], "rating": ["sensitive"],
    }


def test_categorize_keeps_order_and_dedupes_every_category():
    result = categorize(["smile", "1girl", "solo", "1girl", "Smile", "1GIRL", "solo", "hatsune_miku",
                         "hatsune miku", "general", "general", "long_hair", "long hair"])
    assert result["special"] == ["1girl"]
    assert result["general"] == ["smile", "solo", "long hair"]
    assert result["characters"] == ["hatsune miku"]
    assert result["rating"] == ["general"]


def test_categorize_dedupes_by_the_one_tag_key():
    result = categorize(["long hair", "long  hair", "Long_Hair_", "zq \\(x\\)", "zq (x)"])
    assert result["general"] == ["long hair", "zq \\(x\\)"]
    assert stored_forms(["maid_", " ", "Long_Hair", "^_^"]) == ["maid", "Long Hair", "^_^"]


def test_categorize_keeps_user_case_and_strips():
    result = categorize(["  Hatsune_Miku ", "Long_Hair", "", "   "])
    assert result["characters"] == ["Hatsune Miku"]
    assert result["general"] == ["Long Hair"]


def test_categorize_general_word_is_rating_questionable_is_general():
    result = categorize(["general", "questionable"])
    assert result["rating"] == ["general"]
    assert result["general"] == ["questionable"]


def test_categorize_emoticons_and_scores():
    result = categorize(["^_^", "o_o", "score_9", "score_8_up", "source_anime", "x_x"])
    assert result["general"] == ["^_^", "o_o", "x_x"]
    assert result["quality"] == ["score_9", "score_8_up", "source_anime"]


def test_extra_quality_and_special():
    tags = ["score_9_up", "very awa", "2futas", "smile", "absurdres"]
    plain = categorize(tags)
    assert plain["quality"] == [] and plain["special"] == []
    extended = categorize(tags, extra_quality=["score_9_up", "Very Awa", "absurdres"], extra_special=["2futas"])
    assert extended["quality"] == ["score_9_up", "very awa", "absurdres"]  # user extension wins over meta
    assert extended["special"] == ["2futas"]
    assert extended["general"] == ["smile"]
    assert extended["meta"] == []


def test_extra_sets_match_the_spaced_form():
    assert categorize(["very_awa"], extra_quality=["very awa"])["quality"] == ["very awa"]
    assert category_of("very_awa", extra_quality=["very awa"]) == "quality"
    assert category_of("2futas", extra_special={"2FUTAS"}) == "special"


# ---------------------------------------------------------------------------------------------
# Laziness and speed


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_import_opens_no_file():
    result = _run_python(
        """
        import sys
        opened = []
        sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
        import kgen_cli.formats.tags as T
        assert T.lists_opened() == [], T.lists_opened()
        assert not [p for p in opened if "tag-lists" in p], opened
        T.category_of("masterpiece")
        print(",".join(T.lists_opened()))
        print(sum("tag-lists" in p for p in opened))
        """
    )
    assert result.returncode == 0, result.stderr
    names, count = result.stdout.split()
    # masterpiece goes through artist, characters, copyrights, meta before quality: 4 files, once each.
    assert names == "artist,characters,copyrights,meta"
    assert count == "4"


def test_module_state_is_lazy_in_process():
    # In this process other tests may have opened the lists; a fresh table is closed until used.
    table = SortedTagFile("meta")
    assert not table.is_open
    assert "absurdres" in table
    assert table.is_open


def test_import_and_categorize_are_fast():
    result = _run_python(
        """
        import time
        t = time.perf_counter()
        from kgen_cli.formats.tags import categorize
        categorize(["1girl", "hatsune miku", "vocaloid", "ask (askzy)", "masterpiece"] + [f"tag {i}" for i in range(60)])
        print(time.perf_counter() - t)
        """
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 0.25


@pytest.mark.parametrize("tag, expected", [
    ("long_hair_", ("general", "long hair")),  # not "long hair ": no stray space in the model's input
    ("_solo", ("general", "solo")),
    ("____", ("general", "____")),  # nothing but underscores: nothing to space
    ("^_^", ("general", "^_^")),
])  # fmt: skip
def test_underscores_at_the_ends_leave_no_spaces(tag, expected):
    assert classify(tag) == expected
