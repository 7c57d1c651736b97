"""The library entry points: open a model, run expand jobs on it (one, N variants, or a batch).

The CLI commands are thin adapters over these functions. Model calls of every job go through
the continuous-batching `Scheduler` on the engine's `BranchDecoder`; the first model call of a
variants job can instead be served by the TGTS tree (`tree.tgts_sample`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable

from kgen_cli.errors import KgenError, StopRequested, UsageError
from kgen_cli.pipeline import ExpandRequest, ExpandResult, run_expand
from kgen_cli.samplers import DEFAULT_SAMPLER, TOP_UP_SAMPLER, SamplerSpec, sampler_named
from kgen_cli.sampling import MAX_SEQUENCES, SEED_MAX, Completion, CompletionRequest, derive_seed
from kgen_cli.tree import DEFAULT_EXPLORATION, DEFAULT_GROUP_SIZE
from kgen_cli.scheduler import Scheduler, prompt_too_long

DEFAULT_N_CTX = 4096  # the smallest context kgen sizes by itself
DEFAULT_N_CTX_MAX = 65536  # the largest (--n-ctx may ask for up to sampling.MAX_N_CTX)
# One model call's context (prompt + new tokens) for a file the registry does not describe: the
# peers load every TIPO and DTG GGUF with n_ctx=1024, and a GGUF's own n_ctx_train may be the
# base architecture's, not the length the model was trained on.
DEFAULT_CONTEXT_LENGTH = 1024


def random_seed() -> int:
    """A fresh seed in [0, 2**32 - 2] (0xFFFFFFFF would make llama.cpp pick its own)."""
    return random.SystemRandom().randint(0, SEED_MAX)


@dataclass
class EngineConfig:
    model_path: str
    n_ctx: int | None = None
    gpu_layers: int | str = "auto"
    threads: int | None = None
    verbose: bool = False
    n_seq_max: int = 1
    context_length: int | None = None  # one call's context: --context-length, else the registry's
    max_tokens: int | None = None  # per model call, when known: sizes the default context
    kv_unified: bool = True  # False: a KV stream per sequence (kgen batch without trees)


def default_n_ctx(sequences: int, max_tokens: int | None = None) -> int:
    """KV cells for this many concurrent sequences: the cache is unified and shared prompt cells
    count once, so about 384 cells per extra sequence covers a TIPO call (prompt + ~200 tokens).
    With `max_tokens` known: a shared prompt plus max_tokens + 128 (a later call's own prompt
    part) per extra sequence, so that `-n 64 --max-tokens 64` does not allocate (and clear) a
    cache sized for 512-token calls. Whatever the size, the tree and the scheduler wait for
    cells rather than overflow them."""
    if max_tokens is not None:
        return min(DEFAULT_N_CTX_MAX, max(DEFAULT_N_CTX, 512 + max(0, sequences - 1) * (max_tokens + 128)))
    return min(DEFAULT_N_CTX_MAX, DEFAULT_N_CTX + max(0, sequences - 1) * 384)


def open_engine(config: EngineConfig):
    """Load the model and create the context; returns (engine, load seconds)."""
    from kgen_cli import engine as engine_mod

    engine_mod.check_gguf(config.model_path)
    layers = config.gpu_layers
    if layers == "auto":
        layers = 10_000 if engine_mod.gpu_offload_supported() else 0
    elif layers == "all":
        layers = 10_000
    n_ctx = config.n_ctx or default_n_ctx(config.n_seq_max, config.max_tokens)
    if config.context_length is not None and config.context_length < 1:
        raise UsageError("--context-length must be at least 1")
    started = time.perf_counter()
    eng = engine_mod.Engine(
        config.model_path,
        n_ctx=n_ctx,
        n_gpu_layers=int(layers),
        n_threads=config.threads,
        n_seq_max=max(1, min(config.n_seq_max, MAX_SEQUENCES)),
        verbose=config.verbose,
        kv_unified=config.kv_unified,
    )
    window = config.context_length or min(DEFAULT_CONTEXT_LENGTH, eng.model_info["n_ctx_train"] or DEFAULT_CONTEXT_LENGTH)
    eng.window = min(eng.n_ctx_seq, window)
    return eng, time.perf_counter() - started


def tokenizer(engine) -> Callable[[str], list[int]]:
    return lambda text: engine.tokenize(text, add_bos=True)


def expand(engine, request: ExpandRequest, seed: int, *, on_text: Callable[[str], None] | None = None) -> ExpandResult:
    """One prompt, start to finish (every operation and retry)."""
    results: dict[Hashable, tuple[Any, BaseException | None]] = {}
    scheduler = Scheduler(
        engine.branches(), tokenizer(engine), n_ctx=engine.n_ctx, window=engine.window, parallel=1,
        on_piece=(lambda _key, text: on_text(text)) if on_text else None,
    )
    scheduler.run([(0, run_expand(request, seed))], lambda k, v, e: results.__setitem__(k, (v, e)))
    value, error = results[0]
    if error is not None:
        raise error
    return value


@dataclass
class VariantsResult:
    """N variants of one prompt (iterable: the ExpandResults, in the order they were found)."""

    variants: list[ExpandResult]
    duplicates: int  # generated variants dropped as repeats (the tree's repeated leaves + same output)
    tokens_decoded: int  # NFE: every token fed to llama_decode for this run, prompts included
    wall_seconds: float
    sampler: str
    tree: dict | None = None
    per_variant: list[dict] = field(default_factory=list)  # score, tokens decoded, depth
    requested: int = 0
    steps: int = 0  # llama_decode calls
    stop_reason: str = "complete"  # why the first-call sampler stopped (tree.tgts_sample)
    rounds: int = 1  # generation rounds (further ones replace variants that repeated an earlier one)

    def __iter__(self):
        return iter(self.variants)

    def __len__(self) -> int:
        return len(self.variants)

    def __getitem__(self, index: int) -> ExpandResult:
        return self.variants[index]

    def to_dict(self) -> dict:
        n = len(self.variants)
        extras = self.per_variant or [{}] * n
        return {
            "variants": [dict(v.to_dict(), **extra) for v, extra in zip(self.variants, extras)],
            "totals": {
                "requested": self.requested or n,
                "variants": n,
                "duplicates_removed": self.duplicates,
                "tokens_decoded": self.tokens_decoded,
                "decode_steps": self.steps,
                "wall_seconds": round(self.wall_seconds, 4),
                "variants_per_second": round(n / self.wall_seconds, 3) if self.wall_seconds > 0 else None,
                "sampler": self.sampler,
                "stop_reason": self.stop_reason,
                "rounds": self.rounds,
            },
        }


def shortfall(got: int, requested: int, stop_reason: str = "complete") -> str | None:
    """The stderr note for fewer distinct variants than asked (None when all came back). Short
    runs end on repeats (stop reasons complete, duplicates, budget) unless the tree had no room."""
    if got >= requested:
        return None
    why = "the tree had no room to grow" if stop_reason == "exhausted" else "the model kept repeating itself"
    return f"only {got} of {requested} distinct variants: {why}"


# Rounds of `expand_variants`: when post-processing maps different generations to the same
# prompt, the missing variants are generated again (new seeds), while rounds still add some.
MAX_ROUNDS = 4


def round_size(n: int, found: int, rounds: int, added: int) -> int:
    """How many jobs the next round of N-variant generation draws; 0: no further round.
    `found` distinct so far after `rounds` rounds, `added` of them by the last one. A further
    round draws more than it misses (the likeliest outputs come back first)."""
    if rounds == 0:
        return n
    if found >= n or rounds >= MAX_ROUNDS or added == 0:
        return 0
    return min(n, 2 * (n - found) + 2)


def keep_distinct(items: Iterable, formatted: Callable[[Any], str], n: int, seen: set[str], kept: list) -> int:
    """Append to `kept` (at most `n` in all), in order, the items whose `formatted(item)` is not
    in `seen`; returns how many repeats were dropped on the way."""
    dropped = 0
    for item in items:
        if len(kept) == n:
            break
        if (line := formatted(item)) in seen:
            dropped += 1
            continue
        seen.add(line)
        kept.append(item)
    return dropped


def expand_variants(
    engine,
    request: ExpandRequest,
    n: int,
    seed: int,
    *,
    sampler: str = DEFAULT_SAMPLER,
    group_size: int = DEFAULT_GROUP_SIZE,
    exploration: float = DEFAULT_EXPLORATION,
    parallel: int | None = None,
    check: Callable[[], None] | None = None,
    on_variant: Callable[[ExpandResult, dict], None] | None = None,
) -> VariantsResult:
    """N distinct variants of one prompt (fewer only when the model cannot give more).

    Variant i runs the normal pipeline (parse, model calls, post-process, format) with seed
    `derive_seed(seed, i)`. Their first model calls have the same prompt: with `tgts` they are
    served together by the token-group tree (`tree.tgts_sample`), with `independent` by N
    sampled sequences forked from the prompt's KV cache (`tree.independent_sample`, variant i
    sampled with the seed its own single expand would use). Later calls (retries, further
    operations) are batched by the continuous-batching scheduler. Under TGTS a variant that ends
    with its first call on a line an earlier one gave is refused inside the tree, which grows
    another leaf for that job. Variants whose formatted output still repeats an earlier one
    (after later calls, or past n refusals) are removed, and the missing ones are drawn in a
    further round (jobs n, n+1, ...: new seeds; twice as many as missing, plus 2, the first
    distinct ones to end kept, the rest dropped then; independent samples even after a TGTS
    round), up to `MAX_ROUNDS` rounds while each adds a variant.
    When the tree stops short on a streak of repeats (a model that keeps repeating itself) or
    for lack of room, no further round runs: fewer variants come back, and `stop_reason` says
    why. After its token budget, top-up rounds still run (unless decoding is greedy). `check()` runs
    before every decode step and may raise `StopRequested` to stop (signals); the exception then
    carries the variants final so far as `partial` (a VariantsResult, stop_reason "interrupted").

    Variants are judged in the order their jobs end, so the first of equal lines is kept and
    the list is in that order. `on_variant(result, figures)` streams: it sees each variant as
    soon as it is kept, which is final; `figures` is its entry of `per_variant`.
    """
    started = time.perf_counter()
    counters = getattr(engine, "counters", None)
    steps_before = counters.decode_calls if counters else 0
    tokens_before = counters.tokens if counters else 0
    kept: list[tuple[ExpandResult, dict]] = []
    seen: set[str] = set()
    dups = tokens = rounds = 0
    tree_json, stop_reason, next_job, added = None, "complete", 0, 0

    def result(reason: str, tokens: int) -> VariantsResult:
        return VariantsResult(
            [v for v, _ in kept], dups, tokens, time.perf_counter() - started, sampler if n > 1 else "single",
            tree_json, [e for _, e in kept], requested=n, steps=(counters.decode_calls - steps_before) if counters else 0,
            stop_reason=reason, rounds=rounds,
        )  # fmt: skip

    try:
        # After a tree that hit its token budget a sampling model may well have more to give
        # (short outputs make many equal leaves): top-up rounds still run. Not for greedy
        # decoding, where they could only reorder the same text (post-processing shuffles new
        # tags by seed); nor after a streak of repeats, nor when the tree had no room.
        go_on = ("complete", "budget") if request.params is None or request.params.temperature > 0 else ("complete",)
        while stop_reason in go_on and (want := round_size(n, len(kept), rounds, added)):
            judge = _Judge(n, seen, kept, on_variant)
            before = len(kept)
            # A top-up round is a few variants: independent samples decode them in one pass, where a
            # new tree would first have to grow (its steps come one segment deep at a time).
            done = _variants_round(engine, request, range(next_job, next_job + want), seed,
                                   TOP_UP_SAMPLER if rounds else sampler, group_size, exploration,
                                   parallel or max(1, min(n, engine.n_seq_max)), check, judge.done)  # fmt: skip
            next_job, rounds = done.next_job, rounds + 1
            tokens += done.tokens
            tree_json = tree_json or done.tree
            stop_reason = done.stop_reason
            judge.finish()  # a job's error
            dups += done.tree_duplicates + judge.dropped
            added = len(kept) - before
    except StopRequested as stop:
        rounds += 1  # the one it stopped
        stop.partial = result("interrupted", (counters.tokens - tokens_before) if counters else tokens)
        raise
    return result(stop_reason, tokens)


class _Judge:
    """A round's results judged as they arrive (the tree serves jobs as leaves end, the scheduler
    as calls end): `keep_distinct` keeps the first of equal lines, so a kept result is final at
    once and `on_kept` can stream it. `done` returns True once `n` are kept."""

    def __init__(self, n: int, seen: set[str], kept: list, on_kept: Callable | None):
        self.n, self.seen, self.kept, self.on_kept = n, seen, kept, on_kept
        self.dropped = 0
        self.error: BaseException | None = None

    def done(self, value: Any, error: BaseException | None, figures: dict) -> bool:
        if error is not None:
            self.error = self.error or error  # raised at finish(); later results still count
        elif len(self.kept) < self.n:
            before = len(self.kept)
            self.dropped += keep_distinct([(value, figures)], lambda r: r[0].formatted, self.n, self.seen, self.kept)
            if len(self.kept) > before and self.on_kept is not None:
                self.on_kept(value, figures)
        return len(self.kept) == self.n

    def finish(self) -> None:
        if self.error is not None:
            raise self.error


class _Enough(Exception):
    """The round has the variants it was for: the jobs still running are dropped."""


@dataclass
class _Round:
    tokens: int
    tree: dict | None
    stop_reason: str
    tree_duplicates: int
    next_job: int  # the first job id it did not use


def _variants_round(engine, request: ExpandRequest, job_ids: range, seed: int, sampler: str, group_size: int,
                    exploration: float, parallel: int, check: Callable[[], None] | None,
                    report: Callable[[Any, BaseException | None, dict], bool]) -> _Round:  # fmt: skip
    """Run jobs `job_ids` of `expand_variants` (job i with seed `derive_seed(seed, i)`).

    `report(result, error, figures)` is called as each job ends, in any order; True means
    enough, and the jobs still running are dropped. Jobs the tree could not serve (see
    stop_reason) are never reported. A job that ends with its first call on a line an earlier
    one gave is refused there (see `serve`): under TGTS a fresh copy of it waits for another
    leaf; an independent sample is replaced by the next job's (ids from job_ids.stop on)."""
    spec = sampler_named(sampler)
    jobs = {i: run_expand(request, derive_seed(seed, i)) for i in job_ids}
    per_variant: dict[int, dict] = {}  # the first call's figures of each job (score, tokens, depth)
    ended: set[int] = set()
    skipped: set[int] = set()  # jobs the tree could not give a distinct first call (see stop_reason)
    last_id = job_ids.stop - 1
    counters = getattr(engine, "counters", None)
    tokens_before = counters.tokens if counters else 0

    def on_result(i: int, value: Any, error: BaseException | None) -> None:
        ended.add(i)
        figures = dict(per_variant.get(i, {}))
        if figures and value is not None:  # later model calls (scheduler): prompt + decoded tokens
            figures["tokens_decoded"] += sum(_call_tokens(c) for c in value.calls[1:])
        if report(value, error, figures) and any(j not in ended and j not in skipped for j in jobs):
            raise _Enough()

    first: dict[int, CompletionRequest] = {}
    next_request: dict[int, CompletionRequest] = {}  # jobs given their first call's result: what they ask next
    tree_json, tokens, stop_reason, tree_dups = None, 0, "complete", 0
    try:
        for i, job in list(jobs.items()):
            try:
                first[i] = next(job)
            except StopIteration as stop:  # a request that needs no model call
                on_result(i, stop.value, None)
        lead = first[min(first)] if first else None
        # Every job asks the same first call (the prompt does not depend on the seed); one that
        # does not goes through the scheduler like any later call.
        shared = [i for i in first if first[i].prompt == lead.prompt and first[i].params == lead.params] if lead else []
        if len(shared) > 1:
            taken: list[int] = []  # jobs served so far, in `shared` order
            lines: set[str] = set()  # results of the jobs that ended with their first call
            refused: list[int] = []
            # Sample k is job job_ids.start + k (its seed), for replacements too: only when the
            # jobs are exactly job_ids, so that their ids go on from job_ids.stop.
            can_replace = spec.tree or shared == list(job_ids)

            def serve(variant, completion: Completion) -> bool:
                """Give a job its first call's result: the next job in `shared` a tree leaf, job
                i sample i. A job that ends with it on a line another job gave refuses it (at
                most len(shared) times, about a round's worth: a format that shows none of the
                model's text must not keep the sampler searching): under TGTS the tree grows
                another leaf and a fresh copy of the job waits for it; an independent sample
                is spent, and the sampler starts the next one for the next job id."""
                nonlocal last_id
                if spec.tree:
                    i = shared[len(taken)]
                elif variant.index < len(shared):
                    i = shared[variant.index]
                else:
                    i = last_id = job_ids.start + variant.index
                    jobs[i] = run_expand(request, derive_seed(seed, i))
                    first[i] = next(jobs[i])
                per_variant[i] = {"score": round(variant.score, 6), "tokens_decoded": variant.n_decoded,
                                  "depth": variant.depth}  # fmt: skip
                try:
                    next_request[i] = jobs[i].send(completion)
                except StopIteration as stop:
                    if can_replace and stop.value.formatted in lines and len(refused) < len(shared):
                        refused.append(i)
                        if spec.tree:
                            jobs[i] = run_expand(request, derive_seed(seed, i))
                            next(jobs[i])
                        else:
                            del jobs[i]
                        return False
                    lines.add(stop.value.formatted)
                    taken.append(i)
                    on_result(i, stop.value, None)
                    return True
                except KgenError as exc:  # reported like any job error (as the scheduler does)
                    taken.append(i)
                    on_result(i, None, exc)
                    return True
                taken.append(i)
                return True

            out = _first_calls(engine, lead, len(shared), spec, group_size, exploration, check, serve)
            prompt_len = out.tree.get("prompt_tokens", 0)
            tree_json, tokens = out.tree, out.total_decoded + prompt_len  # + the prompt, decoded once
            stop_reason, tree_dups = out.stats.get("stop_reason", "complete"), out.stats.get("duplicates", 0)
            if spec.tree:
                skipped = set(shared[len(out.variants):])
                for i in skipped:
                    jobs[i].close()

        def continue_jobs():
            for i, job in list(jobs.items()):
                if i not in ended and i not in skipped:
                    yield i, _resume(job, next_request.get(i, first[i]))

        scheduler = Scheduler(_branches(engine, check), tokenizer(engine), n_ctx=engine.n_ctx,
                              window=engine.window, parallel=parallel)
        try:
            scheduler.run(continue_jobs(), on_result)
        finally:
            tokens += scheduler.stats.tokens_decoded
    except _Enough:
        if counters:
            tokens = counters.tokens - tokens_before
    return _Round(tokens, tree_json, stop_reason, tree_dups, last_id + 1)


def _call_tokens(call) -> int:
    """Tokens a scheduler call decoded: its prompt, then every generated token but the last one
    when the length limit ended it (it is sampled, never fed back)."""
    return call.n_prompt_tokens + call.n_tokens - (1 if call.finish_reason == "length" else 0)


def _resume(job, request):
    """Wrap a job whose next request was already pulled, so the scheduler can start it."""
    completion = yield request
    while True:
        try:
            request = job.send(completion)
        except StopIteration as stop:
            return stop.value
        completion = yield request


class _Checked:
    """A BranchDecoder that runs `check()` before every step, where a stop request may raise."""

    def __init__(self, decoder, check: Callable[[], None]):
        self._decoder, self._check = decoder, check

    def __getattr__(self, name: str):
        return getattr(self._decoder, name)

    def step(self, feeds: dict[int, list[int]]) -> None:
        self._check()
        self._decoder.step(feeds)


def _branches(engine, check: Callable[[], None] | None):
    decoder = engine.branches()
    return decoder if check is None else _Checked(decoder, check)


def _completion(variant, prompt_len: int) -> Completion:
    """A tree variant as the model call's result its job receives."""
    return Completion(text=variant.text, n_prompt_tokens=prompt_len, n_tokens=len(variant.tokens),
                      finish_reason="stop" if variant.finished else "length")


def _first_calls(engine, request: CompletionRequest, n: int, spec: SamplerSpec, group_size: int,
                 exploration: float, check: Callable[[], None] | None, serve: Callable[[Any, Completion], bool]):
    """Serve n identical first model calls at once with the sampler `spec`: e.g. one TGTS tree,
    or n independent samples (sample i with seed `derive_seed(request.seed, i)`, the seed job i
    would use) sharing the prompt's KV cells. Returns the `tree.TreeResult`.
    `serve(variant, completion)` sees each variant as it ends, with the model call's result it
    makes, and may refuse it (the sampler's `accept`)."""
    prompt = engine.tokenize(request.prompt, add_bos=True)
    max_tokens = min(request.params.max_tokens, engine.window - len(prompt))
    if max_tokens < 1:
        raise prompt_too_long(len(prompt), engine.window, engine.n_ctx)
    decoder = _branches(engine, check)
    tuning = {"exploration": exploration} if spec.explores else {}
    return spec.sample(decoder, prompt, n, request.params, request.seed, group_size=group_size,
                       max_tokens=max_tokens, max_cells=engine.n_ctx,
                       accept=lambda v: serve(v, _completion(v, len(prompt))), **tuning)
