"""`kgen batch`: expand every prompt of a file or stdin, concurrently, written in input order."""

from __future__ import annotations

import json
import signal
import sys
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from kgen_cli import options as o
from kgen_cli.console import err_console, stderr_is_tty
from kgen_cli.errors import KgenError, UsageError


class InputFormat(str, Enum):
    lines = "lines"
    jsonl = "jsonl"


class OutputFormat(str, Enum):
    text = "text"
    jsonl = "jsonl"


class Interrupted(Exception):
    """SIGINT/SIGTERM during a batch: finish writing, then exit 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 128 + signum


@contextmanager
def _signals_raise():
    def handler(signum, _frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def batch(
    input: Annotated[str, typer.Argument(help="Prompt file, or '-' for stdin: one prompt per line, or JSONL objects.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file. [default: stdout]")] = None,
    input_format: Annotated[Optional[InputFormat], typer.Option("--input-format", help="lines or jsonl. [default: detected from the first prompt line]")] = None,
    output_format: Annotated[OutputFormat, typer.Option("--output-format", help="text (one prompt per line) or jsonl (one object per input).")] = OutputFormat.text,
    parallel: Annotated[int, typer.Option("--parallel", "-p", min=1, max=256, help="Sequences decoded concurrently.")] = 16,
    resume: Annotated[bool, typer.Option("--resume", help="Skip inputs already in -o OUTPUT and append the rest.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failing line.")] = False,
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
    gpu_layers: o.GpuLayersOpt = "auto",
    n_ctx: o.NCtxOpt = None,
    threads: o.ThreadsOpt = None,
    verbose: o.VerboseOpt = False,
) -> None:
    """Expand every prompt of a file or stdin. Line i gets seed S + i with --seed S.

    Results are written in input order; a bad line gives an error record (jsonl) or a message on
    stderr and the batch goes on (exit status 1 at the end).
    """
    from kgen_cli import batchjobs, runner
    from kgen_cli.batchio import OrderedWriter, read_records, scan_done
    from kgen_cli.registry import registry_spec_only, resolve_model

    if resume and output is None:
        raise UsageError("--resume needs -o OUTPUT")
    fam = family.value if family else None
    spec = registry_spec_only(model, fam)
    defaults = dict(
        nl=nl, family=spec.family, quality_line=spec.quality_line, tag_length=tag_length, nl_length=nl_length,
        operation=operation, width=width, height=height, aspect_ratio=aspect_ratio, ban=ban, retries=retries,
        format_=format_, escape_parens=escape_parens, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, repeat_penalty=repeat_penalty, max_tokens=max_tokens,
    )
    from kgen_cli.commands.expand import build_request

    build_request("", **defaults)  # validate the shared options before touching the model
    fmt = output_format.value
    done = scan_done(str(output), fmt, variants) if resume else set()
    base_seed = runner.random_seed() if seed is None else seed
    if verbose:
        err_console.print(f"base seed {base_seed}", highlight=False)

    resolved = resolve_model(model, fam, download_missing=True)
    engine, _load = runner.open_engine(runner.EngineConfig(
        model_path=str(resolved.path), n_ctx=n_ctx, gpu_layers=runner.parse_gpu_layers(gpu_layers),
        threads=threads, verbose=verbose, n_seq_max=parallel, context_length=resolved.context_length))
    stream = sys.stdin.buffer if input == "-" else _open_input(input)
    out = sys.stdout if output is None else open(output, "a" if resume else "w", encoding="utf-8")
    writer = OrderedWriter(out, skip=done)
    state = _BatchState(fail_fast=fail_fast)
    try:
        with _signals_raise(), _progress(quiet, input) as progress:
            records = (r for r in read_records(stream, input_format.value if input_format else None)
                       if r.index not in done)
            batchjobs.run_batch(
                engine, records, defaults, base_seed, variants=variants, parallel=parallel,
                on_done=lambda rec, res, err: state.record(rec, res, err, writer, fmt, progress),
            )
    except Interrupted as exc:
        if fmt == "jsonl":
            writer.flush_out_of_order()
        err_console.print(f"interrupted: {state.finished} results written", highlight=False)
        raise typer.Exit(exc.exit_code)
    finally:
        engine.close()
        if out is not sys.stdout:
            out.close()
    if state.failed:
        raise typer.Exit(1)


def _open_input(path: str):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


class _BatchState:
    def __init__(self, fail_fast: bool):
        self.fail_fast = fail_fast
        self.failed = 0
        self.finished = 0
        self.stop = False

    def record(self, rec, result, error, writer, fmt, progress) -> None:
        self.finished += 1
        if error is not None:
            self.failed += 1
            message = str(error)
            if fmt == "jsonl":
                writer.add(rec.index, [json.dumps({"index": rec.index, "line": rec.line, "id": rec.id,
                                                   "input": rec.fields, "error": message}, ensure_ascii=False)])
            else:
                err_console.print(f"line {rec.line}: {message}", highlight=False, markup=False)
                writer.add(rec.index, [])
            if self.fail_fast:
                self.stop = True
                raise KgenError(f"line {rec.line}: {message}")
        else:
            writer.add(rec.index, _render(rec, result, fmt))
        progress(result)


def _render(rec, result, fmt: str) -> list[str]:
    variants = result["variants"]
    if fmt == "text":
        return [v.formatted for v in variants]
    body = {"index": rec.index, "line": rec.line, "id": rec.id, "input": rec.fields, "seed": result["seed"]}
    if len(variants) == 1 and result["n"] == 1:
        body.update(variants[0].to_dict())
    else:
        body["variants"] = [v.to_dict() for v in variants]
        body["duplicates_removed"] = result["duplicates"]
    return [json.dumps(body, ensure_ascii=False)]


@contextmanager
def _progress(quiet: bool, input_name: str):
    """Progress on stderr (done, prompts/s, tokens/s, ETA) only when stderr is a terminal."""
    if quiet or not stderr_is_tty():
        yield lambda _result: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = None
    if input_name != "-":
        with open(input_name, "rb") as fh:
            total = sum(1 for line in fh if line.strip() and not line.lstrip().startswith(b"#"))
    started = time.perf_counter()
    tokens = [0]
    with Progress(TextColumn("expanding"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("batch", total=total, rate="")

        def advance(result) -> None:
            if result is not None:
                tokens[0] += result.get("tokens", 0)
            elapsed = max(time.perf_counter() - started, 1e-9)
            done = bar.tasks[0].completed + 1
            bar.update(task, advance=1, rate=f"{done / elapsed:.2f} prompts/s {tokens[0] / elapsed:.0f} tok/s")

        yield advance
