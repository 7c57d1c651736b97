"""Continuous batching of model calls from many jobs in one llama.cpp context.

A *job* is a generator that yields `CompletionRequest`s and receives `Completion`s (see
`pipeline.run_expand`): one prompt's whole expand, with its operations and retries. The
scheduler keeps up to `parallel` requests decoding at once, each on its own KV sequence, and
advances all of them with one `decoder.step()` per token. When a request finishes, its job
immediately yields the next request (or its result), and a waiting request takes the free slot,
so a long generation never holds the others back.

Requests whose prompts are token-identical share the prompt's KV cells: the newcomer forks a
live sequence that holds the prompt (`fork(keep=len-1)`) and replays only the last prompt token.
A job's next request inherits its finished one's sequence: retries and later operations repeat
most of the previous prompt (meta lines, the tags so far), so the sequence is cut back to the
common start (`truncate`) and only the rest is decoded, as llama-cpp-python's single-sequence
prompt cache does for the peers.

One call spans at most `window` positions, prompt included (the model's trained context; the
peers load TIPO/DTG with n_ctx=1024): its new tokens are capped to fit, a first prompt that does
not fit is the job's error, and a `may_skip` request that leaves less than `room_needed()` is
answered with `Completion.no_room` without a model call.

Pure Python over the `decoding.BranchDecoder` protocol, so it is tested with a fake decoder.
"""

from __future__ import annotations

import codecs
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Hashable, Iterable, Iterator

from kgen_cli.errors import EngineError, KgenError, UsageError
from kgen_cli.sampling import Completion, CompletionRequest, validate_params

Job = Generator[CompletionRequest, Completion, Any]
Tokenize = Callable[[str], list[int]]


@dataclass
class _Call:
    """One request in flight on one KV sequence."""

    key: Hashable
    job: Job
    request: CompletionRequest
    prompt: list[int]
    budget: int = 0  # most new tokens: max_tokens, clipped to the window
    seq: int = -1
    sampler: Any = None
    fed: list[int] = field(default_factory=list)  # generated tokens decoded into the sequence
    inherited: tuple[int, list[int]] | None = None  # (seq, its tokens) left by the job's previous call
    pieces: list[bytes] = field(default_factory=list)
    started: float = 0.0
    first_token_at: float = 0.0
    finish_reason: str = "length"


@dataclass
class SchedulerStats:
    steps: int = 0
    tokens_decoded: int = 0  # every token fed to the model, prompts included
    prompt_tokens: int = 0
    prompt_tokens_shared: int = 0  # prompt tokens not decoded thanks to a shared prefix
    generated_tokens: int = 0


def prompt_too_long(n_prompt: int, window: int, n_ctx: int) -> EngineError:
    """The error for a prompt that leaves no room in one call's window, naming the option to raise."""
    return EngineError(f"the prompt is {n_prompt} tokens, longer than the context ({window}); "
                       f"raise {'--context-length' if window < n_ctx else '--n-ctx'}")


def _common_prefix(prompt: list[int], other: list[int]) -> int:
    """Leading tokens `prompt` shares with `other`, at most len(prompt) - 1 (one is always fed)."""
    n = 0
    for a, b in zip(prompt[: len(prompt) - 1], other):
        if a != b:
            break
        n += 1
    return n


class Scheduler:
    """Drive many jobs to completion over one `BranchDecoder`."""

    def __init__(
        self,
        decoder: Any,
        tokenize: Tokenize,
        *,
        n_ctx: int,
        parallel: int = 16,
        on_piece: Callable[[Hashable, str], None] | None = None,
        share_prefix: int = 0,
        window: int | None = None,
    ):
        """`n_ctx`: KV cells shared by every sequence; `window`: the most positions one call
        spans (default n_ctx). `share_prefix` > 0: a new prompt that starts with at least that
        many tokens of a live request's prompt forks that sequence and decodes only the rest
        (TIPO prompts share their header); 0 shares whole identical prompts only."""
        if parallel < 1:
            raise KgenError("parallel must be at least 1")
        self.share_prefix = share_prefix
        self.decoder = decoder
        self.tokenize = tokenize
        self.n_ctx = n_ctx
        self.window = min(n_ctx, window or n_ctx)
        self.parallel = min(parallel, decoder.max_branches)
        self._can_truncate = callable(getattr(decoder, "truncate", None))
        self.on_piece = on_piece
        self.stats = SchedulerStats()
        self._waiting: deque[_Call] = deque()
        self._live: dict[int, _Call] = {}  # seq id -> call
        self._decoders: dict[Hashable, Any] = {}  # key -> incremental utf-8 decoder for streaming

    # -- public -------------------------------------------------------------------------------

    def run(
        self,
        jobs: Iterable[tuple[Hashable, Job]],
        on_result: Callable[[Hashable, Any, BaseException | None], None],
    ) -> None:
        """Run every job; `on_result(key, value, error)` fires as each one ends (any order).

        Jobs are pulled lazily, so a 100k-line input never sits in memory at once. While the
        scheduler is `busy`, `jobs` may yield None for "nothing ready yet" (a slow pipe): the
        requests already there decode, and the next step asks again.
        """
        for _ in self.steps(jobs, on_result):
            pass

    def steps(
        self,
        jobs: Iterable[tuple[Hashable, Job]],
        on_result: Callable[[Hashable, Any, BaseException | None], None],
    ) -> Iterator[None]:
        """`run`, one decode step at a time: yields after each step, so that the caller can hand
        out the results that step ended. Closing the iterator early (or an exception) releases
        every sequence and sampler, so the decoder can serve further runs."""
        self._jobs: Iterator[tuple[Hashable, Job]] = iter(jobs)
        self._exhausted = False
        try:
            while not (self._exhausted and not self._live and not self._waiting):
                self._step(on_result)
                yield
        except BaseException:  # GeneratorExit included: the caller stopped early
            self._release_all()
            raise

    def _release_all(self) -> None:
        """After an error or a stop request: every sequence and sampler back, best effort (the
        decoder may be what failed), so the engine can serve further runs."""
        release = getattr(self.decoder, "release_sampler", None)
        for call in list(self._live.values()) + list(self._waiting):
            seqs = [call.seq] if call.seq >= 0 and self._live.get(call.seq) is call else []
            seqs += [call.inherited[0]] if call.inherited is not None else []
            for seq in seqs:
                with contextlib.suppress(Exception):
                    self.decoder.free(seq)
            if call.sampler is not None:
                with contextlib.suppress(Exception):
                    release(call.sampler) if release else call.sampler.free()
            call.inherited, call.sampler = None, None
        self._live.clear()
        self._waiting.clear()

    def _pull_jobs(self, on_result) -> None:
        """Start new jobs while there is room: each contributes its first request."""
        while not self._exhausted and len(self._live) + len(self._waiting) < self.parallel:
            try:
                item = next(self._jobs)
            except StopIteration:
                self._exhausted = True
                return
            if item is None:
                return
            key, job = item
            self._advance(key, job, on_result, start=True)

    @property
    def busy(self) -> bool:
        """Whether a request is decoding or waiting for a slot."""
        return bool(self._live or self._waiting)

    # -- job plumbing -------------------------------------------------------------------------

    def _advance(self, key, job, on_result, *, start=False, completion=None, inherited=None) -> None:
        """Queue the job's next request, or report its final result. `inherited`: the sequence
        of the job's call that just finished, and the tokens it holds; the next request goes
        first in the queue to reuse it (this step's admission takes it or frees it)."""
        call = None
        try:
            call = self._next_call(key, job, on_result, start, completion)
        finally:
            if call is None and inherited is not None:
                self.decoder.free(inherited[0])
        if call is None:
            return
        if inherited is None:
            self._waiting.append(call)
        else:
            call.inherited = inherited
            self._waiting.appendleft(call)

    def _next_call(self, key, job, on_result, start: bool, completion) -> _Call | None:
        """The job's next request as a call; None when the job ended (result or error reported).
        A `may_skip` request without room in the window is answered here, and the next one taken."""
        while True:
            try:
                request = next(job) if start else job.send(completion)
            except StopIteration as stop:
                on_result(key, stop.value, None)
                return None
            except KgenError as exc:
                on_result(key, None, exc)
                return None
            start = False
            try:
                validate_params(request.params, request.seed)  # a bad request fails its job only
                prompt = self.tokenize(request.prompt)
            except KgenError as exc:
                job.close()
                on_result(key, None, exc)
                return None
            if not prompt:  # nothing to continue (a model with no BOS and an empty prompt)
                job.close()
                on_result(key, None, UsageError("the prompt is empty: there is nothing to continue"))
                return None
            room = self.window - len(prompt)
            if request.may_skip and room < request.room_needed():
                completion = Completion.no_room(len(prompt))
                continue
            if room < 1:
                job.close()
                on_result(key, None, prompt_too_long(len(prompt), self.window, self.n_ctx))
                return None
            budget = min(request.params.max_tokens, room)
            return _Call(key=key, job=job, request=request, prompt=prompt, budget=budget)

    def _cells_in_use(self) -> int:
        return sum(len(c.prompt) + c.budget for c in self._live.values())

    def _admit(self, feeds: dict[int, list[int]]) -> None:
        """Give free sequence slots to waiting requests; their prompts join this step's `feeds`.

        Prefill is never a decode of its own: that would overwrite the logits the other live
        sequences are about to sample from. A prompt identical to a live one forks it instead and
        feeds only its last token again; with `share_prefix`, a prompt that starts like a live one
        forks it at the common prefix and feeds the rest (one that starts like a prompt decoded in
        this very step waits for the next step, to fork it then)."""
        try:
            self._admit_waiting(feeds)
        finally:
            # An inherited sequence is never held across a decode outside the cell budget.
            for call in self._waiting:
                if call.inherited is not None:
                    self.decoder.free(call.inherited[0])
                    call.inherited = None

    def _admit_waiting(self, feeds: dict[int, list[int]]) -> None:
        prefilling: list[list[int]] = []
        admitted: set[int] = set()  # sequences whose prompt cells are only decoded by this step
        while self._waiting and len(self._live) < self.parallel:
            call = self._waiting[0]
            if self._live and self._cells_in_use() + len(call.prompt) + call.budget > self.n_ctx:
                return  # wait for cells; a lone request always runs (its max_tokens is clipped)
            if call.inherited is not None:
                seq, held = call.inherited
                call.inherited = None
                keep = _common_prefix(call.prompt, held)
                if keep:
                    self._waiting.popleft()
                    self.decoder.truncate(seq, keep)
                    self._start(call, seq, call.prompt[keep:], feeds, admitted)
                    self.stats.prompt_tokens_shared += keep
                    prefilling.append(call.prompt)
                    continue
                self.decoder.free(seq)
            if call.prompt in prefilling:
                return  # its twin is being prefilled in this step: fork from it next step
            twin = self._live_with_prompt(call.prompt)
            prefix = None if twin is not None else self._longest_prefix(call.prompt, admitted)
            if twin is None and prefix is None and self.share_prefix and any(
                    _common_prefix(call.prompt, p) >= self.share_prefix for p in prefilling):
                return  # it starts like a prompt decoded in this step: fork from that one next step
            self._waiting.popleft()
            if twin is not None:
                keep = len(call.prompt) - 1
                seq = self.decoder.fork(twin.seq, keep)
            elif prefix is not None:
                parent, keep = prefix
                seq = self.decoder.fork(parent.seq, keep)
                prefilling.append(call.prompt)
            else:
                keep, seq = 0, self.decoder.open()
                prefilling.append(call.prompt)
            self._start(call, seq, call.prompt[keep:], feeds, admitted)
            self.stats.prompt_tokens_shared += keep

    def _start(self, call: _Call, seq: int, feed: list[int], feeds: dict[int, list[int]], admitted: set[int]) -> None:
        """The call goes live on `seq`, which holds its prompt but for `feed` (decoded this step)."""
        call.started = time.perf_counter()
        try:
            call.sampler = self.decoder.new_sampler(call.request.params, call.request.seed)
        except BaseException:
            self.decoder.free(seq)  # not live yet: the release after an error would not see it
            raise
        call.seq = seq
        feeds[seq] = list(feed)
        self._live[seq] = call
        admitted.add(seq)
        self.stats.prompt_tokens += len(call.prompt)

    def _longest_prefix(self, prompt: list[int], admitted: set[int]) -> tuple[_Call, int] | None:
        """The live request whose (decoded) prompt shares the longest start with `prompt`, if that
        is at least `share_prefix` tokens; at most len(prompt) - 1, so one token is fed for logits."""
        if not self.share_prefix:
            return None
        best, best_n = None, self.share_prefix - 1
        for seq, call in self._live.items():
            if seq in admitted:
                continue
            n = _common_prefix(prompt, call.prompt)
            if n > best_n:
                best, best_n = call, n
        return (best, best_n) if best is not None else None

    def _live_with_prompt(self, prompt: list[int]) -> _Call | None:
        for call in self._live.values():
            if call.prompt == prompt:
                return call
        return None

    # -- the token loop -----------------------------------------------------------------------

    def _step(self, on_result) -> None:
        """Sample every live sequence, retire finished ones, admit waiting requests, then decode
        all the new tokens (and new prompts) in one `decoder.step()`."""
        feeds: dict[int, list[int]] = {}
        for seq, call in list(self._live.items()):
            sampled = self.decoder.sample(seq, call.sampler, with_prob=False)
            if not call.first_token_at:
                call.first_token_at = time.perf_counter()
            if sampled.is_eog:
                call.finish_reason = "stop"
                self._finish(call, on_result)
                continue
            call.pieces.append(sampled.piece)
            self.stats.generated_tokens += 1
            self._stream(call, sampled.piece)
            if len(call.pieces) >= call.budget:
                call.finish_reason = "length"
                self._finish(call, on_result)
                continue
            feeds[seq] = [sampled.token]
            call.fed.append(sampled.token)
        self._pull_jobs(on_result)
        self._admit(feeds)
        if feeds:
            self.decoder.step(feeds)
            self.stats.steps += 1
            self.stats.tokens_decoded += sum(len(t) for t in feeds.values())

    def _stream(self, call: _Call, piece: bytes) -> None:
        if self.on_piece is None:
            return
        dec = self._decoders.setdefault(call.key, codecs.getincrementaldecoder("utf-8")("replace"))
        text = dec.decode(piece)
        if text:
            self.on_piece(call.key, text)

    def _finish(self, call: _Call, on_result) -> None:
        now = time.perf_counter()
        del self._live[call.seq]
        inherited = None
        if self._can_truncate:
            inherited = (call.seq, call.prompt + call.fed)  # the job's next call may reuse it
        else:
            self.decoder.free(call.seq)
        release = getattr(self.decoder, "release_sampler", None)
        release(call.sampler) if release else call.sampler.free()
        first = call.first_token_at or now
        completion = Completion(
            text=b"".join(call.pieces).decode("utf-8", errors="replace"),
            n_prompt_tokens=len(call.prompt),
            n_tokens=len(call.pieces),
            finish_reason=call.finish_reason,  # type: ignore[arg-type]
            prompt_seconds=first - call.started,
            generate_seconds=now - first,
        )
        if self.on_piece is not None:
            self._decoders.pop(call.key, None)
            self.on_piece(call.key, "\n")
        self._advance(call.key, call.job, on_result, completion=completion, inherited=inherited)
