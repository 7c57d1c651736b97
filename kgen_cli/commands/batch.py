"""`kgen batch`: expand every prompt of a file or stdin, concurrently, written in input order."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from kgen_cli.commands import _options as o
from kgen_cli.console import examples, info, require_open, status_line, stderr_is_tty
from kgen_cli.errors import KgenError, StopRequested, UsageError
from kgen_cli.options import VariantOptions
from kgen_cli.paths import check_output_file
from kgen_cli.scale import DEFAULT_SHARD_SIZE
from kgen_cli.stopping import Interrupted, SignalStop


EXAMPLES = examples(
    "kgen batch prompts.txt -o out.txt",
    "kgen batch prompts.jsonl -o out.jsonl --output-format jsonl --seed 1",
    "grep -v '^#' prompts.txt | kgen batch - -n 4 --parallel 8",
)


class InputFormat(str, Enum):
    lines = "lines"
    jsonl = "jsonl"


class OutputFormat(str, Enum):
    text = "text"
    jsonl = "jsonl"


def batch(
    input: Annotated[str, typer.Argument(help="Prompt file, or '-' for stdin: one prompt per line, or JSONL objects.")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output file ('-' or none: stdout); with --ray a directory (or s3://..., gs://...) of JSONL part files.")] = None,
    input_format: Annotated[Optional[InputFormat], typer.Option("--input-format", help="lines or jsonl (default: jsonl when the first prompt line is a JSON object).")] = None,
    output_format: Annotated[Optional[OutputFormat], typer.Option("--output-format", help="text (one prompt per line) or jsonl (one object per input, docs/json.md; --ray writes jsonl). \\[default: jsonl for -o *.jsonl / *.ndjson, else text]")] = None,
    parallel: Annotated[int, typer.Option("--parallel", "-p", min=1, max=o.MAX_SEQUENCES, help="Sequences decoded concurrently (continuous batching).")] = 16,
    resume: Annotated[bool, typer.Option("--resume", help="Skip inputs already in -o OUTPUT and append the rest.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failing line.")] = False,
    timings: Annotated[bool, typer.Option("--timings/--no-timings", help="jsonl: include timings (--no-timings: a rerun gives a byte-identical file).")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    nl: o.NlOpt = "",
    model: o.ModelOpt = None,
    family: o.FamilyOpt = None,
    tag_length: o.TagLengthOpt = o.Level.long,
    nl_length: o.NlLengthOpt = o.Level.long,
    operation: o.OperationOpt = None,
    width: o.WidthOpt = None,
    height: o.HeightOpt = None,
    aspect_ratio: o.AspectOpt = None,
    ban: o.BanOpt = None,
    retries: o.RetriesOpt = None,
    format_: o.FormatOpt = "oneline",
    escape_parens: o.EscapeOpt = False,
    seed: o.SeedOpt = None,
    temperature: o.TemperatureOpt = None,
    top_p: o.TopPOpt = None,
    top_k: o.TopKOpt = None,
    min_p: o.MinPOpt = None,
    repeat_penalty: o.RepeatPenaltyOpt = None,
    max_tokens: o.MaxTokensOpt = None,
    variants: o.VariantsOpt = 1,
    sampler: o.SamplerOpt = None,
    group_size: o.GroupSizeOpt = None,
    exploration: o.ExplorationOpt = None,
    gpu_layers: o.GpuLayersOpt = "auto",
    n_ctx: Annotated[Optional[int], typer.Option("--n-ctx", min=o.MIN_N_CTX, max=o.MAX_N_CTX, rich_help_panel=o.ENGINE, help="KV cells for all sequences. Default: parallel x context length, each sequence in its own KV stream; for TGTS -n and short single calls (--retries 0, few tokens), parallel x (max tokens + 256) in one shared buffer; at least 4096, at most 65536.")] = None,
    context_length: o.ContextLengthOpt = None,
    threads: o.ThreadsOpt = None,
    verbose: o.VerboseOpt = 0,
    llama_log: o.LlamaLogOpt = False,
    ray: Annotated[bool, typer.Option("--ray", rich_help_panel=o.RAY, help="Run on Ray Data: the input cut into shards, expanded by actors that each hold the model; -o DIR gets one JSONL part file per shard. Needs pip install 'kgen-cli[ray]'; see docs/scale-out.md.")] = False,
    address: o.AddressOpt = None,
    actors: o.ActorsOpt = None,
    threads_per_actor: o.ThreadsPerActorOpt = 1,
    gpus_per_actor: o.GpusPerActorOpt = 0.0,
    shard_size: o.ShardSizeOpt = DEFAULT_SHARD_SIZE,
    merge: Annotated[bool, typer.Option("--merge", rich_help_panel=o.RAY, help="--ray: when every shard is written, print all records to stdout in input order.")] = False,
) -> None:
    """Expand every prompt of a file or stdin, concurrently; results in input order.

    Input: one prompt per line (blank lines and # comments skipped), or JSONL objects with "tags",
    "nl", "id", "seed" and the generation options of expand by their long names ("tag_length",
    "width", "format", ...; docs/usage.md lists them); the command's options are the defaults.
    With --seed S the i-th prompt (from 0) gets seed S + i unless its line sets one; a rerun with
    the same options reproduces the output exactly on CPU. --parallel 1 gives what `kgen expand
    --seed S+i` gives; with more parallel sequences the batched arithmetic differs slightly, so
    results can differ from a single expand.

    -n N: by default each input's N variants come from one TGTS tree, as `kgen expand -n N`
    makes them (inputs one after another, the tree's branches decoded together); with --sampler
    independent the variants of several inputs decode together instead (continuous batching).

    Text output: one line per input (a multi-line --format is joined with spaces; a failed input
    leaves an empty line, its error on stderr); with -n N, N distinct lines per input (repeats
    are replaced by further rounds, as in expand; fewer only when the model keeps repeating
    itself, with a note on stderr; none for a failed input). JSONL: one object per input (index,
    id or line number, input, seed, result, timings) or one with "error". A bad line never stops
    the batch unless --fail-fast; the exit status is then 1. Ctrl-C / SIGTERM: finished results are written, never a partial line, exit
    130/143; --resume -o OUTPUT then completes the rest (jsonl: records finished out of order were
    written too, so the file may be out of order; their "index" tells).

    --ray: the same batch on Ray Data, locally or on a cluster (--address): INPUT may be a file,
    a directory or glob of files, or s3://...; -o DIR receives one JSONL part file per shard of
    --shard-size inputs, each written whole, so a lost actor or a rerun never duplicates a
    record; --resume runs the shards not yet written. See docs/scale-out.md.
    """
    import kgen_cli as kgen
    from kgen_cli.batchio import OrderedWriter, OutputFile, PipeLines, bounded_lines, count_prompts, read_records, scan_done
    from kgen_cli.registry import registry_spec_only

    cluster = o.ray_cluster(ray, address, actors, threads_per_actor, gpus_per_actor, shard_size,
                            **{"--merge": merge})
    if output == "-":
        output = None
    if ray:
        _check_ray_args(input, output, output_format, fail_fast, threads, merge)
    elif resume and output is None:
        raise UsageError("--resume needs -o OUTPUT")
    elif output is not None:
        _check_output(Path(output), input)
    else:
        require_open("stdout", hint="write the results to a file with -o FILE")
    if input == "-" and not ray:
        require_open("stdin")
    spec = registry_spec_only(model, family)
    options = o.generation_options(locals())
    # The shared options are checked before any model or file is touched.
    options.request("", family=spec.family, quality_line=spec.quality_line)
    VariantOptions.checked(variants, sampler, group_size, exploration)
    llama_log = llama_log or verbose >= 2
    engine_options = kgen.EngineOptions(model, family, gpu_layers, n_ctx, context_length, threads, llama_log).checked()
    o.warn_high_temperature(temperature)
    if ray:
        from kgen_cli import scale

        scale.require_ray()
        prepared = scale.prepare(input, output, shard_size=shard_size,
                                 input_format=input_format.value if input_format else None, resume=resume,
                                 seed=None if seed == o.RANDOM_SEED else seed)
        job = scale.Job(options, engine_options, threads=threads_per_actor, variants=variants,
                        parallel=parallel, sampler=sampler, group_size=group_size, exploration=exploration,
                        timings=timings)
        _run_on_ray(scale, prepared, job, cluster, merge=merge, quiet=quiet, verbose=verbose > 0)
        return
    stream = sys.stdin.buffer if input == "-" else _open_input(input)
    fmt = output_format.value if output_format is not None else _format_for(None if output is None else Path(output))
    # Opened and locked now: an unwritable file fails before the model loads, and a second kgen
    # on the same file is refused before --resume reads it.
    sink = None if output is None else OutputFile(str(output), append=resume)
    with OutputFile.discard_on_error(sink):
        done = scan_done(str(output), fmt, variants) if resume else set()
        # The family note comes after the checks: an error stays one line.
        gen = kgen.load(spec, family=engine_options.family, gpu_layers=engine_options.gpu_layers, threads=threads,
                        n_ctx=n_ctx, context_length=context_length, verbose=llama_log, defaults=options, lazy=True,
                        progress=True, on_log=(lambda _note: None) if quiet else info)
    base_seed = o.random_seed_if_unset(seed, show=not verbose and not quiet)  # -v shows it below
    stop = SignalStop(watch_stdout=output is None)  # `| head`: stop once the reader is gone
    with OutputFile.discard_on_error(sink):
        try:
            run, _ = gen.batch(parallel=parallel, variants=variants, seed=base_seed, sampler=sampler,
                               group_size=group_size, exploration=exploration, check=stop.check)
        except BaseException:
            gen.close()
            raise
    engine = run.engine
    if verbose:
        resolved = gen.model
        info(f"model {resolved.name} ({resolved.family}), loaded in {gen.load_seconds:.2f}s; n_ctx {engine.n_ctx}, "
             f"context length {engine.window}, "
             f"{'one shared KV buffer' if engine.kv_unified else 'a KV stream per sequence'}, "
             f"{parallel} parallel sequences, {engine.model_info.get('n_threads')} threads, base seed {base_seed}")
    out = sys.stdout if sink is None else sink.open()
    writer = OrderedWriter(out, skip=done)
    state = _BatchState(fmt, writer, variants, fail_fast, timings, nl)
    stats = None
    try:
        regular = _is_regular(stream)
        total = max(0, count_prompts(input) - len(done)) if regular and input != "-" else None
        with stop.installed(), _progress(quiet, total) as progress:
            state.progress = progress
            run.on_done = state.record
            if regular:
                lines = stop.watch(bounded_lines(stream))
            else:
                # A pipe or terminal: never wait on it while there is decoding to do.
                lines = PipeLines(stream.fileno())
                lines.busy, lines.wait = run.busy, stop.blocking
            records = (r for r in read_records(lines, input_format.value if input_format else None)
                       if r is None or r.index not in done)
            try:
                stats = run.run(records)
                stop.check()  # a signal that came after the last decode still counts
            except (Interrupted, _FailFast) as exc:
                stop.finishing = True  # further signals wait until the records below are whole
                early = writer.flush_out_of_order() if fmt == "jsonl" else 0
                if isinstance(exc, _FailFast):
                    raise KgenError(str(exc)) from None
                note = f" ({early} of them out of input order)" if early else ""
                info(f"interrupted: {writer.written} results written{note}; --resume -o OUTPUT completes the rest")
                raise typer.Exit(exc.exit_code) from None
    finally:
        gen.close()
        if out is not sys.stdout:
            out.close()
        if sink is not None:
            sink.close()
        if stream is not sys.stdin.buffer:
            stream.close()
    if verbose and stats is not None:
        stats.peak_pending = writer.peak_pending
        info(f"batch: {stats.summary()}; at most {stats.peak_pending} results held back for ordering")
    if state.failed:
        info(f"{state.failed} of {state.finished} inputs failed")
        raise typer.Exit(1)


def _format_for(output: Path | None) -> str:
    """--output-format when not given: JSONL for an output file named *.jsonl or *.ndjson."""
    return "jsonl" if output is not None and output.suffix.lower() in (".jsonl", ".ndjson") else "text"


def _check_ray_args(input: str, output: str | None, output_format, fail_fast: bool, threads, merge: bool) -> None:
    if input == "-":
        raise UsageError("--ray reads files (a file, a directory, a glob, s3://...), not stdin")
    if output is None:
        raise UsageError("--ray needs -o DIR: the directory that receives the part files")
    if output_format is OutputFormat.text:
        raise UsageError("--ray writes JSONL records; --output-format text is for a local batch")
    if fail_fast:
        raise UsageError("--fail-fast is for a local batch; --ray records failures and goes on")
    if threads is not None:
        raise UsageError("with --ray, give the threads of each actor with --threads-per-actor")
    if merge:
        require_open("stdout", hint="--merge prints the records; redirect stdout to a file")


def _run_on_ray(scale, prepared, job, cluster, *, merge: bool, quiet: bool, verbose: bool) -> None:
    """The batch on Ray (kgen_cli/scale.py); the figures and interruptions reported as locally."""
    stats = scale.RunStats()
    stop = SignalStop()
    try:
        with stop.installed():
            scale.run_batch(prepared, job, cluster, stats=stats, watch=stop.watch,
                            progress=not quiet and stderr_is_tty(), verbose=verbose,
                            on_log=(lambda _note: None) if quiet else info)
    except Interrupted as exc:
        info(f"interrupted: {scale.written(prepared)} of {stats.shards} shards written to {prepared.out}; "
             f"--resume completes the rest")
        raise typer.Exit(exc.exit_code) from None
    if verbose:
        for line in stats.actor_lines():
            info(line)
        info(f"ray: {stats.shards} shards ({stats.skipped} already written), {stats.records} prompts "
             f"({stats.failed} failed), {stats.tokens} tokens generated")
    if merge:
        scale.merge(prepared.out, prepared.plan, sys.stdout.buffer.write)
        sys.stdout.flush()
    if stats.failed:
        info(f"{stats.failed} of {stats.records} inputs failed (their error records are in {prepared.out})")
        raise typer.Exit(1)


def _check_output(output: Path, input: str) -> None:
    check_output_file(output, "--output")
    try:  # stdin too: `kgen batch - -o f < f` would empty f before reading it
        source = os.fstat(sys.stdin.fileno()) if input == "-" else os.stat(input)
        same = os.path.samestat(source, os.stat(output))
    except (OSError, ValueError, AttributeError):  # either does not exist (yet), or no stdin
        same = False
    if same:
        raise UsageError("the output file is the input file")


def _is_regular(stream) -> bool:
    import stat

    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


def _open_input(path: str):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


class _FailFast(StopRequested):
    pass


class _BatchState:
    """Turns each finished record into output lines (and error messages)."""

    def __init__(self, fmt: str, writer, variants: int, fail_fast: bool, timings: bool, nl: str = ""):
        self.fmt = fmt
        self.nl = nl  # --nl: a line's default
        self.writer = writer
        self.variants = variants
        self.fail_fast = fail_fast
        self.timings = timings
        self.failed = 0
        self.finished = 0
        self.progress = lambda _result: None

    def record(self, rec, result, error) -> None:
        self.finished += 1
        if error is not None:
            self.failed += 1
            message = f"line {rec.line}: {error}"
            if self.fmt == "jsonl":
                from kgen_cli.batchio import error_record

                self.writer.add(rec.index, [error_record(rec, error, default_nl=self.nl)])
            else:
                # One line per input keeps output line i with input prompt i (and --resume exact).
                self.writer.add(rec.index, [""] if self.variants == 1 else [])
                if not self.fail_fast:
                    info(message)
            if self.fail_fast:
                raise _FailFast(message)
        else:
            self.writer.add(rec.index, self._render(rec, result))
            from kgen_cli.runner import shortfall  # loaded by now: it runs the jobs

            if note := shortfall(len(result["variants"]), result["n"]):
                info(f"line {rec.line}: {note}")
        self.progress(result)

    def _render(self, rec, result) -> list[str]:
        from kgen_cli.batchio import one_line, result_record

        if self.fmt == "text":
            return [one_line(v.formatted) for v in result["variants"]]
        return [result_record(rec, result, default_nl=self.nl, timings=self.timings)]


@contextmanager
def _progress(quiet: bool, total: int | None):
    """Progress on stderr (done/total, prompts/s, tokens/s, time left) only when stderr is a
    terminal: one line that results and messages print above (`console.StatusLine`)."""
    with status_line(enabled=not quiet) as line:
        if line is None:
            yield lambda _result: None
            return
        started = time.perf_counter()
        counts = {"done": 0, "tokens": 0}
        line.show(_progress_text(0, total, 0, 0.0))

        def advance(result) -> None:
            counts["done"] += 1
            if result is not None:
                counts["tokens"] += result.get("tokens", 0)
            line.show(_progress_text(counts["done"], total, counts["tokens"], time.perf_counter() - started))

        yield advance


def _progress_text(done: int, total: int | None, tokens: int, elapsed: float) -> str:
    """`expanding [#####-----] 3/6  0.90 prompts/s, 22 tok/s, 0:00:03 left`."""
    parts = ["expanding"]
    if total:
        filled = min(20, round(20 * done / total))
        parts.append("[" + "#" * filled + "-" * (20 - filled) + "]")
    parts.append(f"{done}/{total}" if total is not None else str(done))
    if done and elapsed > 0:
        parts.append(f"{done / elapsed:.2f} prompts/s, {tokens / elapsed:.0f} tok/s")
        if total:
            left = int(max(total - done, 0) * elapsed / done)
            parts[-1] += f", {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d} left"
    return " ".join(parts)
