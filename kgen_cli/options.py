"""The typed options of a run, validated in one place.

`GenerationOptions` holds what shapes one expand (NL, lengths, operation, aspect ratio, format,
bans, retries, sampling); `GenerationOptions.request(tags, family=...)` validates them into the
`pipeline.ExpandRequest` a job runs. `EngineOptions` holds what opens a model (model, family, GPU
layers, context sizes, threads); `EngineOptions.checked()` validates them. `VariantOptions` holds
how N variants of one prompt share work. `kgen expand`, `kgen batch` (its options and each JSONL
line's own) and the Python API all build these, so a bad value gets the same message everywhere.

Values may be plain strings or the command layer's str Enums (`Level.long`). Import-light: the
format, ban and pipeline modules are imported when a request is built.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from typing import Any, Mapping

from kgen_cli.errors import UsageError
from kgen_cli.sampling import MAX_N_CTX, MIN_CONTEXT_LENGTH, MIN_N_CTX, validate_params
from kgen_cli.tree import DEFAULT_EXPLORATION, DEFAULT_GROUP_SIZE



def _text(value: Any) -> Any:
    """A str Enum's value (the command layer's choices), anything else unchanged."""
    return value.value if isinstance(value, Enum) else value


@dataclass(frozen=True)
class GenerationOptions:
    """Everything that shapes one expand except its tags and seed. None: the family's default.

    Field names are the CLI's long options (`--tag-length` -> `tag_length`; `--format` ->
    `format`) and the keys of a `kgen batch` JSONL line."""

    nl: str = ""
    tag_length: str = "long"
    nl_length: str = "long"
    operation: str | None = None
    expand_tags: bool = True  # False: the automatic plan adds no tags (TIPO writes only the NL)
    width: int | None = None
    height: int | None = None
    aspect_ratio: float | None = None
    ban: tuple[str, ...] | list[str] | str | None = None
    retries: int | None = None
    format: str = "oneline"
    escape_parens: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    max_tokens: int | None = None

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    def updated(self, overrides: Mapping[str, Any]) -> GenerationOptions:
        """These options with `overrides` on top (None values ignored). A new aspect ratio
        replaces the old one whichever way either was given (width/height or aspect_ratio).
        Unknown names raise UsageError."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if unknown := sorted(set(overrides) - self.names()):
            raise UsageError(f"unknown option(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(sorted(self.names()))}")
        base = self
        if "width" in overrides or "height" in overrides:
            base = replace(base, aspect_ratio=None)
        if "aspect_ratio" in overrides:
            base = replace(base, width=None, height=None)
        return replace(base, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    def request(self, tags: str, *, family: str, quality_line: bool = False):
        """Validate into a `pipeline.ExpandRequest` (UsageError on bad input)."""
        from kgen_cli import families
        from kgen_cli.formats.bans import BanList
        from kgen_cli.formats.templates import resolve_format
        from kgen_cli.pipeline import ExpandRequest, validate

        ratio = _aspect_ratio(self.width, self.height, self.aspect_ratio)
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise UsageError("--max-tokens must be a positive number of tokens")
        params = families.get(family).sampling.with_overrides(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repeat_penalty=self.repeat_penalty, max_tokens=self.max_tokens,
        )
        validate_params(params, 0)  # what llama.cpp would refuse, before a model is loaded
        bans = [self.ban] if isinstance(self.ban, str) else list(self.ban or [])
        try:  # a value of the right type that still makes no sense (a JSONL line's, say)
            request = ExpandRequest(
                tags=tags, nl=self.nl, family=family, tag_length=_text(self.tag_length),
                nl_length=_text(self.nl_length), operation=self.operation, expand_tags=self.expand_tags,
                aspect_ratio=ratio,
                template=resolve_format(self.format), bans=BanList.parse(bans), retries=self.retries,
                params=params, quality_line=quality_line, escape_parens=self.escape_parens,
            )
        except (TypeError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        validate(request)
        return request


def _aspect_ratio(width: int | None, height: int | None, aspect_ratio: float | None) -> float:
    if (width is None) != (height is None):
        raise UsageError("--width and --height go together")
    if width is not None and aspect_ratio is not None:
        raise UsageError("give either --width/--height or --aspect-ratio, not both")
    if width is not None:
        if width <= 0 or height <= 0:
            raise UsageError("--width and --height must be positive")
        return width / height
    if aspect_ratio is not None and aspect_ratio <= 0:
        raise UsageError("--aspect-ratio must be positive")
    return 1.0 if aspect_ratio is None else aspect_ratio


@dataclass(frozen=True)
class VariantOptions:
    """How the N variants of one prompt share work: `sampler` is a registered sampler's name
    (see `samplers`); it serves the N identical first calls when n > 1."""

    n: int = 1
    sampler: str = "tgts"
    group_size: int = DEFAULT_GROUP_SIZE
    exploration: float = DEFAULT_EXPLORATION

    @property
    def kind(self) -> str:
        """"single" for n = 1, else the sampler's name (what the JSON output reports)."""
        return self.sampler if self.n > 1 else "single"

    @classmethod
    def checked(cls, n: int, sampler: Any = None, group_size: int | None = None,
                exploration: float | None = None) -> VariantOptions:
        """The tree options are accepted with n = 1 (a script may vary N), but `exploration` not
        against an explicit sampler that does not explore (it has no tree)."""
        from kgen_cli.samplers import DEFAULT_SAMPLER, sampler_named

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UsageError(f"the number of variants must be a positive integer, not {n!r}")
        sampler = _text(sampler)
        chosen = sampler_named(sampler or DEFAULT_SAMPLER)
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
            raise UsageError("--group-size must be a positive integer")
        if exploration is not None:
            if not math.isfinite(exploration) or exploration < 0:
                raise UsageError("--exploration must be a number >= 0")
            if sampler is not None and not chosen.explores:
                raise UsageError(f"--exploration is for --sampler {DEFAULT_SAMPLER}")
        return cls(n, chosen.name, DEFAULT_GROUP_SIZE if group_size is None else group_size,
                   DEFAULT_EXPLORATION if exploration is None else exploration)


def parse_gpu_layers(value: Any) -> int | str:
    """'auto', 'all' or a non-negative integer (validated here, resolved when the engine loads)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise UsageError(f"--gpu-layers must be a number, 'all' or 'auto', not {value!r}")
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


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if value is None:
        return
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole or value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f">= {low}"
        raise UsageError(f"--{name.replace('_', '-')} must be a whole number {span}, not {value!r}")


@dataclass(frozen=True)
class EngineOptions:
    """What opens a model. `model`: a registry name (None: the registry's default), NAME@QTYPE,
    or a path to a local .gguf; `family`: the prompt format (None: the registry's, or guessed
    from the file name); `gpu_layers`: N, "all" or "auto"; `n_ctx`: KV cells shared by every
    sequence (None: sized for the calls); `context_length`: the most tokens one model call
    spans (None: the registry's, 1024 for a local file); `threads`: None for llama.cpp's."""

    model: str | None = None
    family: str | None = None
    gpu_layers: int | str = "auto"
    n_ctx: int | None = None
    context_length: int | None = None
    threads: int | None = None
    verbose: bool = False

    def checked(self) -> EngineOptions:
        """These options validated and normalised (UsageError on a bad value)."""
        from kgen_cli.registry import check_family

        _check_int("n_ctx", self.n_ctx, MIN_N_CTX, MAX_N_CTX)
        _check_int("context_length", self.context_length, MIN_CONTEXT_LENGTH, MAX_N_CTX)
        _check_int("threads", self.threads, 1)
        if self.model is not None and not isinstance(self.model, str):
            raise UsageError(f"the model must be a registry name or a path, not {self.model!r}")
        return replace(self, family=check_family(_text(self.family)), gpu_layers=parse_gpu_layers(self.gpu_layers))


