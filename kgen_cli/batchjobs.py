"""Running a batch of input records as concurrent expand jobs (continuous batching).

Each record becomes one expand job (`pipeline.run_expand`), or N with `-n N`; the jobs run on the
continuous-batching `Scheduler` over the engine's `BranchDecoder`: up to `parallel` model calls
decode together, one `llama_decode` per token step, and a finished call's slot goes to the next
waiting request at once. Records are pulled from their (lazy) iterator only when there is room,
so the input is streamed. With `-n N` and the TGTS sampler a record's N variants come from one
token-group tree instead (`runner.expand_variants`), records one after another.

Pure Python above the decoder protocol: tested with the fake decoder as well as the real engine.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from kgen_cli.console import debug_enabled
from kgen_cli.errors import KgenError, StopRequested, UsageError
from kgen_cli.options import GenerationOptions
from kgen_cli.pipeline import call_totals, run_expand
from kgen_cli.runner import DEFAULT_N_CTX, DEFAULT_N_CTX_MAX, keep_distinct, round_size
from kgen_cli.samplers import TOP_UP_SAMPLER, sampler_named
from kgen_cli.sampling import derive_seed, validate_params
from kgen_cli.tree import DEFAULT_EXPLORATION, DEFAULT_GROUP_SIZE
from kgen_cli.scheduler import Scheduler

# KV cells budgeted per concurrent sequence beyond its max_tokens: room for the prompt. A TIPO
# first prompt is ~30-150 tokens; retries and later operations carry the previous output, so
# they need more and may then run a little less parallel (they wait for cells, never fail).
PROMPT_CELLS = 256
# A new prompt that starts with this many tokens of a live one forks it instead of decoding them
# again: TIPO prompts share a ~20-token header ("aspect_ratio: ...\ntarget: ...\ntag: ").
SHARE_PREFIX = 8


def use_kv_streams(*, trees: bool, context_length: int, max_tokens: int, retries: int | None) -> bool:
    """Whether `kgen batch` gives each sequence its own KV stream instead of one shared buffer.

    In the shared buffer every token's attention reads every used cell of every sequence
    (masked): fine for short calls, and forks there share cells (TIPO's header, TGTS trees). With
    long calls (retries carry the earlier outputs up to the context length) that scan dominates,
    and a stream per sequence measured 1.3x faster on TIPO's full plan (16 prompts with retries);
    on 64-token single calls the shared buffer was 1.25x faster. Trees need the shared buffer:
    they fork partial prefixes."""
    if trees:
        return False
    longest = max_tokens + (context_length if retries != 0 else PROMPT_CELLS)
    return longest > 2 * PROMPT_CELLS


def batch_n_ctx(parallel: int, max_tokens: int, context_length: int, *, unified: bool = True) -> int:
    """The default context for `kgen batch --parallel K`.

    Unified (TGTS trees): the scheduler reserves a call's prompt + max_tokens cells while it
    runs, so K calls at once need about K x (max_tokens + a prompt); TIPO defaults (512 tokens),
    K = 16: 12288 cells. A stream per sequence: each stream holds a whole call, K x the context
    length (1024: 16384 cells)."""
    if unified:
        want = parallel * (max_tokens + PROMPT_CELLS)
    else:
        want = parallel * (-(-context_length // 256) * 256)
    want = -(-want // 256) * 256
    return max(DEFAULT_N_CTX, min(DEFAULT_N_CTX_MAX, want))


@dataclass
class BatchStats:
    """What a batch did, from the decoder's side (timing-free evidence of continuous batching)."""

    records: int = 0
    failed: int = 0
    model_calls: int = 0  # sequences opened or forked: one per model call
    steps: int = 0  # llama_decode calls
    tokens_decoded: int = 0  # prompts included
    prompt_tokens_shared: int = 0  # prompt tokens forked from a live sequence instead of decoded
    generated_tokens: int = 0
    peak_sequences: int = 0  # the most sequences fed in one decode step
    refills: int = 0  # calls admitted while other sequences were mid-generation
    peak_pending: int = 0  # the most finished records held back for ordering (set by the caller)

    def summary(self) -> str:
        return (f"{self.records} prompts ({self.failed} failed), {self.model_calls} model calls, "
                f"{self.steps} decode steps, up to {self.peak_sequences} sequences at once, "
                f"{self.refills} slot refills, {self.tokens_decoded} tokens decoded "
                f"({self.generated_tokens} generated, {self.prompt_tokens_shared} prompt tokens shared)")


class _Instrumented:
    """The decoder as the scheduler sees it: counts concurrency and refills, and runs `check`
    before every decode step (where a stop request may raise: no result is half-written then)."""

    def __init__(self, decoder: Any, stats: BatchStats, check: Callable[[], None] | None):
        self._decoder = decoder
        self._stats = stats
        self._check = check
        self._live: set[int] = set()
        if not callable(getattr(decoder, "truncate", None)):
            self.truncate = None  # the scheduler then frees finished sequences instead

    def __getattr__(self, name: str) -> Any:
        return getattr(self._decoder, name)

    def _admitted(self, seq: int) -> None:
        if self._stats.steps and self._live:
            self._stats.refills += 1
        self._live.add(seq)
        self._stats.model_calls += 1

    def open(self) -> int:
        seq = self._decoder.open()
        self._admitted(seq)
        return seq

    def fork(self, parent: int, keep: int) -> int:
        seq = self._decoder.fork(parent, keep)
        self._admitted(seq)
        return seq

    def truncate(self, seq: int, keep: int) -> None:
        # A job's next call taking over its finished call's sequence: a model call admitted too.
        self._decoder.truncate(seq, keep)
        self._admitted(seq)

    def free(self, seq: int) -> None:
        self._decoder.free(seq)
        self._live.discard(seq)

    def step(self, feeds: dict[int, list[int]]) -> None:
        if self._check is not None:
            self._check()
        self._decoder.step(feeds)
        self._stats.steps += 1
        self._stats.peak_sequences = max(self._stats.peak_sequences, len(feeds))


def _failing(error: BaseException):
    """A job that fails at once (a bad input line), so errors flow through the same path."""
    raise error
    yield  # pragma: no cover - makes this a generator


@contextmanager
def _record_errors():
    """Unexpected exceptions inside (a bug met on one odd model output) become a KgenError that
    fails the record only; a stop request (StopRequested) still stops the batch."""
    try:
        yield
    except (KgenError, StopRequested):
        raise
    except Exception as exc:
        if debug_enabled():
            raise
        raise KgenError(f"internal error: {type(exc).__name__}: {exc}") from exc


def _guarded(job):
    """A job whose unexpected exceptions fail its record only."""
    with _record_errors():
        return (yield from job)


def _group(rec, request, seed: int | None, jobs: int, started: float) -> dict:
    """A record in flight: its variants' results so far (job order) and what they kept."""
    return {"rec": rec, "request": request, "seed": seed, "started": started, "left": jobs,
            "results": [None] * jobs, "error": None, "rounds": 1, "checked": 0, "kept": [], "seen": set(),
            "duplicates": 0}


def _timings(results, started: float) -> dict:
    totals = call_totals([c for r in results for c in r.calls])
    return dict(totals, wall_seconds=round(time.perf_counter() - started, 4))


def line_request(rec, defaults: GenerationOptions, base_seed: int, *, family: str = "tipo",
                 quality_line: bool = False):
    """(ExpandRequest, seed) for one record: the command's options with the line's own on top
    (a line's aspect ratio replaces the command's, whichever way either was given).
    Raises UsageError for a bad line."""
    if rec.error:
        raise UsageError(rec.error)
    fields = dict(rec.fields)
    seed = fields.pop("seed", None)
    if seed is None:
        seed = derive_seed(base_seed, rec.index)
    text = fields.pop("tags", "")
    request = defaults.updated(fields).request(text, family=family, quality_line=quality_line)
    validate_params(request.params, seed)
    return request, seed


def run_batch(engine, records: Iterable, defaults: GenerationOptions, base_seed: int, **kw) -> BatchStats:
    """`BatchRun(engine, defaults, base_seed, **kw).run(records)`."""
    return BatchRun(engine, defaults, base_seed, **kw).run(records)


class BatchRun:
    """Expand records concurrently (continuous batching) on one engine.

    `results(records)` yields (rec, result, error) once per record as it finishes (in finishing
    order, not input order); `run(records)` hands them to `on_done` instead. Record i uses the seed `base_seed + i` unless it sets its own; variant v of it
    uses `derive_seed(seed, v)`, as `kgen expand -n N --sampler independent` does, and the N
    variants' identical first prompts share their KV cells. Variants that format to the same line
    are replaced by further rounds (variants N, N+1, ...; `runner.round_size`) as slots free up,
    so a record gets N distinct variants when the model has them, as `expand -n N` does.
    `check()` runs before every decode step and may raise to stop the batch. `records` may yield
    None while `busy()` ("no input ready yet"): the requests in flight go on decoding.

    A tree sampler (`samplers`, e.g. "tgts") with variants > 1: each record's variants come from
    one tree (`runner.expand_variants`), records one at a time; `group_size` and `exploration`
    tune it. `family` and `quality_line` say how every record's request is built.

    `result` is {"variants": [ExpandResult, ...] (duplicates removed), "n", "duplicates", "seed",
    "tokens", "timings"}.
    """

    def __init__(self, engine, defaults: GenerationOptions, base_seed: int, *, family: str = "tipo",
                 quality_line: bool = False, variants: int = 1, parallel: int = 16,
                 on_done: Callable[[Any, dict | None, BaseException | None], None] | None = None,
                 check: Callable[[], None] | None = None, sampler: str = TOP_UP_SAMPLER,
                 group_size: int = DEFAULT_GROUP_SIZE, exploration: float = DEFAULT_EXPLORATION):
        from kgen_cli.runner import tokenizer

        self.defaults, self.base_seed, self.variants, self.on_done = defaults, base_seed, variants, on_done
        self.line_options = {"family": family, "quality_line": quality_line}
        self.engine, self.check = engine, check
        self.sampler = sampler
        self.trees = sampler_named(sampler).tree and variants > 1
        self.tree_options = {"group_size": group_size, "exploration": exploration}
        self.stats = BatchStats()
        self._groups: dict[int, dict] = {}  # records in flight: their variants' results so far
        self._top_ups: deque[tuple[int, int]] = deque()  # (record index, variant) of further rounds
        self._ended: deque[tuple[Any, dict | None, BaseException | None]] = deque()  # records finished, not yet handed out
        self.scheduler = Scheduler(_Instrumented(engine.branches(), self.stats, check), tokenizer(engine),
                                   n_ctx=engine.n_ctx, parallel=min(parallel, engine.n_seq_max),
                                   # separate KV streams: a fork copies a whole stream, too dear for a header
                                   share_prefix=SHARE_PREFIX if engine.kv_unified else 0,
                                   window=engine.window)

    def busy(self) -> bool:
        """Whether model calls are decoding or waiting for a slot."""
        return self.scheduler.busy

    def run(self, records: Iterable) -> BatchStats:
        """Run every record; `on_done` fires as each one finishes (inside the decode step that
        ends it, so that it may raise to stop the batch before anything else is admitted)."""
        with closing(self._results(records, self.on_done)) as ended:
            for rec, result, error in ended:
                self.on_done(rec, result, error)
        return self.stats

    def results(self, records: Iterable) -> Iterator[tuple[Any, dict | None, BaseException | None]]:
        """Run every record, yielding (record, result, error) as each one finishes (finishing
        order). Closing the iterator early stops the batch and releases its sequences."""
        return self._results(records, None)

    def _results(self, records: Iterable, sink: Callable | None):
        """Finished records go to `sink` at once, or (None) are yielded after their step."""
        if self.trees:
            yield from self._run_trees(records)
            return
        self._finished = sink or (lambda *item: self._ended.append(item))
        stats, scheduler = self.stats, self.scheduler
        try:
            for _ in scheduler.steps(self._jobs(records), self._on_result):
                while self._ended:
                    yield self._ended.popleft()
        finally:
            stats.tokens_decoded = scheduler.stats.tokens_decoded
            stats.generated_tokens = scheduler.stats.generated_tokens
            stats.prompt_tokens_shared = scheduler.stats.prompt_tokens_shared

    def _run_trees(self, records: Iterable):
        """-n N with TGTS: one record at a time, its N variants from one token-group tree (the
        tree's branches are the batch), as `kgen expand -n N` makes them."""
        from kgen_cli.runner import expand_variants

        stats = self.stats

        def before_step() -> None:
            if self.check is not None:
                self.check()
            stats.steps += 1

        for rec in records:
            if rec is None:
                continue  # no input ready: nothing is decoding meanwhile, so the reader may block
            stats.records += 1
            started = time.perf_counter()
            try:
                request, seed = line_request(rec, self.defaults, self.base_seed, **self.line_options)
                with _record_errors():
                    out = expand_variants(self.engine, request, self.variants, seed, sampler=self.sampler,
                                          check=before_step, **self.tree_options)
            except KgenError as exc:
                stats.failed += 1
                yield rec, None, exc
                continue
            stats.model_calls += sum(len(v.calls) for v in out.variants)
            stats.tokens_decoded += out.tokens_decoded
            generated = sum(c.n_tokens for v in out.variants for c in v.calls)
            stats.generated_tokens += generated
            yield rec, {"variants": out.variants, "n": self.variants, "duplicates": out.duplicates,
                        "seed": seed, "tokens": generated, "timings": _timings(out.variants, started)}, None

    def _jobs(self, records):
        stats, groups, variants = self.stats, self._groups, self.variants
        for rec in records:
            yield from self._top_up_jobs()  # finish started records first: a smaller reorder window
            if rec is None:
                yield None
                continue
            stats.records += 1
            started = time.perf_counter()
            try:
                request, seed = line_request(rec, self.defaults, self.base_seed, **self.line_options)
            except UsageError as exc:
                groups[rec.index] = _group(rec, None, None, 1, started)
                yield (rec.index, 0), _failing(exc)
                continue
            groups[rec.index] = _group(rec, request, seed, variants, started)
            for v in range(variants):
                yield (rec.index, v), _guarded(run_expand(request, derive_seed(seed, v)))
        while groups:  # the input is done; records still running may need further rounds
            yield from self._top_up_jobs()
            if not groups:
                break
            if not self.busy():  # every job ended, so each record ended or has top-ups
                raise KgenError(f"internal error: records {sorted(groups)[:5]} have no job left")
            yield None  # their jobs are decoding

    def _top_up_jobs(self):
        while self._top_ups:
            index, v = self._top_ups.popleft()
            group = self._groups[index]
            yield (index, v), _guarded(run_expand(group["request"], derive_seed(group["seed"], v)))

    def _on_result(self, key, value, error) -> None:
        stats, groups, variants = self.stats, self._groups, self.variants
        index, v = key
        group = groups[index]
        group["left"] -= 1
        if error is not None:
            group["error"] = group["error"] or error
        else:
            group["results"][v] = value
        if group["left"]:
            return
        results, kept = group["results"], group["kept"]
        if group["error"] is None:
            before = len(kept)
            group["duplicates"] += keep_distinct(results[group["checked"]:], lambda r: r.formatted, variants,
                                                 group["seen"], kept)
            group["checked"] = len(results)
            if want := round_size(variants, len(kept), group["rounds"], len(kept) - before):
                group["rounds"] += 1
                group["left"] = want
                self._top_ups.extend((index, v) for v in range(len(results), len(results) + want))
                results.extend([None] * want)
                return
        del groups[index]
        if group["error"] is not None:
            stats.failed += 1
            self._finished(group["rec"], None, group["error"])
            return
        timings = _timings(results, group["started"])
        self._finished(group["rec"], {"variants": kept, "n": variants, "duplicates": group["duplicates"],
                                      "seed": group["seed"], "tokens": timings["generated_tokens"],
                                      "timings": timings}, None)
