"""One prompt's whole expand job (every operation and retry), as a generator independent of any engine.

`run_expand(request, seed)` yields one `CompletionRequest` per model call and receives the model's
`Completion` through `.send()`; the `ExpandResult` is its return value (`StopIteration.value`).
The scheduler (`scheduler.py`) runs many jobs at once; a test may drive one with a plain function. The text a
call's output is parsed from is `prompt + completion.text`, as on the reference GGUF path.

Flow: the tag prompt is parsed for A1111 syntax (`syntax.parse_prompt`; only bare tags reach the
model) and categorised; the NL loses its weights (`syntax.parse_nl`). TIPO runs the automatic plan
(or the one requested operation), DTG its single retried call. The final tag map is rendered with
the template, then weights, BREAK and extra networks are put back (`syntax.restore`).

Seeds (docs/design.md#sampling-defaults). `seed` is reduced into [0, 2**32 - 2]; every derived seed goes through
`derive_seed`, so it stays there too (0xFFFFFFFF would make llama.cpp pick a random seed):

- TIPO: attempt `a` (0 = first call) of planned operation `i` (0-based) uses
  `derive_seed(seed, 1000 * i + a)`; the very first call uses `seed` itself. Retries are capped
  at 999, so the ranges of two operations never overlap.
- DTG: attempt `a` uses `derive_seed(seed, a)` (the reference's `seed + attempt`).
- Shuffles (new tags, new sentences, DTG retry prompts) draw from a private `random.Random(seed)`
  in call order, never from the global RNG.

Same request, same seed and same model outputs give the identical result.

Retries (docs/design.md#tipo, #dtg). TIPO: an operation re-runs up to `retries` times (default 10) until its
target passes, each attempt extending the previous result; 5 raw outputs in a row that repeat an
earlier one of the operation stop it. DTG: `retries` (default 20) is a budget used by each
changed output; an output with the same new-tag set as the previous one costs nothing, and 15 of
those in a row stop the loop. `retries=0` makes one call per operation.

Context. Every call after the first is `may_skip`: a retry prompt carries the outputs so far,
and once it would leave too little room in the model's context (the runner's window, 1024 tokens
for the registry models, as the peers load them), the call is not made. The operation then
keeps its last result, like a retry loop that ran out; a later operation is still tried (its
prompt may be shorter). `ExpandResult.skipped_calls` lists what was not made.

Between TIPO operations (docs/design.md#tipo) the next one starts from the previous result's tags and NL; meta
lines always come from the user's input, but tags a model put in other categories (a character,
a quality tag) are carried to the final result.

Decisions: DTG models take tags only, so `nl` or `operation` with family "dtg" is a UsageError.
When a plan has no model call (e.g. tags with no expansion asked for), the result is the user's
own prompt, categorised and formatted, and `first_prompt` returns "".
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Generator

from kgen_cli import families
from kgen_cli.errors import UsageError
from kgen_cli.formats import dtg, syntax, tipo
from kgen_cli.formats.bans import BanList
from kgen_cli.formats.tags import FIELDS, categorize
from kgen_cli.formats.templates import DEFAULT_FORMAT, apply_format, resolve_format, wants_extra_nl
from kgen_cli.sampling import SEED_MODULUS, Completion, CompletionRequest, SamplingParams, derive_seed

# Raw outputs in a row that repeat an earlier one after which a retry loop stops.
TIPO_MAX_SAME_OUTPUT = 5
DTG_MAX_SAME_OUTPUT = 15
OPERATION_SEED_STRIDE = 1000
MAX_RETRIES = OPERATION_SEED_STRIDE - 1

Job = Generator[CompletionRequest, Completion, "ExpandResult"]


def _default_template() -> str:
    return resolve_format(DEFAULT_FORMAT)


def _no_bans() -> BanList:
    return BanList.parse([])


@dataclass
class ExpandRequest:
    """Everything one expand needs except the seed. `template` is already resolved (its text)."""

    tags: str = ""  # raw user tag prompt (A1111 syntax allowed)
    nl: str = ""  # natural language (TIPO only)
    family: str = "tipo"  # a registered family (`families.py`)
    tag_length: str = "long"
    nl_length: str = "long"
    operation: str | None = None  # None: the automatic plan; else one TIPO operation
    aspect_ratio: float = 1.0
    template: str = field(default_factory=_default_template)
    bans: BanList = field(default_factory=_no_bans)
    retries: int | None = None  # None: family default (TIPO 10, DTG 20); 0: one call per operation
    params: SamplingParams | None = None  # None: the family's defaults
    quality_line: bool = False  # DTG models trained with quality info (delta, delta-rev2)
    escape_parens: bool = False
    extra_quality: tuple[str, ...] = ()
    extra_special: tuple[str, ...] = ()
    # The automatic TIPO plan's switches.
    expand_tags: bool = True
    expand_prompt: bool = True
    tag_first: bool = True

    def __post_init__(self) -> None:
        if self.params is None and self.family in families.names():
            self.params = families.get(self.family).sampling
        if self.bans is None:
            self.bans = _no_bans()

    @property
    def effective_retries(self) -> int:
        return families.get(self.family).retries if self.retries is None else self.retries


@dataclass
class CallRecord:
    """One model call: what was asked, with which seed, and what came back."""

    operation: str  # a TIPO operation name ("None" for tag only) or "dtg"
    level: str
    expand: bool | None  # None for DTG
    attempt: int
    seed: int
    prompt: str
    completion: str  # what the model wrote after the prompt
    n_prompt_tokens: int
    n_tokens: int
    finish_reason: str
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExpandResult:
    """What one expand job produced, with every model call that led there."""

    formatted: str  # template applied, then weights, BREAK and extra networks restored
    tag_map: dict  # FIELDS lists; TIPO adds the `extended` / `generated` strings
    new_tags: list[str]  # tags the model added (TIPO: in the final map's order; DTG: as generated)
    seed: int
    calls: list[CallRecord] = field(default_factory=list)
    family: str = "tipo"
    operations: list[dict] = field(default_factory=list)  # the plan that ran (TIPO)
    skipped_calls: list[dict] = field(default_factory=list)  # calls whose prompt left no room

    @property
    def tags(self) -> dict[str, list[str]]:
        """The final tags by category (special, characters, copyrights, artist, general, quality,
        meta, rating), the user's and the model's."""
        return {category: list(self.tag_map.get(category, [])) for category in FIELDS}

    @property
    def nl(self) -> str:
        """The final natural-language prompt (TIPO): the generated one, else the extended one."""
        return self.tag_map.get("generated") or self.tag_map.get("extended") or ""

    @property
    def timings(self) -> dict:
        """Totals over the model calls: calls, prompt and generated tokens, seconds."""
        return call_totals(self.calls)

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {
            "formatted": self.formatted,
            "tag_map": self.tag_map,
            "new_tags": self.new_tags,
            "seed": self.seed,
            "family": self.family,
            "operations": self.operations,
            "calls": [call.to_dict() for call in self.calls],
            "skipped_calls": self.skipped_calls,
        }


def call_totals(calls: list[CallRecord]) -> dict:
    """Model calls, prompt and generated tokens, prompt and generation seconds, summed."""
    return {
        "model_calls": len(calls),
        "prompt_tokens": sum(c.n_prompt_tokens for c in calls),
        "generated_tokens": sum(c.n_tokens for c in calls),
        "prompt_seconds": round(sum(c.prompt_seconds for c in calls), 4),
        "generate_seconds": round(sum(c.generate_seconds for c in calls), 4),
    }


# ---------------------------------------------------------------------------------------------
# Validation and the pieces a caller may want without a model


def validate(request: ExpandRequest) -> None:
    """Raise UsageError for anything the pipeline cannot run."""
    family = families.get(request.family)
    for what, level in (("tag length", request.tag_length), ("NL length", request.nl_length)):
        if level not in tipo.LEVELS:
            raise UsageError(f"unknown {what} {level!r}; choose one of: {', '.join(tipo.LEVELS)}")
    if family.validate is not None:
        family.validate(request)
    ratio = request.aspect_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise UsageError(f"the aspect ratio must be a positive number, not {ratio!r}")
    retries = request.retries
    whole = isinstance(retries, int) and not isinstance(retries, bool)
    if retries is not None and not (whole and 0 <= retries <= MAX_RETRIES):
        raise UsageError(f"retries must be a whole number from 0 to {MAX_RETRIES}")
    if not isinstance(request.template, str):
        raise UsageError("the output template must be text")
    if not isinstance(request.params, SamplingParams):
        raise UsageError("missing sampling parameters")


def first_prompt(request: ExpandRequest) -> str:
    """The exact text of the job's first model call (no model needed); "" when it makes none."""
    job = run_expand(request, 0)
    try:
        return next(job).prompt
    except StopIteration:
        return ""
    finally:
        job.close()


def parsed_input(request: ExpandRequest) -> dict:
    """The user's input as the model sees it: bare tags, their categories, the bare NL."""
    prompt = syntax.parse_prompt(request.tags)
    bare_nl, _ = syntax.parse_nl(request.nl)
    return {
        "tags": list(prompt.tags),
        "tag_map": _categorize(request, prompt.tags),
        "nl": bare_nl.strip(),
    }


def plan_operations(request: ExpandRequest, has_tags: bool, has_nl: bool) -> list[tipo.Operation]:
    """The TIPO operations a request runs: its one operation, or the automatic plan."""
    if request.operation is not None:
        return tipo.single_operation(request.operation, request.tag_length, request.nl_length)
    return tipo.plan(
        has_tags, has_nl, request.tag_length, request.nl_length,
        expand_tags=request.expand_tags, expand_prompt=request.expand_prompt, tag_first=request.tag_first,
        extra_nl=wants_extra_nl(request.template, has_nl),
    )


# ---------------------------------------------------------------------------------------------
# The job


@dataclass
class JobContext:
    """What every step of one job shares; a family's `run(ctx)` reads the request and the
    user's parsed input from it and makes its model calls with `yield from ctx.call(...)`."""

    request: ExpandRequest
    seed: int
    prompt: syntax.ParsedPrompt  # the user's tag prompt (weights, BREAK, extra networks)
    user_map: dict[str, list[str]]  # its bare tags, categorised
    nl: str  # the user's NL without weights
    nl_spans: list[tuple[str, float, str]]  # the NL's weighted spans
    rng: random.Random
    calls: list[CallRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def call(self, prompt: str, seed: int, operation: str, level: str, expand: bool | None = None,
             attempt: int = 0) -> Generator[CompletionRequest, Completion, str | None]:
        """One model call, recorded (`yield from` it): the text to parse (prompt + completion), or
        None when the call was not made (every call but the job's first may be skipped: its
        prompt left no room in the model's context)."""
        return _call(self, prompt, seed, operation, level, expand, attempt)


def _categorize(request: ExpandRequest, tags) -> dict[str, list[str]]:
    return categorize(list(tags), extra_quality=request.extra_quality, extra_special=request.extra_special)


def run_expand(request: ExpandRequest, seed: int) -> Job:
    """The expand job: yields CompletionRequests, receives Completions, returns the ExpandResult."""
    validate(request)
    seed = seed % SEED_MODULUS
    prompt = syntax.parse_prompt(request.tags)
    bare_nl, spans = syntax.parse_nl(request.nl)
    user_map = _categorize(request, prompt.tags)
    ctx = JobContext(request, seed, prompt, user_map, bare_nl.strip(), spans, random.Random(seed))
    tag_map, new_tags, operations = yield from families.get(request.family).run(ctx)
    return ExpandResult(
        formatted=_render(ctx, tag_map), tag_map=tag_map, new_tags=new_tags, seed=seed,
        calls=ctx.calls, family=request.family, operations=operations, skipped_calls=ctx.skipped,
    )


def _call(ctx: JobContext, prompt: str, seed: int, operation: str, level: str, expand: bool | None,
          attempt: int) -> Generator[CompletionRequest, Completion, str | None]:
    """One model call, recorded; returns the text to parse (prompt + completion), or None when
    the call was not made (every call but the job's first may be skipped: no room left)."""
    completion = yield CompletionRequest(prompt=prompt, seed=seed, params=ctx.request.params,
                                         may_skip=bool(ctx.calls))
    if completion.finish_reason == "no_room":
        ctx.skipped.append({"operation": operation, "attempt": attempt, "n_prompt_tokens": completion.n_prompt_tokens})
        return None
    ctx.calls.append(CallRecord(
        operation=operation, level=level, expand=expand, attempt=attempt, seed=seed, prompt=prompt,
        completion=completion.text, n_prompt_tokens=completion.n_prompt_tokens, n_tokens=completion.n_tokens,
        finish_reason=completion.finish_reason, prompt_seconds=completion.prompt_seconds,
        generate_seconds=completion.generate_seconds,
    ))
    return prompt + completion.text


def validate_tipo(request: ExpandRequest) -> None:
    if request.operation is not None and request.operation not in tipo.OPERATIONS:
        raise UsageError(f"unknown TIPO operation {request.operation!r}; choose one of: {', '.join(tipo.OPERATIONS)}")


def validate_dtg(request: ExpandRequest) -> None:
    """DTG models take tags only."""
    if request.operation is not None:
        raise UsageError("operations are for TIPO models; DanTagGen only extends tags")
    if request.nl.strip():
        raise UsageError("DanTagGen models take tags only; natural language needs a TIPO model")


def run_tipo(ctx: JobContext):
    """TIPO's part of the job: every planned operation; the next one starts from the previous
    result. Returns (tag map, new tags, the operations that ran)."""
    state = {category: list(ctx.user_map[category]) for category in FIELDS}
    has_tags = bool(state["special"] or state["general"])
    ops = plan_operations(ctx.request, has_tags, bool(ctx.nl))
    nl = ctx.nl
    result = None
    for index, op in enumerate(ops):
        done = yield from _run_operation(ctx, op, index, state, nl)
        if done is None:
            continue  # its first call had no room: the state stays as it was
        result = done
        state = {category: result[category] for category in FIELDS}
        # Renaming `generated` to `extended` before picking (as the reference does) leaves this same choice.
        nl = result["generated"] or result["extended"] or nl
    if result is None:
        # No model call: the user's prompt, with the NL as post-processing would leave it.
        result = dict(state, extended=". ".join(tipo.sentences(ctx.nl)), generated="")
    tag_map = {category: result[category] for category in FIELDS}
    tag_map.update(extended=result["extended"], generated=result["generated"])
    return tag_map, _added_tags(ctx.user_map, tag_map), [op.to_dict() for op in ops]


def _run_operation(ctx: JobContext, op: tipo.Operation, index: int, state: dict, nl: str):
    """One TIPO operation with its retries (K3 fixed, docs/deviations.md): each retry extends the last result."""
    request = ctx.request
    user_nl = nl
    op_seed = derive_seed(ctx.seed, OPERATION_SEED_STRIDE * index)
    seen: set[str] = set()
    same = 0
    result = None
    for attempt in range(request.effective_retries + 1):
        prompt = tipo.build_prompt(ctx.user_map, state["special"] + state["general"], nl, op,
                                   aspect_ratio=request.aspect_ratio)
        output = yield from _call(ctx, prompt, derive_seed(op_seed, attempt), op.name, op.level, op.expand, attempt)
        if output is None:
            break  # no room for this attempt: the last result stands (None: the operation never ran)
        parsed = tipo.parse_output(output, extra_quality=request.extra_quality, extra_special=request.extra_special)
        result = tipo.post_process(
            parsed, op, before=state, nl=nl, user_nl=user_nl, tag_level=request.tag_length,
            nl_level=request.nl_length, rng=ctx.rng, bans=request.bans,
        )
        if tipo.passes(op.target, result, op.level):
            break
        # An output seen before in this operation counts as "same"; a new one resets the count.
        same = same + 1 if output in seen else 0
        seen.add(output)
        if same >= TIPO_MAX_SAME_OUTPUT:
            break
        nl = result["extended"] or result["generated"] or nl
        state = {category: result[category] for category in FIELDS}
    return result


def run_dtg(ctx: JobContext):
    """DTG's part of the job: its call with the retries. Returns (final tag map, new
    tags, no operations)."""
    request = ctx.request
    level = request.tag_length
    prompt = dtg.build_prompt(ctx.user_map, level=level, aspect_ratio=request.aspect_ratio,
                              quality_line=request.quality_line)
    budget, same, previous, attempt = request.effective_retries, 0, None, 0
    new: list[str] = []
    while budget >= 0 and same < DTG_MAX_SAME_OUTPUT:
        output = yield from _call(ctx, prompt, derive_seed(ctx.seed, attempt), "dtg", level, None, attempt)
        if output is None:
            break  # the retry prompt has no room left: the last new tags stand
        attempt += 1
        new = dtg.new_tags(output, ctx.user_map, bans=request.bans, extra_quality=request.extra_quality,
                           extra_special=request.extra_special)
        if set(new) == previous:
            same += 1
            budget += 1  # identical outputs do not use the retry budget
        else:
            same, previous = 0, set(new)
        if dtg.passes(ctx.user_map, new, level):
            break
        budget -= 1
        ctx.rng.shuffle(new)
        prompt = dtg.retry_prompt(output, new)
    tag_map = dtg.merge(ctx.user_map, new, extra_quality=request.extra_quality, extra_special=request.extra_special)
    return tag_map, new, []


def _added_tags(user_map: dict, tag_map: dict) -> list[str]:
    """Tags of `tag_map` not in the user's input (any category), in FIELDS order."""
    known = {tipo.tag_key(t) for category in FIELDS for t in user_map.get(category, [])}
    return [t for category in FIELDS for t in tag_map.get(category, []) if tipo.tag_key(t) not in known]


def _render(ctx: JobContext, tag_map: dict) -> str:
    """The template applied, then the user's weights, BREAK and extra networks restored."""
    escape_parens = ctx.request.escape_parens
    values = dict(tag_map)
    # Undocumented placeholders of the reference (docs/design.md#templates).
    values["tag"] = tag_map["special"] + tag_map["general"]
    values["aspect_ratio"] = [tipo.format_ratio(ctx.request.aspect_ratio)]
    nl_texts = []
    for key, spans in (("extended", ctx.nl_spans), ("generated", ())):
        if values.get(key):
            # The user's NL weights go back on the NL only; restore() then leaves NL text alone.
            values[key] = syntax.restore_nl(values[key], spans, escape_parens=escape_parens)
            nl_texts.append(values[key])
    # Weights and escapes go on each tag before the template places it: a template may join tags
    # with anything (" BREAK ", " ", ". "), so they could not be found in its output reliably.
    decorated: dict[str, str] = {}
    for key, tags in list(values.items()):
        if key in FIELDS or key == "tag":
            values[key] = [ctx.prompt.decorate(t, escape_parens=escape_parens) for t in tags]
            decorated.update((d, syntax.tag_key(t)) for d, t in zip(values[key], tags))
    text = apply_format(values, ctx.request.template)
    return syntax.restore(text, ctx.prompt, escape_parens=escape_parens, nl=nl_texts, decorated=decorated)
