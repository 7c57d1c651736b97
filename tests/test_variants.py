"""`kgen expand -n N` end to end on the real SmolLM2 GGUF: TGTS and independent sampling through
the llama.cpp BranchDecoder, each variant through the normal pipeline (issue 4).

SmolLM2 writes junk for our formats: these tests check behaviour (N distinct lines, determinism,
the JSON totals, the tree file, pools smaller than N, no llama.cpp abort), never quality, and
never a count that depends on the exact text (how many variants repeat, rounds: those
situations are forced on the fake decoder; see tests/conftest.py). Every run is short
(--max-tokens <= 32, --retries 0, --threads KGEN_TEST_THREADS or 1) and runs with identical
arguments are made once per module.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kgen_cli import runner
from kgen_main import THREADS, run_main
from kgen_cli.batchio import one_line
from engine_calls import drive  # tests/ is on sys.path
from kgen_cli.pipeline import run_expand
from kgen_cli.sampling import Completion, derive_seed

PROMPT = "1girl, dragon horns"
REPO_ROOT = Path(__file__).resolve().parent.parent
FAST = ("--threads", THREADS, "--retries", "0")

model = pytest.mark.model


@functools.lru_cache(maxsize=None)
def variants_run(model_path: Path, *args: str) -> tuple[int, str, str]:
    """One in-process `kgen expand PROMPT --model M ...`; identical calls are made once."""
    return run_main("expand", PROMPT, "--model", str(model_path), *FAST, *args)


def json_run(model_path: Path, *args: str) -> dict:
    code, out, err = variants_run(model_path, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def lines_of(out: str) -> list[str]:
    return out.splitlines()


TGTS16 = ("-n", "16", "--family", "tipo", "--seed", "3", "--max-tokens", "24", "--operation", "None")
PLAN8 = ("-n", "8", "--family", "tipo", "--seed", "3", "--max-tokens", "24")  # TIPO's default plan: 2 calls


# ---------------------------------------------------------------------------------------------
# N variants, TGTS (the default sampler)


@model
def test_tgts_prints_n_distinct_lines_identically_twice(model_path):
    code, out, err = variants_run(model_path, *TGTS16)
    assert code == 0, err
    lines = lines_of(out)
    assert len(set(lines)) == len(lines)  # duplicates are removed
    doc = json_run(model_path, *TGTS16)
    totals = doc["totals"]
    # a second run (the --json one) made the same variants, in the same order
    assert [v["formatted"] for v in doc["variants"]] == lines
    assert totals["requested"] == 16 and totals["variants"] == len(lines) and 1 <= len(lines) <= 16
    assert 1 <= totals["rounds"] <= runner.MAX_ROUNDS
    # Fewer than asked only when the model kept repeating itself (or the tree had no room), and
    # the note says so; how many repeat depends on the CPU's logits, so no count is asserted.
    note = runner.shortfall(len(lines), 16, totals["stop_reason"])
    assert (note is None) == (len(lines) == 16) and (note is None or note in err)


@model
def test_a_multi_line_format_gives_one_line_per_variant(model_path):
    args = ("-n", "4", "--family", "tipo", "--seed", "1", "--max-tokens", "16", "--operation", "None",
            "--format", "tag-only")
    code, out, err = variants_run(model_path, *args)
    assert code == 0, err
    exact = [v["formatted"] for v in json_run(model_path, *args)["variants"]]
    assert 1 <= len(exact) <= 4 and all("\n" in f for f in exact)  # the preset spans lines; --json keeps it
    assert lines_of(out) == [one_line(f) for f in exact]  # joined with spaces, as kgen batch's text output


@model
def test_json_has_per_variant_and_total_figures(model_path):
    doc = json_run(model_path, *PLAN8)
    totals = doc["totals"]
    assert totals["sampler"] == "tgts" and totals["requested"] == 8
    for key in ("tokens_decoded", "decode_steps", "wall_seconds", "variants_per_second", "duplicates_removed"):
        assert isinstance(totals[key], (int, float)) and totals[key] >= 0, key
    assert totals["variants_per_second"] == pytest.approx(totals["variants"] / totals["wall_seconds"], rel=0.01)
    assert 0 < totals["decode_steps"] < totals["tokens_decoded"]  # batched: many tokens per decode
    assert doc["seed"] == 3 and doc["family"] == "tipo"
    for v in doc["variants"]:
        assert 0.0 <= v["score"] <= 1.0
        assert v["depth"] >= 1
        assert len(v["calls"]) == 2  # --retries 0: the tag call (the tree) and the NL call (scheduler)
        # its share of the tree + its NL call (prompt + generated tokens)
        assert v["tokens_decoded"] > v["calls"][1]["n_prompt_tokens"]


@model
def test_each_variant_goes_through_the_single_expand_path(model_path):
    """Re-driving the pipeline of variant i (seed derive_seed(3, i)) with the model replaced by
    the completions it recorded reproduces its output exactly: parse, post-process and format
    are those of a single `kgen expand`."""
    from kgen_cli.options import GenerationOptions

    doc = json_run(model_path, *PLAN8)
    request = GenerationOptions(retries=0, max_tokens=24).request(
        PROMPT, family="tipo", quality_line=doc["model"]["quality_line"])
    seeds = {derive_seed(3, i) for i in range(8)}
    for v in doc["variants"]:
        assert v["seed"] in seeds
        replies = iter(v["calls"])

        def model_stub(call, replies=replies):
            rec = next(replies)
            assert call.prompt == rec["prompt"] and call.seed == rec["seed"]
            return Completion(rec["completion"], rec["n_prompt_tokens"], rec["n_tokens"], rec["finish_reason"])

        result = drive(run_expand(request, v["seed"]), model_stub)
        assert result.formatted == v["formatted"]
        assert result.tag_map == v["tag_map"]


@model
def test_tree_out_writes_the_tree(model_path, tmp_path):
    tree_file = tmp_path / "tree.json"
    code, out, err = run_main("expand", PROMPT, "--model", str(model_path), *FAST, "--family", "tipo", "-n", "8",
                              "--seed", "5", "--max-tokens", "24", "--operation", "None", "--tree-out", str(tree_file))
    assert code == 0, err
    tree = json.loads(tree_file.read_text())
    assert tree["sampler"] == "tgts" and tree["group_size"] == 4 and tree["exploration"] == 1.0
    nodes = tree["nodes"]
    assert nodes[0]["parent"] is None and nodes[0]["n_tokens"] == tree["prompt_tokens"]
    assert all(nodes[c]["parent"] == n["id"] for n in nodes for c in n["children"])
    assert len(nodes) == tree["stats"]["nodes"]
    variant_leaves = [n for n in nodes if n["variant"] is not None]
    assert all(n["leaf"] and n["spent"] for n in variant_leaves)
    assert len(variant_leaves) >= len(lines_of(out))  # repeated outputs are removed after formatting
    assert tree["stats"]["peak_live_seqs"] <= 9  # the anchor + 8 (-n 8 sizes the pool at 9)


@model
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_tree_out_write_failure_keeps_the_results(model_path):
    # The tree is written last: a disk that fails then (/dev/full: ENOSPC) costs one error
    # line and exit 1, not the variants already computed.
    code, out, err = run_main("expand", PROMPT, "--model", str(model_path), *FAST, "--family", "tipo", "-n", "3",
                              "--seed", "5", "--max-tokens", "12", "--operation", "None", "--json",
                              "--tree-out", "/dev/full")
    assert code == 1
    assert 1 <= len(json.loads(out)["variants"]) <= 3
    assert err.strip().splitlines()[-1] == "Error: cannot write --tree-out /dev/full: No space left on device"


@model
@pytest.mark.parametrize("family", ["tipo", "dtg"])
def test_independent_sampler_and_both_families(model_path, family):
    args = ("-n", "6", "--family", family, "--seed", "11", "--max-tokens", "24", "--operation", "None")
    if family == "dtg":
        args = args[:-2]  # DTG has no operations: one call per variant anyway
    for sampler in ("independent", "tgts"):
        doc = json_run(model_path, *args, "--sampler", sampler)
        totals = doc["totals"]
        assert totals["sampler"] == sampler and doc["family"] == family
        lines = [v["formatted"] for v in doc["variants"]]
        assert lines and len(set(lines)) == len(lines)
        assert totals["variants"] == len(lines) and totals["requested"] == 6
        for v in doc["variants"]:
            assert v["depth"] >= 1 and 0 <= v["score"] <= 1 and v["tokens_decoded"] >= 1
            assert v["calls"][0]["seed"] == v["seed"]  # the seed its single expand would use
        # Fewer than 6 only after repeats (independent samples never stop short otherwise).
        if sampler == "independent":
            assert totals["variants"] == 6 or totals["duplicates_removed"] > 0


# ---------------------------------------------------------------------------------------------
# streaming: each line as soon as its variant is final; signals and `| head` keep what is out

# Retry chains of different lengths end the variants seconds apart (the last ~3 s after the first)
SPREAD = ("-n", "6", "--family", "tipo", "--seed", "3", "--max-tokens", "16", "--retries", "3", "--threads", THREADS)


def start_expand(model_path: Path, home: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("KGEN_DEBUG", "KGEN_MODEL")}
    env.update(KGEN_HOME=str(home), HF_HUB_CACHE=str(home / "hf-cache"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-m", "kgen_cli", "expand", PROMPT, "--model", str(model_path), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=REPO_ROOT)  # fmt: skip


@model
def test_sigint_after_the_first_variant_keeps_the_lines_printed(model_path, isolated_home):
    proc = start_expand(model_path, isolated_home, *SPREAD)
    first = proc.stdout.readline()  # printed as soon as that variant was final, not at the end
    assert first.endswith(b"\n") and proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    rest, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr.decode()[-2000:]
    lines = (first + rest).decode().splitlines()
    assert 1 <= len(lines) < 6 and len(set(lines)) == len(lines) and (first + rest).endswith(b"\n")
    assert f"interrupted: {len(lines)} of 6 variants written" in stderr.decode()
    assert "Traceback" not in stderr.decode()


@model
def test_a_closed_pipe_ends_the_run_quietly(model_path, isolated_home):
    """`kgen expand -n 6 ... | head -1`: once the reader is gone, the next decode step stops."""
    proc = start_expand(model_path, isolated_home, *SPREAD)
    assert proc.stdout.readline().endswith(b"\n")
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE, stderr[-2000:]
    assert "Error" not in stderr and "Traceback" not in stderr


@model
def test_sigterm_with_json_writes_the_variants_so_far(model_path, monkeypatch):
    """The document after a signal: what was final, stop_reason 'interrupted', exit 143. The
    signal is simulated at the first SignalStop.check (run before every step()) after the
    first variant was kept, whichever step that is on this CPU."""
    from kgen_cli.stopping import Interrupted, SignalStop

    kept, checks = [], [0]
    real_check, real_done = SignalStop.check, runner._Judge.done

    def done(self, value, error, figures):
        finished = real_done(self, value, error, figures)
        kept.append(len(self.kept))
        return finished

    def check(self):
        if kept and kept[-1] >= 1:
            raise Interrupted(signal.SIGTERM)
        checks[0] += 1
        real_check(self)

    monkeypatch.setattr(runner._Judge, "done", done)
    monkeypatch.setattr(SignalStop, "check", check)
    code, out, err = run_main("expand", PROMPT, "--model", str(model_path), *SPREAD, "--json")
    assert code == 128 + signal.SIGTERM, err
    doc = json.loads(out)
    totals = doc["totals"]
    assert totals["stop_reason"] == "interrupted" and 1 <= totals["variants"] == len(doc["variants"]) < 6
    assert totals["variants"] == kept[-1]  # what was final when the signal came, nothing after
    assert totals["tokens_decoded"] > 0 and totals["decode_steps"] == checks[0] + 1  # the prompt, + a step per check
    assert f"interrupted: {len(doc['variants'])} of 6 variants written" in err


# ---------------------------------------------------------------------------------------------
# more variants than sequence ids; memory


@model
def test_more_variants_than_the_pool_through_the_runner(model_path):
    """A pool of 4 sequence ids (anchor + 3) serves 12 variants: work queues, nothing aborts."""
    from kgen_cli.options import GenerationOptions

    request = GenerationOptions(operation="None", retries=0, temperature=1.0, max_tokens=12).request(
        PROMPT, family="tipo")
    engine, _ = runner.open_engine(runner.EngineConfig(model_path=str(model_path), n_seq_max=4, threads=int(THREADS),
                                                       n_ctx=1024))
    try:
        for sampler in ("tgts", "independent"):
            out = runner.expand_variants(engine, request, 12, 7, sampler=sampler)
            # 12, unless repeats (how many depends on the CPU's logits) or the tree stopped short
            assert 1 <= len(out.variants) <= 12
            assert len(out.variants) == 12 or out.duplicates > 0 or out.stop_reason != "complete"
            assert len({v.formatted for v in out.variants}) == len(out.variants)
            if sampler == "tgts":
                assert out.tree["stats"]["peak_live_seqs"] <= 4
            assert not engine.branches().live  # every sequence id is back in the pool
    finally:
        engine.close()


@model
def test_n_1024_exceeds_llama_cpp_256_sequences_without_abort(model_path, tmp_path):
    """N far above the 256 sequence ids llama.cpp allows, memory bounded. In a child process, so
    that an abort would show as a signal, and its peak RSS is its own."""
    tree_file = tmp_path / "tree.json"
    cmd = [sys.executable, "-m", "kgen_cli", "expand", PROMPT, "--model", str(model_path), *FAST, "-n", "1024",
           "--family", "tipo", "--max-tokens", "3", "--operation", "None", "--seed", "1", "--json", "--tree-out", str(tree_file)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    totals = json.loads(proc.stdout)["totals"]
    assert totals["requested"] == 1024 and 1 <= totals["variants"] <= 1024
    stats = json.loads(tree_file.read_text())["stats"]
    assert stats["peak_live_seqs"] <= 256
    assert stats["peak_cells"] <= json.loads(proc.stdout)["engine"]["n_ctx"]
    # a junk model writing 3 tokens soon repeats itself: the tree stops on duplicates, not an abort
    assert totals["stop_reason"] in ("complete", "duplicates", "budget", "exhausted")
    rss_mb = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    assert rss_mb < 1500, f"peak RSS {rss_mb:.0f} MB"


# ---------------------------------------------------------------------------------------------
# the BranchDecoder parts TGTS relies on


@model
def test_new_sampler_history_feeds_the_repetition_penalty(model_path):
    """A tree segment's fresh chain is told the tokens its text already has: with a strong
    penalty, greedy sampling then avoids the token it would otherwise pick."""
    from kgen_cli.engine import Engine
    from kgen_cli.sampling import SamplingParams

    greedy = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, max_tokens=4)
    penalized = greedy.with_overrides(repeat_penalty=50.0)
    with Engine(model_path, n_ctx=256, n_seq_max=4, n_threads=int(THREADS)) as engine, engine.branches() as bd:
        seq = bd.start(engine.tokenize(PROMPT))
        best = bd.fork(seq, bd.length(seq))  # shares the pending logits row
        other = bd.fork(seq, bd.length(seq))
        top = bd.sample(seq, bd.new_sampler(greedy, 0)).token
        assert bd.sample(best, bd.new_sampler(penalized, 0)).token == top  # no history: no penalty
        s = bd.sample(other, bd.new_sampler(penalized, 0, history=[top]))
        assert s.token != top and 0 < s.prob < 1


@model
def test_fewer_variants_than_asked_are_noted_on_stderr(model_path):
    # Greedy decoding gives one output: the lines printed say nothing about the missing ones.
    code, out, err = run_main("expand", PROMPT, "--model", str(model_path), *FAST, "--family", "tipo", "-n", "3",
                              "--seed", "1", "--max-tokens", "8", "--operation", "None", "--temperature", "0")
    assert code == 0, err
    got = len(lines_of(out))
    assert got < 3
    assert f"note: only {got} of 3 distinct variants: the model kept repeating itself" in err


def test_a_tree_stopped_by_its_token_budget_is_topped_up(monkeypatch):
    """Forced on the fake decoder (whether SmolLM2 reaches the budget depends on the CPU's
    logits): at a quarter of the usual budget the tree stops with 4 of 8 variants, and further
    rounds of independent samples (jobs 8, 9, ...) find the rest. Greedy decoding, which could
    only repeat itself, gets no top-up round."""
    from fake_decoder import FakeEngine
    from kgen_cli import tree
    from kgen_cli.options import GenerationOptions

    monkeypatch.setattr(tree, "BUDGET_FACTOR", tree.BUDGET_FACTOR / 4)

    def request(temperature):
        options = GenerationOptions(retries=0, format="tag-only", temperature=temperature, max_tokens=24)
        return options.request(PROMPT, family="tipo")

    engine = FakeEngine()
    out = runner.expand_variants(engine, request(None), 8, 7, sampler="tgts")
    first_round = {derive_seed(7, i) for i in range(8)}
    from_tree = [v for v in out.variants if v.seed in first_round]
    assert out.tree["stats"]["stop_reason"] == "budget" and 1 <= len(from_tree) < 8
    assert out.rounds >= 2 and len(out.variants) == 8 == len({v.formatted for v in out.variants})
    assert out.variants[: len(from_tree)] == from_tree  # the tree's first, then the top-up's
    assert out.stop_reason == "complete" and out.to_dict()["totals"]["rounds"] == out.rounds
    assert engine.decoder.live_seqs == 0 and not engine.decoder.live_samplers

    greedy = runner.expand_variants(FakeEngine(), request(0.0), 8, 7, sampler="tgts")
    assert greedy.stop_reason == "budget" and greedy.rounds == 1 and 1 <= len(greedy.variants) < 8
