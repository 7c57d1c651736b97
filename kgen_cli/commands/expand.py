"""`kgen expand`: upsample one prompt (or N variants of it)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from kgen_cli.commands import _options as o
from kgen_cli.records import SCHEMA_VERSION, input_json
from kgen_cli.console import examples, info, plain_output, require_open, stdout_is_tty, write_result
from kgen_cli.errors import KgenError, UsageError
from kgen_cli.options import VariantOptions
from kgen_cli.paths import check_output_file
from kgen_cli.samplers import sampler_named

EXAMPLES = examples(
    'kgen expand "1girl, dragon horns"',
    'kgen expand "1girl, scenery" --nl "A girl on a hill." -n 4 --seed 1',
    'kgen expand "1girl, solo" -m ./my-model.gguf --family dtg --json',
)

PromptArg = Annotated[
    Optional[str],
    typer.Argument(help="Comma-separated tags (A1111 weights, BREAK and <lora:…> kept). '-' or omitted with piped input: read stdin."),
]


def read_prompt(prompt: str | None, *, nl: str = "") -> str:
    """The argument wins; stdin is read only for '-' or when no argument is given and it is piped.
    Piped lines are joined into one prompt (tags may span lines), with a note on stderr pointing
    to `kgen batch` when there are several. No prompt, no --nl and a terminal on stdin is a
    usage error: kgen never waits on a terminal, nor runs an empty prompt by accident."""
    if prompt is None and not nl and sys.stdin.isatty():
        raise UsageError("no prompt: give the tags as an argument, or pipe them on stdin",
                         hint='kgen expand "1girl, dragon horns"')  # fmt: skip
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        from kgen_cli.batchio import MAX_PROMPT_BYTES, line_too_long

        data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)  # bounded: `< /dev/zero` is refused, not read
        if len(data) > MAX_PROMPT_BYTES:
            raise line_too_long(data, "stdin")
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise UsageError("stdin is UTF-16; kgen reads UTF-8 (convert it, e.g. with iconv)")
        try:
            text = data.decode("utf-8").removeprefix("\ufeff")  # a BOM from Windows editors
        except UnicodeDecodeError:
            raise UsageError("stdin is not valid UTF-8") from None
        if "\x00" in text:
            raise UsageError("stdin contains NUL bytes (a UTF-16 file? kgen reads UTF-8)")
        if (lines := sum(1 for line in text.splitlines() if line.strip())) > 1:
            info(f"note: the {lines} lines on stdin are one prompt; `kgen batch -` expands one prompt per line")
        return text
    return prompt or ""


def expand(
    prompt: PromptArg = None,
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
    tree_out: Annotated[Optional[Path], typer.Option("--tree-out", rich_help_panel=o.VARIANTS, help="TGTS: write the final tree as JSON to this file.")] = None,
    gpu_layers: o.GpuLayersOpt = "auto",
    n_ctx: o.NCtxOpt = None,
    context_length: o.ContextLengthOpt = None,
    threads: o.ThreadsOpt = None,
    show_prompt: Annotated[bool, typer.Option("--show-prompt", rich_help_panel=o.OUTPUT, help="Print the exact text of the first model call and exit (no model needed); with --json, an object with it and the parsed input.")] = False,
    json_: Annotated[bool, typer.Option("--json", rich_help_panel=o.OUTPUT, help="Print one JSON object with everything: input, model, seeds, sampling, every call's prompt and raw output, timings.")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", rich_help_panel=o.OUTPUT, help="Stream the generated text live when stdout is a terminal.")] = True,
    verbose: o.VerboseOpt = 0,
    llama_log: o.LlamaLogOpt = False,
) -> None:
    """Expand one prompt into a richer one with a TIPO or DanTagGen model.

    Prints one line (the formatted prompt) per variant on stdout.
    """
    import kgen_cli as kgen
    from kgen_cli import pipeline, runner
    from kgen_cli.registry import family_note, registry_spec_only

    require_open("stdout")  # before the model: every result goes there
    text = read_prompt(prompt, nl=nl)
    spec_model = registry_spec_only(model, family)
    options = o.generation_options(locals())
    request = options.request(text, family=spec_model.family, quality_line=spec_model.quality_line)
    llama_log = llama_log or verbose >= 2
    engine_options = kgen.EngineOptions(model, family, gpu_layers, n_ctx, context_length, threads, llama_log).checked()
    o.warn_high_temperature(temperature)
    note = family_note(spec_model)  # shown once the input is checked: an error stays one line
    if show_prompt:
        if note:
            info(note)
        first = pipeline.first_prompt(request)
        if json_:  # the exact text, unambiguous (trailing spaces and newlines included)
            write_result(json.dumps({"schema_version": SCHEMA_VERSION, "input": input_json(text, request.nl),
                                     "parsed": _parsed_input(request), "family": request.family,
                                     "operation": request.operation, "prompt": first}, ensure_ascii=False))  # fmt: skip
        else:
            write_result(first)
        return
    shape = VariantOptions.checked(variants, sampler, group_size, exploration)
    if tree_out is not None:
        if not (variants > 1 and sampler_named(shape.sampler).tree):
            raise UsageError("--tree-out needs the TGTS sampler with -n > 1")
        if str(tree_out) == "-":
            raise UsageError("--tree-out needs a file name: stdout carries the variants")
        check_output_file(tree_out, "--tree-out")

    gen = kgen.load(spec_model, family=engine_options.family, gpu_layers=engine_options.gpu_layers,
                    threads=threads, n_ctx=n_ctx, context_length=context_length, verbose=llama_log,
                    defaults=options, lazy=True, progress=True, on_log=info)
    resolved = gen.model
    seed = o.random_seed_if_unset(seed, show=not verbose)  # -v shows it below
    if verbose:
        where = "" if resolved.name == str(resolved.path) else f" {resolved.path}"
        info(f"model {resolved.name} ({resolved.family}){where}")
        info(f"seed {seed}")
    with gen:
        engine = gen.reserve(sequences=1 if variants == 1 else variants + 1,
                                 max_tokens=request.params.max_tokens)  # + the prompt anchor
        load_seconds = gen.load_seconds
        if verbose:
            info(f"threads {getattr(engine, 'model_info', {}).get('n_threads')}, n_ctx {engine.n_ctx}, "
                 f"loaded in {load_seconds:.2f}s")
        started = time.perf_counter()
        if variants == 1:
            on_text = _TerminalStream() if (stream and stdout_is_tty() and not json_) else None
            try:
                result = gen.expand(text, seed=seed, on_text=on_text)
            finally:
                if on_text is not None:
                    on_text.end()  # the final prompt (or an error) starts on a line of its own
            wall = time.perf_counter() - started
            if json_:
                write_result(json.dumps(_single_json(text, request, resolved, engine, seed, result, load_seconds, wall), ensure_ascii=False))
            else:
                write_result(result.formatted)
            if verbose:
                _report_timings(result, load_seconds, wall)
            return
        out, interrupted = _variants(gen, text, variants, seed, dict(sampler=sampler, group_size=group_size,
                                                                    exploration=exploration), json_)
        if json_ and out is not None:
            doc = _common_json(text, request, resolved, engine, seed, load_seconds)
            doc.update(out.to_dict())
            write_result(json.dumps(doc, ensure_ascii=False))
        if tree_out is not None and out is not None and out.tree is not None:
            _write_tree(tree_out, out.tree)  # after the results: a failure here loses none of them
        if interrupted is not None:
            got = "" if out is None else f": {len(out.variants)} of {variants} variants written"
            info(f"interrupted{got}")
            raise typer.Exit(interrupted.exit_code)
        if short := runner.shortfall(len(out.variants), variants, out.stop_reason):
            info(f"note: {short}")
        if verbose:
            info(f"{len(out.variants)} variants ({out.duplicates} duplicates removed), "
                 f"{out.tokens_decoded} tokens decoded in {out.wall_seconds:.2f}s")


def _variants(gen, text: str, n: int, seed: int, options: dict, json_: bool):
    """Run `gen.variants`; in text mode each variant is printed as soon as it is final (one
    line each, so that N variants stay N lines, as in kgen batch), so that `| head` ends the run
    early and a signal keeps what was printed. Returns (result, Interrupted or None): after
    SIGINT/SIGTERM the result holds the variants finished so far (None after a second signal)."""
    from kgen_cli.batchio import one_line
    from kgen_cli.stopping import Interrupted, SignalStop

    show = None if json_ else (lambda result, _figures: write_result(one_line(result.formatted)))
    stop = SignalStop(watch_stdout=True)
    try:
        with stop.installed():
            out = gen.variants(text, n, seed=seed, check=stop.check, on_variant=show, **options)
    except Interrupted as exc:
        return getattr(exc, "partial", None), exc
    return out, None


def _write_tree(path: Path, tree: dict) -> None:
    try:
        path.write_text(json.dumps(tree, ensure_ascii=False), encoding="utf-8")
    except OSError as exc:
        raise KgenError(f"cannot write --tree-out {path}: {exc.strerror or exc}") from None


# C0 controls and DEL except tab and newline: model text must not drive the terminal (ESC would
# start an escape sequence, CR would overwrite the line).
_CONTROLS = {c: "\ufffd" for c in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F]}


class _TerminalStream:
    """Generated text, dimmed, live on the terminal (stdout is one when this is used); plain
    under NO_COLOR or TERM=dumb."""

    def __init__(self) -> None:
        self.at_line_start = True
        self.dim = not plain_output()

    def __call__(self, text: str) -> None:
        text = text.translate(_CONTROLS)
        if not text:
            return
        if self.dim:  # each line's text; the newlines themselves stay outside the escape sequences
            text = "\n".join(f"\x1b[2m{line}\x1b[0m" if line else "" for line in text.split("\n"))
        sys.stdout.write(text)
        sys.stdout.flush()
        self.at_line_start = text.endswith("\n")

    def end(self) -> None:
        if not self.at_line_start:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.at_line_start = True


def _common_json(text, request, resolved, engine, seed, load_seconds) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "input": input_json(text, request.nl),
        "parsed": _parsed_input(request),
        "model": {"name": resolved.name, "path": str(resolved.path), "sha256": resolved.spec.sha256 if resolved.spec else None,
                  "family": resolved.family, "quality_line": request.quality_line},
        "family": request.family,
        "seed": seed,
        **_engine_json(engine),
        "sampling": request.params.to_dict(),
        "request": {"tag_length": request.tag_length, "nl_length": request.nl_length,
                    "operation": request.operation, "aspect_ratio": request.aspect_ratio,
                    "bans": request.bans.patterns, "retries": request.effective_retries},  # the default resolved
        "timings": {"load_seconds": round(load_seconds, 4)},
    }


def _engine_json(engine) -> dict:
    """Where the model ran: "device" and the context llama.cpp gave us."""
    from kgen_cli import engine as engine_mod

    model_info = getattr(engine, "model_info", {})
    offload = engine_mod.gpu_offload_supported()
    # What llama.cpp really offloads: nothing without GPU support, at most every layer + output.
    layers = min(int(model_info.get("n_gpu_layers", 0)), int(model_info.get("n_layer", 0)) + 1) if offload else 0
    return {
        "device": "gpu" if layers > 0 else "cpu",
        "engine": {"n_ctx": engine.n_ctx, "context_length": engine.window, "n_threads": model_info.get("n_threads"),
                   "gpu_layers": layers, "gpu_offload_supported": offload},
    }


def _parsed_input(request) -> dict:
    from kgen_cli.pipeline import parsed_input

    return parsed_input(request)


def _after_first(call: dict) -> int:
    sampled = call.get("n_tokens", 0) + (call.get("finish_reason") == "stop")
    return max(0, sampled - 1)


def _single_json(text, request, resolved, engine, seed, result, load_seconds, wall) -> dict:
    doc = _common_json(text, request, resolved, engine, seed, load_seconds)
    body = result.to_dict()
    calls = body.get("calls", [])
    prompt_s = sum(c.get("prompt_seconds", 0) for c in calls)
    gen_s = sum(c.get("generate_seconds", 0) for c in calls)
    n_prompt = sum(c.get("n_prompt_tokens", 0) for c in calls)
    n_gen = sum(c.get("n_tokens", 0) for c in calls)
    # The first token of a call comes with its prompt (prompt_seconds); generation_seconds covers
    # the tokens sampled after it, the end-of-generation token included when the model stopped.
    n_after_first = sum(_after_first(c) for c in calls)
    doc.update(body)
    doc["timings"].update({
        "prompt_eval_seconds": round(prompt_s, 4), "generation_seconds": round(gen_s, 4),
        "prompt_tokens": n_prompt, "generated_tokens": n_gen,
        "tokens_per_second": round(n_after_first / gen_s, 2) if gen_s > 0 and n_after_first else None,
        "wall_seconds": round(wall, 4),
    })
    return doc


def _report_timings(result, load_seconds: float, wall: float) -> None:
    calls = result.to_dict().get("calls", [])
    n_gen = sum(c.get("n_tokens", 0) for c in calls)
    gen_s = sum(c.get("generate_seconds", 0) for c in calls) or 1e-9
    info(f"load {load_seconds:.2f}s, {len(calls)} model calls, {n_gen} tokens, "
         f"{n_gen / gen_s:.1f} tok/s, wall {wall:.2f}s")
