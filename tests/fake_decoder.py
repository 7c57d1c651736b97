"""A deterministic fake `BranchDecoder` (kgen_cli.tree) for tests and benchmarks.

No model: the next-token distribution is a pure function of the sequence's whole token history
(a rolling 64-bit hash, seed-free), shaped like a tag generator:

- vocabulary: 0 = EOG (piece b""), 1 = separator (piece b","), 2 = newline (piece b"\\n": a
  boundary that resets the tag count, used to end prompts), 3.. = words (pieces b" w03" ...);
- a tag is `tag_tokens` = (3, 6) tokens long including its separator: after 2 words the
  separator's probability rises so that, under the raw probabilities, tag lengths 3..6 are
  equally likely;
- the end of generation replaces a separator (`"tag, tag, tag<EOG>"`) with a share that ramps from
  0 to 1 between `tags - tags_spread` and `tags + tags_spread` tags after the last newline;
- the words get hash-derived logits scaled by `sharpness` (higher: more peaked, fewer candidates
  survive min_p).

The bookkeeping is honest and strict, so a sampler that misuses the protocol fails loudly:
a bounded pool of ids (lowest free id first, so reuse is visible; `BranchPoolExhausted` when
empty), KV cells counted once however many sequences share them, pending logits that are valid
only until the next `step()`/`start()` and can be sampled once, forks only within a sequence's
length, no EOG fed back, samplers used only while alive. Counters: `n_steps`, `tokens_fed`,
`batch_sizes`, `start_calls`, `prompt_tokens`, `forks`, `frees`, `allocations`, `peak_live`,
`peak_cells`.

`FakeEngine` wraps one in what kgen_cli.runner needs of an Engine (`fake_tokenize` for text).
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass

from kgen_cli.sampling import SamplingParams
from kgen_cli.decoding import BranchPoolExhausted, Sampled

# The tree samplers' sampling in the reference (docs/design.md#tgts): temperature 1, min_p 0.1,
# top_p/top_k off. Tests and benchmarks of the samplers use it.
TREE_DEFAULTS = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.1, repeat_penalty=1.0, max_tokens=512)

EOG, SEP, NEWLINE, FIRST_WORD = 0, 1, 2, 3
_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of x."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


@dataclass(frozen=True)
class FakeModel:
    vocab: int = 64
    tag_tokens: tuple[int, int] = (3, 6)  # tokens per tag, separator included
    tags: int = 24  # EOG comes after about this many tags
    tags_spread: int = 6
    sharpness: float = 2.0

    def piece(self, token: int) -> bytes:
        if token == EOG:
            return b""
        if token == SEP:
            return b","
        if token == NEWLINE:
            return b"\n"
        return b" w%02d" % token

    def initial_state(self) -> tuple[int, int, int]:
        return (0x5EED, 0, 0)  # (history hash, words since the last boundary, tags since newline)

    def advance(self, state: tuple[int, int, int], token: int) -> tuple[int, int, int]:
        h, words, tags = state
        h = _mix((h * 1_000_003 + token + 1) & _MASK)
        if token == NEWLINE:
            return (h, 0, 0)
        if token in (SEP, EOG):
            return (h, 0, tags + 1)
        return (h, words + 1, tags)

    def probs(self, state: tuple[int, int, int]) -> list[float]:
        """Raw next-token probabilities after a history summarised by `state`."""
        h, words, tags = state
        lo, hi = self.tag_tokens
        if words < lo - 1:
            end_tag = 0.0
        elif words >= hi - 1:
            end_tag = 1.0
        else:
            end_tag = 1.0 / (hi - words)  # uniform tag length in [lo, hi]
        ramp = (tags - (self.tags - self.tags_spread) + 1) / (2 * self.tags_spread + 1)
        eog_share = min(1.0, max(0.0, ramp))
        n_words = self.vocab - FIRST_WORD
        weights = [math.exp(self.sharpness * 3.0 * (_mix(h + i) / 2**64)) for i in range(n_words)]
        scale = (1.0 - end_tag) / sum(weights)
        return [end_tag * eog_share, end_tag * (1.0 - eog_share), 0.0] + [w * scale for w in weights]


class FakeSampler:
    """top_k -> top_p -> min_p -> temperature -> a draw from its own seeded random.Random,
    the order of kgen's llama.cpp chain (kgen_cli/sampling.py)."""

    def __init__(self, params: SamplingParams, seed: int, live: set):
        self.params = params
        self.rng = random.Random(seed)
        self.freed = False
        self._live = live
        live.add(self)

    def choose(self, probs: list[float]) -> int:
        p = self.params
        cand = sorted((i for i in range(len(probs)) if probs[i] > 0), key=lambda i: -probs[i])
        if p.top_k > 0:
            cand = cand[: p.top_k]
        if 0 < p.top_p < 1:
            total, kept = sum(probs[i] for i in cand), 0.0
            for j, i in enumerate(cand):
                kept += probs[i] / total
                if kept >= p.top_p:
                    cand = cand[: j + 1]
                    break
        if p.min_p > 0:
            cand = [i for i in cand if probs[i] >= p.min_p * probs[cand[0]]]
        if p.temperature <= 0:
            return cand[0]
        weights = [probs[i] ** (1.0 / p.temperature) for i in cand]
        r = self.rng.random() * sum(weights)
        for i, w in zip(cand, weights):
            r -= w
            if r < 0:
                return i
        return cand[-1]

    def free(self) -> None:
        assert not self.freed, "sampler freed twice"
        self.freed = True
        self._live.discard(self)


class _Seq:
    __slots__ = ("tokens", "cells", "states")

    def __init__(self, tokens: list[int], cells: list[int], states: list[tuple[int, int, int]]):
        self.tokens, self.cells, self.states = tokens, cells, states


class FakeDecoder:
    """See the module docstring. `pool_size` below `max_branches` makes the fake run out of ids
    before the advertised size, like an engine that reserved some."""

    def __init__(self, max_branches: int = 256, model: FakeModel | None = None, *,
                 pool_size: int | None = None):  # fmt: skip
        self.max_branches = max_branches
        self.model = model or FakeModel()
        self._free_ids = list(range(pool_size or max_branches))
        heapq.heapify(self._free_ids)
        self._seqs: dict[int, _Seq] = {}
        self._pending: set[int] = set()
        self._cell_refs: dict[int, int] = {}
        self._next_cell = 0
        self._cache: dict[tuple[int, int, int], list[float]] = {}
        self.live_samplers: set[FakeSampler] = set()
        self.n_steps = self.tokens_fed = self.start_calls = self.prompt_tokens = 0
        self.forks = self.frees = self.truncations = self.peak_live = self.peak_cells = 0
        self.batch_sizes: list[int] = []
        self.allocations: list[int] = []

    # ---- the protocol

    def start(self, tokens: list[int]) -> int:
        assert tokens, "start() needs at least one token"
        seq = self._allocate()
        self._seqs[seq] = _Seq([], [], [])
        self._append(seq, tokens)
        self._pending = {seq}  # a decode overwrites every earlier logits row
        self.start_calls += 1
        self.prompt_tokens += len(tokens)
        return seq

    def open(self) -> int:
        seq = self._allocate()
        self._seqs[seq] = _Seq([], [], [])
        return seq

    def fork(self, parent: int, keep: int) -> int:
        src = self._live(parent)
        length = len(src.tokens)
        assert 0 <= keep <= length, f"fork keep={keep} outside seq {parent} (length {length})"
        seq = self._allocate()
        cells = src.cells[:keep]
        for c in cells:
            self._cell_refs[c] += 1
        self._seqs[seq] = _Seq(src.tokens[:keep], cells, src.states[:keep])
        self.forks += 1
        return seq

    def free(self, seq: int) -> None:
        s = self._live(seq)
        for c in s.cells:
            self._cell_refs[c] -= 1
            if not self._cell_refs[c]:
                del self._cell_refs[c]
        del self._seqs[seq]
        self._pending.discard(seq)
        heapq.heappush(self._free_ids, seq)
        self.frees += 1

    def truncate(self, seq: int, keep: int) -> None:
        s = self._live(seq)
        assert 0 <= keep <= len(s.tokens), f"truncate keep={keep} outside seq {seq} (length {len(s.tokens)})"
        if keep == len(s.tokens):
            return
        for c in s.cells[keep:]:
            self._cell_refs[c] -= 1
            if not self._cell_refs[c]:
                del self._cell_refs[c]
        self._seqs[seq] = _Seq(s.tokens[:keep], s.cells[:keep], s.states[:keep])
        self._pending.discard(seq)
        self.truncations += 1

    def length(self, seq: int) -> int:
        return len(self._live(seq).tokens)

    def step(self, feeds: dict[int, list[int]]) -> None:
        assert feeds, "step() with nothing to decode"
        for seq, tokens in feeds.items():
            self._live(seq)
            assert tokens, f"step() feeds seq {seq} no token"
            assert all(0 <= t < self.model.vocab for t in tokens), "token outside the vocabulary"
            assert EOG not in tokens, "EOG fed back into a sequence"
        for seq, tokens in feeds.items():
            self._append(seq, tokens)
        self._pending = set(feeds)
        self.n_steps += 1
        self.tokens_fed += sum(len(t) for t in feeds.values())
        self.batch_sizes.append(len(feeds))

    def new_sampler(self, params: SamplingParams, seed: int, history=()) -> FakeSampler:
        sampler = FakeSampler(params, seed, self.live_samplers)
        sampler.history = list(history)  # the fake has no repetition penalty; tests may check it
        return sampler

    def sample(self, seq: int, sampler: FakeSampler, *, with_prob: bool = True) -> Sampled:
        s = self._live(seq)
        assert seq in self._pending, f"sample() on seq {seq}, which has no pending logits"
        assert not sampler.freed, "sample() with a freed sampler"
        self._pending.discard(seq)  # one sample per logits row
        probs = self._probs(s.states[-1])
        token = sampler.choose(probs)
        piece = self.model.piece(token)
        return Sampled(token, probs[token], piece, token == EOG, piece.count(b","))

    # ---- inspection helpers for tests

    @property
    def live_seqs(self) -> int:
        return len(self._seqs)

    @property
    def live_cells(self) -> int:
        return len(self._cell_refs)

    def history(self, seq: int) -> list[int]:
        return list(self._live(seq).tokens)

    def raw_probs_after(self, tokens: list[int]) -> list[float]:
        """The raw distribution after a whole history, recomputed from scratch."""
        state = self.model.initial_state()
        for t in tokens:
            state = self.model.advance(state, t)
        return self.model.probs(state)

    # ---- internals

    def _allocate(self) -> int:
        if not self._free_ids:
            raise BranchPoolExhausted(f"all {self.max_branches} sequence ids are in use")
        seq = heapq.heappop(self._free_ids)
        self.allocations.append(seq)
        self.peak_live = max(self.peak_live, len(self._seqs) + 1)
        return seq

    def _live(self, seq: int) -> _Seq:
        assert seq in self._seqs, f"seq {seq} is not live"
        return self._seqs[seq]

    def _append(self, seq: int, tokens: list[int]) -> None:
        s = self._seqs[seq]
        state = s.states[-1] if s.states else self.model.initial_state()
        for t in tokens:
            state = self.model.advance(state, t)
            s.tokens.append(t)
            s.states.append(state)
            s.cells.append(self._next_cell)
            self._cell_refs[self._next_cell] = 1
            self._next_cell += 1
        assert len(s.tokens) == len(s.cells) == len(s.states), "positions out of step"
        self.peak_cells = max(self.peak_cells, len(self._cell_refs))

    def _probs(self, state: tuple[int, int, int]) -> list[float]:
        probs = self._cache.get(state)
        if probs is None:
            if len(self._cache) > 200_000:
                self._cache.clear()
            probs = self._cache[state] = self.model.probs(state)
        return probs


def make_prompt(n_words: int = 20, seed: int = 0) -> list[int]:
    """A prompt of input tags ending with a newline, so generation starts a fresh tag list."""
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < n_words:
        out += [rng.randrange(FIRST_WORD, 64) for _ in range(rng.randint(2, 4))] + [SEP]
    return out + [NEWLINE]


def fake_tokenize(text: str) -> list[int]:
    """Text -> fake token ids (one per character), ending with a newline like `make_prompt`."""
    return [3 + (ord(c) % 60) for c in text] + [2]


class FakeEngine:
    """What the runner (`expand_variants`, `run_batch`) needs of an Engine, over the strict fake decoder."""

    def __init__(self, n_seq_max: int = 16, n_ctx: int = 8192):
        self.decoder = FakeDecoder(max_branches=n_seq_max)
        self.n_seq_max, self.n_ctx = n_seq_max, n_ctx
        self.window, self.kv_unified = n_ctx, True

    def branches(self):
        return self.decoder

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return fake_tokenize(text)
