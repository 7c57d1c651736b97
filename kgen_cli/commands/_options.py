"""Option aliases shared by `kgen expand` and `kgen batch`, so help text and types stay identical."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Mapping, Optional

import typer

if TYPE_CHECKING:
    from kgen_cli.options import GenerationOptions

from kgen_cli.errors import UsageError
from kgen_cli.sampling import MAX_N_CTX, MAX_SEQUENCES, MIN_CONTEXT_LENGTH, MIN_N_CTX, SEED_MAX, finite_float

RANDOM_SEED = -1  # --seed -1: a random seed, as the ComfyUI/A1111 extensions write it
HIGH_TEMPERATURE = 2.0  # above this, sampling is close to uniform: the output is mostly noise

GEN = "Generation"
SAMPLING = "Sampling"
OUTPUT = "Output"
ENGINE = "Model and engine"
VARIANTS = "Variants"


class Level(str, Enum):
    very_short = "very_short"
    short = "short"
    long = "long"
    very_long = "very_long"


class SamplerKind(str, Enum):
    tgts = "tgts"
    independent = "independent"


ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", envvar="KGEN_MODEL", rich_help_panel=ENGINE,
                 help="Registry name (kgen models list) or path to a local .gguf. \\[default: the registry's default]"),
]
FamilyOpt = Annotated[
    Optional[str],
    typer.Option("--family", rich_help_panel=ENGINE, metavar="[tipo|dtg]",
                 help="Prompt format for the model: tipo, dtg, or a family a plugin registered (needed for an unknown local .gguf)."),
]
GpuLayersOpt = Annotated[
    str,
    typer.Option("--gpu-layers", rich_help_panel=ENGINE,
                 help="Layers to offload: N, 'all', or 'auto' (all when llama.cpp has GPU offload, else 0)."),
]
NCtxOpt = Annotated[
    Optional[int],
    typer.Option("--n-ctx", min=MIN_N_CTX, max=MAX_N_CTX, rich_help_panel=ENGINE, help="KV cells shared by all sequences. \\[default: 4096, more for -n]"),
]
ContextLengthOpt = Annotated[
    Optional[int],
    typer.Option("--context-length", min=MIN_CONTEXT_LENGTH, max=MAX_N_CTX, rich_help_panel=ENGINE, help="Most tokens one model call spans, prompt included; a retry whose prompt leaves no room is not made. \\[default: the registry's context_length, 1024 for a local file]"),
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", "-t", min=1, rich_help_panel=ENGINE, help="CPU threads, fixed (-t as in llama.cpp). \\[default: the usable CPUs less other processes' load, at most 8, followed while decoding; see kgen info]"),
]
NlOpt = Annotated[
    str, typer.Option("--nl", rich_help_panel=GEN, help="Natural-language prompt (TIPO): alone or with tags."),
]
TagLengthOpt = Annotated[Level, typer.Option("--tag-length", rich_help_panel=GEN, help="Target tag count level.")]
NlLengthOpt = Annotated[Level, typer.Option("--nl-length", rich_help_panel=GEN, help="Target NL length level (TIPO).")]
OperationOpt = Annotated[
    Optional[str],
    typer.Option("--operation", rich_help_panel=GEN,
                 help="Run one TIPO operation instead of the automatic plan: None, short_to_tag, short_to_tag_to_long, "
                      "tag_to_long, tag_to_long_to_short, tag_to_short, tag_to_short_to_long, long_to_tag."),
]
WidthOpt = Annotated[Optional[int], typer.Option("--width", rich_help_panel=GEN, help="Image width (with --height) for the aspect ratio.")]
HeightOpt = Annotated[Optional[int], typer.Option("--height", rich_help_panel=GEN, help="Image height (with --width).")]
AspectOpt = Annotated[
    Optional[float],
    typer.Option("--aspect-ratio", "--ar", rich_help_panel=GEN, help="Width / height, e.g. 0.7. \\[default: 1.0]"),
]
BanOpt = Annotated[
    Optional[list[str]],
    typer.Option("--ban", rich_help_panel=GEN,
                 help="Never add this tag (repeatable, or comma-separated). Whole tag, case-insensitive, _ = space, "
                      "* wildcard; 're:PATTERN' for a regular expression. Your own tags are never removed."),
]
RetriesOpt = Annotated[
    Optional[int],
    typer.Option("--retries", min=0, max=999, rich_help_panel=GEN, help="Retries to reach the length target; 0 disables. \\[default: TIPO 10, DTG 20]"),
]
FormatOpt = Annotated[
    str,
    typer.Option("--format", "-f", rich_help_panel=OUTPUT,
                 help="Output template: a preset (oneline, tag-only, nl-only, both-tag-first, both-nl-first, "
                      "both-generated, comfyui, tree), a literal template with <|field|> markers, or @FILE."),
]
EscapeOpt = Annotated[
    bool, typer.Option("--escape-parens", rich_help_panel=OUTPUT, help="Write ( ) in tags as \\( \\) for A1111/ComfyUI."),
]
SeedOpt = Annotated[
    Optional[int],
    typer.Option("--seed", "-s", min=RANDOM_SEED, max=SEED_MAX, rich_help_panel=SAMPLING,
                 help="Seed in [0, 4294967294], or -1 for a random one; same seed, model and version reproduce the output on CPU. \\[default: random, shown on stderr in a terminal and in --json]"),
]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", "--temp", min=0.0, parser=finite_float, rich_help_panel=SAMPLING, help="Temperature (0 = greedy; above 2 gets a warning). \\[default: TIPO 0.35, DTG 0.5]")]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", rich_help_panel=SAMPLING, help="Top-p in (0, 1] (1 = off). \\[default: 0.95]")]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", min=0, rich_help_panel=SAMPLING, help="Top-k (0 = off). \\[default: TIPO 60, DTG 100]")]
MinPOpt = Annotated[Optional[float], typer.Option("--min-p", min=0.0, max=1.0, parser=finite_float, rich_help_panel=SAMPLING, help="Min-p (0 = off). \\[default: TIPO 0.1, DTG 0]")]
RepeatPenaltyOpt = Annotated[Optional[float], typer.Option("--repeat-penalty", rich_help_panel=SAMPLING, help="Repetition penalty over the last 64 tokens, > 0 (1 = off). \\[default: TIPO 1.17, DTG 1.0]")]
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens", rich_help_panel=SAMPLING, help="New tokens per model call. \\[default: TIPO 512, DTG 256]")]
VariantsOpt = Annotated[int, typer.Option("--variants", "-n", min=1, max=1024, rich_help_panel=VARIANTS, help="Distinct variants to return, one line each, printed as each one finishes (a multi-line --format is joined with spaces; --json keeps it).")]
SamplerOpt = Annotated[
    Optional[SamplerKind],
    typer.Option("--sampler", rich_help_panel=VARIANTS,
                 help="How variants share work: tgts (token-group tree sampling) or independent (shared prompt cache). \\[default: tgts when -n > 1]"),
]
GroupSizeOpt = Annotated[Optional[int], typer.Option("--group-size", min=1, rich_help_panel=VARIANTS, help="Separators (commas) per token group: TGTS's segments, and the segments independent variants are scored by. \\[default: 4]")]
ExplorationOpt = Annotated[Optional[float], typer.Option("--exploration", min=0.0, parser=finite_float, rich_help_panel=VARIANTS, help="TGTS: UCT exploration constant. \\[default: 1.0]")]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="kgen's diagnostics on stderr: model, seed, threads, timings, decode figures; -vv adds llama.cpp's own log.")]
LlamaLogOpt = Annotated[bool, typer.Option("--llama-log", help="llama.cpp's own log on stderr (as -vv).")]

RAY = "Scale-out (Ray)"
AddressOpt = Annotated[Optional[str], typer.Option("--address", rich_help_panel=RAY, help="--ray: the cluster: auto (the one `ray start` runs on this machine), HOST:PORT or ray://HOST:PORT. \\[default: a local Ray for this run]")]
ActorsOpt = Annotated[Optional[str], typer.Option("--actors", metavar="N[:M]", rich_help_panel=RAY, help="--ray: N actors, or N:M to autoscale between N and M. \\[default: the cluster's CPUs / --threads-per-actor]")]
ThreadsPerActorOpt = Annotated[int, typer.Option("--threads-per-actor", min=1, rich_help_panel=RAY, help="--ray: CPUs reserved for each actor, and its llama.cpp threads.")]
GpusPerActorOpt = Annotated[float, typer.Option("--gpus-per-actor", min=0, rich_help_panel=RAY, help="--ray: GPUs reserved for each actor (its layers offloaded per --gpu-layers).")]
ShardSizeOpt = Annotated[int, typer.Option("--shard-size", min=1, rich_help_panel=RAY, help="--ray: inputs (prompts, images) per shard: one unit of work and of retry.")]


def ray_cluster(ray: bool, address: str | None, actors: str | None, threads_per_actor: int, gpus_per_actor: float,
                shard_size: int, **others: bool):  # fmt: skip
    """The `scale.Cluster` of the Ray options (None without --ray). Without --ray, any Ray option
    given (`others`: the command's own, name -> given) is a usage error."""
    from kgen_cli.scale import DEFAULT_SHARD_SIZE, Cluster, parse_actors

    given = {"--address": address is not None, "--actors": actors is not None,
             "--threads-per-actor": threads_per_actor != 1, "--gpus-per-actor": gpus_per_actor != 0,
             "--shard-size": shard_size != DEFAULT_SHARD_SIZE, **others}
    if not ray:
        if named := [name for name, set_ in given.items() if set_]:
            raise UsageError(f"{named[0]} is for --ray")
        return None
    return Cluster(address, parse_actors(actors), threads_per_actor, gpus_per_actor)



def random_seed_if_unset(seed: int | None, *, show: bool = True) -> int:
    """The run's seed: the one given, else (None or -1) a random one, shown as `seed N` on
    stderr when it is a terminal (to rerun it) and `show` (False when -v or -q say otherwise)."""
    from kgen_cli.console import info, stderr_is_tty
    from kgen_cli.runner import random_seed

    if seed is not None and seed != RANDOM_SEED:
        return seed
    seed = random_seed()
    if stderr_is_tty() and show:
        info(f"seed {seed}")
    return seed


def warn_high_temperature(temperature: float | None) -> None:
    """One warning line on stderr for a temperature above 2 (llama.cpp users typed -t 8 for threads)."""
    from kgen_cli.console import info

    if temperature is not None and temperature > HIGH_TEMPERATURE:
        info(f"warning: temperature {temperature:g} is above {HIGH_TEMPERATURE:g}: the output will be mostly noise "
             "(-t is --threads; --temp is the temperature)")


def generation_options(params: Mapping[str, Any]) -> GenerationOptions:
    """The `GenerationOptions` a command was given: its parameters of the same names (`format_`
    is the CLI's spelling of `format`), so expand and batch build them one way."""
    from kgen_cli.options import GenerationOptions

    given = {name: params["format_" if name == "format" else name] for name in GenerationOptions.names()
             if ("format_" if name == "format" else name) in params}
    return GenerationOptions(**given)
