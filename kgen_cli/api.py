"""The Python API: `load` a model once, then expand prompts on it (see docs/api.md).

    import kgen_cli as kgen
    with kgen.load("tipo-500m-q8_0") as gen:
        print(gen.expand("1girl, dragon horns", seed=1).formatted)

A `Generator` owns one llama.cpp context. Its context is sized for the calls it serves (one
sequence for `expand`, n + 1 for `variants(n)`, `parallel` for `expand_many`); a call that needs
more sequences, cells or another KV layout reopens it (the weights stay in the page cache).

The library never prints: errors are raised (`KgenError` subclasses, with the CLI's exit codes),
notes go to the `on_log` callback or the `kgen_cli` logger. A Generator is not thread-safe: use
one per thread (a process can hold several). A KeyboardInterrupt (or any exception from a
callback) during a call releases every sequence of that call: the Generator stays usable.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Mapping

from kgen_cli.errors import KgenError, UsageError
from kgen_cli.options import EngineOptions, GenerationOptions, VariantOptions
from kgen_cli.pipeline import ExpandRequest, ExpandResult
from kgen_cli.registry import ResolvedModel

log = logging.getLogger("kgen_cli")

# Results held back for input order by `expand_many`, per parallel sequence, before it stops
# admitting new inputs until the oldest one is done: bounded memory on endless inputs.
ORDER_WINDOW_PER_SEQUENCE = 4


def load(
    model: str | ResolvedModel | None = None,
    *,
    family: str | None = None,
    gpu_layers: int | str = "auto",
    threads: int | None = None,
    n_ctx: int | None = None,
    context_length: int | None = None,
    verbose: bool = False,
    download: bool = True,
    progress: bool = False,
    parallel: int = 1,
    lazy: bool = False,
    defaults: GenerationOptions | None = None,
    on_log: Callable[[str], None] | None = None,
) -> Generator:
    """Open a model for expanding prompts.

    `model`: a registry name (`kgen models list`; None: the registry's default), NAME@QTYPE, or a
    path to a local .gguf. It is resolved once; a registry model not on disk is downloaded when
    `download` (else ModelNotFoundError), with the hub's progress bars on stderr when `progress`.
    `family`: "tipo", "dtg" or another registered family (`families.py`; None: the registry's, or
    guessed from the file name). `gpu_layers`: N, "all" or "auto" (all when llama.cpp has GPU
    offload). `n_ctx`: KV cells shared by all sequences (None: sized for the calls);
    `context_length`: the most tokens one model call spans (None: the registry's, 1024 for a
    local file); `threads`: CPU threads (None: llama.cpp's). `parallel`: sequences to size the
    first context for (`variants(n)` needs n + 1); `lazy`: open the context at the first call
    instead. `defaults`: the GenerationOptions every call starts from. `on_log`: receives notes
    (an assumed family); without it they go to the `kgen_cli` logger. `verbose`: llama.cpp's
    own log on stderr.

    Raises UsageError for a bad value, ModelNotFoundError, DownloadError, RegistryError or
    EngineError (the model or context could not be loaded)."""
    options = EngineOptions(model if isinstance(model, str) or model is None else model.name, family,
                            gpu_layers, n_ctx, context_length, threads, verbose).checked()  # fmt: skip
    defaults = defaults if defaults is not None else GenerationOptions()
    if not isinstance(defaults, GenerationOptions):
        raise UsageError("defaults must be a GenerationOptions")
    from kgen_cli.download import locate
    from kgen_cli.registry import family_note, registry_spec_only

    if isinstance(model, ResolvedModel):
        resolved = model
    else:
        resolved = registry_spec_only(options.model, options.family)
    defaults.request("", family=resolved.family, quality_line=resolved.quality_line)  # checked before any file
    resolved = locate(resolved, download_missing=download, quiet=not progress)
    gen = Generator(resolved, options, defaults, on_log=on_log)
    if note := family_note(resolved):
        gen._log(note)
    if not lazy:
        gen.reserve(parallel)
    return gen


def show_prompt(tags: str = "", *, family: str = "tipo", quality_line: bool = False, **options: Any) -> str:
    """The exact text of the first model call for these tags and options (no model needed);
    "" when the request makes no model call. `options`: GenerationOptions fields."""
    from kgen_cli.pipeline import first_prompt
    from kgen_cli.registry import check_family

    family = check_family(family) or "tipo"
    return first_prompt(GenerationOptions().updated(options).request(tags, family=family, quality_line=quality_line))


class Generator:
    """A loaded model that expands prompts. Create it with `load()`; close it (or use `with`).

    Not thread-safe. Attributes: `model` (the resolved model: name, path, family), `family`,
    `options` (EngineOptions), `defaults` (GenerationOptions), `load_seconds` (the last
    context's load time), `engine` (the open engine, None before the first call when lazy)."""

    def __init__(self, model: ResolvedModel, options: EngineOptions, defaults: GenerationOptions, *,
                 on_log: Callable[[str], None] | None = None):
        self.model = model
        self.family = model.family
        self.options = options
        self.defaults = defaults
        self.on_log = on_log
        self.engine = None
        self.load_seconds = 0.0
        self._closed = False

    # -- lifetime ------------------------------------------------------------------------------

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the model and its context. Idempotent."""
        self._closed = True
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.close()

    def _log(self, text: str) -> None:
        if self.on_log is not None:
            self.on_log(text)
        else:
            log.info(text)

    def reserve(self, sequences: int = 1, *, max_tokens: int | None = None, kv_unified: bool = True,
                n_ctx: int | None = None):
        """Make the context ready for calls decoding `sequences` sequences at once (of up to
        `max_tokens` new tokens each; None: the defaults'), with one shared KV buffer or a
        stream per sequence, and `n_ctx` cells when the EngineOptions do not set them. The open
        context is kept when it has all that, else reopened (`load_seconds` then says how long
        that took). Returns the engine. The calls do this themselves; `kgen expand` calls it
        first to time the load apart from the generation."""
        from kgen_cli import runner
        from kgen_cli.sampling import MAX_SEQUENCES

        if self._closed:
            raise KgenError("the generator is closed")
        sequences = max(1, min(sequences, MAX_SEQUENCES))
        if max_tokens is None:
            max_tokens = self.defaults.request("", family=self.family).params.max_tokens
        cells = self.options.n_ctx or n_ctx or runner.default_n_ctx(sequences, max_tokens)
        engine = self.engine
        if engine is not None and not engine.closed and engine.n_seq_max >= sequences and engine.n_ctx >= cells \
                and engine.kv_unified == kv_unified:  # fmt: skip
            return engine
        self.close()
        self._closed = False
        self.engine, self.load_seconds = runner.open_engine(runner.EngineConfig(
            model_path=str(self.model.path), n_ctx=cells, gpu_layers=self.options.gpu_layers,
            threads=self.options.threads, verbose=self.options.verbose, n_seq_max=sequences,
            context_length=self.options.context_length or self.model.n_ctx, max_tokens=max_tokens,
            kv_unified=kv_unified,
        ))
        return self.engine

    # -- requests ------------------------------------------------------------------------------

    def request(self, tags: str = "", **options: Any) -> ExpandRequest:
        """The validated request `expand` would run (UsageError on a bad option)."""
        if not isinstance(tags, str):
            raise UsageError(f"tags must be a string, not {type(tags).__name__}")
        return self.defaults.updated(options).request(tags, family=self.family,
                                                      quality_line=self.model.quality_line)

    @staticmethod
    def _seed(seed: int | None) -> int:
        from kgen_cli.runner import random_seed
        from kgen_cli.sampling import SEED_MAX

        if seed is None:
            return random_seed()
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
            raise UsageError(f"seed must be an integer in [0, {SEED_MAX}], got {seed!r}")
        return seed

    def expand(self, tags: str = "", *, nl: str | None = None, seed: int | None = None,
               on_text: Callable[[str], None] | None = None, **options: Any) -> ExpandResult:
        """Expand one prompt: every planned operation and retry, post-processing, the format.

        `tags`: comma-separated tags (A1111 weights, BREAK, <lora:...> kept); `nl`: natural
        language (TIPO); `seed`: None for a random one (`result.seed` tells). `options`:
        GenerationOptions fields (tag_length="short", temperature=0.5, format="tag-only", ...).
        `on_text` receives the generated text as it streams."""
        from kgen_cli import runner

        request = self.request(tags, **_with_nl(options, nl))
        seed = self._seed(seed)
        engine = self.reserve(sequences=1, max_tokens=request.params.max_tokens)
        return runner.expand(engine, request, seed, on_text=on_text)

    def variants(self, tags: str = "", n: int = 16, *, nl: str | None = None, seed: int | None = None,
                 sampler: str | None = None, group_size: int | None = None, exploration: float | None = None,
                 check: Callable[[], None] | None = None,
                 on_variant: Callable[[ExpandResult, dict], None] | None = None, **options: Any):
        """Up to `n` distinct variants of one prompt (fewer only when the model keeps repeating
        itself; `result.stop_reason` tells). `sampler`: "tgts" (token-group tree sampling, the
        default) or "independent". Returns a `VariantsResult`: `.variants` (ExpandResults, in the
        order they were found), `.duplicates`, `.tree`, `.to_dict()`; it iterates over the
        variants. `on_variant(result, figures)` sees each variant as soon as it is final;
        `check()` runs before every decode step and may raise to stop."""
        from kgen_cli import runner

        shape = VariantOptions.checked(n, sampler, group_size, exploration)
        request = self.request(tags, **_with_nl(options, nl))
        seed = self._seed(seed)
        sequences = 1 if n == 1 else n + 1  # + the prompt's anchor
        engine = self.reserve(sequences=sequences, max_tokens=request.params.max_tokens)
        return runner.expand_variants(engine, request, n, seed, sampler=shape.sampler,
                                      group_size=shape.group_size, exploration=shape.exploration,
                                      check=check, on_variant=on_variant)

    def batch(self, *, parallel: int = 16, variants: int = 1, seed: int | None = None, sampler: str | None = None,
              group_size: int | None = None, exploration: float | None = None,
              check: Callable[[], None] | None = None, **options: Any):
        """A `batchjobs.BatchRun` on this model (what `kgen batch` runs): `.results(records)`
        yields (record, result, error) as records finish, in finishing order. Most callers want
        `expand_many`. Returns (run, base seed)."""
        from kgen_cli import batchjobs

        shape = VariantOptions.checked(variants, sampler, group_size, exploration)
        defaults = self.defaults.updated(options)
        request = defaults.request("", family=self.family, quality_line=self.model.quality_line)
        _check_parallel(parallel)
        base_seed = self._seed(seed)
        from kgen_cli.samplers import sampler_named

        trees = variants > 1 and sampler_named(shape.sampler).tree
        context_length = self.options.context_length or self.model.n_ctx or _default_context_length()
        call_tokens = request.params.max_tokens
        unified = not batchjobs.use_kv_streams(trees=trees, context_length=context_length,
                                               max_tokens=call_tokens, retries=request.retries)  # fmt: skip
        cells = batchjobs.batch_n_ctx(parallel, call_tokens, context_length, unified=unified)
        engine = self.reserve(sequences=parallel, max_tokens=call_tokens, kv_unified=unified, n_ctx=cells)
        run = batchjobs.BatchRun(engine, defaults, base_seed, family=self.family,
                                 quality_line=self.model.quality_line, variants=variants, parallel=parallel, check=check,
                                 sampler=shape.sampler, group_size=shape.group_size,
                                 exploration=shape.exploration)
        return run, base_seed

    def expand_many(self, requests: Iterable[str | Mapping[str, Any]], *, parallel: int = 16,
                    seed: int | None = None, check: Callable[[], None] | None = None,
                    **options: Any) -> Iterator[ExpandResult | KgenError]:
        """Expand many prompts concurrently (continuous batching), yielding in input order.

        Each request is a tag string or a mapping of a `kgen batch` JSONL line (tags or prompt,
        nl, seed, and GenerationOptions fields such as tag_length, format, temperature). Request i
        uses `seed + i` (`derive_seed`) unless it sets its own; `seed` None draws a random base.
        Each item is the request's ExpandResult, or the KgenError that failed it (the others go
        on). Inputs are read lazily and at most a few results per parallel sequence are held
        back for ordering, so an endless iterator runs in bounded memory. Stopping the
        iteration early releases the context's sequences."""
        from kgen_cli.batchio import record_from

        run, _ = self.batch(parallel=parallel, seed=seed, check=check, **options)
        window = ORDER_WINDOW_PER_SEQUENCE * parallel
        pending: dict[int, Any] = {}
        next_index = 0

        def records():
            for index, item in enumerate(requests):
                while len(pending) >= window and run.busy():
                    yield None  # the oldest input is still decoding: wait for it before taking more
                yield record_from(index, item)

        for rec, result, error in run.results(records()):
            pending[rec.index] = error if error is not None else result["variants"][0]
            while next_index in pending:
                yield pending.pop(next_index)
                next_index += 1


def _with_nl(options: dict, nl: str | None) -> dict:
    return options if nl is None else dict(options, nl=nl)


def _check_parallel(parallel: Any) -> None:
    from kgen_cli.sampling import MAX_SEQUENCES

    if isinstance(parallel, bool) or not isinstance(parallel, int) or not 1 <= parallel <= MAX_SEQUENCES:
        raise UsageError(f"parallel must be a whole number from 1 to {MAX_SEQUENCES}, not {parallel!r}")


def _default_context_length() -> int:
    from kgen_cli.runner import DEFAULT_CONTEXT_LENGTH

    return DEFAULT_CONTEXT_LENGTH
