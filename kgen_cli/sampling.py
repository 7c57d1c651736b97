"""Sampling parameters and the completion request/response types shared by the pipeline and engine.

Pure data, no llama_cpp import. The engine turns `SamplingParams` into llama.cpp's C sampler chain
in this fixed, documented order (the same order as llama-cpp-python's `create_completion`, so
numbers mean what they mean in the WebUI/ComfyUI extensions):

    penalties(repeat_penalty, last_n) -> top_k -> top_p -> min_p -> temperature -> dist(seed)

A value that disables a stage (top_k 0, top_p 1.0, min_p 0.0, repeat_penalty 1.0) leaves it out.
Temperature 0 means greedy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

from kgen_cli.errors import UsageError

# llama.cpp's dist sampler takes a uint32 and treats 0xFFFFFFFF as "pick a random seed";
# every seed kgen derives stays in [0, SEED_MAX].
SEED_MAX = 2**32 - 2
SEED_MODULUS = 2**32 - 1

# llama.cpp's LLAMA_MAX_SEQ (src/llama-cparams.h): no context can hold more live sequence ids.
MAX_SEQUENCES = 256

# The most KV cells kgen asks for: beyond it a cache is tens of GB, and llama.cpp's uint32 fields
# wrap further up (a GGML_ASSERT abort, or a wrapped size the kernel's OOM killer ends).
MAX_N_CTX = 1 << 20
MIN_N_CTX = 64  # the fewest --n-ctx accepts
MIN_CONTEXT_LENGTH = 16  # the shortest --context-length accepts


def finite_float(text: str) -> float:
    """A command-line number that must be finite: "nan" and "inf" are "not a number" (they would
    pass, or fail with a misleading range message, in a `min`/`max` check). The range itself is
    checked where the value is used (`validate_params`)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a number")
    return value


def derive_seed(seed: int, offset: int) -> int:
    """`seed + offset` kept inside llama.cpp's usable range (wraps instead of overflowing)."""
    return (seed + offset) % SEED_MODULUS


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    max_tokens: int
    penalty_last_n: int = 64

    def with_overrides(self, **overrides: float | int | None) -> SamplingParams:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


def validate_params(params: SamplingParams, seed: int) -> None:
    """Reject values llama.cpp would misread (seed 0xFFFFFFFF = random) or that make no sense."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise UsageError(f"seed must be an integer in [0, {SEED_MAX}], got {seed!r}")
    if isinstance(params.max_tokens, bool) or not isinstance(params.max_tokens, int) or params.max_tokens <= 0:
        raise UsageError(f"max_tokens must be a positive integer, got {params.max_tokens!r}")
    if not math.isfinite(params.temperature):
        raise UsageError(f"temperature must be a finite number, got {params.temperature!r}")
    if params.temperature < 0:
        raise UsageError(f"temperature must be >= 0 (0 = greedy), got {params.temperature!r}")
    if not 0.0 < params.top_p <= 1.0:
        raise UsageError(f"top_p must be in (0, 1], got {params.top_p!r}")
    if not 0.0 <= params.min_p <= 1.0:
        raise UsageError(f"min_p must be in [0, 1], got {params.min_p!r}")
    if params.top_k < 0:
        raise UsageError(f"top_k must be >= 0 (0 = off), got {params.top_k!r}")
    if not (math.isfinite(params.repeat_penalty) and params.repeat_penalty > 0):
        raise UsageError(f"repeat_penalty must be > 0, got {params.repeat_penalty!r}")
    if params.penalty_last_n < 0:  # llama.cpp's sampler reads -1 as 0 (off), not "whole context"
        raise UsageError(f"penalty_last_n must be >= 0, got {params.penalty_last_n!r}")


# The reference library's defaults (docs/design.md#sampling-defaults); TIPO's repetition penalty
# 1.17 is explicit here (K8, docs/deviations.md).
FAMILY_DEFAULTS: dict[str, SamplingParams] = {
    "tipo": SamplingParams(temperature=0.35, top_p=0.95, top_k=60, min_p=0.1, repeat_penalty=1.17, max_tokens=512),
    "dtg": SamplingParams(temperature=0.5, top_p=0.95, top_k=100, min_p=0.0, repeat_penalty=1.0, max_tokens=256),
}



# A call that may be skipped (a retry, a later operation) is made only if its prompt leaves room
# for this many new tokens (max_tokens, if smaller) in the model's context: retries carry every
# earlier output, and a prompt that outgrows the context the model was trained on gives junk.
MIN_ROOM = 64


@dataclass(frozen=True)
class CompletionRequest:
    """One model call: continue `prompt` (text without BOS; the engine adds BOS per the GGUF).

    `may_skip`: the job can do without this call (a retry, a later operation). When its prompt
    leaves less than `room_needed()` tokens in the call window, it is answered without a model
    call by `Completion.no_room`."""

    prompt: str
    seed: int
    params: SamplingParams
    may_skip: bool = False

    def room_needed(self) -> int:
        return min(MIN_ROOM, self.params.max_tokens)


@dataclass
class Completion:
    """What the model wrote after the prompt (generated tokens only, EOG not rendered)."""

    text: str
    n_prompt_tokens: int
    n_tokens: int
    finish_reason: Literal["stop", "length", "no_room"]
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0

    @classmethod
    def no_room(cls, n_prompt_tokens: int) -> Completion:
        """The answer to a `may_skip` request whose prompt leaves too little room: no call made."""
        return cls(text="", n_prompt_tokens=n_prompt_tokens, n_tokens=0, finish_reason="no_room")
