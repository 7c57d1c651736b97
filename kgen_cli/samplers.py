"""Variant samplers: how the N identical first model calls of `expand -n N` are served at once.

A sampler is one function with `tree.tgts_sample`'s signature (decoder, prompt tokens, n,
sampling params, seed, keyword options incl. `accept`) plus one `register()` call. Its flags
tell the runner and the batch how to use it:

- `tree`: the variants are leaves of one search over a shared prefix tree. Jobs take the leaves
  in the order they end; a refused leaf (a repeat of an earlier variant's line) makes the search
  grow another. The tree forks partial prefixes, so it needs one unified KV buffer, and
  `kgen batch -n N` runs a record's N variants as one tree, records one after another.
  Without `tree`, sample i belongs to job i (its seed), and a refused sample is replaced by the
  next job id's; `kgen batch` decodes the variants of many records together.
- `explores`: the sampler takes the `exploration` constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kgen_cli.errors import UsageError

DEFAULT_SAMPLER = "tgts"
TOP_UP_SAMPLER = "independent"  # further rounds of a few missing variants: no tree to grow first


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    sample: Callable[..., object]  # -> tree.TreeResult
    tree: bool = False
    explores: bool = False


_SAMPLERS: dict[str, SamplerSpec] = {}


def register(spec: SamplerSpec) -> SamplerSpec:
    """Make a sampler available under `spec.name` (`--sampler NAME`, `sampler="NAME"`)."""
    _SAMPLERS[spec.name] = spec
    return spec


def sampler_named(name: str) -> SamplerSpec:
    _load_builtin()
    try:
        return _SAMPLERS[name]
    except KeyError:
        raise UsageError(f"unknown sampler {name!r}; choose one of: {', '.join(names())}") from None


def names() -> list[str]:
    _load_builtin()
    return list(_SAMPLERS)


def _load_builtin() -> None:
    if "tgts" in _SAMPLERS:
        return
    from kgen_cli.tree import independent_sample, tgts_sample

    register(SamplerSpec("tgts", tgts_sample, tree=True, explores=True))
    register(SamplerSpec("independent", independent_sample))
