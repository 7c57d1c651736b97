"""Many variants from one prompt: Token Group Tree Sampling (TGTS) and independent sampling.

Pure Python, no llama_cpp import. Both samplers drive a `BranchDecoder` (`decoding.py`): a pool of sequence ids
over one shared KV cache. The engine implements it on llama.cpp's unified KV cache
(`Engine.branches()`, docs/design.md#engine): `fork` is a prefix `llama_memory_seq_cp`, `free` is
`llama_memory_seq_rm`, `step` is one `llama_decode` for every sequence fed. Tests and the
benchmark drive the same code through `tests/fake_decoder.py`.

TGTS (the algorithm: docs/design.md#tgts) grows a tree whose nodes are *segments*: runs of tokens that end after
`group_size` separators, so a node is a group of tags. Leaves (end of generation, or
`max_tokens`) are the variants. Siblings share their ancestors' KV cells, so a variant only pays
for the tokens below the point where it branched off; independent sampling pays for every
token of every variant.

How this differs from the sequential reference (KGen's `cg_mcts_sample`, docs/design.md#tgts), and why:

- **Parallel.** The reference runs one iteration at a time and decodes one segment at a time.
  Here every iteration that selection allows is started at once (a *job*: a simulation or an
  expansion), with a virtual visit of value 0 on its selection path so the next selection
  spreads out (tree-parallel MCTS with virtual loss). Progressive widening counts real visits
  only, as the reference does (a node being simulated from counts as visited once, so the root
  widens while the first simulation runs), and segments being generated count as children of
  their parent. All growing segments, at any depth, advance together: one `step()` per token.
- **Empty expansions.** The reference back-propagates 0 when selection lands on a node with no
  open child and no room to widen, and selects again. Here, with work still in flight below that
  node, we wait for it. Except at the root when every child completed so far is a leaf: then
  what is in flight probably ends in leaves too, and the reference, which would have it complete
  by now, would be making empty expansions there; so we make them, with at most 2 segments in
  flight per leaf seen, plus 1 (waiting would decode one-segment outputs one or two at a time).
  At the root a run of empty expansions is made in one go (nothing else changes between two of
  them), up to the visits that give room for one more child; below it, one per selection.
  When outputs are only one or two segments long, most children are spent leaves and the
  reference needs millions of these (256 such variants: 17 million, since 256 children of the
  root take ~1e9 visits); after `NOOP_LIMIT` in a row below the root (`ROOT_NOOP_LIMIT` at it)
  the selected node gets one more child.
- An expansion generates all its missing children concurrently; when one is a leaf it is a
  variant, the others still become (active) children.
- No more work is started than can still be needed: variants found, simulations in flight and
  the expansion segments in flight expected to end in a leaf (by the share of completed ones
  that did) stay within `n`; once the simulations in flight are enough to finish, surplus
  expansions/simulations are dropped.
- Each segment gets a fresh sampler chain (its own seed); the path's generated tokens are
  accepted into it first, so the repetition penalty sees the whole text as a single chain would.
- `value` (sum of back-propagated scores) starts at 0, as in the reference; the segment's own score is
  kept apart. A segment whose every token equals its final token scores 0 (the reference divides
  by zero there). The reference bans EOG for the first 4 tokens of a segment; the decoder
  protocol has no token ban, so a segment may end earlier.
- A leaf whose tokens repeat an earlier variant is spent but not returned. The run stops after
  `DUPLICATE_STREAK` repeats in a row (a (near-)deterministic model, e.g. temperature 0), and in
  any case at the first step past a budget of `n * max_tokens * BUDGET_FACTOR` decoded tokens
  (twice what independent sampling can cost), so it always terminates.

Cost accounting: a child re-feeds its parent's last token on a forked sequence (fork keeps all
but that token) so that it gets fresh logits without the tree storing a logits row per node:
one extra token per fork. A simulation continues on its own sequence with no fork.
`Variant.n_decoded` charges each node's tokens to the first variant whose path uses it, so
variants found later are cheaper; tokens of nodes no variant uses are only in `total_decoded`.

Sequence ids are bounded (llama.cpp allows 256): a growing segment owns one id; a finished
non-leaf segment's id is *parked* at its node (a free fork source); parked ids are evicted
least-recently-used when a fork needs an id. One *anchor* id keeps the prompt for the whole run,
so any evicted node can be re-created: fork the nearest live holder of an ancestor and replay the
missing tokens. When no id can be had, work waits in a queue. Given `max_cells` (the context
size), the tree also mirrors llama.cpp's cell sharing and only starts a branch when every growing
branch can still reach `max_tokens` inside the context.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kgen_cli.decoding import BranchDecoder, BranchPoolExhausted, Sampled
from kgen_cli.errors import EngineError
from kgen_cli.sampling import SamplingParams, derive_seed

DEFAULT_GROUP_SIZE = 4  # separators per segment (the reference's; docs/design.md#tgts)
DEFAULT_EXPLORATION = 1.0  # UCT constant c (the reference's default)
BUDGET_FACTOR = 2  # TGTS stops after n * max_tokens * BUDGET_FACTOR decoded tokens
NOOP_LIMIT = 1_000  # empty expansions in a row after which the selected node is widened anyway
ROOT_NOOP_LIMIT = 1_000_000  # the same at the root, where a run of them costs O(1)
DUPLICATE_STREAK = 32  # consecutive repeated leaves after which the model is taken as saturated


@dataclass
class Variant:
    tokens: list[int]  # generated tokens, EOG excluded
    text: str
    score: float  # mean segment score along the path (`segment_score`)
    n_decoded: int  # tokens decoded for it that no earlier variant had paid for
    depth: int  # segments from the prompt to the leaf
    finish_reason: str = "stop"  # "stop" (EOG) or "length" (max_tokens)
    index: int = 0  # TGTS: the order it was found in; independent: sample i (seed derive_seed(seed, i))

    @property
    def finished(self) -> bool:
        """True when the model ended the text itself (EOG), False when max_tokens cut it."""
        return self.finish_reason == "stop"


@dataclass
class TreeResult:
    variants: list[Variant]
    total_decoded: int  # every token fed to step(), prompt excluded (NFE)
    n_steps: int  # step() calls
    tree: dict  # JSON-serialisable, for --tree-out
    stats: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- pure rules


def widening_alpha(depth: int) -> float:
    """Progressive widening's exponent at `depth`: deeper nodes widen more slowly."""
    return 0.5 ** (1 + math.sqrt(2) ** depth)


def allowed_children(visits: float, depth: int) -> int:
    """Progressive widening: how many children a node with `visits` visits may have.
    Same float expression as the reference, so rounding at the boundaries matches it."""
    if visits <= 0:
        return 0
    return math.ceil(math.sqrt(2) * visits ** widening_alpha(depth))


def uct(value: float, visits: float, parent_visits: float, exploration: float) -> float:
    """UCT1; unvisited children first."""
    if visits <= 0:
        return math.inf
    return value / visits + exploration * math.sqrt(math.log(parent_visits) / visits)


def segment_score(tokens: Sequence[int], probs: Sequence[float]) -> float:
    """The reference's segment score: (min p + max p + geometric mean p) / 3 over the segment's tokens, skipping
    every token equal to the final one (the separator, or EOG for a leaf)."""
    final = tokens[-1]
    kept = [max(p, 1e-300) for t, p in zip(tokens, probs) if t != final]
    if not kept:
        return 0.0
    geometric = math.exp(sum(math.log(p) for p in kept) / len(kept))
    return (min(kept) + max(kept) + geometric) / 3


class _Group:
    """The tokens of one segment being sampled, with the reference's stop rule (docs/design.md#tgts)."""

    __slots__ = ("tokens", "probs", "pieces", "separators", "eog")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.probs: list[float] = []
        self.pieces: list[bytes] = []
        self.separators = 0
        self.eog = False

    def add(self, s: Sampled) -> None:
        # The reference's stop rule records the length at its first call, which comes after
        # the first new token: separators count from the second token on.
        if self.tokens:
            self.separators += s.separators
        self.tokens.append(s.token)
        self.probs.append(s.prob)
        self.pieces.append(s.piece)
        self.eog = s.is_eog

    def complete(self, group_size: int) -> bool:
        return self.eog or self.separators >= group_size

    def score(self) -> float:
        return segment_score(self.tokens, self.probs)


# --------------------------------------------------------------------------- tree


class _Node:
    """A segment of the tree (the root's segment is the prompt)."""

    __slots__ = (
        "id", "parent", "depth", "tokens", "pieces", "score", "length", "gen_len", "n_fed",
        "visits", "value", "virtual", "pending", "children", "active", "spent", "leaf",
        "finish", "variant", "claimed", "holders", "exact_seq",
    )  # fmt: skip

    def __init__(self, parent: _Node | None, tokens: list[int], pieces: list[bytes], score: float):
        self.id = 0
        self.parent = parent
        self.depth = 0 if parent is None else parent.depth + 1
        self.tokens = tokens
        self.pieces = pieces
        self.score = score  # the segment's own score (`segment_score`)
        self.length = len(tokens) + (parent.length if parent else 0)  # KV positions of the path
        self.gen_len = (len(tokens) + parent.gen_len) if parent else 0  # generated tokens on the path
        self.n_fed = 0  # tokens fed to step() to produce this segment (incl. fork/replay)
        self.visits = 0
        self.value = 0.0  # sum of back-propagated scores
        self.virtual = 0  # jobs in flight whose selection path passes here (virtual loss)
        self.pending = 0  # child segments in flight or queued
        self.children: list[_Node] = []
        self.active = False
        self.spent = False
        self.leaf = False
        self.finish: str | None = None
        self.variant: int | None = None
        self.claimed = False  # its n_fed already charged to a variant
        self.holders: set[int] = set()  # live seqs holding (at least) this path minus its last token
        self.exact_seq: int | None = None  # a parked seq holding exactly that: reusable as is

    @property
    def effective_visits(self) -> int:
        return self.visits + self.virtual


def _widening_visits(node: _Node) -> int:
    """The visits progressive widening counts: real ones, as in the reference (virtual visits
    only spread selection), and at least 1 while the node is being simulated from."""
    return node.visits if node.visits or not node.virtual else 1


def select(root: _Node, exploration: float) -> list[_Node]:
    """The reference's selection (docs/design.md#tgts), counting in-flight work: descend
    through active, unspent children by UCT; stop where the node may still widen or has no such
    child. Returns root..node."""
    node, path = root, [root]
    while True:
        open_children = [c for c in node.children if c.active and not c.spent]
        if not open_children:
            return path
        visits = node.effective_visits
        if allowed_children(_widening_visits(node), node.depth) > len(node.children) + node.pending:
            return path
        node = max(open_children, key=lambda c: uct(c.value, c.effective_visits, visits, exploration))
        path.append(node)


def expansion_need(node: _Node) -> int:
    """How many new children an expansion of `node` generates now (0: no room to widen).
    The reference checks room against all children, then fills up to the *unspent* count."""
    allowed = allowed_children(_widening_visits(node), node.depth)
    if len(node.children) + node.pending >= allowed:
        return 0
    unspent = sum(1 for c in node.children if not c.spent) + node.pending
    return allowed - unspent


def _only_leaves(node: _Node) -> bool:
    """Whether the segments in flight below `node` can be taken to end in leaves too: every
    complete child is a leaf, and there are enough of them (at most 2 in flight per leaf seen,
    plus 1). Then the reference, which would have them complete by now, would widen `node` by
    empty expansions; this lets a tree of one-segment outputs widen as fast as the evidence."""
    return node.pending <= 2 * len(node.children) + 1 and all(c.leaf for c in node.children)


def _visits_to_widen(node: _Node) -> int:
    """Empty expansions (visits) it takes before `node` may have one more child."""
    have = len(node.children) + node.pending
    visits = _widening_visits(node)
    if allowed_children(visits, node.depth) > have:
        return 1
    # ceil(sqrt(2) * v ** alpha) > have  <=>  v > (have / sqrt(2)) ** (1 / alpha)
    target = (have / math.sqrt(2)) ** (1 / widening_alpha(node.depth))
    need = max(1, int(min(target, 1e15)) - visits)
    while need > 1 and allowed_children(visits + need - 1, node.depth) > have:
        need -= 1  # float rounding at the boundary: the first count that makes room
    while allowed_children(visits + need, node.depth) <= have and need < 1e15:
        need += 1
    return need


def _ancestors(node: _Node | None):
    while node is not None:
        yield node
        node = node.parent


def _path_tokens(node: _Node, start: int) -> list[int]:
    """Tokens at KV positions [start, node.length) of node's path."""
    chunks = []
    for n in _ancestors(node):
        if n.length <= start:
            break
        chunks.append(n.tokens[max(0, start - (n.length - len(n.tokens))) :])
    return [t for chunk in reversed(chunks) for t in chunk]


class _KvCells:
    """A mirror of the unified KV cache's cell sharing (docs/design.md#kv-budget): a fork shares the
    parent's first cells, a step appends new cells, a cell lives while a sequence holds it. Lets
    the tree stay inside the context (`max_cells`) and report its peak."""

    def __init__(self) -> None:
        self.cells: dict[int, list[int]] = {}
        self.refs: dict[int, int] = {}
        self.next_cell = 0
        self.peak = 0

    @property
    def used(self) -> int:
        return len(self.refs)

    def append(self, seq: int, count: int) -> None:
        new = range(self.next_cell, self.next_cell + count)
        self.next_cell += count
        self.cells.setdefault(seq, []).extend(new)
        self.refs.update(dict.fromkeys(new, 1))
        self.peak = max(self.peak, len(self.refs))

    def fork(self, source: int, seq: int, keep: int) -> None:
        shared = self.cells[source][:keep]
        for cell in shared:
            self.refs[cell] += 1
        self.cells[seq] = shared

    def free(self, seq: int) -> None:
        for cell in self.cells.pop(seq):
            if self.refs[cell] == 1:
                del self.refs[cell]
            else:
                self.refs[cell] -= 1


_SIMULATE, _EXPAND = "simulate", "expand"


class _Job:
    """One TGTS iteration in flight: a simulation from `node` (segments one after another on one
    sequence, down to a leaf) or an expansion of `node` (sibling segments side by side)."""

    __slots__ = ("kind", "node", "path", "todo", "running")

    def __init__(self, kind: str, path: list[_Node], todo: int):
        self.kind = kind
        self.node = path[-1]
        self.path = path
        self.todo = todo  # segments queued, not started
        self.running = 0  # segments being generated


class _Branch:
    """A growing segment: one live sequence sampling one group of tags below `parent`."""

    __slots__ = ("seq", "parent", "job", "group", "feed", "fed", "sampler")

    def __init__(self, seq: int, parent: _Node, job: _Job, feed: list[int], sampler: Any):
        self.seq = seq
        self.parent = parent
        self.job = job
        self.group = _Group()
        self.feed = feed  # tokens for the next step()
        self.fed = 0
        self.sampler = sampler


class _TreeSearch:
    """State of one tgts_sample() run. `run()` is the main loop; the rest is bookkeeping."""

    def __init__(self, decoder: BranchDecoder, prompt: list[int], n: int, params: SamplingParams,
                 seed: int, group_size: int, exploration: float, max_tokens: int,
                 on_variant: Callable[[Variant], None] | None, max_jobs: int | None,
                 max_cells: int | None, accept: Callable[[Variant], bool] | None = None):  # fmt: skip
        _check_args(decoder, prompt, n, max_tokens)
        if group_size < 1:
            raise ValueError("group_size must be at least 1")
        self.dec, self.n, self.params, self.seed = decoder, n, params, seed
        self.group_size, self.c, self.max_tokens = group_size, exploration, max_tokens
        self.on_variant, self.accept = on_variant, accept
        self.penalize = params.repeat_penalty != 1.0 and params.penalty_last_n > 0
        self.budget = n * max_tokens * BUDGET_FACTOR
        self.max_growing = decoder.max_branches - 1  # one id stays the prompt anchor
        if max_jobs is not None and max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        self.max_jobs = max_jobs or math.inf
        self.root = _Node(None, list(prompt), [], 0.0)
        self.nodes = [self.root]
        self.branches: dict[int, _Branch] = {}  # seq -> growing segment
        self.waiting: deque[_Job] = deque()  # one entry per queued segment
        self.jobs: dict[_Job, None] = {}  # in flight, in start order
        self.sims_in_flight = 0
        self.expanding = 0  # expansion segments queued or growing
        self.expansion_segments = {False: 0, True: 0}  # completed ones: non-leaves, leaves
        self.seq_node: dict[int, _Node] = {}  # live seq -> node whose path it holds
        self.seq_len: dict[int, int] = {}  # live seq -> KV positions
        self.parked: OrderedDict[int, None] = OrderedDict()  # evictable seqs, oldest use first
        self.variants: list[Variant] = []
        self.seen: set[tuple] = set()
        self.total_decoded = self.n_steps = self.n_segments = self.duplicate_streak = 0
        self.counts = dict.fromkeys(
            ("forks", "replayed", "evictions", "duplicates", "noops", "forced", "dropped"), 0
        )
        self.peak_live = 0
        self.kv = _KvCells()
        self.max_cells = max_cells
        if max_cells is not None and max_cells < len(prompt) + max_tokens:
            raise _context_too_small(max_cells, len(prompt), max_tokens)
        self.anchor = decoder.start(list(prompt))
        self.kv.append(self.anchor, len(prompt))
        self._hold(self.anchor, self.root, len(prompt))

    def run(self) -> TreeResult:
        """Launch what selection allows, advance every growing segment by one token, repeat."""
        reason = "complete"
        try:
            while len(self.variants) < self.n:
                if self.total_decoded >= self.budget:
                    reason = "budget"
                    break
                if self.duplicate_streak >= DUPLICATE_STREAK:
                    reason = "duplicates"
                    break
                self._launch()
                if not self.branches:
                    reason = "exhausted"  # nothing growing, nothing could be started
                    break
                self._step()
                self._sample()
                self._drop_surplus()
        except BaseException:
            self._release_all(best_effort=True)
            raise
        self._release_all()
        return self._result(reason)

    # ---- launching work

    def _launch(self) -> None:
        """Open queued segments, then start the jobs selection asks for while ids and need last.

        No more work is started than can still be needed: variants found, simulations in flight
        and the expansion segments in flight expected to end in a leaf stay within `n`."""
        if not self._drain():
            return  # the pool is full: queued work keeps its place
        noops = {False: 0, True: 0}  # empty expansions in a row: below the root, at the root
        while (not self.waiting and len(self.branches) < self.max_growing
               and len(self.jobs) < self.max_jobs
               and (room := self.n - len(self.variants) - self.sims_in_flight - self._expected_leaves()) > 0):  # fmt: skip
            path = select(self.root, self.c)
            node = path[-1]
            if node.effective_visits == 0:
                self._start_job(_SIMULATE, path, 1)
            elif (need := expansion_need(node)) > 0:
                self._start_job(_EXPAND, path, min(need, room))
            elif node.virtual > 0 and not (node is self.root and _only_leaves(node)):
                # Work in flight below `node` may open a child to descend into: wait for it. At
                # the root of one-segment outputs that would serialise the variants (module
                # docstring), so there the reference's empty expansions go on.
                return
            elif noops[node is self.root] < (limit := ROOT_NOOP_LIMIT if node is self.root else NOOP_LIMIT):
                # The reference's empty expansion: back-propagate 0, so visits (and room) grow.
                # Below the root one at a time (each lowers the path's UCT, so the next selection
                # may go elsewhere); at the root nothing else changes between two of them, so as
                # many as it takes to make room are made in one go.
                count = min(_visits_to_widen(node), limit - noops[True]) if node is self.root else 1
                self._backprop(node, 0.0, count)
                self.counts["noops"] += count
                noops[node is self.root] += count
                continue
            else:
                self._start_job(_EXPAND, path, 1)  # stuck: widen here by one (module docstring)
                self.counts["forced"] += 1
            noops = {False: 0, True: 0}
            if not self._drain():
                return

    def _expected_leaves(self) -> int:
        """How many of the expansion segments in flight will end in a leaf (a variant), by the
        share of completed ones that did (prior: one of each)."""
        leaves, others = self.expansion_segments[True], self.expansion_segments[False]
        return round(self.expanding * (leaves + 1) / (leaves + others + 2))

    def _start_job(self, kind: str, path: list[_Node], todo: int) -> None:
        job = _Job(kind, path, todo)
        for node in path:
            node.virtual += 1
        job.node.pending += todo
        if kind == _SIMULATE:
            self.sims_in_flight += 1
        else:
            self.expanding += todo
        self.jobs[job] = None
        self.waiting.extend([job] * todo)

    def _drain(self) -> bool:
        """Open queued segments while sequence ids can be had; True when the queue is empty."""
        while self.waiting:
            job = self.waiting[0]
            if len(self.branches) >= self.max_growing:
                return False
            got = self._acquire(job.node)
            if got is None:
                return False
            self.waiting.popleft()
            job.todo -= 1
            self._open(job, job.node, *got)
        return True

    def _open(self, job: _Job, parent: _Node, seq: int, feed: list[int]) -> None:
        # Seeds follow the (deterministic) order in which segments start. The chain is new, so
        # the repetition penalty is told what the path generated so far.
        history = _path_tokens(parent, self.root.length)[-self.params.penalty_last_n :] if self.penalize else []
        sampler = self.dec.new_sampler(self.params, derive_seed(self.seed, self.n_segments), history)
        self.n_segments += 1
        self.branches[seq] = _Branch(seq, parent, job, feed, sampler)
        job.running += 1

    # ---- sequence ids

    def _acquire(self, node: _Node) -> tuple[int, list[int]] | None:
        """A seq holding node's path minus its last token, and what to feed so that it ends
        with fresh logits after node's last token. None when no id (or no KV room) is free now."""
        exact = node.exact_seq
        if exact is not None:  # parked exactly there: no fork, no replay
            if not self._make_room(spare=exact, start=node.length - 1, need_id=False):
                return self._retry_without(exact, node)
            self._unpark(exact)
            return exact, [node.tokens[-1]]
        base = node
        while not base.holders:  # the root always has the anchor
            base = base.parent
        source = min(base.holders)
        keep = base.length - 1
        while True:
            if not self._make_room(spare=source, start=keep, need_id=True):
                return self._retry_without(source, node)
            try:
                seq = self.dec.fork(source, keep)
                break
            except BranchPoolExhausted:  # the engine ran out before our count said so
                if not self._evict(spare=source):
                    return None
        if source in self.parked:
            self.parked.move_to_end(source)
        self.kv.fork(source, seq, keep)
        self.counts["forks"] += 1
        self._hold(seq, base, keep)
        feed = _path_tokens(node, keep)
        self.counts["replayed"] += len(feed) - 1
        return seq, feed

    def _retry_without(self, seq: int, node: _Node) -> tuple[int, list[int]] | None:
        """No room while the parked source `seq` stays. Growing work will free some: wait. With
        nothing growing nothing will, so give `seq` up too and start from an ancestor's holder
        (the anchor at worst, which always fits: see the max_cells check)."""
        if self.branches or seq not in self.parked:
            return None
        self._free(seq)
        self.counts["evictions"] += 1
        return self._acquire(node)

    def _make_room(self, spare: int, start: int, need_id: bool) -> bool:
        """Evict parked seqs, least recently used first, until a new branch starting at `start`
        positions fits: a free id (when `need_id`) and, with `max_cells`, its KV cells."""
        while (need_id and len(self.seq_len) >= self.dec.max_branches) or not self._room_for_branch(start):
            if not self._evict(spare):
                return False
        return True

    def _hold(self, seq: int, node: _Node, length: int | None = None) -> None:
        """Record that `seq` holds node's path minus (at least) its last token: a fork source
        for `node` and every ancestor."""
        old = self.seq_node.get(seq)
        if old is not node:
            if old is node.parent:  # one segment further down (or a new holder of the root)
                node.holders.add(seq)
            else:
                for a in _ancestors(old):
                    a.holders.discard(seq)
                for a in _ancestors(node):
                    a.holders.add(seq)
            self.seq_node[seq] = node
        if length is not None:
            self.seq_len[seq] = length

    def _park(self, seq: int) -> None:
        node = self.seq_node[seq]
        self.parked[seq] = None
        if self.seq_len[seq] == node.length - 1:
            node.exact_seq = seq

    def _unpark(self, seq: int) -> None:
        del self.parked[seq]
        node = self.seq_node[seq]
        if node.exact_seq == seq:
            node.exact_seq = None

    def _evict(self, spare: int) -> bool:
        """Free the least recently used parked seq other than `spare`."""
        for seq in self.parked:
            if seq != spare:
                self._free(seq)
                self.counts["evictions"] += 1
                return True
        return False

    def _room_for_branch(self, start: int) -> bool:
        """With `max_cells`: can a new branch starting from `start` positions grow to its end
        while every growing branch also grows to its end? A sequence never holds more than
        prompt + max_tokens - 1 positions, and each position it appends is a new cell."""
        if self.max_cells is None:
            return True
        ceiling = self.root.length + self.max_tokens - 1
        growth = sum(ceiling - self.seq_len[seq] for seq in self.branches)
        return self.kv.used + growth + ceiling - start <= self.max_cells

    def _release(self, seq: int) -> None:
        """A seq no segment needs any more: free it, unless it is the only one holding its node."""
        if len(self.seq_node[seq].holders) > 1:
            self._free(seq)
        else:
            self._park(seq)

    def _free(self, seq: int) -> None:
        if seq in self.parked:
            self._unpark(seq)
        for a in _ancestors(self.seq_node.pop(seq)):
            a.holders.discard(seq)
        del self.seq_len[seq]
        self.kv.free(seq)
        self.dec.free(seq)

    # ---- decoding

    def _step(self) -> None:
        """One decode for every growing segment, whatever its depth."""
        self.dec.step({seq: br.feed for seq, br in self.branches.items()})
        self.n_steps += 1
        for seq, br in self.branches.items():
            fed = len(br.feed)
            self.total_decoded += fed
            br.fed += fed
            self.seq_len[seq] += fed
            self.kv.append(seq, fed)
            br.feed = []
            if self.seq_node[seq] is not br.parent:  # a replay has caught up with its parent
                self._hold(seq, br.parent)
        self.peak_live = max(self.peak_live, len(self.seq_len))

    def _sample(self) -> None:
        """Sample every growing segment; a complete segment becomes a node."""
        for br in list(self.branches.values()):
            s = self.dec.sample(br.seq, br.sampler)
            br.group.add(s)
            at_limit = br.parent.gen_len + len(br.group.tokens) >= self.max_tokens
            if br.group.complete(self.group_size) or at_limit:
                self._finish(br)
                if len(self.variants) >= self.n or self.duplicate_streak >= DUPLICATE_STREAK:
                    return
            else:
                br.feed = [s.token]

    def _finish(self, br: _Branch) -> None:
        """The segment becomes a node; its job yields a variant, goes on, or parks the seq."""
        job = br.job
        self._close(br)
        node = self._add_node(br)
        if job.kind == _EXPAND:
            self.expansion_segments[node.leaf] += 1
        if node.leaf:
            self._backprop(node, node.score)
            self._yield_variant(node)
            self._release(br.seq)
        elif job.kind == _SIMULATE:  # the reference back-propagates every simulated segment
            self._backprop(node, node.score)
            self._hold(br.seq, node)
            node.pending += 1
            self._open(job, node, br.seq, [node.tokens[-1]])  # same seq, no fork
            return
        else:
            self._hold(br.seq, node)
            self._park(br.seq)  # the seq that will simulate from this child later
        if job.running == 0 and job.todo == 0:
            self._end_job(job)

    def _close(self, br: _Branch) -> None:
        del self.branches[br.seq]
        br.sampler.free()
        br.parent.pending -= 1
        br.job.running -= 1
        if br.job.kind == _EXPAND:
            self.expanding -= 1

    def _add_node(self, br: _Branch) -> _Node:
        g = br.group
        node = _Node(br.parent, g.tokens, g.pieces, g.score())
        node.n_fed = br.fed
        node.leaf = g.eog or node.gen_len >= self.max_tokens
        node.finish = "stop" if g.eog else "length" if node.leaf else None
        node.id = len(self.nodes)
        self.nodes.append(node)
        br.parent.children.append(node)
        return node

    # ---- search bookkeeping

    def _backprop(self, node: _Node, score: float, count: int = 1) -> None:
        for n in _ancestors(node):
            n.visits += count
            n.value += score * count

    def _end_job(self, job: _Job) -> None:
        for node in job.path:
            node.virtual -= 1
        if job.kind == _SIMULATE:
            self.sims_in_flight -= 1
        else:
            for child in job.node.children:
                child.active = True
        del self.jobs[job]

    def _yield_variant(self, leaf: _Node) -> None:
        """A leaf is spent (never selected again) and, unless it repeats one, a variant."""
        leaf.spent = True
        path = list(_ancestors(leaf))[-2::-1]  # root excluded
        drop_eog = 1 if leaf.finish == "stop" else 0
        tokens = [t for n in path for t in n.tokens]
        tokens = tokens[: len(tokens) - drop_eog]
        if (key := tuple(tokens)) in self.seen:
            self.counts["duplicates"] += 1
            self.duplicate_streak += 1
            return
        self.seen.add(key)
        pieces = [p for n in path for p in n.pieces]
        variant = Variant(
            tokens=tokens,
            text=b"".join(pieces[: len(pieces) - drop_eog]).decode("utf-8", errors="replace"),
            score=sum(n.score for n in path) / len(path),
            n_decoded=sum(n.n_fed for n in path if not n.claimed),
            depth=leaf.depth,
            finish_reason=leaf.finish or "length",
        )
        if self.accept is not None and not self.accept(variant):
            self.counts["duplicates"] += 1  # other tokens, but the caller's same result: a repeat too
            self.duplicate_streak += 1
            return
        self.duplicate_streak = 0
        for n in path:
            n.claimed = True
        leaf.variant = variant.index = len(self.variants)
        self.variants.append(variant)
        if self.on_variant is not None:
            self.on_variant(variant)

    def _drop_surplus(self) -> None:
        """Once the simulations in flight can deliver the remaining variants, expansions are
        wasted tokens; simulations beyond the need are too (the newest go first)."""
        missing = self.n - len(self.variants)
        if self.sims_in_flight < missing:
            return
        for job in [j for j in self.jobs if j.kind == _EXPAND]:
            self._cancel(job)
        surplus = self.sims_in_flight - missing
        for job in [j for j in reversed(self.jobs) if j.kind == _SIMULATE][:surplus]:
            self._cancel(job)

    def _cancel(self, job: _Job) -> None:
        for br in [b for b in self.branches.values() if b.job is job]:
            self._close(br)
            self._release(br.seq)
        if job.todo:
            self.waiting = deque(j for j in self.waiting if j is not job)
            job.node.pending -= job.todo
            if job.kind == _EXPAND:
                self.expanding -= job.todo
            job.todo = 0
        self.counts["dropped"] += 1
        self._end_job(job)

    # ---- the end

    def _release_all(self, best_effort: bool = False) -> None:
        for br in self.branches.values():
            _quietly(br.sampler.free, best_effort)
        self.branches.clear()
        for seq in list(self.seq_len):
            _quietly(lambda s=seq: self.dec.free(s), best_effort)
        self.seq_len.clear()
        self.seq_node.clear()

    def _result(self, reason: str) -> TreeResult:
        stats = {
            "stop_reason": reason,
            "budget": self.budget,
            "nodes": len(self.nodes),
            "segments": self.n_segments,
            "peak_live_seqs": self.peak_live,
            "peak_cells": self.kv.peak,
            **self.counts,
        }
        tree = {
            "sampler": "tgts",
            "group_size": self.group_size,
            "exploration": self.c,
            "prompt_tokens": self.root.length,
            "stats": stats,
            "nodes": [_node_json(n) for n in self.nodes],
        }
        return TreeResult(self.variants, self.total_decoded, self.n_steps, tree, stats)


def _node_json(n: _Node) -> dict:
    return {
        "id": n.id,
        "parent": None if n.parent is None else n.parent.id,
        "depth": n.depth,
        "text": "" if n.parent is None else b"".join(n.pieces).decode("utf-8", errors="replace"),
        "n_tokens": len(n.tokens),
        "score": round(n.score, 6),
        "visits": n.visits,
        "value": round(n.value, 6),
        "leaf": n.leaf,
        "finish": n.finish,
        "spent": n.spent,
        "active": n.active,
        "variant": n.variant,
        "children": [c.id for c in n.children],
    }


def _quietly(fn: Callable[[], None], best_effort: bool) -> None:
    """Cleanup after a failure must not hide the failure."""
    if not best_effort:
        fn()
        return
    try:
        fn()
    except Exception:  # noqa: BLE001 - the original error is being raised
        pass


def _check_args(decoder: BranchDecoder, prompt: Sequence[int], n: int, max_tokens: int) -> None:
    if n < 1:
        raise ValueError("n must be at least 1")
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if len(prompt) < 1:
        raise ValueError("the prompt has no tokens")
    if decoder.max_branches < 2:
        raise EngineError("multi-variant sampling needs at least 2 sequence ids (prompt + 1 branch)")


def _context_too_small(max_cells: int, prompt_len: int, max_tokens: int) -> EngineError:
    return EngineError(
        f"the context ({max_cells} cells) cannot hold the prompt ({prompt_len} tokens) "
        f"and one variant of {max_tokens} tokens"
    )


def tgts_sample(
    decoder: BranchDecoder,
    prompt_tokens: Sequence[int],
    n: int,
    params: SamplingParams,
    seed: int,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    exploration: float = DEFAULT_EXPLORATION,
    max_tokens: int = 512,
    on_variant: Callable[[Variant], None] | None = None,
    max_jobs: int | None = None,
    max_cells: int | None = None,
    accept: Callable[[Variant], bool] | None = None,
) -> TreeResult:
    """Up to `n` distinct variants by token group tree sampling (docs/design.md#tgts, module docstring).

    Stops when `n` variants are found ("complete"), when the tree cannot produce more
    ("exhausted"), after `DUPLICATE_STREAK` repeated leaves in a row ("duplicates"), or past
    `n * max_tokens * BUDGET_FACTOR` decoded tokens ("budget"); `result.stats["stop_reason"]`
    says which. Every id taken from the decoder is freed before returning.

    `accept(variant)`, when given, sees each new leaf before it counts: False makes it a repeat
    (counted in `stats["duplicates"]`, the search goes on), for outputs that differ in tokens but
    not in what the caller makes of them. `on_variant` is called as each variant is found.
    `max_jobs` caps the iterations in flight: 1 reproduces the reference's one-at-a-time order
    (about the same tokens, many more steps); None lets selection and the id pool decide.
    `max_cells` (the context size, `n_ctx`) keeps the KV cells in use, counting what every
    growing branch may still add, within the context: work waits rather than overflow it.
    `stats["peak_cells"]` reports the most cells held.
    """
    search = _TreeSearch(decoder, list(prompt_tokens), n, params, seed, group_size, exploration,
                         max_tokens, on_variant, max_jobs, max_cells, accept)  # fmt: skip
    return search.run()


# --------------------------------------------------------------------------- independent


class _Lane:
    """One independent variant being generated on its own sequence."""

    __slots__ = ("index", "sampler", "group", "scores", "tokens", "pieces", "feed", "fed", "n_sampled",
                 "eog")  # fmt: skip

    def __init__(self, index: int, sampler: Any, feed: list[int]):
        self.index = index
        self.sampler = sampler
        self.group = _Group()  # scored by segments too, so scores compare with TGTS
        self.scores: list[float] = []
        self.tokens: list[int] = []
        self.pieces: list[bytes] = []
        self.feed = feed
        self.fed = 0
        self.n_sampled = 0
        self.eog = False

    def add(self, s: Sampled, group_size: int, max_tokens: int) -> bool:
        """Take one sampled token; True when the variant is finished."""
        self.n_sampled += 1
        self.group.add(s)
        self.eog = s.is_eog
        if not s.is_eog:
            self.tokens.append(s.token)
            self.pieces.append(s.piece)
        done = s.is_eog or self.n_sampled >= max_tokens
        if done or self.group.complete(group_size):
            self.scores.append(self.group.score())
            self.group = _Group()
        self.feed = [s.token]
        return done

    def variant(self) -> Variant:
        return Variant(
            tokens=self.tokens,
            text=b"".join(self.pieces).decode("utf-8", errors="replace"),
            score=sum(self.scores) / len(self.scores),
            n_decoded=self.fed,
            depth=len(self.scores),
            finish_reason="stop" if self.eog else "length",
            index=self.index,
        )


def independent_sample(
    decoder: BranchDecoder,
    prompt_tokens: Sequence[int],
    n: int,
    params: SamplingParams,
    seed: int,
    *,
    max_tokens: int = 512,
    group_size: int = DEFAULT_GROUP_SIZE,
    on_variant: Callable[[Variant], None] | None = None,
    max_cells: int | None = None,
    accept: Callable[[Variant], bool] | None = None,
) -> TreeResult:
    """`n` independent samples (seed `derive_seed(seed, i)` for variant i) sharing the prompt's KV.

    The prompt is decoded once on an anchor sequence; each variant forks it (keeping all but the
    prompt's last token, which it re-feeds for fresh logits). All running variants advance in one
    step() per token; beyond `max_branches - 1` of them, a finished variant's id is refilled with
    the next one. With `max_cells` (the context size), no more variants run at once than the
    context holds at full length: prompt + running * max_tokens <= max_cells.

    Variants are returned in index order, duplicates included. `accept(variant)`, when given,
    sees each one as it ends (`variant.index` says which) and may refuse it (a repeat of what
    the caller has): it is not returned, and sample n, n + 1, ... (seed `derive_seed(seed, i)`)
    starts in its place, in the same batch, at most n of them (`stats["duplicates"]` counts the
    refusals). `on_variant` is called for each accepted variant, in completion order. Either may
    raise to stop early: every running sample is dropped and its id freed.
    """
    prompt = list(prompt_tokens)
    _check_args(decoder, prompt, n, max_tokens)
    width = decoder.max_branches - 1  # one id stays the prompt anchor
    if max_cells is not None:
        width = min(width, (max_cells - len(prompt)) // max_tokens)  # a variant adds <= max_tokens cells
        if width < 1:
            raise _context_too_small(max_cells, len(prompt), max_tokens)
    anchor = decoder.start(prompt)
    lanes: dict[int, _Lane] = {}  # seq -> running variant
    done: dict[int, Variant] = {}
    started = n_steps = total = refused = 0
    target = n  # samples to start: n, plus one per refusal
    try:
        while started < target or lanes:
            started = _refill(decoder, anchor, prompt, lanes, started, target, width, params, seed)
            decoder.step({seq: lane.feed for seq, lane in lanes.items()})
            n_steps += 1
            for seq, lane in list(lanes.items()):
                lane.fed += len(lane.feed)
                total += len(lane.feed)
                if lane.add(decoder.sample(seq, lane.sampler), group_size, max_tokens):
                    del lanes[seq]
                    lane.sampler.free()
                    decoder.free(seq)
                    variant = lane.variant()
                    if accept is not None and not accept(variant):
                        refused += 1
                        target += refused <= n
                        continue
                    done[lane.index] = variant
                    if on_variant is not None:
                        on_variant(variant)
    except BaseException:
        for seq, lane in lanes.items():
            _quietly(lane.sampler.free, True)
            _quietly(lambda s=seq: decoder.free(s), True)
        _quietly(lambda: decoder.free(anchor), True)
        raise
    decoder.free(anchor)
    variants = [done[i] for i in sorted(done)]
    tree = _star_json(variants, len(prompt))
    return TreeResult(variants, total, n_steps, tree, {"stop_reason": "complete", "duplicates": refused})


def _refill(decoder: BranchDecoder, anchor: int, prompt: list[int], lanes: dict[int, _Lane],
            started: int, n: int, width: int, params: SamplingParams, seed: int) -> int:  # fmt: skip
    """Start variants while fewer than `width` run; returns how many have been started.
    Variant i's seed depends on i only, so results do not depend on the pool size."""
    while started < n and len(lanes) < width:
        try:
            seq = decoder.fork(anchor, len(prompt) - 1)
        except BranchPoolExhausted:
            break  # queued: refilled when a running variant finishes
        sampler = decoder.new_sampler(params, derive_seed(seed, started))
        lanes[seq] = _Lane(started, sampler, [prompt[-1]])
        started += 1
    if not lanes:
        raise BranchPoolExhausted("no sequence id is free for a variant")
    return started


def _star_json(variants: list[Variant], prompt_len: int) -> dict:
    """The independent sampler's 'tree': the prompt with one leaf per variant."""
    leaves = [
        {"id": i + 1, "parent": 0, "depth": 1, "text": v.text, "n_tokens": len(v.tokens),
         "score": round(v.score, 6), "leaf": True, "finish": v.finish_reason, "variant": i,
         "children": []}
        for i, v in enumerate(variants)
    ]  # fmt: skip
    root = {"id": 0, "parent": None, "depth": 0, "text": "", "n_tokens": prompt_len,
            "leaf": False, "children": [leaf["id"] for leaf in leaves]}  # fmt: skip
    return {"sampler": "independent", "prompt_tokens": prompt_len, "nodes": [root, *leaves]}
