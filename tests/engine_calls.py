"""Driving model calls and jobs in tests and benchmarks: single calls on a real Engine through the
product's one step loop (`scheduler.Scheduler`), each request a job that makes that one call; and
`drive`, one expand job with a plain function as the model."""

from __future__ import annotations

from typing import Callable

from kgen_cli.pipeline import ExpandResult, Job
from kgen_cli.runner import tokenizer
from kgen_cli.sampling import Completion, CompletionRequest
from kgen_cli.scheduler import Scheduler, SchedulerStats


def _one_call(request: CompletionRequest):
    return (yield request)


def run_calls(engine, requests: list[CompletionRequest], *, on_text: Callable[[str], None] | None = None,
              parallel: int | None = None) -> tuple[list[Completion], SchedulerStats]:
    """Every request decoded concurrently on `engine` (up to `parallel` at once, default all its
    sequences); completions in input order, and the scheduler's counters. `on_text` sees the
    generated text as it streams (then "\\n" at the end of each call)."""
    results: dict[int, tuple[Completion | None, BaseException | None]] = {}
    scheduler = Scheduler(engine.branches(), tokenizer(engine), n_ctx=engine.n_ctx, window=engine.n_ctx_seq,
                          parallel=parallel or engine.n_seq_max,
                          on_piece=(lambda _key, text: on_text(text)) if on_text else None)
    scheduler.run([(i, _one_call(r)) for i, r in enumerate(requests)], lambda k, v, e: results.__setitem__(k, (v, e)))
    for _value, error in results.values():
        if error is not None:
            raise error
    return [results[i][0] for i in range(len(requests))], scheduler.stats


def complete(engine, request: CompletionRequest, *, on_text: Callable[[str], None] | None = None) -> Completion:
    return run_calls(engine, [request], on_text=on_text)[0][0]


def complete_many(engine, requests: list[CompletionRequest], **kw) -> list[Completion]:
    return run_calls(engine, requests, **kw)[0]


def drive(gen: Job, complete: Callable[[CompletionRequest], Completion]) -> ExpandResult:
    """Run a job to its end, one call at a time, with `complete` as the model."""
    try:
        call = next(gen)
        while True:
            call = gen.send(complete(call))
    except StopIteration as stop:
        return stop.value
