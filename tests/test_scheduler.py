"""The continuous-batching scheduler on the fake decoder: order, sharing, refill, errors."""

from __future__ import annotations

import pytest

from fake_decoder import FakeDecoder
from kgen_cli.errors import UsageError
from kgen_cli.sampling import Completion, CompletionRequest, SamplingParams
from kgen_cli.scheduler import Scheduler

PARAMS = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.1, repeat_penalty=1.0, max_tokens=40)


def tokenize(text: str) -> list[int]:
    """Fake tokenizer: one 'word' token per character class, ending with the newline token 2."""
    return [3 + (ord(c) % 60) for c in text] + [2]


def job(prompts: list[str], seed: int, log: list):
    """A job that makes one call per prompt and returns the texts it got."""
    texts = []
    for i, prompt in enumerate(prompts):
        completion = yield CompletionRequest(prompt, seed + i, PARAMS)
        assert isinstance(completion, Completion)
        log.append((seed, i, completion.n_tokens))
        texts.append(completion.text)
    return texts


def run(decoder, jobs, parallel=4, n_ctx=4096):
    results = {}
    sched = Scheduler(decoder, tokenize, n_ctx=n_ctx, parallel=parallel)
    sched.run(jobs, lambda k, v, e: results.__setitem__(k, (v, e)))
    return results, sched


def test_every_job_finishes_with_its_own_results():
    log: list = []
    decoder = FakeDecoder(max_branches=8)
    results, sched = run(decoder, [(k, job([f"prompt {k}", f"again {k}"], k * 10, log)) for k in range(10)])
    assert sorted(results) == list(range(10))
    assert all(e is None and len(v) == 2 for v, e in results.values())
    assert decoder.live_seqs == 0 and not decoder.live_samplers
    assert sched.stats.generated_tokens == sum(n for _, _, n in log)


def test_same_jobs_same_seeds_give_identical_results_whatever_the_parallelism():
    a, _ = run(FakeDecoder(), [(k, job([f"p{k}"], k, [])) for k in range(6)], parallel=1)
    b, _ = run(FakeDecoder(), [(k, job([f"p{k}"], k, [])) for k in range(6)], parallel=6)
    assert a == b


def test_one_decode_per_step_for_all_live_sequences():
    decoder = FakeDecoder()
    _, sched = run(decoder, [(k, job(["same prompt"], k, [])) for k in range(8)], parallel=8)
    # All prompts are admitted together, so the decoder sees far fewer steps than tokens.
    assert decoder.n_steps == sched.stats.steps
    assert max(decoder.batch_sizes) == 8
    assert decoder.n_steps < sched.stats.generated_tokens / 4


def test_identical_prompts_share_the_prefix():
    decoder = FakeDecoder()
    _, sched = run(decoder, [(k, job(["one shared prompt"], k, [])) for k in range(5)], parallel=5)
    n_prompt = len(tokenize("one shared prompt"))
    assert sched.stats.prompt_tokens_shared == 4 * (n_prompt - 1)
    assert decoder.forks == 4


def test_free_slot_is_refilled_before_others_finish():
    decoder = FakeDecoder(max_branches=2)
    _, sched = run(decoder, [(k, job([f"prompt number {k}"], k, [])) for k in range(6)], parallel=2)
    assert decoder.peak_live <= 2
    assert sched.stats.steps < sum([40] * 6)  # never one-at-a-time


def test_errors_of_one_job_do_not_stop_the_others():
    def bad():
        raise UsageError("bad line")
        yield  # pragma: no cover

    results, _ = run(FakeDecoder(), [(0, job(["fine"], 0, [])), (1, bad()), (2, job(["fine too"], 2, []))])
    assert results[1][0] is None and isinstance(results[1][1], UsageError)
    assert results[0][1] is None and results[2][1] is None


def test_prompt_longer_than_the_context_is_an_error_not_a_crash():
    results, _ = run(FakeDecoder(), [(0, job(["x" * 100], 0, []))], n_ctx=50)
    value, error = results[0]
    assert value is None and "longer than the context" in str(error)


def test_max_tokens_caps_each_call():
    log: list = []
    run(FakeDecoder(), [(0, job(["cap me"], 1, log))])
    assert all(n <= PARAMS.max_tokens for _, _, n in log)


class NoTruncate:
    """The fake decoder without `truncate`: every call decodes its whole prompt."""

    def __init__(self, decoder: FakeDecoder):
        self._decoder = decoder

    def __getattr__(self, name):
        if name == "truncate":
            raise AttributeError(name)
        return getattr(self._decoder, name)


def retrying_job(k: int, log: list):
    """Like a TIPO operation's retries: each call's prompt is the previous one plus its output."""
    prompt = f"aspect_ratio: 1.0\ntag: subject {k}, "
    texts = []
    for attempt in range(4):
        completion = yield CompletionRequest(prompt, k * 10 + attempt, PARAMS)
        log.append(completion.n_prompt_tokens)
        texts.append(completion.text)
        prompt += completion.text.replace("\n", " ") + ", more, "
    return texts


def test_a_jobs_next_call_reuses_its_previous_sequence_and_decodes_only_what_differs():
    jobs = lambda: [(k, retrying_job(k, [])) for k in range(6)]  # noqa: E731
    plain, plain_sched = run(NoTruncate(FakeDecoder(max_branches=4)), jobs(), parallel=3)
    decoder = FakeDecoder(max_branches=4)
    reused, sched = run(decoder, jobs(), parallel=3)
    assert reused == plain and all(e is None for _, e in reused.values())  # the same texts
    assert decoder.truncations >= 6 * 3 - 2  # (nearly) every retry kept the previous prompt's cells
    assert sched.stats.prompt_tokens_shared > sched.stats.prompt_tokens / 2
    assert sched.stats.tokens_decoded == plain_sched.stats.tokens_decoded - sched.stats.prompt_tokens_shared
    assert decoder.live_seqs == 0 and decoder.live_cells == 0 and not decoder.live_samplers


def test_an_inherited_sequence_is_freed_when_the_job_ends_or_must_wait():
    # n_ctx so small that a retry often has to wait for cells: its sequence is not kept meanwhile
    decoder = FakeDecoder(max_branches=8)
    results, sched = run(decoder, [(k, retrying_job(k, [])) for k in range(8)], parallel=8, n_ctx=800)
    assert all(e is None for _, e in results.values())
    assert 0 < decoder.truncations < 8 * 3  # some retries reused their sequence, some had to wait
    assert decoder.live_seqs == 0 and decoder.live_cells == 0 and decoder.peak_cells <= 800


def test_an_error_mid_run_releases_every_sequence_and_sampler():
    class Boom(Exception):
        pass

    decoder = FakeDecoder(max_branches=8)
    sched = Scheduler(decoder, tokenize, n_ctx=4096, parallel=4)
    seen = []

    def on_result(key, value, error):
        seen.append(key)
        if len(seen) == 2:
            raise Boom

    with pytest.raises(Boom):
        sched.run([(k, retrying_job(k, [])) for k in range(6)], on_result)
    assert decoder.live_seqs == 0 and decoder.live_cells == 0 and not decoder.live_samplers


def test_window_caps_each_call_and_skips_optional_calls_without_room():
    """One call spans at most `window` positions: new tokens are capped to fit; a may_skip
    request that leaves less than room_needed() is answered with no_room and never decoded."""
    long_prompt = "y" * 90  # 91 tokens with the newline

    def windowed_job():
        first = yield CompletionRequest("x" * 60, 1, PARAMS)  # 61 tokens: 39 left of 100
        skipped = yield CompletionRequest(long_prompt, 2, PARAMS, may_skip=True)  # 9 left < 40
        return first, skipped

    decoder = FakeDecoder()
    results = {}
    sched = Scheduler(decoder, tokenize, n_ctx=4096, parallel=2, window=100)
    sched.run([(0, windowed_job())], lambda k, v, e: results.__setitem__(k, (v, e)))
    (first, skipped), error = results[0]
    assert error is None
    assert first.n_tokens <= 100 - 61 and first.finish_reason in ("stop", "length")
    assert (skipped.finish_reason, skipped.n_tokens, skipped.n_prompt_tokens) == ("no_room", 0, 91)
    assert len(decoder.allocations) == 1 and decoder.live_seqs == 0  # the skipped call took no sequence


def test_a_first_call_longer_than_the_window_is_the_jobs_error():
    results, _ = run(FakeDecoder(), [(0, job(["x" * 100], 0, []))], n_ctx=4096)
    assert results[0][1] is None
    results = {}
    sched = Scheduler(FakeDecoder(), tokenize, n_ctx=4096, window=50)
    sched.run([(0, job(["x" * 100], 0, []))], lambda k, v, e: results.__setitem__(k, (v, e)))
    assert "longer than the context (50); raise --context-length" in str(results[0][1])


def test_streamed_text_holds_back_split_multibyte_characters():
    """A token's piece may end inside a UTF-8 character: the stream waits for the rest."""
    import types

    seen: list[str] = []
    scheduler = Scheduler(FakeDecoder(4), lambda _text: [1], n_ctx=64, on_piece=lambda _key, text: seen.append(text))
    call = types.SimpleNamespace(key=0)
    data = "日本, 🎉".encode()
    for i in range(len(data)):
        scheduler._stream(call, data[i : i + 1])
    assert "".join(seen) == "日本, 🎉" and all("\ufffd" not in s for s in seen)
