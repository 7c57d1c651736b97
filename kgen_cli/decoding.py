"""The decoder protocol: what the samplers (`tree.py`) and the step loop (`scheduler.py`) need of a
decoder, and its value types. `engine.BranchDecoder` implements it on llama.cpp;
`tests/fake_decoder.py` implements it without a model. Both import this module, so the engine
does not depend on the samplers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kgen_cli.errors import EngineError
from kgen_cli.sampling import SamplingParams


@dataclass(frozen=True)
class Sampled:
    """One sampled token. `prob` is under the raw (unwarped) logits: it feeds the segment score."""

    token: int
    prob: float
    piece: bytes
    is_eog: bool
    separators: int  # number of "," in `piece`


class BranchPoolExhausted(EngineError):
    """Every sequence id of the decoder's pool is in use."""


class BranchDecoder(Protocol):
    max_branches: int  # size of the sequence-id pool (<= 256)

    def start(self, tokens: list[int]) -> int:
        """Allocate a seq, decode the prompt on it; its last token's logits are pending."""
        ...

    def open(self) -> int:
        """Allocate an empty seq without decoding (its tokens come with the next `step`, so a
        new prompt's prefill shares a decode with the sequences already running)."""
        ...

    def fork(self, parent: int, keep: int) -> int:
        """New seq sharing the parent's first `keep` positions (KV copy, no recompute).
        Raises BranchPoolExhausted when the pool is empty."""
        ...

    def free(self, seq: int) -> None: ...

    def truncate(self, seq: int, keep: int) -> None:
        """Keep the seq's first `keep` positions (drops its pending logits). The scheduler uses
        it when present, to reuse a finished call's sequence for the job's next prompt."""
        ...

    def length(self, seq: int) -> int: ...

    def step(self, feeds: dict[int, list[int]]) -> None:
        """Append tokens to each seq in one decode call; the last fed token of each seq gets
        pending logits (valid until the next step)."""
        ...

    def new_sampler(self, params: SamplingParams, seed: int, history: Sequence[int] = ()) -> Any:
        """A sampler object with `.free()`. `history`: the tokens generated before this point of
        the text (a segment continuing its parent's), for the repetition penalty."""
        ...

    def sample(self, seq: int, sampler: Any, *, with_prob: bool = True) -> Sampled:
        """Sample from the seq's pending logits; `prob` may be skipped (NaN) when not needed."""
        ...
