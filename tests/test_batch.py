"""`kgen batch`: the job runner on the fake decoder (pure), then the command end to end on the
real SmolLM2 GGUF (junk text: these tests check behaviour, never quality).

Model runs use `--retries 0 --max-tokens 8 --format tag-only` (one short model call per prompt)
and `--threads KGEN_TEST_THREADS` (default 1). What SmolLM2 writes differs between CPUs: model
tests assert what holds for any text (see tests/conftest.py).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from fake_decoder import FakeDecoder, FakeEngine, fake_tokenize
from kgen_cli import batchjobs, runner
from kgen_cli.batchio import InputRecord, one_line, read_records
from kgen_cli.cli import main
from kgen_cli.options import GenerationOptions
from kgen_cli.errors import KgenError, StopRequested, UsageError
from kgen_cli.sampling import FAMILY_DEFAULTS, CompletionRequest, derive_seed
from kgen_cli.scheduler import Scheduler
from kgen_main import THREADS

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# The job runner on the fake decoder
# ---------------------------------------------------------------------------------------------


def defaults(**over) -> GenerationOptions:
    return GenerationOptions(**{"retries": 0, "format": "tag-only", "max_tokens": 24, **over})


def build_request(text: str, options: GenerationOptions):
    return options.request(text, family="tipo")


def recs(lines: list[str]):
    return read_records(io.BytesIO("".join(line + "\n" for line in lines).encode()), None)


def run(lines, *, parallel=4, variants=1, base_seed=100, engine=None, **kw):
    engine = engine or FakeEngine()
    done: list = []
    stats = batchjobs.run_batch(engine, recs(lines) if isinstance(lines, list) else lines, defaults(), base_seed,
                                variants=variants, parallel=parallel,
                                on_done=lambda rec, res, err: done.append((rec, res, err)), **kw)
    return done, stats, engine.decoder


def test_every_record_once_with_its_seed_concurrently_with_refills():
    lines = [json.dumps({"tags": f"1girl, tag {i}", "max_tokens": 10 + 7 * i % 11, **({"seed": 7} if i == 5 else {})})
             for i in range(30)]
    done, stats, decoder = run(lines, parallel=4)
    assert sorted(rec.index for rec, _, _ in done) == list(range(30))
    assert all(err is None for _, _, err in done)
    seeds = {rec.index: res["seed"] for rec, res, _ in done}
    assert seeds == {i: 7 if i == 5 else 100 + i for i in range(30)}
    assert all(res["variants"][0].seed == seeds[rec.index] for rec, res, _ in done)
    # Continuous batching: 4 sequences decode together, and finished ones are replaced mid-run.
    assert stats.peak_sequences == 4 == decoder.peak_live
    assert stats.model_calls == 30 and stats.refills >= 20  # (26 = 30 - the first 4, at most)
    assert stats.steps < sum(res["timings"]["generated_tokens"] for _, res, _ in done) / 2
    assert decoder.live_seqs == 0 and not decoder.live_samplers


def test_same_records_same_results_whatever_the_order_of_finishing():
    lines = [json.dumps({"tags": f"1girl, tag {i}", "max_tokens": 20 - i}) for i in range(12)]
    a, _, _ = run(lines, parallel=1)
    b, _, _ = run(lines, parallel=5)
    # The fake decoder's logits do not depend on batching, so the results must not either.
    assert {r.index: x["variants"][0].formatted for r, x, _ in a} == {r.index: x["variants"][0].formatted for r, x, _ in b}
    assert [r.index for r, _, _ in a] == list(range(12)) and [r.index for r, _, _ in b] != list(range(12))


def test_bad_lines_fail_alone(monkeypatch):
    real = batchjobs.run_expand

    def flaky(request, seed):
        job = real(request, seed)
        if "explode" in request.tags:
            yield next(job)  # one model call, then a bug meets its output
            raise RuntimeError("boom")
        return (yield from job)

    monkeypatch.setattr(batchjobs, "run_expand", flaky)
    lines = ['{"tags": "fine"}', '{"tags": "x", "operation": "sideways"}', '{"tags": "x", "format": "@/no/such/file"}',
             '{"tags": "x", "unknown": 1}', '{"tags": "explode"}', '{"tags": "x", "top_p": 0.5, "temperature": 0}',
             "not json"]
    done, stats, decoder = run(lines)
    errors = {rec.index: err for rec, _, err in done}
    assert errors[0] is None and errors[5] is None
    assert isinstance(errors[1], UsageError) and "sideways" in str(errors[1])
    assert isinstance(errors[2], UsageError)
    assert isinstance(errors[3], UsageError) and "unknown key" in str(errors[3])
    assert isinstance(errors[4], KgenError) and "internal error: RuntimeError: boom" in str(errors[4])
    assert isinstance(errors[6], UsageError) and "invalid JSON" in str(errors[6])
    assert stats.failed == 5 and decoder.live_seqs == 0


def test_line_options_override_the_defaults_and_the_aspect_ratio_either_way():
    d = defaults(aspect_ratio=2.0, format="oneline", tag_length="long")
    rec = next(recs(['{"tags": "1girl", "width": 832, "height": 1216, "tag_length": "short", "format": "tag-only", '
                     '"seed": 3, "max_tokens": 5, "ban": "hat"}']))
    request, seed = batchjobs.line_request(rec, d, 50)
    assert seed == 3 and request.aspect_ratio == pytest.approx(832 / 1216) and request.tag_length == "short"
    assert request.params.max_tokens == 5 and request.bans.patterns == ["hat"] and "<|extended|>" not in request.template
    rec = next(recs(['{"tags": "1girl", "aspect_ratio": 0.5}']))
    request, seed = batchjobs.line_request(rec, defaults(width=100, height=200), 50)
    assert request.aspect_ratio == 0.5 and seed == 50


def test_records_are_pulled_lazily():
    pulled = itertools.count()

    def endless():
        for i in itertools.count():
            next(pulled)
            yield InputRecord(i, i + 1, fields={"tags": f"1girl, prompt {i}"})

    class Enough(Exception):
        pass

    seen = []

    def on_done(rec, res, err):
        seen.append(rec.index)
        if len(seen) == 10:
            raise Enough

    with pytest.raises(Enough):
        batchjobs.run_batch(FakeEngine(), endless(), defaults(), 0, parallel=4, on_done=on_done)
    assert next(pulled) <= 10 + 4 + 1  # what finished, what is in flight, and nothing more


class Stop(StopRequested):
    pass


def stop_after(steps: int):
    """A `check` that lets `steps` decodes through, then asks to stop."""
    calls = itertools.count(1)

    def check():
        if next(calls) > steps:
            raise Stop

    return check


def test_check_stops_the_batch_before_a_decode():
    engine = FakeEngine()
    with pytest.raises(Stop):
        run([f"1girl, tag {i}" for i in range(8)], engine=engine, check=stop_after(5))
    assert engine.decoder.n_steps == 5


def test_variants_share_the_prompt_and_drop_duplicates():
    done, stats, decoder = run(["1girl, solo", "cat"], variants=3, parallel=6)
    for rec, res, err in done:
        assert err is None and res["n"] == 3
        assert len({v.formatted for v in res["variants"]}) == len(res["variants"]) == 3
        base = 100 + rec.index
        assert {v.seed for v in res["variants"]} <= {derive_seed(base, v) for v in range(3 + 2 * res["duplicates"] + 2)}
    assert decoder.forks >= 4  # variants 1 and 2 of each prompt fork its KV cells


def test_independent_variants_that_repeat_are_replaced_by_further_rounds_as_in_expand(monkeypatch):
    original = batchjobs.run_expand
    repeating = {derive_seed(base, v) for base in (100, 101) for v in (0, 2, 3)}

    def collapsing(request, seed):  # variants 0, 2 and 3 of each input format to the same line
        result = yield from original(request, seed)
        if seed in repeating:
            result.formatted = "same"
        return result

    monkeypatch.setattr(batchjobs, "run_expand", collapsing)
    monkeypatch.setattr(runner, "run_expand", collapsing)
    lines = ["1girl, solo", "cat, outdoors", "scenery"]
    done, stats, decoder = run(lines, variants=5, parallel=4)
    assert sorted(rec.index for rec, _, _ in done) == [0, 1, 2]
    for rec, res, err in done:
        assert err is None and len({v.formatted for v in res["variants"]}) == len(res["variants"]) == 5
        alone = runner.expand_variants(FakeEngine(), build_request(lines[rec.index], defaults()), 5,
                                       100 + rec.index, sampler="independent")
        assert [(v.seed, v.formatted) for v in res["variants"]] == [(v.seed, v.formatted) for v in alone.variants]
        assert res["duplicates"] == alone.duplicates
    assert {v.seed for v in done[0][1]["variants"]} >= {derive_seed(100, 5)}  # round 2 started at variant 5
    assert stats.records == 3 and decoder.live_seqs == 0 and decoder.live_cells == 0

    # A model that keeps repeating itself: rounds stop once one adds nothing.
    monkeypatch.setattr(batchjobs, "run_expand", lambda request, seed: _constant(original(request, seed)))
    done, stats, decoder = run(["1girl", "cat"], variants=4, parallel=3)
    for _, res, err in done:
        assert err is None and [v.formatted for v in res["variants"]] == ["same"]
        assert res["duplicates"] == 3 + 4  # round 1: 3 repeats; round 2 (2 * 3 + 2 = 4 jobs -> min(4, 8)) adds none
    assert decoder.live_seqs == 0


def test_batch_variants_from_a_tgts_tree_per_input():
    lines = ["1girl, solo", "cat, outdoors", "scenery"]
    done, stats, decoder = run(lines, variants=4, parallel=8, sampler="tgts")
    assert [rec.index for rec, _, _ in done] == [0, 1, 2]  # one input at a time, in order
    for rec, res, err in done:
        assert err is None and res["n"] == 4 and res["seed"] == 100 + rec.index
        assert len({v.formatted for v in res["variants"]}) == len(res["variants"]) == 4
        # the same variants `kgen expand -n 4` makes for that input and seed
        alone = runner.expand_variants(FakeEngine(n_seq_max=8), build_request(lines[rec.index], defaults()),
                                       4, 100 + rec.index, sampler="tgts")
        assert [v.formatted for v in res["variants"]] == [v.formatted for v in alone.variants]
    assert stats.records == 3 and stats.failed == 0 and stats.steps > 0 and stats.tokens_decoded > 0
    assert decoder.forks > 0 and decoder.live_seqs == 0 and decoder.live_cells == 0


def test_batch_tgts_bad_line_fails_alone_and_check_stops_it():
    lines = recs(['{"tags": "1girl"}', '{"tags": "cat", "width": "wide"}', '{"tags": "dog"}'])
    done, stats, _ = run(lines, variants=2, sampler="tgts")
    assert [err is None for _, _, err in done] == [True, False, True] and stats.failed == 1
    engine = FakeEngine()
    with pytest.raises(Stop):  # passes through the record's error handling: the batch stops
        run(["1girl", "cat"], variants=4, sampler="tgts", engine=engine, check=stop_after(3))
    assert engine.decoder.n_steps == 3 and engine.decoder.live_seqs == 0


def test_variants_repeating_after_formatting_are_replaced_in_a_further_round(monkeypatch):
    original = runner.run_expand
    collapse_jobs(monkeypatch, range(3))
    out = runner.expand_variants(FakeEngine(), build_request("1girl", defaults()), 6, 7, sampler="tgts")
    assert len(out.variants) == 6 and out.rounds == 2 and out.duplicates >= 2
    assert len({v.formatted for v in out.variants}) == 6
    assert {v.seed for v in out.variants} >= {derive_seed(7, i) for i in (6, 7)}  # round 2: jobs 6, 7

    monkeypatch.setattr(runner, "run_expand", lambda request, seed: _constant(original(request, seed)))
    out = runner.expand_variants(FakeEngine(), build_request("1girl", defaults()), 4, 7, sampler="independent")
    assert [v.formatted for v in out.variants] == ["same"] and out.rounds == 2  # round 2 added nothing: stop
    assert out.to_dict()["totals"]["rounds"] == 2


def test_tgts_refuses_leaves_whose_result_repeats_inside_the_tree(monkeypatch):
    original = runner.run_expand

    def eight_lines(request, seed):  # results fall into 8 lines whatever the text: repeats are common
        result = yield from original(request, seed)
        result.formatted = f"line {zlib.crc32(result.calls[0].completion.encode()) % 8}"
        return result

    monkeypatch.setattr(runner, "run_expand", eight_lines)
    engine = FakeEngine()
    out = runner.expand_variants(engine, build_request("1girl", defaults()), 6, 7, sampler="tgts")
    assert len({v.formatted for v in out.variants}) == len(out.variants) == 6
    assert out.rounds == 1 and out.duplicates >= 1  # the tree found the replacements itself
    assert [v.seed for v in out.variants] == [derive_seed(7, i) for i in range(6)]  # jobs 0-5, in order
    assert engine.decoder.live_seqs == 0 and not engine.decoder.live_samplers


def test_expand_variants_streams_each_kept_variant_as_soon_as_it_is_final():
    engine = FakeEngine()
    streamed = []  # (seed, decode steps so far) at each on_variant call
    out = runner.expand_variants(engine, build_request("1girl", defaults()), 6, 7, sampler="tgts",
                                 on_variant=lambda r, figures: streamed.append((r.seed, engine.decoder.n_steps, figures)))
    assert [seed for seed, _, _ in streamed] == [v.seed for v in out.variants]  # each once, in the list's order
    assert [f for _, _, f in streamed] == out.per_variant
    assert streamed[0][1] < engine.decoder.n_steps  # the first one came out while others still decoded


def collapse_jobs(monkeypatch, jobs: range, base: int = 7) -> list[int]:
    """Make the jobs `jobs` of expand_variants (seed base + i) format to the same line; returns
    the seeds of the jobs that ended, in the order they ended."""
    original, finished = runner.run_expand, []
    same = {derive_seed(base, i) for i in jobs}

    def collapsing(request, seed):
        result = yield from original(request, seed)
        finished.append(seed)
        if seed in same:
            result.formatted = "same"
        return result

    monkeypatch.setattr(runner, "run_expand", collapsing)
    return finished


def test_independent_samples_that_repeat_are_replaced_in_the_same_batch(monkeypatch):
    collapse_jobs(monkeypatch, range(3))
    engine = FakeEngine()
    out = runner.expand_variants(engine, build_request("1girl", defaults()), 5, 7, sampler="independent")
    assert len({v.formatted for v in out.variants}) == len(out.variants) == 5
    assert out.rounds == 1 and out.duplicates == 2  # samples 5 and 6 took the places of two repeats
    assert {v.seed for v in out.variants} == {derive_seed(7, i) for i in (0, 3, 4, 5, 6)}
    assert engine.decoder.live_seqs == 0 and not engine.decoder.live_samplers


def test_a_further_round_stops_once_it_has_its_variants(monkeypatch):
    finished = collapse_jobs(monkeypatch, range(3))  # jobs 0-2 end on the same line, after their 2nd call
    engine = FakeEngine()
    request = build_request("1girl", defaults(format="oneline"))  # TIPO's 2 calls: no variant ends with its 1st
    out = runner.expand_variants(engine, request, 5, 7, sampler="independent")
    assert len({v.formatted for v in out.variants}) == len(out.variants) == 5 and out.rounds == 2
    second = [s for s in finished if s in {derive_seed(7, i) for i in range(5, 11)}]
    assert len(second) < 6  # round 2 drew 6 jobs; those still running once 2 were kept were dropped
    assert engine.decoder.live_seqs == 0 and not engine.decoder.live_samplers


def test_an_interrupted_expand_variants_carries_what_it_kept():
    class Stop(StopRequested):
        pass

    engine = FakeEngine()
    streamed = []

    def check():
        if engine.decoder.n_steps >= 30:  # variants come out at steps 24, 36 and 48 of this run
            raise Stop()

    with pytest.raises(Stop) as info:
        runner.expand_variants(engine, build_request("1girl", defaults()), 12, 7, sampler="tgts", check=check,
                               on_variant=lambda r, _f: streamed.append(r.seed))
    partial = info.value.partial
    assert [v.seed for v in partial.variants] == streamed and 0 < len(streamed) < 12
    totals = partial.to_dict()["totals"]
    assert totals["stop_reason"] == "interrupted" and totals["rounds"] == 1
    assert engine.decoder.live_seqs == 0 and not engine.decoder.live_samplers


def _constant(job):
    result = yield from job
    result.formatted = "same"
    return result


def test_prompts_with_a_common_start_share_its_cells_and_give_the_same_results():
    header = "aspect_ratio: 1.0\ntarget: <|long|>\ntag: "

    def job(i):  # calls of different lengths: slots free up one by one, while others still run
        params = FAMILY_DEFAULTS["tipo"].with_overrides(max_tokens=10 + 7 * i % 13)
        completion = yield CompletionRequest(header + f"1girl, tag {i}, " + "x" * (i % 5), i, params)
        return completion.text

    runs = []
    for share in (0, 8):
        decoder = FakeDecoder(max_branches=4)
        results = {}
        sched = Scheduler(decoder, fake_tokenize, n_ctx=4096, parallel=4, share_prefix=share)
        sched.run([(i, job(i)) for i in range(12)], lambda k, v, e: results.__setitem__(k, (v, e)))
        runs.append((results, sched.stats, decoder))
    (plain, plain_stats, _), (shared, stats, decoder) = runs
    assert shared == plain and all(e is None for _, e in shared.values())  # forks kept the right tokens
    assert plain_stats.prompt_tokens_shared == 0
    common = len(header) + len("1girl, tag ")
    # Every prompt but the first forks: even the 3 that come with it wait one step to do so.
    assert decoder.forks == 11 and stats.prompt_tokens_shared >= 11 * common
    assert stats.tokens_decoded == plain_stats.tokens_decoded - stats.prompt_tokens_shared
    assert decoder.live_seqs == 0 and decoder.live_cells == 0


def test_default_context_runs_16_tipo_calls_at_once():
    """TIPO defaults (512 new tokens) with --parallel 16: the scheduler reserves prompt + 512
    cells per call, and batch's default n_ctx leaves room for 16 such calls with 200-token prompts
    (shared cache, TGTS trees). With a KV stream per sequence, each stream holds a whole call."""
    params = FAMILY_DEFAULTS["tipo"]
    n_ctx = batchjobs.batch_n_ctx(16, params.max_tokens, 1024)
    assert n_ctx == 12288 and batchjobs.batch_n_ctx(1, 512, 1024) == 4096
    assert batchjobs.batch_n_ctx(256, 512, 1024) == 65536
    assert batchjobs.batch_n_ctx(16, 512, 1024, unified=False) == 16 * 1024
    assert batchjobs.batch_n_ctx(16, 512, 1000, unified=False) == 16 * 1024  # streams of 256-cell steps

    def job(i, n_chars):
        yield CompletionRequest("x" * (n_chars - 1) + str(i % 10), i, params)

    for n_chars, expect_all in [(200, True), (700, False)]:
        decoder = FakeDecoder(max_branches=16)
        results = {}
        sched = Scheduler(decoder, fake_tokenize, n_ctx=n_ctx, parallel=16)
        sched.run([(i, job(i, n_chars)) for i in range(32)], lambda k, v, e: results.__setitem__(k, e))
        assert len(results) == 32 and not any(results.values())  # retries' long prompts wait, never fail
        assert (decoder.peak_live == 16) is expect_all


# ---------------------------------------------------------------------------------------------
# The command on the real model
# ---------------------------------------------------------------------------------------------

FAST = ("--family", "tipo", "--retries", "0", "--max-tokens", "8", "--format", "tag-only", "--threads", THREADS)


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KGEN_DEBUG", "KGEN_MODEL", "COLUMNS")}
    env.update(KGEN_HOME=str(home), HF_HUB_CACHE=str(home / "hf-cache"), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def batch_argv(model_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "kgen_cli", "batch", "--model", str(model_path), *FAST, *args]  # args win


def kgen_batch(model_path, home, *args, stdin: bytes | None = None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(batch_argv(model_path, *args), input=stdin, capture_output=True, env=env_for(home),
                          cwd=REPO_ROOT, timeout=timeout, stdin=None if stdin is not None else subprocess.DEVNULL)


def prompts(n: int, start: int = 1) -> list[str]:
    return [f"1girl, solo, item{i:03d}zz" for i in range(start, start + n)]


def write_prompts(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def owns(text: str, prompt: str) -> bool:
    """Whether a formatted result belongs to this input (it holds every tag of the input; each
    input has a tag of its own)."""
    tags = {t.strip() for t in one_line(text).split(",")}
    return all(t.strip() in tags for t in prompt.split(","))


def stats_line(stderr: bytes) -> dict[str, int]:
    m = re.search(r"batch: (\d+) prompts \((\d+) failed\), (\d+) model calls, (\d+) decode steps, up to (\d+) "
                  r"sequences at once, (\d+) slot refills.* (\d+) prompt tokens shared", stderr.decode())
    assert m, stderr.decode()[-2000:]
    keys = ("prompts", "failed", "calls", "steps", "peak", "refills", "shared")
    return dict(zip(keys, map(int, m.groups())))


@pytest.mark.model
def test_stdin_jsonl_in_order_with_16_sequences_at_once_and_refills(model_path, isolated_home):
    """Per-line max_tokens (2..8) make the calls end at different steps, so freed slots are
    refilled while the other sequences are still decoding."""
    lines = prompts(32)
    src = "".join(json.dumps({"id": f"p{i}", "tags": t, "max_tokens": 2 + i % 7}) + "\n" for i, t in enumerate(lines))
    proc = kgen_batch(model_path, isolated_home, "-", "--output-format", "jsonl", "--seed", "1000", "-v",
                      stdin=src.encode())
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = proc.stdout.decode().splitlines()
    assert len(out) == 32
    docs = [json.loads(line) for line in out]  # stdout holds results only: every line is a record
    for i, d in enumerate(docs):
        assert (d["index"], d["id"], d["line"], d["seed"]) == (i, f"p{i}", i + 1, 1000 + i)
        assert d["input"] == {"tags": lines[i], "nl": "", "options": {"max_tokens": 2 + i % 7}}
        assert owns(d["formatted"], lines[i])
        assert len(d["calls"]) == 1 and d["calls"][0]["seed"] == 1000 + i
        assert d["calls"][0]["n_tokens"] <= 2 + i % 7
        assert d["timings"]["model_calls"] == 1 and d["timings"]["wall_seconds"] > 0
        assert "error" not in d
    s = stats_line(proc.stderr)
    assert (s["prompts"], s["failed"], s["calls"], s["peak"]) == (32, 0, 32, 16)
    assert s["refills"] >= 8  # finished sequences were replaced while others still decoded
    assert s["shared"] >= 16 * s["refills"]  # refills fork the TIPO header of a live prompt
    assert "one shared KV buffer" in proc.stderr.decode()  # short single calls: shared cells
    assert s["steps"] < s["calls"]  # many sequences per decode (one at a time takes a step per call at least)


@pytest.mark.model
def test_retries_run_on_a_kv_stream_per_sequence(model_path, isolated_home):
    """With retries a call can grow to the context length: every sequence gets its own KV
    stream (kv_unified=false), forks copy whole streams, and a job's retries reuse its stream."""
    lines = prompts(6)
    proc = kgen_batch(model_path, isolated_home, "-", "--output-format", "jsonl", "--seed", "5", "--retries", "2",
                      "--parallel", "4", "-v", stdin="".join(t + "\n" for t in lines).encode())
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    err = proc.stderr.decode()
    assert "a KV stream per sequence" in err and "context length 1024" in err
    docs = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [d["index"] for d in docs] == list(range(6)) and not any("error" in d for d in docs)
    for d, line in zip(docs, lines):
        assert owns(d["formatted"], line)
        assert all(c["n_prompt_tokens"] + c["n_tokens"] <= 1024 for c in d["calls"])
    s = stats_line(proc.stderr)
    assert s["calls"] == sum(len(d["calls"]) for d in docs) and s["calls"] > 6  # the retries ran
    assert s["peak"] == 4


def test_kv_streams_only_for_long_calls_without_trees():
    rule = batchjobs.use_kv_streams
    assert rule(trees=False, context_length=1024, max_tokens=512, retries=None)  # TIPO's defaults
    assert rule(trees=False, context_length=1024, max_tokens=8, retries=1)  # retries grow the prompt
    assert rule(trees=False, context_length=1024, max_tokens=512, retries=0)
    assert not rule(trees=False, context_length=1024, max_tokens=64, retries=0)  # short single calls
    assert not rule(trees=True, context_length=1024, max_tokens=512, retries=None)  # trees fork prefixes


@pytest.mark.model
def test_rerun_reproduces_the_file_and_parallel_1_matches_expand(model_path, isolated_home, tmp_path):
    src = write_prompts(tmp_path / "in.txt", prompts(8))
    outs = []
    for name in ("a.txt", "b.txt"):
        proc = kgen_batch(model_path, isolated_home, str(src), "-o", str(tmp_path / name), "--seed", "1",
                          "--parallel", "3")
        assert proc.returncode == 0 and proc.stdout == b"" and proc.stderr == b"", proc.stderr.decode()[-2000:]
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1] and outs[0].count(b"\n") == 8

    # --parallel 1 decodes like `kgen expand` with seed S + i (more sequences: see the help).
    two = write_prompts(tmp_path / "two.txt", prompts(2, start=4))
    proc = kgen_batch(model_path, isolated_home, str(two), "--seed", "7", "--parallel", "1", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    for i, line in enumerate(proc.stdout.decode().splitlines()):
        single = subprocess.run([sys.executable, "-m", "kgen_cli", "expand", prompts(2, start=4)[i], "--seed",
                                 str(7 + i), "--model", str(model_path), *FAST, "--max-tokens", "12"],
                                capture_output=True, env=env_for(isolated_home), cwd=REPO_ROOT, timeout=120,
                                stdin=subprocess.DEVNULL)
        assert single.returncode == 0, single.stderr.decode()[-2000:]
        assert " ".join(single.stdout.decode().split()) == " ".join(line.split())


BAD_INPUT = b"\n".join([
    b'{"id": "a", "tags": "1girl, solo, mark 1"}',
    b'{"id": "b", "tags": "1girl, oops"',  # invalid JSON
    b'{"id": "c", "tags": "1girl", "colour": "red"}',  # unknown option
    b'{"id": "d", "tags": "1girl", "top_p": 0}',  # invalid option value
    b'{"id": "e", "tags": "1girl, \xff\xfe"}',  # not UTF-8
    b'{"id": "f", "tags": "' + b", ".join(b"tag%d" % i for i in range(300)) + b'"}',  # too long for --n-ctx 256
    b'# a comment',
    b'{"id": "g", "tags": "1girl, solo, mark 7", "seed": 99, "width": 832, "height": 1216, "format": "oneline"}',
]) + b"\n"


@pytest.mark.model
def test_bad_lines_give_error_records_and_the_batch_goes_on(model_path, isolated_home, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(BAD_INPUT)
    proc = kgen_batch(model_path, isolated_home, str(src), "--output-format", "jsonl", "--n-ctx", "256",
                      "--parallel", "2", "--seed", "10")
    assert proc.returncode == 1, proc.stderr.decode()[-2000:]
    docs = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    # A line that cannot be read has no id of its own: its line number stands in.
    assert [d["id"] for d in docs] == ["a", 2, "c", "d", 5, "f", "g"] and [d["index"] for d in docs] == list(range(7))
    errors = dict(zip("abcdefg", (d.get("error") for d in docs)))
    assert errors["a"] is None and errors["g"] is None
    assert "invalid JSON" in errors["b"] and "unknown key" in errors["c"] and "top_p" in errors["d"]
    assert "UTF-8" in errors["e"] and "longer than the context" in errors["f"]
    assert docs[0]["seed"] == 10 and docs[6]["seed"] == 99 and "aspect_ratio: 0.7" in docs[6]["calls"][0]["prompt"]
    assert proc.stderr.decode().strip() == "5 of 7 inputs failed"

    # Text output: one line per input (empty when it failed), the reasons on stderr.
    proc = kgen_batch(model_path, isolated_home, str(src), "--n-ctx", "256", "--parallel", "2", "--seed", "10")
    assert proc.returncode == 1
    out = proc.stdout.decode().split("\n")
    assert len(out) == 8 and out[-1] == "" and [bool(x) for x in out[:7]] == [1, 0, 0, 0, 0, 0, 1]
    err = proc.stderr.decode().splitlines()
    assert [e.split(":")[0] for e in err] == ["line 2", "line 3", "line 4", "line 5", "line 6", "5 of 7 inputs failed"]

    # --fail-fast: stop at the first bad line, one error line, exit 1.
    proc = kgen_batch(model_path, isolated_home, str(src), "--n-ctx", "256", "--parallel", "1", "--fail-fast")
    assert proc.returncode == 1
    assert proc.stderr.decode().count("\n") == 1 and "line 2: invalid JSON" in proc.stderr.decode()
    assert proc.stdout.decode().count("\n") <= 2


@pytest.mark.model
@pytest.mark.parametrize("sig, fmt", [(signal.SIGINT, "text"), (signal.SIGTERM, "jsonl")])
def test_interrupt_then_resume_gives_every_input_once(model_path, isolated_home, tmp_path, sig, fmt):
    lines = prompts(24)
    src = write_prompts(tmp_path / "in.txt", lines)
    out = tmp_path / f"out.{fmt}"
    args = [str(src), "-o", str(out), "--output-format", fmt, "--seed", "3", "--parallel", "4", "--max-tokens", "4"]
    proc = subprocess.Popen(batch_argv(model_path, *args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env_for(isolated_home), cwd=REPO_ROOT)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the batch ended before it could be interrupted"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr.decode()[-2000:]
    assert stdout == b"" and "interrupted:" in stderr.decode()
    data = out.read_bytes()
    assert data.endswith(b"\n")  # never a partial last line
    first = data.decode().splitlines()
    assert 1 <= len(first) < 24

    proc = kgen_batch(model_path, isolated_home, *args, "--resume")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    final = out.read_text().splitlines()
    assert final[: len(first)] == first and len(final) == 24
    if fmt == "text":
        for i, line in enumerate(final):  # in input order: line i is prompt i's expansion
            assert owns(line, lines[i]), (i, line)
    else:
        docs = [json.loads(line) for line in final]
        assert sorted(d["index"] for d in docs) == list(range(24))  # each exactly once
        assert all(owns(d["formatted"], lines[d["index"]]) for d in docs)


@pytest.mark.model
def test_head_pipe_ends_quietly(model_path, isolated_home, tmp_path):
    src = write_prompts(tmp_path / "in.txt", prompts(40))
    err = tmp_path / "err.txt"
    cmd = " ".join(["cat", str(src), "|", *map(str, batch_argv(model_path, "-", "--parallel", "2")),
                    "2>", str(err), "|", "head", "-3", "; exit ${PIPESTATUS[1]}"])
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, env=env_for(isolated_home), cwd=REPO_ROOT,
                          timeout=240)
    assert proc.returncode == 128 + signal.SIGPIPE  # kgen's own status: as if killed by SIGPIPE, not 1
    out = proc.stdout.decode().splitlines()
    assert len(out) == 3 and all(owns(line, p) for line, p in zip(out, prompts(3)))
    assert err.read_text() == ""  # no BrokenPipeError traceback, no message


@pytest.mark.model
def test_variants_grouped_per_input(model_path, isolated_home, tmp_path):
    lines = prompts(3)
    src = write_prompts(tmp_path / "in.txt", lines)
    proc = kgen_batch(model_path, isolated_home, str(src), "-n", "3", "--seed", "5", "--output-format", "jsonl",
                      "--no-timings", "--temperature", "1.5")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    docs = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [d["index"] for d in docs] == [0, 1, 2]
    for i, d in enumerate(docs):
        # fewer than 3 only after repeats (how many repeat depends on the CPU's logits)
        assert 1 <= len(d["variants"]) <= 3 and (len(d["variants"]) == 3 or d["duplicates_removed"] > 0)
        assert d["seed"] == 5 + i and "timings" not in d
        assert all("generate_seconds" not in c for v in d["variants"] for c in v["calls"])

    proc = kgen_batch(model_path, isolated_home, str(src), "-n", "3", "--seed", "5", "--temperature", "1.5")
    assert proc.returncode == 0
    out = proc.stdout.decode().splitlines()
    owners = [next(i for i, p in enumerate(lines) if owns(line, p)) for line in out]
    assert owners == sorted(owners) and set(owners) == {0, 1, 2}  # N lines per input, grouped in input order
    assert [owners.count(i) for i in range(3)] == [len(d["variants"]) for d in docs]  # same seeds, same variants
    notes = [f"line {i + 1}: only {len(d['variants'])} of 3 distinct variants" for i, d in enumerate(docs)
             if len(d["variants"]) < 3]  # fmt: skip
    assert [line for line in proc.stderr.decode().splitlines() if "distinct variants" in line] == [
        f"{note}: the model kept repeating itself" for note in notes]
    greedy = kgen_batch(model_path, isolated_home, str(src), "-n", "3", "--seed", "5", "--temperature", "0")
    assert greedy.returncode == 0 and len(greedy.stdout.decode().splitlines()) == 3  # one per input
    assert greedy.stderr.decode().splitlines() == [
        f"line {i}: only 1 of 3 distinct variants: the model kept repeating itself" for i in (1, 2, 3)]

    # Independent variants at TIPO's low default temperature repeat often: each input gets up to
    # N distinct ones, the repeats replaced by later variants (seeds past S + N - 1); fewer only
    # when the rounds ran out, with a note (forced on the fake decoder above).
    src = write_prompts(tmp_path / "in2.txt", ["1girl, solo", "cat ears", "scenery"])
    proc = kgen_batch(model_path, isolated_home, str(src), "-n", "4", "--sampler", "independent", "--seed", "5",
                      "--output-format", "jsonl", "--no-timings")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    for i, d in enumerate(json.loads(line) for line in proc.stdout.decode().splitlines()):
        lines_out = [v["formatted"] for v in d["variants"]]
        assert d["index"] == i and len(set(lines_out)) == len(lines_out) and 1 <= len(lines_out) <= 4
        assert len(lines_out) == 4 or f"line {i + 1}: only {len(lines_out)} of 4" in proc.stderr.decode()
        seeds = [v["seed"] for v in d["variants"]]
        # kept in the order the samples ended (an end-of-text may come early): compared as sets
        assert (sorted(seeds) == list(range(5 + i, 9 + i))) == (d["duplicates_removed"] == 0)


@pytest.mark.model
def test_a_slow_pipe_is_expanded_as_it_comes_and_ctrl_c_stops_the_wait(model_path, isolated_home):
    proc = subprocess.Popen(batch_argv(model_path, "-", "--max-tokens", "4"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_for(isolated_home), cwd=REPO_ROOT)
    try:
        proc.stdin.write(b"1girl, solo\n1girl, cat ears\n")  # fewer than --parallel, and stdin stays open
        proc.stdin.flush()
        got = [proc.stdout.readline(), proc.stdout.readline()]
        assert owns(got[0].decode(), "1girl, solo") and owns(got[1].decode(), "1girl, cat ears")
        proc.send_signal(signal.SIGINT)  # while it waits for more input
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and err.decode().startswith("interrupted: 2 results written")


def run_with_stderr_tty(argv: list[str], home: Path, timeout: float = 240) -> tuple[int, bytes, bytes]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                            env=env_for(home), cwd=REPO_ROOT)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        out = proc.stdout.read()
        rc = proc.wait(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return rc, out, b"".join(chunks)


@pytest.mark.model
def test_progress_on_a_terminal_only_and_quiet_silences_it(model_path, isolated_home, tmp_path):
    src = write_prompts(tmp_path / "in.txt", prompts(6))
    rc, out, tty = run_with_stderr_tty(batch_argv(model_path, str(src), "--parallel", "2"), isolated_home)
    assert rc == 0 and out.decode().count("\n") == 6
    assert b"expanding" in tty and b"prompts/s" in tty and b"/6" in tty
    rc, out, tty = run_with_stderr_tty(batch_argv(model_path, str(src), "--parallel", "2", "-q"), isolated_home)
    assert rc == 0 and out.decode().count("\n") == 6 and tty == b""


# ---------------------------------------------------------------------------------------------
# Usage errors, before any model is loaded
# ---------------------------------------------------------------------------------------------


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("args, message", [
    (["in.txt", "--resume"], "--resume needs -o OUTPUT"),
    (["missing.txt", "--model", "/nonexistent.gguf", "--family", "tipo"], "cannot read missing.txt"),
    (["in.txt", "-o", "no/such/dir/out.txt"], "is not a directory"),
    (["in.txt", "--top-p", "0"], "top_p"),
    (["in.txt", "--format", "<|nothing"], "format"),
    (["in.txt", "-o", "in.txt"], "the output file is the input file"),
    (["in.txt", "-n", "2", "-o", "out.txt", "--resume"], "needs -n 1"),
    (["in.txt", "--sampler", "independent", "--exploration", "2"], "--exploration is for --sampler tgts"),
])
def test_usage_errors_exit_2_before_loading_a_model(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("1girl\n")
    (tmp_path / "out.txt").write_text("x\n")
    code, out, err = run_main(capsys, "batch", *args, "--model", "/nonexistent.gguf", "--family", "tipo")
    assert code == 2 and out == ""
    assert message in " ".join(err.split()) and err.count("\n") == 1


@pytest.mark.parametrize("extra", [[], ["--resume"]])
def test_stdin_redirected_from_the_output_file_is_refused_and_kept(isolated_home, tmp_path, extra):
    """`kgen batch - -o f < f` would truncate f before reading it (or, resuming, read its own output)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("1girl\n1boy\n")
    with open(victim, "rb") as stdin:
        proc = subprocess.run([sys.executable, "-m", "kgen_cli", "batch", "-", "-o", str(victim), *extra,
                               "--model", "/nonexistent.gguf", "--family", "tipo"], stdin=stdin,
                              capture_output=True, env=env_for(isolated_home), cwd=REPO_ROOT, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == b""
    assert b"the output file is the input file" in proc.stderr and proc.stderr.count(b"\n") == 1
    assert victim.read_text() == "1girl\n1boy\n"


def test_stats_count_every_model_call_including_those_reusing_a_sequence():
    engine = FakeEngine()
    done: list = []
    stats = batchjobs.run_batch(engine, recs(["1girl, solo", "cat"]), defaults(retries=3), 100, parallel=4,
                                on_done=lambda rec, res, err: done.append((rec, res, err)))
    calls = sum(len(v.calls) for _, res, _ in done for v in res["variants"])
    assert calls > 2 and stats.model_calls == calls  # retries took over their previous call's sequence
    assert engine.decoder.truncations > 0 and engine.decoder.live_seqs == 0
