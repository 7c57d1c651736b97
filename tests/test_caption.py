"""`kgen caption`'s library without a model: discovery, headers, shaping, templates, wiki and
cache, output policy, and the stages over a scripted backend (fixed model output)."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from caption_data import BAD, GOOD, huge_png_header, make_dataset
from kgen_cli.caption import templates
from kgen_cli.caption.backends import ChatCall
from kgen_cli.caption.discovery import ItemError, find_images, image_data_uri, image_size, read_tags
from kgen_cli.caption.output import Existing, check_policy, write_caption
from kgen_cli.caption.run import CaptionSettings, Captioner, FailFast, clean_text
from kgen_cli.caption.shaping import TagShaping, parse_replacements
from kgen_cli.caption.wiki import DescriptionCache, open_wiki, strip_dtext
from kgen_cli.errors import KgenError, UsageError
from kgen_main import run_main


# -- discovery --------------------------------------------------------------------------------


def test_finds_every_format_case_insensitively_in_sorted_order(tmp_path):
    make_dataset(tmp_path)
    root, items = find_images(tmp_path, recursive=False, tags_ext=".txt")
    names = [i.rel.as_posix() for i in items]
    assert names == sorted(["a.png", "b.jpg", "c.webp", "d.BMP", "corrupt.png", "notags.png"])
    assert [i.index for i in items] == list(range(len(items)))
    assert all(i.tag_path == i.path.with_suffix(".txt") for i in items)
    _, deep = find_images(tmp_path, recursive=True, tags_ext=".txt")
    assert {"sub/e.gif", "sub/f.JPEG"} <= {i.rel.as_posix() for i in deep}


def test_recursive_scan_follows_a_symlink_loop_once(tmp_path):
    make_dataset(tmp_path, bad=False)
    os.symlink(tmp_path, tmp_path / "sub" / "loop")
    os.symlink(tmp_path / "sub", tmp_path / "again")
    _, items = find_images(tmp_path, recursive=True, tags_ext=".txt")
    assert sorted(i.path.name for i in items) == sorted(Path(n).name for n in GOOD)


def test_filelist_paths_are_relative_to_the_list(tmp_path):
    make_dataset(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text("# two images\nsub/e.gif\n\nb.jpg\nb.jpg\n")
    root, items = find_images(listing, recursive=False, tags_ext=".txt")
    assert root == tmp_path and [i.rel.as_posix() for i in items] == ["b.jpg", "sub/e.gif"]
    listing.write_text("readme.md\n")
    with pytest.raises(UsageError, match="not an image"):
        find_images(listing, recursive=False, tags_ext=".txt")
    with pytest.raises(UsageError, match="neither a folder nor a file list"):
        find_images(tmp_path / "nope", recursive=False, tags_ext=".txt")


def test_size_comes_from_the_header_and_pixels_keep_the_bomb_guard(tmp_path):
    make_dataset(tmp_path)
    for name, (size, _, _) in GOOD.items():
        assert image_size(tmp_path / name) == size
    huge = huge_png_header(tmp_path / "huge.png")
    assert image_size(huge) == (100_000, 100_000)  # no decode, no bomb error
    with pytest.raises(ItemError, match="decompression-bomb"):
        image_data_uri(huge)
    with pytest.raises(ItemError, match="not a readable image"):
        image_size(tmp_path / "corrupt.png")


def test_vision_data_uri_is_a_scaled_png_of_the_first_frame(tmp_path):
    import base64
    import io

    from PIL import Image

    frames = [Image.new("RGB", (40, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    uri = image_data_uri(tmp_path / "anim.gif")
    assert uri.startswith("data:image/png;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert im.format == "PNG" and im.size == (40, 20)
    assert im.convert("RGB").getpixel((0, 0))[0] > 200  # the first (red) frame
    Image.new("RGB", (3000, 1500)).save(tmp_path / "big.png")
    assert Image.open(io.BytesIO(base64.b64decode(image_data_uri(tmp_path / "big.png").split(",", 1)[1]))).size == (1024, 512)


def test_tag_file_errors(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ItemError, match="no tag file"):
        read_tags(tmp_path / "missing.txt")
    with pytest.raises(ItemError, match="is empty"):
        read_tags(tmp_path / "empty.txt")
    with pytest.raises(ItemError, match="not valid UTF-8"):
        read_tags(tmp_path / "latin.txt")
    os.mkfifo(tmp_path / "fifo.txt")  # no writer: reading it would wait for ever
    with pytest.raises(ItemError, match="not a regular file"):
        read_tags(tmp_path / "fifo.txt")
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(ItemError, match="not a regular file"):
        image_size(tmp_path / "fifo.png")


# -- shaping ----------------------------------------------------------------------------------


def test_tags_lose_weights_and_are_spelled_as_expand_spells_them():
    shaping = TagShaping()
    text = r"1girl, (long_hair:1.2), ((smile)), ask \(askzy\), <lora:x:1>, BREAK, blue  eyes, ^_^, long hair"
    assert shaping.tags(text) == ["1girl", "long hair", "smile", "ask (askzy)", "blue eyes", "^_^"]


def test_replace_undesired_and_always_first_in_kohya_order():
    shaping = TagShaping.from_options(undesired=["solo, *_background", "re:.*eyes"], replace="smile,grin;hat,",
                                      always_first="1boy,1girl")
    tags = shaping.tags("solo, smile, white_background, blue_eyes, hat, 1girl, 1boy, tree, grin")
    assert tags == ["1boy", "1girl", "grin", "tree"]
    assert parse_replacements(r"a\,b,c;d,e") == [("a,b", "c"), ("d", "e")]
    with pytest.raises(UsageError, match="--replace"):
        parse_replacements("a;b")


def test_caption_wrapping_puts_the_trigger_first():
    shaping = TagShaping.from_options(trigger="sks", prepend="photo of", append="(trained)")
    assert shaping.caption("a girl smiles.") == "sks, photo of a girl smiles. (trained)"
    assert TagShaping.from_options(trigger="sks").caption("sks, a girl.") == "sks, a girl."  # not twice
    assert TagShaping().caption("  text ") == "text"


def test_clean_text_drops_reasoning_and_quotes():
    assert clean_text('<think>hmm\nlet me see</think>\n "A cat sits." ') == "A cat sits."
    assert clean_text("line one\n\nline two") == "line one line two"


# -- templates --------------------------------------------------------------------------------


def test_presets_use_known_variables_and_render():
    for name in templates.PRESETS:
        assert "tags" in templates.variables(templates.resolve_template(name))
    text = templates.render("{{literal}} {tags} / {name} in {directory} {trigger}",
                            {"tags": "a, b", "name": "img", "directory": "set", "trigger": "sks"})
    assert text == "{literal} a, b / img in set sks"


def test_unknown_variable_and_bad_files_are_usage_errors(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("Caption {tags} with {mood}")
    with pytest.raises(UsageError, match=r"unknown variable \{mood\}"):
        templates.resolve_template(f"@{bad}")
    bad.write_text("a lone { brace {tags}")
    with pytest.raises(UsageError, match="lone"):
        templates.resolve_template(f"@{bad}")
    bad.write_text("x" * (templates.MAX_TEMPLATE_BYTES + 1))
    with pytest.raises(UsageError, match="at most"):
        templates.resolve_template(f"@{bad}")
    with pytest.raises(UsageError, match="not a regular file"):
        templates.resolve_template("@/dev/zero")
    with pytest.raises(UsageError, match="unknown template"):
        templates.resolve_template("medium")


def test_unknown_template_variable_exits_2_before_any_model(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "t.tmpl").write_text("{tags} {colour}")
    code, out, err = run_main("caption", str(tmp_path), "--backend", "chat", "--model", "/nonexistent.gguf",
                              "--template", f"@{tmp_path / 't.tmpl'}")
    assert code == 2 and out == "" and "unknown variable {colour}" in err and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--backend", "chat"], "needs --model"),
    (["--backend", "openai"], "needs --api-model"),
    (["--wiki", "w.jsonl"], "--wiki is for --backend chat or openai"),
    (["--backend", "chat", "-m", "x.gguf", "--wiki", "missing.jsonl"], "--wiki missing.jsonl: no such file"),
    (["--backend", "chat", "-m", "x.gguf", "--wiki", "hf:nowhere"], "expected hf:OWNER/NAME"),
    (["--backend", "chat", "-m", "x.gguf", "--vision-model", "v"], "needs --backend openai"),
    (["--caption-ext", ".txt"], "needs --existing overwrite"),
    (["--caption-ext", "png"], "--caption-ext must be a file extension"),
    (["--replace", "a"], "--replace takes"),
    (["--backend", "chat", "-m", "x.gguf", "--describe-only"], "--describe-only needs --wiki"),
])
def test_usage_errors_exit_2(tmp_path, args, message):
    make_dataset(tmp_path)
    code, out, err = run_main("caption", str(tmp_path), *args)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1, err


# -- wiki and the description cache ------------------------------------------------------------


def test_dtext_becomes_plain_text():
    body = ('h4. Usage\n* Use [[long_hair|long hair]] with [[blue eyes]] and {{smile}}.\n'
            '[b]Bold[/b] "a link":https://example.com and "another":[/wiki_pages/x] <https://x.y>.\nSee post #123.')
    assert strip_dtext(body) == "Usage - Use long hair with blue eyes and smile. Bold a link and another . See ."


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_wiki_tables_load_only_the_wanted_tags(tmp_path, fmt):
    rows = [{"title": "long_hair", "body": "Hair that is [[long]]."}, {"title": "smile", "body": "h4. A smile"},
            {"title": "other", "body": "unused"}]
    path = tmp_path / f"wiki.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["title", "body"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(rows), path)
    table = open_wiki(str(path))
    assert table.pages({"long hair", "smile", "absent"}) == {"long hair": "Hair that is long.", "smile": "A smile"}
    assert table.revision.startswith("sha256:")


def test_hub_wiki_offline_without_cache_is_one_error(tmp_path, monkeypatch):
    from kgen_cli.caption import wiki

    def offline_miss(**kwargs):
        assert kwargs["repo_type"] == "dataset" and kwargs["local_files_only"] is True
        raise FileNotFoundError("not cached")

    monkeypatch.setattr(wiki, "snapshot_download", offline_miss)
    monkeypatch.setattr("kgen_cli.download.is_offline", lambda: True)
    with pytest.raises(KgenError, match="not in the cache and HF_HUB_OFFLINE is set"):
        open_wiki("hf:isek-ai/danbooru-wiki-2024")


def test_hub_wiki_revision_is_the_snapshot_commit(tmp_path, monkeypatch):
    from kgen_cli.caption import wiki

    snap = tmp_path / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "data.jsonl").write_text(json.dumps({"tag": "smile", "body": "A smile."}) + "\n")
    monkeypatch.setattr(wiki, "snapshot_download", lambda **kw: str(snap))
    table = open_wiki("hf:isek-ai/danbooru-wiki-2024@202408")
    assert table.revision == "hf:isek-ai/danbooru-wiki-2024@abc123" and table.pages({"smile"}) == {"smile": "A smile."}


def test_cache_is_shared_safely_by_concurrent_writers(tmp_path):
    path = tmp_path / "cache.sqlite"
    errors = []

    def writer(n: int) -> None:
        try:
            cache = DescriptionCache(path)
            for i in range(50):
                cache.put(f"tag{i}", "rev", f"model{n}", "tmpl", f"desc {n} {i}")
            cache.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    cache = DescriptionCache(path)
    assert len(cache.get_many([f"tag{i}" for i in range(50)], "rev", "model2", "tmpl")) == 50
    assert cache.get_many(["tag1"], "rev", "model2", "other template") == {}
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- output -----------------------------------------------------------------------------------


def test_writes_are_atomic_and_follow_the_existing_policy(tmp_path):
    path = tmp_path / "x.caption"
    assert write_caption(path, "first", Existing.skip) == "written"
    assert write_caption(path, "second", Existing.skip) == "skipped"  # never replaced
    assert path.read_text() == "first\n"
    assert write_caption(path, "appended", Existing.append) == "appended"
    assert write_caption(path, "prepended", Existing.prepend) == "prepended"
    assert path.read_text() == "prepended\nfirst\nappended\n"
    assert write_caption(path, "new", Existing.overwrite) == "written" and path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.caption"]  # no temporary left


def test_the_tag_file_is_only_replaced_with_overwrite(tmp_path):
    make_dataset(tmp_path)
    _, items = find_images(tmp_path, recursive=False, tags_ext=".txt")
    with pytest.raises(UsageError, match="--existing overwrite"):
        check_policy(items, ".txt", None, Existing.skip)
    check_policy(items, ".txt", None, Existing.overwrite)
    check_policy(items, ".txt", tmp_path / "out", Existing.skip)  # another folder: not the tag files


# -- the stages over a scripted backend --------------------------------------------------------


class ScriptedBackend:
    """Runs jobs one after another; every ChatCall is answered by `answer(call)`."""

    model_name = "scripted"

    def __init__(self, answer=None):
        self.calls: list[ChatCall] = []
        self.answer = answer or (lambda call: f"caption {call.seed}")

    def run(self, jobs, on_result, check=None):
        for key, job in jobs:
            try:
                request = next(job)
                while True:
                    if check:
                        check()
                    self.calls.append(request)
                    request = job.send(self.answer(request))
            except StopIteration as stop:
                on_result(key, stop.value, None)
            except KgenError as exc:
                on_result(key, None, exc)


def run_captioner(root, backend, records, **settings):
    _, items = find_images(root, recursive=True, tags_ext=".txt")
    cfg = CaptionSettings(backend="chat", template=templates.resolve_template("short-no-description"), seed=100,
                          **settings)
    captioner = Captioner(cfg, lambda: backend, model_name="scripted", on_record=records.append)
    return items, captioner.run(items)


def test_one_record_per_image_seeds_in_path_order_and_resume(tmp_path):
    make_dataset(tmp_path)
    records: list[dict] = []
    backend = ScriptedBackend()
    items, stats = run_captioner(tmp_path, backend, records)
    assert sorted(r["index"] for r in records) == list(range(len(items)))
    by_name = {Path(r["image"]).name: r for r in records}
    for name in BAD:
        assert by_name[name]["status"] == "error" and BAD[name] in by_name[name]["error"]
    for item in items:
        r = by_name[item.path.name]
        assert r["seed"] == 100 + item.index
        if r["status"] == "written":
            assert Path(r["caption_file"]).read_text() == f"caption {100 + item.index}\n"
    assert (stats.written, stats.failed) == (len(GOOD), len(BAD))
    assert "Image tags: 1girl, solo, long hair, blue eyes, smile" in by_name["a.png"]["prompts"][0]

    again: list[dict] = []
    _, items = find_images(tmp_path, recursive=True, tags_ext=".txt")
    cfg = CaptionSettings(backend="chat", template=templates.resolve_template("short-no-description"), seed=100)
    captioner = Captioner(cfg, lambda: pytest.fail("a rerun with nothing to do opened the model"),
                          model_name="scripted", on_record=again.append)
    captioner.run(items)
    assert captioner.opened is None  # nothing asked again, no model loaded
    assert sorted(r["status"] for r in again) == sorted(["skipped"] * len(GOOD) + ["error"] * len(BAD))


def test_an_empty_answer_or_unwritable_folder_fails_that_image_only(tmp_path):
    root = make_dataset(tmp_path / "ds", bad=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("a file where the captions' folder should be")  # unwritable, even for root
    records: list[dict] = []
    backend = ScriptedBackend(lambda call: "" if "cat" in call.messages[0][1] else "fine")
    run_captioner(root, backend, records, out_dir=out)
    errors = {Path(r["image"]).name: r["error"] for r in records if r["status"] == "error"}
    assert errors.pop("c.webp") == "the model wrote no caption"
    assert sorted(errors) == ["e.gif", "f.JPEG"] and all("cannot write" in e for e in errors.values())
    assert sorted(p.name for p in out.iterdir()) == ["a.caption", "b.caption", "d.caption", "sub"]
    assert not list(tmp_path.rglob(".*.tmp"))


def test_fail_fast_stops_after_the_first_error(tmp_path):
    make_dataset(tmp_path)
    records: list[dict] = []
    with pytest.raises(FailFast, match="corrupt.png"):
        run_captioner(tmp_path, ScriptedBackend(), records, fail_fast=True)
    assert records[-1]["status"] == "error"


def test_descriptions_are_summarised_once_then_read_from_the_cache(tmp_path):
    make_dataset(tmp_path, bad=False)
    wiki_file = tmp_path / "wiki.jsonl"
    wiki_file.write_text("".join(json.dumps({"tag": t, "body": f"The [[{t}]] tag."}) + "\n"
                                 for t in ("1girl", "long_hair", "smile", "cat", "tree")))
    cache = DescriptionCache(tmp_path / "cache.sqlite")

    def run(records):
        backend = ScriptedBackend(lambda call: "DESC " + call.messages[0][1].split('"')[1]
                                  if "wiki entry" in call.messages[0][1] else "a caption")
        _, items = find_images(tmp_path, recursive=True, tags_ext=".txt")
        cfg = CaptionSettings(backend="chat", template=templates.resolve_template("short-no-description"), seed=1)
        captioner = Captioner(cfg, lambda: backend, model_name="m", on_record=records.append, cache=cache,
                              wiki=lambda: open_wiki(str(wiki_file)))
        captioner.run(items)
        return backend, captioner.stats

    records: list[dict] = []
    backend, stats = run(records)
    summaries = [c for c in backend.calls if "wiki entry" in c.messages[0][1]]
    assert len(summaries) == stats.summarised == 5
    prompt = next(r for r in records if r["image"].endswith("a.png"))["prompts"][0]
    assert "- long hair: DESC long hair" in prompt and "- smile: DESC smile" in prompt
    for path in tmp_path.rglob("*.caption"):
        path.unlink()
    backend, stats = run([])
    assert [c for c in backend.calls if "wiki entry" in c.messages[0][1]] == []
    assert stats.summarised == 0 and stats.described_cached == 5
