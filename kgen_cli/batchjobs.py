"""Running a batch of input records as concurrent expand jobs (continuous batching)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from kgen_cli.errors import UsageError
from kgen_cli.pipeline import run_expand
from kgen_cli.runner import tokenizer
from kgen_cli.sampling import derive_seed
from kgen_cli.scheduler import Scheduler


# Per-line JSONL keys that are not `build_request` keyword arguments under the same name.
_LINE_KEYS = {"tags": "text", "format": "format_"}


def _failing(error: BaseException):
    """A job that fails at once (a bad input line), so errors flow through the same path."""
    raise error
    yield  # pragma: no cover - makes this a generator


def run_batch(engine, records: Iterable, defaults: dict, base_seed: int, *, variants: int = 1,
              parallel: int = 16, on_done: Callable[[Any, dict | None, BaseException | None], None]) -> None:
    """Expand every record concurrently (continuous batching); `on_done` fires per record.

    Record i uses the seed `base_seed + i` unless it sets its own; variant v of it uses
    `derive_seed(seed, v)`. With `variants > 1` the N calls share the prompt's KV cache.
    """
    from kgen_cli.commands.expand import build_request

    groups: dict[int, dict] = {}

    def jobs():
        for rec in records:
            seed = derive_seed(base_seed, rec.index)
            try:
                if rec.error:
                    raise UsageError(rec.error)
                kwargs = dict(defaults)
                fields = dict(rec.fields)
                if "seed" in fields:
                    seed = _line_seed(fields.pop("seed"))
                text = str(fields.pop("tags", ""))
                for key, value in fields.items():
                    kwargs[_LINE_KEYS.get(key, key)] = value
                request = build_request(text, **kwargs)
            except (UsageError, TypeError, ValueError) as exc:
                groups[rec.index] = {"rec": rec, "left": 1, "results": [], "error": None, "seed": seed}
                yield (rec.index, 0), _failing(exc if isinstance(exc, UsageError) else UsageError(str(exc)))
                continue
            groups[rec.index] = {"rec": rec, "left": variants, "results": [None] * variants, "error": None, "seed": seed}
            for v in range(variants):
                yield (rec.index, v), run_expand(request, derive_seed(seed, v) if variants > 1 else seed)

    def on_result(key, value, error) -> None:
        index, v = key
        group = groups[index]
        group["left"] -= 1
        if error is not None:
            group["error"] = group["error"] or error
        else:
            group["results"][v] = value
        if group["left"] == 0:
            del groups[index]
            if group["error"] is not None:
                on_done(group["rec"], None, group["error"])
                return
            unique, seen = [], set()
            for r in group["results"]:
                if r.formatted not in seen:
                    seen.add(r.formatted)
                    unique.append(r)
            tokens = sum(c.n_tokens for r in group["results"] for c in getattr(r, "calls", []))
            on_done(group["rec"], {"variants": unique, "n": variants, "duplicates": variants - len(unique),
                                   "seed": group["seed"], "tokens": tokens}, None)

    scheduler = Scheduler(engine.branches(), tokenizer(engine), n_ctx=engine.n_ctx,
                          parallel=min(parallel, engine.n_seq_max))
    scheduler.run(jobs(), on_result)


def _line_seed(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**32 - 2:
        raise UsageError(f"seed must be an integer in [0, 4294967294], not {value!r}")
    return value
