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

# llama.cpp's dist sampler takes a uint32 and treats 0xFFFFFFFF as "pick a random seed";
# every seed kgen derives stays in [0, SEED_MAX].
SEED_MAX = 2**32 - 2
SEED_MODULUS = 2**32 - 1

# The most KV cells kgen asks for: beyond it a cache is tens of GB, and llama.cpp's uint32 fields
# wrap further up (a GGML_ASSERT abort, or a wrapped size the kernel's OOM killer ends).
MAX_N_CTX = 1 << 20


def finite_float(text: str) -> float:
    """A command-line number that must be finite: "nan" and "inf" are "not a number" (they would
    pass, or fail with a misleading range message, in a `min`/`max` check). The range itself is
    checked where the value is used (`engine.validate_params`)."""
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


# FORMATS.md §12, the library rows: TIPO's repetition penalty 1.17 is explicit here (K8).
FAMILY_DEFAULTS: dict[str, SamplingParams] = {
    "tipo": SamplingParams(temperature=0.35, top_p=0.95, top_k=60, min_p=0.1, repeat_penalty=1.17, max_tokens=512),
    "dtg": SamplingParams(temperature=0.5, top_p=0.95, top_k=100, min_p=0.0, repeat_penalty=1.0, max_tokens=256),
}

# Tree samplers (PEERS.md §6.1): temperature 1, min_p 0.1, top_p/top_k off.
TREE_DEFAULTS = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.1, repeat_penalty=1.0, max_tokens=512)


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
