"""`kgen caption --ray` (kgen_cli/caption/scale.py): the usage errors before any work, then the
command on a local Ray (2 CPUs, 2 actors x 1 thread) on the real SmolLM2 GGUF, compared with a
local `kgen caption` of the same dataset. SmolLM2 writes junk: these tests check one caption per
image, the records and their seeds, and equality with a local run on this machine, never the text.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import pytest

from caption_data import BAD, GOOD, make_dataset
from test_batch import run_main
from test_caption_model import captions, kgen

from kgen_cli.caption import scale as caption_scale
from kgen_cli.caption.discovery import find_images

ACTORS = ("--ray", "--actors", "2", "--threads-per-actor", "1")
COMMON = ("--max-tokens", "8", "--seed", "5", "--parallel", "1")
N_IMAGES = len(GOOD) + len(BAD)


def test_shards_cut_the_images_by_index_and_keep_their_paths(tmp_path):
    root = make_dataset(tmp_path / "data")
    _, items = find_images(root, recursive=True, tags_ext=".txt")
    rows = caption_scale.shard_rows(items, 3)
    assert len(rows) == 3  # 8 images: 3 + 3 + 2
    back = [item for row in rows for item in caption_scale.shard_items(row["shard"])]
    assert back == items


@pytest.mark.parametrize("args, message", [
    (["--backend", "openai", "--api-model", "m"], "--ray runs a model on each actor"),
    (["--existing", "append"], "--existing append is not safe to retry"),
    (["--existing", "prepend"], "--existing prepend is not safe to retry"),
    (["--threads", "2"], "--threads-per-actor"),
    (["--backend", "chat", "--wiki", "w.jsonl", "--describe-only"], "--describe-only fills this machine's"),
])  # fmt: skip
def test_ray_usage_errors_exit_2_before_any_work(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    root = make_dataset(tmp_path / "data")
    code, out, err = run_main(capsys, "caption", str(root), "--ray", "-m", "/nonexistent.gguf", *args)
    assert code == 2 and out == ""
    assert message in " ".join(err.split()) and err.count("\n") == 1
    assert not list(root.rglob("*.caption"))


@pytest.mark.parametrize("option", [["--actors", "2"], ["--threads-per-actor", "2"], ["--shard-size", "3"],
                                    ["--address", "auto"], ["--gpus-per-actor", "1"]])
def test_ray_options_without_ray_are_usage_errors(capsys, tmp_path, option):
    root = make_dataset(tmp_path / "data")
    code, out, err = run_main(capsys, "caption", str(root), *option)
    assert code == 2 and out == "" and f"{option[0]} is for --ray" in err and err.count("\n") == 1


def test_without_ray_installed_ray_is_a_one_line_usage_error_naming_the_extra(capsys, tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    code, out, err = run_main(capsys, "caption", str(root), "--ray", "--backend", "chat", "-m", str(tmp_path))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "pip install 'kgen-cli[ray]'" in err
    assert not list(root.rglob("*.caption"))


# ---------------------------------------------------------------------------------------------
# The command on a local Ray and the real model
# ---------------------------------------------------------------------------------------------


def ray_caption(capsys, root: Path, *args: str) -> tuple[int, list[dict], str]:
    code, out, err = run_main(capsys, "caption", str(root), "-r", "--json", *ACTORS, *COMMON, *args)
    return code, [json.loads(line) for line in out.splitlines()], err


def check_records(records: list[dict], root: Path) -> None:
    """Every image once, with the seed of its index; the bad ones as errors."""
    assert sorted(r["index"] for r in records) == list(range(N_IMAGES))
    assert all(r["seed"] == 5 + r["index"] for r in records)
    bad = {Path(r["image"]).name for r in records if r["status"] == "error"}
    assert bad == set(BAD)


def local_captions(model_path: Path, home: Path, root: Path, *args: str) -> dict[str, str]:
    proc = kgen(home, str(root), "-r", "--threads", "1", *COMMON, *args)
    assert proc.returncode == 1, proc.stderr[-2000:]  # the bad images
    return captions(root)


@pytest.mark.ray
@pytest.mark.model
def test_chat_captions_on_2_actors_equal_a_local_run_and_a_rerun_skips_them(ray_address, model_path, isolated_home,
                                                                            tmp_path, capsys):
    """Shards of 3 images on 2 actors: every image once, each caption equal to a local run's with
    the same seeds (one image at a time, one thread: the same arithmetic)."""
    root = make_dataset(tmp_path / "ray")
    local = make_dataset(tmp_path / "local")
    chat = ("--backend", "chat", "-m", str(model_path))
    code, records, err = ray_caption(capsys, root, *chat, "--shard-size", "3")
    assert code == 1, err[-2000:]
    check_records(records, root)
    assert sum(r["status"] == "written" for r in records) == len(GOOD)
    assert captions(root) == local_captions(model_path, isolated_home, local, *chat)
    assert not [p for p in root.rglob("*.tmp")]

    code, again, err = ray_caption(capsys, root, *chat, "--shard-size", "3")  # a rerun resumes: nothing left
    assert code == 1, err[-2000:]
    assert sorted(r["status"] for r in again if Path(r["image"]).name not in BAD) == ["skipped"] * len(GOOD)


@pytest.mark.ray
@pytest.mark.model
def test_tipo_captions_on_ray_go_to_out_dir_as_locally(ray_address, model_path, isolated_home, tmp_path, capsys,
                                                        monkeypatch):
    root = make_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # relative paths: the actors get them made absolute, the records keep them
    code, records, err = ray_caption(capsys, Path("data"), "-m", str(model_path), "--out-dir", "caps",
                                     "--shard-size", "4", "--nl-length", "very_short", "-o", "report.jsonl")
    assert code == 1, err[-2000:]
    check_records(records, root)
    for r in records:
        assert r["image"].startswith("data/") and r["tags_file"].startswith("data/")
        assert r["caption_file"] == str(Path("caps", Path(r["image"]).relative_to("data")).with_suffix(".caption"))
    assert [json.loads(line) for line in (tmp_path / "report.jsonl").read_text().splitlines()] == records
    assert not list(root.rglob("*.caption"))
    local = tmp_path / "local"
    shutil.copytree(root, local)
    assert captions(tmp_path / "caps") == local_captions(model_path, isolated_home, local, "-m", str(model_path),
                                                         "--nl-length", "very_short")


@pytest.mark.ray
@pytest.mark.model
def test_an_actor_lost_mid_shard_still_gives_every_image_one_caption(ray_address, model_path, isolated_home,
                                                                     tmp_path, capsys, monkeypatch):
    """The first actor to finish 2 images of a shard exits its process; Ray runs the shard again
    on a new actor, which skips the captions already written and writes the rest."""
    marker = tmp_path / "crashed"
    monkeypatch.setattr(caption_scale, "CaptionJob",
                        functools.partial(caption_scale.CaptionJob, crash={"after": 2, "marker": str(marker)}))
    root = make_dataset(tmp_path / "data")
    code, records, err = ray_caption(capsys, root, "--backend", "chat", "-m", str(model_path), "--shard-size", "4")
    assert code == 1, err[-2000:]
    assert marker.exists()  # an actor did exit mid-shard
    check_records(records, root)
    assert sorted(captions(root)) == sorted(Path(n).with_suffix(".caption").as_posix() for n in GOOD)
    assert all(text.count("\n") == 1 for text in captions(root).values())  # one caption each, never two
    assert not [p for p in root.rglob("*.tmp")]


@pytest.mark.ray
@pytest.mark.model
def test_an_interrupted_ray_run_then_a_rerun_gives_every_image_one_caption(ray_address, model_path, isolated_home,
                                                                          tmp_path):
    import signal
    import subprocess
    import time

    from PIL import Image

    from test_caption_model import REPO_ROOT, env_for

    root = tmp_path / "many"
    root.mkdir()
    for i in range(24):
        Image.new("RGB", (16 + i, 16)).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"1girl, item{i}")
    argv = [sys.executable, "-m", "kgen_cli", "caption", str(root), "--backend", "chat", "-m", str(model_path),
            "--max-tokens", "16", "--parallel", "2", "--seed", "1", "--address", ray_address, "--shard-size", "2",
            *ACTORS]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env_for(isolated_home, RAY_AUTH_MODE="disabled"), cwd=REPO_ROOT)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and not list(root.glob("*.caption")):
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr.decode()[-2000:]
    assert stdout == b"" and b"interrupted:" in stderr and stderr.count(b"\n") == 1, stderr.decode()[-2000:]
    time.sleep(2)  # the job's actors, which Ray stops with the driver, may finish a caption meanwhile
    first = captions(root)
    assert len(first) < 24
    assert not list(root.glob(".*.tmp"))  # no partial file

    rerun = kgen(isolated_home, *argv[4:], RAY_AUTH_MODE="disabled")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    final = captions(root)
    assert len(final) == 24 and all(final[k] == v for k, v in first.items())
    assert all(text.count("\n") == 1 for text in final.values())  # each caption exactly once


@pytest.mark.ray
@pytest.mark.model
def test_wiki_descriptions_on_ray_actors(ray_address, model_path, tmp_path, capsys):
    """The describe stage runs on the actors (the wiki table opened there, each node's own
    description cache): every image is captioned from a template that asks for descriptions."""
    root = make_dataset(tmp_path / "data")
    wiki = tmp_path / "wiki.jsonl"
    wiki.write_text("".join(json.dumps({"title": t, "body": f"h4. About\nThe [[{t}]] tag."}) + "\n"
                            for t in ("1girl", "solo", "cat", "sky")))
    code, records, err = ray_caption(capsys, root, "--backend", "chat", "-m", str(model_path), "--shard-size", "3",
                                     "--wiki", str(wiki), "--template", "short-no-description")
    assert code == 1, err[-2000:]
    check_records(records, root)
    assert sorted(captions(root)) == sorted(Path(n).with_suffix(".caption").as_posix() for n in GOOD)
