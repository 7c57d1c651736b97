"""`kgen caption`: write a natural-language caption for every image of a dataset from its tags."""

from __future__ import annotations

import json
import os
import time
from contextlib import closing, contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from kgen_cli.commands import _options as o
from kgen_cli.caption.output import Existing
from kgen_cli.console import err_console, examples, info, require_open, stderr_is_tty, write_result
from kgen_cli.errors import KgenError, UsageError
from kgen_cli.paths import check_output_file
from kgen_cli.scale import DEFAULT_SHARD_SIZE
from kgen_cli.sampling import MAX_N_CTX, MIN_CONTEXT_LENGTH, MIN_N_CTX, finite_float

EXAMPLES = examples(
    "kgen caption dataset/ -r",
    "kgen caption dataset/ --backend chat -m instruct.gguf --wiki wiki.parquet --trigger mystyle",
    "kgen caption dataset/ --backend openai --base-url http://127.0.0.1:1234/v1 --api-model NAME --json",
)

STAGES = "Stages and backends"
SHAPING = "Tag shaping"


class Backend(str, Enum):
    tipo = "tipo"
    chat = "chat"
    openai = "openai"


def caption(
    source: Annotated[Path, typer.Argument(help="A dataset folder, or a FILELIST (one image path per line).")],
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Also caption the images of subfolders.")] = False,
    tags_ext: Annotated[str, typer.Option("--tags-ext", help="Extension of the tag files beside the images.")] = ".txt",
    backend: Annotated[Backend, typer.Option("--backend", "-b", rich_help_panel=STAGES, help="tipo: the registry's TIPO model turns tags into prose; chat: a local instruct GGUF (--model); openai: an OpenAI-compatible server (--base-url, --api-model).")] = Backend.tipo,
    model: Annotated[Optional[str], typer.Option("--model", "-m", rich_help_panel=STAGES, help="tipo: registry name or TIPO .gguf \\[default: the registry's default]; chat: path to an instruct .gguf.")] = None,
    chat_template: Annotated[Optional[str], typer.Option("--chat-template", rich_help_panel=STAGES, help="chat: one of llama.cpp's built-in chat templates (chatml, llama3, gemma, ...). \\[default: recognised from the GGUF]")] = None,
    base_url: Annotated[str, typer.Option("--base-url", envvar="OPENAI_BASE_URL", rich_help_panel=STAGES, help="openai: the server's API root.")] = "http://127.0.0.1:8080/v1",
    api_model: Annotated[Optional[str], typer.Option("--api-model", rich_help_panel=STAGES, help="openai: the model name to ask the server for.")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", rich_help_panel=STAGES, help="openai: the environment variable holding the API key (never printed).")] = "OPENAI_API_KEY",
    vision_model: Annotated[Optional[str], typer.Option("--vision-model", rich_help_panel=STAGES, help="openai: a vision model on the same server describes each image first ({image_description}).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, rich_help_panel=STAGES, help="openai: seconds to wait for one answer.")] = 120.0,
    max_retries: Annotated[int, typer.Option("--max-retries", min=0, max=20, rich_help_panel=STAGES, help="openai: retries of a request after 429, 5xx or a dropped connection (exponential backoff).")] = 3,
    parallel: Annotated[int, typer.Option("--parallel", "-p", min=1, max=256, rich_help_panel=STAGES, help="Images in flight: sequences decoded together (tipo, chat) or concurrent requests (openai).")] = 8,
    wiki: Annotated[Optional[str], typer.Option("--wiki", rich_help_panel=STAGES, help="chat/openai: Danbooru wiki table for tag descriptions: a .jsonl/.csv/.parquet file (tag or title, body) or hf:OWNER/NAME\\[@REV] (e.g. hf:isek-ai/danbooru-wiki-2024).")] = None,
    describe_only: Annotated[bool, typer.Option("--describe-only", rich_help_panel=STAGES, help="Only fill the tag-description cache (needs --wiki); write no caption.")] = False,
    template: Annotated[Optional[str], typer.Option("--template", rich_help_panel=STAGES, help="chat/openai: caption prompt: a preset (short, short-no-description, long) or @FILE with {tags}, {tag_descriptions}, {image_description}, {name}, {directory}, {trigger}. \\[default: short with --vision-model, else short-no-description]")] = None,
    nl_length: o.NlLengthOpt = o.Level.long,
    undesired_tags: Annotated[Optional[list[str]], typer.Option("--undesired-tags", rich_help_panel=SHAPING, help="Drop these tags (repeatable or comma-separated; * wildcard, re:REGEX).")] = None,
    replace: Annotated[Optional[str], typer.Option("--replace", rich_help_panel=SHAPING, help="Replace tags: 'source,target;source,target' (empty target: drop).")] = None,
    always_first: Annotated[Optional[str], typer.Option("--always-first", rich_help_panel=SHAPING, help="Comma-separated tags moved to the front when present (e.g. '1girl,1boy').")] = None,
    trigger: Annotated[Optional[str], typer.Option("--trigger", rich_help_panel=SHAPING, help="Trigger word: first in every caption ({trigger} in templates).")] = None,
    prepend: Annotated[Optional[str], typer.Option("--prepend", rich_help_panel=SHAPING, help="Text put before every caption.")] = None,
    append: Annotated[Optional[str], typer.Option("--append", rich_help_panel=SHAPING, help="Text put after every caption.")] = None,
    caption_ext: Annotated[str, typer.Option("--caption-ext", rich_help_panel=o.OUTPUT, help="Extension of the caption files (the tag files' own only with --existing overwrite).")] = ".caption",
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", rich_help_panel=o.OUTPUT, help="Write the captions here, mirroring the dataset's folders, instead of beside the images.")] = None,
    existing: Annotated[Existing, typer.Option("--existing", rich_help_panel=o.OUTPUT, help="An existing caption file: skip it (a rerun resumes), overwrite it, or append / prepend the new caption on its own line.")] = Existing.skip,
    json_: Annotated[bool, typer.Option("--json", rich_help_panel=o.OUTPUT, help="Print one JSON record per image on stdout (paths, tags, prompts, caption, backend, model, seed, seconds, or error).")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", rich_help_panel=o.OUTPUT, help="Write the JSON records to this file (JSONL).")] = None,
    seed: o.SeedOpt = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", min=0.0, parser=finite_float, rich_help_panel=o.SAMPLING, help="Temperature (0 = greedy). \\[default: tipo 0.35, chat/openai 0.6]")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", rich_help_panel=o.SAMPLING, help="New tokens per model call. \\[default: tipo 512, chat/openai 256]")] = None,
    gpu_layers: o.GpuLayersOpt = "auto",
    n_ctx: Annotated[Optional[int], typer.Option("--n-ctx", min=MIN_N_CTX, max=MAX_N_CTX, rich_help_panel=o.ENGINE, help="KV cells for all sequences. \\[default: as kgen batch sizes it, plus room for longer chat prompts]")] = None,
    context_length: Annotated[Optional[int], typer.Option("--context-length", min=MIN_CONTEXT_LENGTH, max=MAX_N_CTX, rich_help_panel=o.ENGINE, help="Most tokens one model call spans, prompt included. \\[default: tipo: the registry's; chat: 2048]")] = None,
    threads: o.ThreadsOpt = None,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first image that fails.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display, no summary line.")] = False,
    verbose: o.VerboseOpt = False,
    ray: Annotated[bool, typer.Option("--ray", rich_help_panel=o.RAY, help="Run on Ray Data (tipo, chat): the images cut into shards, captioned by actors that each hold the model; the dataset and the captions on a path every node sees. Needs pip install 'kgen-cli[ray]'; see docs/scale-out.md.")] = False,
    address: o.AddressOpt = None,
    actors: o.ActorsOpt = None,
    threads_per_actor: o.ThreadsPerActorOpt = 1,
    gpus_per_actor: o.GpusPerActorOpt = 0.0,
    shard_size: o.ShardSizeOpt = DEFAULT_SHARD_SIZE,
) -> None:
    """Caption a training dataset: one natural-language caption per image, from its tag file.

    Finds the images (png, jpg/jpeg, webp, bmp, gif) of SOURCE and their same-name tag files, shapes
    the tags, and writes a caption file beside each image (or under --out-dir). tipo (default) runs
    the registry's TIPO model locally; chat a local instruct model from a prompt template, with tag
    descriptions from a Danbooru wiki table (--wiki, summarised once and cached); openai the same
    stages on an OpenAI-compatible server, plus an optional vision model. Image i in sorted path
    order gets seed S + i. A rerun skips the images that have a caption (resume). An image that
    fails gets an error record and the run goes on (exit 1 at the end); Ctrl-C / SIGTERM keep the
    finished captions, never a partial file (exit 130/143). See docs/caption.md.

    --ray: the same run on Ray Data, locally or on a cluster (--address), each actor holding the
    model; the records come back here. See docs/scale-out.md.
    """
    from kgen_cli import runner
    from kgen_cli.caption import templates
    from kgen_cli.caption.discovery import check_extension, find_images
    from kgen_cli.caption.output import check_policy
    from kgen_cli.caption.run import CHAT_PARAMS, CaptionSettings, Captioner, FailFast
    from kgen_cli.caption.shaping import TagShaping
    from kgen_cli.options import parse_gpu_layers
    from kgen_cli.sampling import FAMILY_DEFAULTS, validate_params
    from kgen_cli.stopping import Interrupted, SignalStop

    kind = backend.value
    cluster = o.ray_cluster(ray, address, actors, threads_per_actor, gpus_per_actor, shard_size)
    if ray:
        from kgen_cli.caption.scale import check_ray_policy
        from kgen_cli.scale import require_ray

        check_ray_policy(kind, existing)
        require_ray()
        if threads is not None:
            raise UsageError("with --ray, give the threads of each actor with --threads-per-actor")
        if describe_only:
            raise UsageError("--describe-only fills this machine's description cache; run it without --ray")
    tags_ext = check_extension(tags_ext, "--tags-ext")
    caption_ext = check_extension(caption_ext, "--caption-ext")
    if output is not None:
        check_output_file(output, "--output")
    if json_:
        require_open("stdout", hint="write the records to a file with -o FILE")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is not a folder")
    if kind == "tipo":
        for option, value in (("--wiki", wiki), ("--template", template), ("--vision-model", vision_model),
                              ("--chat-template", chat_template), ("--api-model", api_model)):
            if value is not None:
                raise UsageError(f"{option} is for --backend chat or openai; TIPO writes prose from the tags alone")
    if vision_model and kind != "openai":
        raise UsageError("--vision-model needs --backend openai")
    if kind == "chat" and not model:
        raise UsageError("--backend chat needs --model PATH to an instruct .gguf")
    if kind == "openai" and not api_model:
        raise UsageError("--backend openai needs --api-model NAME")
    if describe_only and not wiki:
        raise UsageError("--describe-only needs --wiki")
    if wiki:
        from kgen_cli.caption.wiki import check_wiki

        check_wiki(wiki)
    template_text = ""
    if kind != "tipo":
        template_text = templates.resolve_template(template or ("short" if vision_model else "short-no-description"))
    shaping = TagShaping.from_options(undesired=undesired_tags, replace=replace, always_first=always_first,
                                      trigger=trigger, prepend=prepend, append=append)
    base = FAMILY_DEFAULTS["tipo"] if kind == "tipo" else CHAT_PARAMS
    params = base.with_overrides(temperature=temperature, max_tokens=max_tokens)
    validate_params(params, 0)  # what llama.cpp (or a server) would refuse, before any work
    layers = parse_gpu_layers(gpu_layers)
    root, items = find_images(source, recursive=recursive, tags_ext=tags_ext)
    check_policy(items, caption_ext, out_dir, existing)
    base_seed = runner.random_seed() if seed is None else seed
    settings = CaptionSettings(backend=kind, template=template_text, shaping=shaping, caption_ext=caption_ext,
                               out_dir=out_dir, existing=existing, seed=base_seed,
                               params=params, nl_length=nl_length.value,
                               tipo_options={"temperature": temperature, "max_tokens": max_tokens}
                               if kind == "tipo" else {},
                               vision_model=vision_model, fail_fast=fail_fast)
    if not items:
        if not quiet:
            info(f"no images in {source}")
        return

    template_name = None
    engine_options = dict(parallel=parallel, n_ctx=n_ctx, context_length=context_length, threads=threads,
                          gpu_layers=layers, verbose=verbose)
    from kgen_cli.caption import backends

    if kind == "openai":  # a server costs nothing to open: checked at once, before any image
        server = backends.OpenAIBackend(base_url, api_model, api_key=os.environ.get(api_key_env) or None,
                                        parallel=parallel, timeout=timeout, retries=max_retries)
        server.check_server([api_model] + ([vision_model] if vision_model else []))
        model_name = server.model_name

        def open_backend():
            return server
    elif kind == "chat":
        path, template_name = backends.chat_model(model, chat_template)  # checked before any image is read
        model_name = path.name
        model = str(path.absolute())

        def open_backend():
            return backends.load_chat(path, chat_template=template_name, max_tokens=params.max_tokens,
                                      **engine_options)
    else:
        from kgen_cli.registry import registry_spec_only

        model_name = registry_spec_only(model, "tipo").name

        def open_backend():
            return backends.load_tipo(model, max_tokens=params.max_tokens, **engine_options)

    cache = None
    loader = None
    if wiki and cluster is None:
        from kgen_cli.caption.wiki import CACHE_FILE, DescriptionCache, open_wiki
        from kgen_cli.paths import kgen_home

        cache = DescriptionCache(kgen_home() / CACHE_FILE)
        loader = lambda: open_wiki(wiki)  # noqa: E731 - opened when a tag needs describing
    if verbose:
        info(f"{len(items)} images in {root}; backend {kind}, model {model_name}, base seed {base_seed}, "
             f"{parallel} in flight")
    report = open(output, "w", encoding="utf-8", newline="\n") if output is not None else None
    stop = SignalStop()
    started = time.perf_counter()
    captioner = None
    try:
        with stop.installed(), _progress(quiet, len(items)) as progress:
            def on_record(record: dict) -> None:
                line = json.dumps(record, ensure_ascii=False)
                if report is not None:
                    report.write(line + "\n")
                    report.flush()
                if json_:
                    write_result(line)
                if record["status"] == "error" and not quiet:
                    info(f"{record['image']}: {record['error']}")
                progress()

            captioner = Captioner(settings, open_backend, model_name=model_name, on_record=on_record,
                                  check=stop.check, wiki=loader, cache=cache)
            try:
                if cluster is None:
                    stats = captioner.run(items, describe_only=describe_only)
                else:
                    stats = _run_on_ray(captioner, items, cluster, stop, kind=kind, model=model,
                                        chat_template=template_name, wiki=wiki,
                                        max_tokens=params.max_tokens, engine=engine_options, shard_size=shard_size,
                                        quiet=quiet, verbose=verbose)
                stop.check()
            except Interrupted as exc:
                stop.finishing = True
                stats = captioner.stats
                info(f"interrupted: {stats.written} captions written, {stats.failed} failed; "
                     f"rerun the same command to caption the rest")
                raise typer.Exit(exc.exit_code) from None
            except FailFast as exc:
                raise KgenError(str(exc)) from None
    finally:
        gen = captioner.opened if captioner is not None else None
        if gen is not None:
            gen.close()
        if cache is not None:
            cache.close()
        if report is not None:
            report.close()
    if verbose and getattr(gen, "stats", None) is not None:  # the local scheduler's figures
        s = gen.stats
        info(f"scheduler: {s.steps} decode steps, {s.tokens_decoded} tokens decoded, "
             f"{s.generated_tokens} tokens generated")
    if not quiet:
        elapsed = time.perf_counter() - started
        info(f"{stats.summary(describe_only=describe_only)} in {elapsed:.1f}s")
    if stats.failed:
        raise typer.Exit(1)


def _run_on_ray(captioner, items, cluster, stop, *, kind: str, model: str | None, chat_template: str | None,
                wiki: str | None, max_tokens: int, engine: dict, shard_size: int, quiet: bool, verbose: bool):
    """The images captioned by Ray actors (kgen_cli/caption/scale.py); their records reported as
    a local run reports them. The actors get absolute paths (they run in other folders); the
    records show the paths as given, as a local run's do."""
    from dataclasses import replace

    from kgen_cli.caption import scale as caption_scale
    from kgen_cli.caption.discovery import ImageItem
    from kgen_cli.caption.output import caption_path
    from kgen_cli.scale import model_for_actors

    if kind == "tipo":
        model = model_for_actors(model, family="tipo", progress=not quiet, on_log=(lambda _note: None) if quiet else info)
    s = captioner.settings
    settings = replace(s, out_dir=s.out_dir.absolute() if s.out_dir is not None else None)
    job = caption_scale.CaptionJob(settings, kind, model, captioner.model_name, max_tokens,
                                   {**engine, "threads": cluster.threads}, chat_template=chat_template, wiki=wiki)
    given = {i.index: i for i in items}
    shipped = [ImageItem(i.index, i.path.absolute(), i.rel, i.tag_path.absolute()) for i in items]
    captioner.stats.images += len(items)
    per_actor: dict[str, int] = {}
    # kgen's own progress line counts the records; Ray Data's bars stay off.
    with closing(caption_scale.run(shipped, job, cluster, shard_size=shard_size, watch=stop.watch,
                                   verbose=verbose)) as records:
        for record, actor in records:  # --fail-fast raises here: closing stops the run on Ray
            per_actor[actor] = per_actor.get(actor, 0) + 1
            item = given[record["index"]]  # the paths as a local run writes them
            record.update(image=str(item.path), tags_file=str(item.tag_path))
            if record["caption_file"] is not None:
                record["caption_file"] = str(caption_path(item, s.caption_ext, s.out_dir))
            captioner.emit(record)
    if verbose:
        for actor, n in sorted(per_actor.items()):
            info(f"actor {actor}: {n} images")
    return captioner.stats


@contextmanager
def _progress(quiet: bool, total: int):
    """Progress on stderr (done/total, captions/s, ETA) only when stderr is a terminal."""
    if quiet or not stderr_is_tty():
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    started = time.perf_counter()
    done = [0]
    with Progress(TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("caption", total=total, rate="")

        def advance() -> None:
            done[0] += 1
            rate = done[0] / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=1, rate=f"{rate:.2f} captions/s")

        yield advance
