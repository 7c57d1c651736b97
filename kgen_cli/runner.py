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

from kgen_cli.errors import UsageError
from kgen_cli.pipeline import ExpandRequest, ExpandResult, run_expand
from kgen_cli.sampling import Completion, derive_seed
from kgen_cli.scheduler import Scheduler

DEFAULT_N_CTX = 4096
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ


def random_seed() -> int:
    """A fresh seed in [0, 2**32 - 2] (0xFFFFFFFF would make llama.cpp pick its own)."""
    return random.SystemRandom().randint(0, 2**32 - 2)


def parse_gpu_layers(value: str) -> int | str:
    """'auto', 'all' or a non-negative integer (validated here, resolved when the engine loads)."""
    value = value.strip().lower()
    if value in ("auto", "all"):
        return value
    try:
        layers = int(value)
    except ValueError:
        raise UsageError(f"--gpu-layers must be a number, 'all' or 'auto', not '{value}'") from None
    if layers < 0:
        raise UsageError("--gpu-layers must not be negative")
    return layers


@dataclass
class EngineConfig:
    model_path: str
    n_ctx: int | None = None
    gpu_layers: int | str = "auto"
    threads: int | None = None
    verbose: bool = False
    n_seq_max: int = 1
    context_length: int | None = None  # the model's trained context, from the registry


def default_n_ctx(sequences: int) -> int:
    """KV cells for this many concurrent sequences: the cache is unified and shared prompt cells
    count once, so about 384 cells per extra sequence covers a TIPO call (prompt + ~200 tokens)."""
    return min(65536, DEFAULT_N_CTX + max(0, sequences - 1) * 384)


def open_engine(config: EngineConfig):
    """Load the model and create the context; returns (engine, load seconds)."""
    from kgen_cli import engine as engine_mod

    engine_mod.check_gguf(config.model_path)
    layers = config.gpu_layers
    if layers == "auto":
        layers = 10_000 if engine_mod.gpu_offload_supported() else 0
    elif layers == "all":
        layers = 10_000
    n_ctx = config.n_ctx or default_n_ctx(config.n_seq_max)
    started = time.perf_counter()
    eng = engine_mod.Engine(
        config.model_path,
        n_ctx=n_ctx,
        n_gpu_layers=int(layers),
        n_threads=config.threads,
        n_seq_max=max(1, min(config.n_seq_max, MAX_SEQUENCES)),
        verbose=config.verbose,
    )
    return eng, time.perf_counter() - started


def tokenizer(engine) -> Callable[[str], list[int]]:
    return lambda text: engine.tokenize(text, add_bos=True)


def expand(engine, request: ExpandRequest, seed: int, *, on_text: Callable[[str], None] | None = None) -> ExpandResult:
    """One prompt, start to finish (every operation and retry)."""
    results: dict[Hashable, tuple[Any, BaseException | None]] = {}
    scheduler = Scheduler(
        engine.branches(), tokenizer(engine), n_ctx=engine.n_ctx, parallel=1,
        on_piece=(lambda _key, text: on_text(text)) if on_text else None,
    )
    scheduler.run([(0, run_expand(request, seed))], lambda k, v, e: results.__setitem__(k, (v, e)))
    value, error = results[0]
    if error is not None:
        raise error
    return value


@dataclass
class VariantsResult:
    variants: list[ExpandResult]
    duplicates: int
    tokens_decoded: int
    wall_seconds: float
    sampler: str
    tree: dict | None = None
    per_variant: list[dict] = field(default_factory=list)  # score, tokens decoded, depth (TGTS)

    def to_dict(self) -> dict:
        n = len(self.variants)
        return {
            "variants": [dict(v.to_dict(), **extra) for v, extra in zip(self.variants, self.per_variant or [{}] * n)],
            "totals": {
                "variants": n,
                "duplicates_removed": self.duplicates,
                "tokens_decoded": self.tokens_decoded,
                "wall_seconds": round(self.wall_seconds, 4),
                "variants_per_second": round(n / self.wall_seconds, 3) if self.wall_seconds > 0 else None,
                "sampler": self.sampler,
            },
        }


def expand_variants(
    engine,
    request: ExpandRequest,
    n: int,
    seed: int,
    *,
    sampler: str = "tgts",
    group_size: int = 4,
    exploration: float = 1.0,
    parallel: int | None = None,
) -> VariantsResult:
    """N distinct variants of one prompt.

    Variant i runs the normal pipeline with seed `derive_seed(seed, i)`. Their first model calls
    share one prompt: with `tgts` they are served together by the token-group tree, with
    `independent` by N sampled sequences forked from the prompt's KV cache. Later calls
    (retries, further operations) are batched by the scheduler. Duplicates are removed.
    """
    started = time.perf_counter()
    jobs = {i: run_expand(request, derive_seed(seed, i)) for i in range(n)}
    first = {i: next(job) for i, job in jobs.items()}
    per_variant: list[dict] = [{} for _ in range(n)]
    tree_json = None
    tokens = 0
    scheduler = Scheduler(engine.branches(), tokenizer(engine), n_ctx=engine.n_ctx,
                          parallel=parallel or min(n, engine.n_seq_max))
    if sampler == "tgts" and n > 1:
        completions, per_variant, tree_json, tokens = _tgts_first_calls(
            engine, first[0], n, seed, group_size, exploration)
        served = {i: c for i, c in enumerate(completions)}
    else:
        served = {}
    results: dict[int, tuple[Any, BaseException | None]] = {}
    on_result = lambda k, v, e: results.__setitem__(k, (v, e))  # noqa: E731

    def continue_jobs():
        for i, job in jobs.items():
            if i in served:
                try:
                    nxt = job.send(served[i])
                except StopIteration as stop:
                    on_result(i, stop.value, None)
                    continue
                yield i, _resume(job, nxt)
            else:
                yield i, _resume(job, first[i])

    scheduler.run(continue_jobs(), on_result)
    tokens += scheduler.stats.tokens_decoded
    variants, extras, seen, dups = [], [], set(), 0
    for i in range(n):
        value, error = results[i]
        if error is not None:
            raise error
        if value.formatted in seen:
            dups += 1
            continue
        seen.add(value.formatted)
        variants.append(value)
        extras.append(per_variant[i] if i < len(per_variant) else {})
    return VariantsResult(variants, dups, tokens, time.perf_counter() - started,
                          sampler if n > 1 else "single", tree_json, extras)


def _resume(job, request):
    """Wrap a job whose next request was already pulled, so the scheduler can start it."""
    completion = yield request
    while True:
        try:
            request = job.send(completion)
        except StopIteration as stop:
            return stop.value
        completion = yield request


def _tgts_first_calls(engine, request, n, seed, group_size, exploration):
    """Serve N identical first model calls with one TGTS tree; returns their completions."""
    from kgen_cli.tree import tgts_sample

    prompt = engine.tokenize(request.prompt, add_bos=True)
    max_tokens = min(request.params.max_tokens, engine.n_ctx - len(prompt) - 1)
    result = tgts_sample(engine.branches(), prompt, n, request.params, request.seed,
                         group_size=group_size, exploration=exploration, max_tokens=max_tokens)
    completions: list[Completion] = []
    extras: list[dict] = []
    for v in result.variants[:n]:
        completions.append(Completion(text=v.text, n_prompt_tokens=len(prompt), n_tokens=len(v.tokens),
                                      finish_reason="stop" if v.finished else "length"))
        extras.append({"score": round(v.score, 6), "tokens_decoded": v.n_decoded, "depth": v.depth})
    return completions, extras + [{} for _ in range(n - len(extras))], result.tree, result.total_decoded

