"""`kgen batch --ray` (kgen_cli/scale.py): shards that number the input exactly as a local batch
does, whole part files, resume and merge (no Ray, no model); then the command on a local Ray
(2 CPUs, 2 actors x 1 thread) on the real SmolLM2 GGUF, compared with local `kgen batch` runs.

The Ray tests are marked `ray` (and `model`); they share one local Ray for the module.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kgen_cli import scale
from kgen_cli.batchio import read_records
from kgen_cli.errors import KgenError, UsageError
from test_batch import FAST, REPO_ROOT, env_for, kgen_batch, prompts, run_main, write_prompts

BOM = b"\xef\xbb\xbf"


def as_tuples(records) -> list[tuple]:
    return [(r.index, r.line, r.id, r.fields, r.error) for r in records]


def sharded(spec: str, size: int, fmt: str | None = None) -> tuple[scale.Plan, list[tuple]]:
    plan = scale.plan_shards(spec, size, fmt)
    out = []
    for shard in plan.shards:
        got = as_tuples(scale.shard_records(shard, plan.input_format))
        assert [t[0] for t in got] == list(range(shard.first_index, shard.first_index + shard.count))
        out.extend(got)
    return plan, out


# ---------------------------------------------------------------------------------------------
# Shards, part files, resume and merge (no Ray, no model)
# ---------------------------------------------------------------------------------------------

MIXED = b"".join([
    BOM + b'{"id": "a", "tags": "1girl"}\n',
    b"\n",
    b"# a comment\n",
    b'{"id": "b", "tags": "1boy", "seed": 5}\n',
    b'{"id": "c", "tags": "oops"\n',  # invalid JSON: an error record, still an index
    b"   \n",
    b'{"id": "d", "tags": "x \xff"}\n',  # not UTF-8
    b'{"id": "e", "colour": "red"}\n',
    b'\xef\xbb\xbf{"id": "f", "tags": "a BOM mid-file is kept"}\n',
    b"# trailing comment\n",
    b'{"id": "g", "tags": "last, no newline"}',
])  # fmt: skip


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_shards_number_a_file_exactly_as_a_local_batch(tmp_path, size):
    src = tmp_path / "in.jsonl"
    src.write_bytes(MIXED)
    with open(src, "rb") as fh:
        expected = as_tuples(read_records(fh, None))
    plan, got = sharded(str(src), size)
    assert got == expected and plan.records == len(expected) == 7
    assert plan.input_format == "jsonl"
    assert len(plan.shards) == -(-7 // size) and all(s.count <= size for s in plan.shards)
    assert [s.name for s in plan.shards][:2] == ["part-000000.jsonl", "part-000001.jsonl"][: len(plan.shards)]


@pytest.mark.parametrize("size", [1, 2, 4, 5, 50])
def test_a_directory_is_numbered_as_its_files_one_after_another(tmp_path, size):
    d = tmp_path / "in"
    d.mkdir()
    files = {
        "a.txt": b"1girl, solo\n\n1boy\n",
        "b.txt": b"# only a comment\n",
        "c.txt": BOM + b"cat ears\ndog\nno newline at the end",
        "d.txt": b"",
        "e.txt": b"\n\nfox\n",
        ".hidden": b"never read\n",
        "_meta": b"never read\n",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    # The rule: each visible file's lines in name order, each file's own BOM dropped.
    joined = b"".join(data.removeprefix(BOM) + (b"\n" if data and not data.endswith(b"\n") else b"")
                      for name, data in sorted(files.items()) if not name.startswith((".", "_")))
    expected = as_tuples(read_records(joined.splitlines(keepends=True), None))
    plan, got = sharded(str(d), size)
    assert got == expected and [t[3]["tags"] for t in got] == ["1girl, solo", "1boy", "cat ears", "dog",
                                                                "no newline at the end", "fox"]
    assert plan.input_format == "lines"
    glob_plan, glob_got = sharded(str(d / "*.txt"), size)
    assert glob_got == expected and len(glob_plan.inputs) == 5


def test_the_format_is_detected_once_for_the_whole_input(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "1.jsonl").write_bytes(b'{"tags": "1girl"}\n')
    (d / "2.jsonl").write_bytes(b'{"tags": "1boy"}\nplain text is then a bad JSON line\n')
    plan, got = sharded(str(d), 2)
    assert plan.input_format == "jsonl"
    assert [t[4] is None for t in got] == [True, True, False]
    _, as_lines = sharded(str(d), 2, "lines")
    assert [t[3]["tags"] for t in as_lines][0] == '{"tags": "1girl"}'


def test_a_line_too_long_for_a_prompt_is_a_usage_error_before_any_shard(tmp_path):
    from kgen_cli.batchio import MAX_PROMPT_BYTES

    src = tmp_path / "in.txt"
    src.write_bytes(b"1girl\n" + b"x" * (MAX_PROMPT_BYTES + 10) + b"\n")
    with pytest.raises(UsageError, match="line 2 is longer than"):
        scale.plan_shards(str(src), 10, None)


def test_missing_and_empty_inputs_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        scale.plan_shards(str(tmp_path / "nope.txt"), 10, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no input files"):
        scale.plan_shards(str(tmp_path / "empty"), 10, None)
    with pytest.raises(UsageError, match="no input files"):
        scale.plan_shards(str(tmp_path / "*.none"), 10, None)


def test_a_part_file_appears_whole_and_replaces_the_previous_one(tmp_path):
    scale._write_whole(str(tmp_path), "part-000000.jsonl", b"first\n")
    scale._write_whole(str(tmp_path), "part-000000.jsonl", b"second\n")
    assert os.listdir(tmp_path) == ["part-000000.jsonl"]  # no temporary file left
    assert (tmp_path / "part-000000.jsonl").read_bytes() == b"second\n"


def test_resume_keeps_finished_parts_and_the_seed_and_refuses_another_input(tmp_path):
    src = write_prompts(tmp_path / "in.txt", prompts(10))
    out = tmp_path / "out"
    fresh = scale.prepare(str(src), str(out), shard_size=4)
    assert [s.number for s in fresh.todo] == [0, 1, 2] and fresh.seed is None and not out.exists()
    scale._start_output(fresh, 1234)
    assert json.loads((out / "kgen-run.json").read_text())["seed"] == 1234
    (out / "part-000001.jsonl").write_text("done\n")
    (out / ".part-000002.jsonl.abc.tmp").write_text("a lost actor's half\n")
    resumed = scale.prepare(str(src), str(out), shard_size=4, resume=True)
    assert [s.number for s in resumed.todo] == [0, 2] and resumed.seed == 1234
    scale._start_output(resumed, resumed.seed)
    assert sorted(os.listdir(out)) == ["kgen-run.json", "part-000001.jsonl"]
    assert scale.prepare(str(src), str(out), shard_size=4, resume=True, seed=7).seed == 7
    with pytest.raises(UsageError, match="another --shard-size"):
        scale.prepare(str(src), str(out), shard_size=5, resume=True)
    # A fresh run into the same directory starts over.
    again = scale.prepare(str(src), str(out), shard_size=4)
    assert len(again.todo) == 3 and os.listdir(out) != []  # nothing removed before the run starts
    scale._start_output(again, 5)
    assert os.listdir(out) == ["kgen-run.json"]
    with pytest.raises(UsageError, match="holds no"):
        scale.prepare(str(src), str(tmp_path / "other"), shard_size=4, resume=True)


def test_paths_with_a_scheme_go_through_pyarrow(tmp_path):
    """s3:// and gs:// cannot be reached here; file:// takes the same pyarrow code path."""
    pytest.importorskip("pyarrow")
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_bytes(b"1girl\n\nfox\n")
    (d / "b.txt").write_bytes(b"cat")
    uri = f"file://{d}"
    plan, got = sharded(uri, 2)
    assert [(t[0], t[1], t[3]["tags"]) for t in got] == [(0, 1, "1girl"), (1, 3, "fox"), (2, 4, "cat")]
    assert plan.inputs == [(f"{uri}/a.txt", 11), (f"{uri}/b.txt", 3)]
    out = f"file://{tmp_path}/out/parts"
    prepared = scale.prepare(uri, out, shard_size=2)
    scale._start_output(prepared, 3)
    for shard in plan.shards:
        scale._write_whole(out, shard.name, f"{shard.number}\n".encode())
    assert scale.written(prepared) == 2 and scale.prepare(uri, out, shard_size=2, resume=True).todo == []
    chunks: list[bytes] = []
    scale.merge(out, plan, chunks.append)
    assert chunks == [b"0\n", b"1\n"]


def test_merge_needs_every_part_and_writes_them_in_order(tmp_path):
    src = write_prompts(tmp_path / "in.txt", prompts(5))
    plan = scale.plan_shards(str(src), 2, None)
    for shard in reversed(plan.shards[1:]):
        scale._write_whole(str(tmp_path), shard.name, f"{shard.first_index}\n".encode())
    with pytest.raises(KgenError, match="1 shards not written"):
        scale.merge(str(tmp_path), plan, lambda data: None)
    scale._write_whole(str(tmp_path), plan.shards[0].name, b"0\n")
    chunks: list[bytes] = []
    scale.merge(str(tmp_path), plan, chunks.append)
    assert b"".join(chunks) == b"0\n2\n4\n"


@pytest.mark.parametrize("text, expected", [("3", (3, 3)), ("1:4", (1, 4)), (None, None)])
def test_actors_n_or_n_to_m(text, expected):
    assert scale.parse_actors(text) == expected


@pytest.mark.parametrize("text", ["0", "4:2", "x", "1:", ":3"])
def test_bad_actors_are_usage_errors(text):
    with pytest.raises(UsageError, match="--actors"):
        scale.parse_actors(text)


@pytest.mark.parametrize("args, message", [
    (["in.txt", "--ray"], "--ray needs -o DIR"),
    (["-", "--ray", "-o", "out"], "not stdin"),
    (["in.txt", "--ray", "-o", "out", "--output-format", "text"], "--ray writes JSONL"),
    (["in.txt", "--ray", "-o", "out", "--threads", "2"], "--threads-per-actor"),
    (["in.txt", "--ray", "-o", "out", "--fail-fast"], "--fail-fast is for a local batch"),
    (["in.txt", "--ray", "-o", "out", "--actors", "3:1"], "--actors 3:1"),
    (["in.txt", "--actors", "2"], "--actors is for --ray"),
    (["in.txt", "--merge"], "--merge is for --ray"),
    (["in.txt", "--address", "auto"], "--address is for --ray"),
    (["in.txt", "--ray", "-o", "in.txt"], "-o names a directory"),
])  # fmt: skip
def test_ray_usage_errors_exit_2_before_loading_a_model(capsys, tmp_path, monkeypatch, args, message):
    pytest.importorskip("ray.data")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("1girl\n")
    code, out, err = run_main(capsys, "batch", *args, "--model", "/nonexistent.gguf", "--family", "tipo")
    assert code == 2 and out == ""
    assert message in " ".join(err.split()) and err.count("\n") == 1


def test_without_ray_installed_ray_is_a_one_line_usage_error_naming_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("1girl\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    code, out, err = run_main(capsys, "batch", "in.txt", "--ray", "-o", "out", "--model", "/nonexistent.gguf",
                              "--family", "tipo")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "pip install 'kgen-cli[ray]'" in err


# ---------------------------------------------------------------------------------------------
# The command on a local Ray and the real model
# ---------------------------------------------------------------------------------------------

_AT = FAST.index("--threads")
RAY_FAST = FAST[:_AT] + FAST[_AT + 2 :]  # without --threads N: actors get --threads-per-actor
ACTORS = ("--actors", "2", "--threads-per-actor", "1")


def ray_batch(capsys, model_path, src, out, *args) -> tuple[int, str, str]:
    return run_main(capsys, "batch", str(src), "--ray", "-o", str(out), "--model", str(model_path), *RAY_FAST,
                    *ACTORS, *args)


def part_records(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(out.glob("part-*.jsonl")) for line in p.read_text().splitlines()]


def jsonl_input(n: int) -> bytes:
    """n JSONL prompts, every 40th line bad in one of three ways, one line with its own seed."""
    lines = []
    for i, text in enumerate(prompts(n)):
        if i % 40 == 7:
            lines.append(f'{{"id": {i}, "tags": "{text}"'.encode())  # invalid JSON
        elif i % 40 == 19:
            lines.append(f'{{"id": {i}, "tags": "{text}", "top_p": 0}}'.encode())  # a bad value
        elif i % 40 == 31:
            lines.append(f'{{"id": {i}, "tags": "{text}", "colour": "red"}}'.encode())  # unknown key
        else:
            seed = ', "seed": 77' if i == 3 else ""
            lines.append(f'{{"id": {i}, "tags": "{text}"{seed}}}'.encode())
    return b"\n".join(lines) + b"\n"


@pytest.mark.ray
@pytest.mark.model
def test_200_prompts_on_2_actors_equal_local_batches_of_the_same_shards(ray_address, model_path, isolated_home,
                                                                         tmp_path, capsys):
    """Every index once, error records included; each shard's records equal those of a local
    `kgen batch --parallel 4` over the shard's lines with the same seeds. (One local batch over
    all 200 would decode other neighbours together, which changes the arithmetic: see
    docs/scale-out.md.)"""
    data = jsonl_input(200)
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    common = ("--parallel", "4", "--no-timings", "--max-tokens", "4")
    out = tmp_path / "out"
    code, merged, err = ray_batch(capsys, model_path, src, out, "--shard-size", "50", "--merge", "--seed", "1000",
                                  *common)
    assert code == 1 and "15 of 200 inputs failed" in err, err[-2000:]
    records = [json.loads(line) for line in merged.splitlines()]
    assert records == part_records(out)
    assert [(r["index"], r["line"]) for r in records] == [(i, i + 1) for i in range(200)]
    assert sorted(p.name for p in out.iterdir()) == ["kgen-run.json"] + [f"part-{i:06d}.jsonl" for i in range(4)]
    assert sum("error" in r for r in records) == 15 and records[3]["seed"] == 77 and records[4]["seed"] == 1004

    def shifted(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in ("index", "line", "id")}

    lines = data.splitlines(keepends=True)
    for k in range(4):
        part = tmp_path / f"shard{k}.jsonl"
        part.write_bytes(b"".join(lines[50 * k:50 * k + 50]))
        local = kgen_batch(model_path, isolated_home, str(part), "--output-format", "jsonl",
                           "--seed", str(1000 + 50 * k), *common)
        assert local.returncode in (0, 1), local.stderr.decode()[-2000:]
        mine = [json.loads(line) for line in local.stdout.decode().splitlines()]
        assert [shifted(r) for r in records[50 * k:50 * k + 50]] == [shifted(r) for r in mine]


@pytest.mark.ray
@pytest.mark.model
def test_an_actor_lost_mid_shard_still_gives_every_record_once(ray_address, model_path, isolated_home, tmp_path,
                                                                capsys, monkeypatch):
    """The first actor to finish 5 records exits its process; Ray starts another and runs the
    shard again, whose part file then appears once. With --parallel 4 a shard is a batch of its
    own: shard 0 equals a local batch of its 20 prompts with the same --parallel."""
    marker = tmp_path / "crashed"
    monkeypatch.setattr(scale, "Job", functools.partial(scale.Job, crash={"after": 5, "marker": str(marker)}))
    src = write_prompts(tmp_path / "in.txt", prompts(60))
    common = ("--seed", "5", "--parallel", "4", "--no-timings")
    out = tmp_path / "out"
    code, stdout, err = ray_batch(capsys, model_path, src, out, "--shard-size", "20", *common)
    assert code == 0, err[-2000:]
    assert marker.exists()  # an actor did exit mid-shard
    assert stdout == ""  # Ray's note of the retried task is not a result
    assert [r["index"] for r in part_records(out)] == list(range(60))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    first = write_prompts(tmp_path / "first.txt", prompts(20))
    local = kgen_batch(model_path, isolated_home, str(first), "--output-format", "jsonl", *common)
    assert local.returncode == 0, local.stderr.decode()[-2000:]
    assert (out / "part-000000.jsonl").read_bytes() == local.stdout


@pytest.mark.ray
@pytest.mark.model
def test_an_interrupted_run_resumes_with_every_record_once(ray_address, model_path, isolated_home, tmp_path, capsys):
    src = write_prompts(tmp_path / "in.txt", prompts(80))
    out = tmp_path / "out"
    args = ["--ray", "--address", ray_address, "-o", str(out), "--shard-size", "10", "--parallel", "4",
            "--seed", "9", "--model", str(model_path), *RAY_FAST, *ACTORS]
    proc = subprocess.Popen([sys.executable, "-m", "kgen_cli", "batch", str(src), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env_for(isolated_home), cwd=REPO_ROOT)
    deadline = time.monotonic() + 240
    while not list(out.glob("part-*.jsonl")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr.decode()[-2000:]
    assert b"--resume completes the rest" in stderr and stderr.count(b"\n") == 1, stderr.decode()[-2000:]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.jsonl")}
    assert 0 < len(before) < 8
    # No --seed this time: the run's own seed, from its manifest.
    code, merged, err = ray_batch(capsys, model_path, src, out, "--shard-size", "10", "--parallel", "4", "--resume",
                                  "--merge")
    assert code == 0, err[-2000:]
    assert [json.loads(line)["index"] for line in merged.splitlines()] == list(range(80))
    assert {r["seed"] for r in part_records(out)} == {9 + i for i in range(80)}  # the first run's seed, kept
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before  # finished parts untouched
