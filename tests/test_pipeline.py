"""The expand job driven by a scripted fake model: plans, retries, seeds, determinism, DTG loop."""

from __future__ import annotations

import json
import random

import pytest

from kgen_cli import pipeline
from kgen_cli.errors import UsageError
from kgen_cli.formats.bans import BanList
from kgen_cli.formats.templates import PRESETS
from engine_calls import drive  # tests/ is on sys.path
from kgen_cli.pipeline import ExpandRequest, first_prompt, run_expand, validate
from kgen_cli.sampling import FAMILY_DEFAULTS, Completion, CompletionRequest, derive_seed

T1 = "1girl, hatsune miku, vocaloid, ask \\(askzy\\), solo, twintails, masterpiece, absurdres, sensitive"
T1_META = (
    "meta: absurdres\nrating: sensitive\nartist: ask (askzy)\ncharacters: hatsune miku\n"
    "copyrights: vocaloid\nquality: masterpiece\naspect_ratio: 1.0\n"
)
D1_TAGS = "1girl, hatsune miku, vocaloid, ask \\(askzy\\), solo, masterpiece, absurdres, sensitive"
D1 = (
    "quality: masterpiece\nrating: sensitive\nartist: ask (askzy)\ncharacters: hatsune miku\ncopyrights: vocaloid\n"
    "aspect ratio: 1.0\ntarget: <|long|>\ngeneral: 1girl, solo<|input_end|>"
)
TAG_ONLY = PRESETS["tag-only"]
BOTH = PRESETS["both-tag-first"]


def names(prefix: str, n: int) -> list[str]:
    """Tags that categorise as general."""
    return [f"z{prefix}{i}q" for i in range(n)]


class Model:
    """A scripted model: each output is a string or a function of the CompletionRequest."""

    def __init__(self, *outputs, default=None):
        self.outputs = list(outputs)
        self.default = default
        self.requests: list[CompletionRequest] = []

    def __call__(self, request: CompletionRequest) -> Completion:
        self.requests.append(request)
        out = self.outputs.pop(0) if self.outputs else self.default
        if out is None:
            raise AssertionError(f"unexpected model call #{len(self.requests)}:\n{request.prompt}")
        text = out(request) if callable(out) else out
        return Completion(text=text, n_prompt_tokens=len(request.prompt), n_tokens=len(text), finish_reason="stop")

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.requests]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.requests]


def run(request: ExpandRequest, model: Model, seed: int = 1234):
    return drive(run_expand(request, seed), model)


# ---------------------------------------------------------------------------------------------
# TIPO: plans and byte-exact prompts


def test_first_prompt_t1_without_a_model():
    request = ExpandRequest(tags=T1, nl_length="short", template=BOTH)
    assert first_prompt(request) == T1_META + "target: <|long|>\ntag: 1girl, solo, twintails"


def test_t1_full_run():
    new = names("a", 40)
    model = Model(", " + ", ".join(new), " A girl smiles. She waves.")
    request = ExpandRequest(tags=T1, nl_length="short", template=BOTH)
    result = run(request, model, seed=99)
    assert len(model.requests) == 2
    op2 = model.prompts[1]
    head = T1_META + "target: <|short|> <|tag_to_long|>\ntag: 1girl, solo, twintails, "
    assert op2.startswith(head) and op2.endswith("\nlong:")
    assert sorted(op2[len(head) : -len("\nlong:")].split(", ")) == sorted(new)
    assert model.seeds == [99, 1099]
    tm = result.tag_map
    assert tm["general"][:2] == ["solo", "twintails"] and sorted(tm["general"][2:]) == sorted(new)
    assert tm["generated"] == "A girl smiles. She waves" and tm["extended"] == ""
    assert sorted(result.new_tags) == sorted(new)
    # (How the artist's parentheses are written back is syntax.restore's business.)
    assert result.formatted.startswith("1girl, hatsune miku, vocaloid, \nask ")
    assert "askzy" in result.formatted and "), \n\nsolo, twintails, za" in result.formatted
    assert result.formatted.endswith(",\n\nA girl smiles. She waves.\n\nmasterpiece, absurdres, sensitive")
    assert [op["operation"] for op in result.operations] == ["None", "tag_to_long"]


def test_t2_prompts_carry_the_previous_results():
    tags = names("b", 20)
    model = Model(
        ", " + ", ".join(tags),  # short_to_tag: enough tags for `short` (18)
        ". The sun sets. Wind blows. Grass sways.",  # tag_to_long continues the user's NL
        " A red sky. Birds fly. Clouds drift. Night falls.",  # short_to_tag_to_long writes `long:`
    )
    request = ExpandRequest(tags="1girl, scenery, sunset, newest, safe", nl="A girl standing on a hill.",
                            tag_length="short", template=PRESETS["both-generated"])
    result = run(request, model)
    p = model.prompts
    head = "rating: safe\nquality: newest\naspect_ratio: 1.0\n"
    assert p[0] == head + "target: <|short|> <|short_to_tag|>\nshort: A girl standing on a hill.\ntag: 1girl, scenery, sunset"
    tag_line = p[1].split("\n")[4]
    # In a real run the NL is the post-processed one: no final period (docs/design.md#tipo).
    assert p[1] == head + f"target: <|long|> <|tag_to_long|>\n{tag_line}\nlong: A girl standing on a hill"
    assert sorted(tag_line.split(", ")[3:]) == sorted(tags)
    nl = p[2].split("\n")[4]
    assert p[2] == head + f"target: <|long|> <|short_to_tag_to_long|>\n{nl}\n{tag_line}\nlong:"
    assert nl.startswith("short: A girl standing on a hill. ") and nl.endswith("Grass sways")
    assert result.tag_map["extended"].startswith("A girl standing on a hill. ")
    assert result.tag_map["generated"] == "A red sky. Birds fly. Clouds drift. Night falls"


def test_t3_nl_only():
    model = Model(".\ntag: 1girl, " + ", ".join(names("c", 60)), " Sun. Moon. Star. Sky.")
    # The extra NL operation runs because the template wants generated NL (docs/design.md#tipo).
    request = ExpandRequest(nl="A cat sleeping on a windowsill", tag_length="very_long", template=PRESETS["both-generated"])
    assert first_prompt(request) == "aspect_ratio: 1.0\ntarget: <|very_long|> <|long_to_tag|>\nlong: A cat sleeping on a windowsill"
    result = run(request, model)
    assert len(model.requests) == 2
    assert model.prompts[1].startswith("aspect_ratio: 1.0\ntarget: <|long|> <|short_to_tag_to_long|>\nshort: A cat sleeping on a windowsill")
    assert "\ntag: 1girl, zc" in model.prompts[1] and model.prompts[1].endswith("\nlong:")
    assert result.tag_map["generated"] == "Sun. Moon. Star. Sky"


def test_t4_empty_input():
    model = Model("\ntag: " + ", ".join(names("d", 40)), "\nlong: A. B. C. D.")
    request = ExpandRequest(template=BOTH)
    assert first_prompt(request) == "aspect_ratio: 1.0\ntarget: <|long|>"
    run(request, model)
    assert model.prompts[0] == "aspect_ratio: 1.0\ntarget: <|long|>"
    assert model.prompts[1].startswith("aspect_ratio: 1.0\ntarget: <|long|> <|tag_to_long|>\ntag: zd")


def test_first_prompt_dtg_is_d1():
    request = ExpandRequest(tags=D1_TAGS, family="dtg", quality_line=True)
    assert first_prompt(request) == D1
    assert request.params == FAMILY_DEFAULTS["dtg"]


def test_first_prompt_single_operation_and_aspect_ratio():
    request = ExpandRequest(tags="1girl, solo", nl="Hi.", operation="tag_to_short", aspect_ratio=0.7, nl_length="short")
    assert first_prompt(request) == "aspect_ratio: 0.7\ntarget: <|short|> <|tag_to_short|>\ntag: 1girl, solo\nshort: Hi."


def test_no_model_call_when_nothing_to_expand():
    request = ExpandRequest(tags="(1girl:1.2), solo, masterpiece", template=TAG_ONLY, expand_tags=False)
    assert first_prompt(request) == ""
    result = run(request, Model())
    assert result.calls == [] and result.new_tags == []
    assert result.formatted == "(1girl:1.2), \n\nsolo,\n\nmasterpiece"


def test_extra_nl_operation_follows_the_template():
    tags = ", " + ", ".join(names("e", 40))
    model = Model(tags)
    run(ExpandRequest(tags="1girl", template=TAG_ONLY), model)
    assert len(model.requests) == 1
    model = Model(tags, " A. B. C. D.")
    run(ExpandRequest(tags="1girl", template=PRESETS["nl-only"]), model)
    assert len(model.requests) == 2
    # With user NL, only <|generated|> asks for the extra pass.
    model = Model(".\ntag: " + tags)
    result = run(ExpandRequest(nl="A cat", tag_length="short", template=BOTH), model)
    assert [op["operation"] for op in result.operations] == ["long_to_tag"]


def test_duplicated_nl_operation_runs_once():
    model = Model(", " + ", ".join(names("o", 40)), " A. B. C. D.")
    request = ExpandRequest(tags="1girl", nl="Hi.", expand_prompt=False, template=PRESETS["both-generated"])
    result = run(request, model)
    assert [op["operation"] for op in result.operations] == ["short_to_tag", "short_to_tag_to_long"]
    assert len(result.calls) == 2
    assert first_prompt(request) == result.calls[0].prompt


# ---------------------------------------------------------------------------------------------
# TIPO: the retry loop (docs/design.md#tipo)


def test_tag_retry_extends_the_previous_result():
    calls = iter(range(100))
    model = Model(default=lambda r: f", zr{next(calls)}q, zs{len(r.prompt)}q")
    request = ExpandRequest(tags="1girl, solo", template=TAG_ONLY, tag_length="very_short")  # needs 6
    result = run(request, model, seed=10)
    # 2 input + 2 new per call: 6 reached on the second call.
    assert len(model.requests) == 2
    first_line = model.prompts[0].split("\n")[-1]
    second_line = model.prompts[1].split("\n")[-1]
    assert first_line == "tag: 1girl, solo"
    assert second_line.startswith("tag: 1girl, solo, ") and len(second_line.split(", ")) == 4
    assert model.seeds == [10, 11]
    assert [c.attempt for c in result.calls] == [0, 1]
    assert len(result.tag_map["general"]) == 5


def test_retries_exhausted_gives_retries_plus_one_calls():
    calls = iter(range(100))
    model = Model(default=lambda r: f", zf{next(calls)}q")
    request = ExpandRequest(tags="1girl", template=TAG_ONLY, tag_length="very_long", retries=4)
    result = run(request, model)
    assert len(model.requests) == 5
    assert len(result.tag_map["general"]) == 5


@pytest.mark.parametrize("family", ["tipo", "dtg"])
def test_retries_zero_one_call(family):
    model = Model(default="")
    request = ExpandRequest(tags="1girl", family=family, template=TAG_ONLY, retries=0)
    result = run(request, model)
    assert len(model.requests) == 1 and len(result.calls) == 1


def test_default_retries_same_output_counter():
    """An identical raw output (prompt + completion) 5 times in a row stops the operation."""
    model = Model(default="")
    run(ExpandRequest(tags="1girl", template=TAG_ONLY), model)
    assert len(model.requests) == 6  # 1 new output, then 5 repeats


class WindowedModel(Model):
    """A scripted model with a context window of `window` characters, answering a `may_skip`
    request that leaves no room as the scheduler does (Completion.no_room, no model call)."""

    def __init__(self, window: int, *outputs, default=None):
        super().__init__(*outputs, default=default)
        self.window = window
        self.skipped: list[CompletionRequest] = []

    def __call__(self, request: CompletionRequest) -> Completion:
        if request.may_skip and self.window - len(request.prompt) < request.room_needed():
            self.skipped.append(request)
            return Completion.no_room(len(request.prompt))
        return super().__call__(request)


def test_only_the_first_call_of_a_job_must_be_made():
    calls = iter(range(100))
    model = Model(default=lambda r: f", zm{next(calls)}q")
    run(ExpandRequest(tags="1girl", template=TAG_ONLY, tag_length="very_long", retries=3), model)
    assert [r.may_skip for r in model.requests] == [False, True, True, True]


def test_a_retry_without_room_ends_the_operation_with_the_last_result():
    calls = iter(range(100))
    model = WindowedModel(200, default=lambda r: ", " + ", ".join(f"zw{next(calls)}q" for _ in range(4)))
    request = ExpandRequest(tags="1girl", template=TAG_ONLY, tag_length="very_long", retries=10)
    result = run(request, model)
    # Each retry prompt carries 4 more tags (~28 characters): the window of 200 (64 of them kept free) ends the loop early.
    made = len(model.requests)
    assert 1 < made < 11 and len(model.skipped) == 1
    assert result.skipped_calls == [{"operation": "None", "attempt": made, "n_prompt_tokens": len(model.skipped[0].prompt)}]
    # The last attempt's tags are the result: 1 input + 4 per call made.
    assert result.tag_map["special"] == ["1girl"] and len(result.tag_map["general"]) == 4 * made
    assert result.to_dict()["skipped_calls"] == result.skipped_calls


def test_an_operation_without_room_is_skipped_and_the_plan_goes_on():
    # tags + NL, expand both: tag operation first, then the NL one; the NL one never fits.
    model = WindowedModel(60, ", zx1q, zx2q", default=None)
    request = ExpandRequest(tags="1girl, solo, " + ", ".join(names("p", 3)), nl="A girl.", template=BOTH, retries=2)
    result = run(request, model)
    assert len(model.requests) == 1
    assert [s["attempt"] for s in result.skipped_calls] == [1] + [0] * (len(result.operations) - 1)
    assert "zx1q" in result.tag_map["general"] and "zx2q" in result.tag_map["general"]


def test_dtg_retry_without_room_keeps_the_new_tags_so_far():
    counter = iter(range(100))
    model = WindowedModel(len(D1) + 120, default=lambda r: f", zd{next(counter)}q, ze{next(counter)}q")
    result = run(ExpandRequest(tags=D1_TAGS, family="dtg", retries=20), model)
    made = len(model.requests)
    assert 1 < made < 21 and result.skipped_calls[0]["operation"] == "dtg"
    assert len(result.new_tags) == 2 * made  # every call's tags: retries extend the previous output


def test_same_output_counter_resets_on_a_new_output():
    model = Model("", "", ", zg1q", default="")
    run(ExpandRequest(tags="1girl", template=TAG_ONLY), model)
    # calls 0-1: same=1; call 2 new (reset); call 3 repeats call 2's raw text; then 4 more repeats.
    assert len(model.requests) == 8


def test_nl_retry_continues_the_text_k3_fixed():
    tags = ", " + ", ".join(names("h", 40))
    model = Model(tags, " A girl smiles.", ". She waves. Wind blows. Birds sing.")
    request = ExpandRequest(tags="1girl, solo", template=BOTH)
    result = run(request, model, seed=5)
    first, second = model.prompts[1], model.prompts[2]
    assert first.endswith("\nlong:")
    assert second == first[: -len("long:")] + "long: A girl smiles"
    assert second.count("long:") == 1
    assert model.seeds == [5, 1005, 1006]
    tm = result.tag_map
    assert tm["extended"] == "" and tm["generated"].startswith("A girl smiles. ") and tm["generated"].endswith("Birds sing")
    assert len(tm["generated"].split(". ")) == 4


def test_nl_target_on_extended_when_user_nl_is_continued_in_long():
    model = Model(" More. Even more.", ". Last one.")
    request = ExpandRequest(tags="1girl", nl="Start.", operation="tag_to_long", nl_length="long")
    result = run(request, model)
    assert len(model.requests) == 2
    assert model.prompts[1].endswith("long: Start. More. Even more") or model.prompts[1].endswith("long: Start. Even more. More")
    assert result.tag_map["extended"].startswith("Start. ") and result.tag_map["generated"] == ""
    assert len(result.tag_map["extended"].split(". ")) == 4


WITCH = "The witch flies over the town"
WITCH_DONE = WITCH + " beneath the glowing signs"
WITCH_REQUEST = dict(tags="5boys, full body, curtains, light rays", nl=WITCH, operation="tag_to_short_to_long",
                     template=PRESETS["both-generated"])
MORE = ["A young woman waves both hands", "Lanterns glow", "Rain falls", "A cat watches", "Smoke rises",
        "Bells ring"]


def test_generated_nl_is_filtered_against_the_merged_input():
    """Issue 19: the model completes the user's unfinished sentence in `short:`, then starts `long:`
    with the user's original sentence. As in the reference, `generated` is filtered against the
    input sentences after the merge, so it keeps that sentence: 8 sentences reach very_long's
    target (8) and the operation needs no retry."""
    generated = [WITCH, *MORE, "The sky darkens"]
    model = Model(" beneath the glowing signs.\nlong: " + ". ".join(generated) + ".")
    result = run(ExpandRequest(**WITCH_REQUEST, nl_length="very_long"), model)
    assert model.prompts[0].endswith("\nshort: " + WITCH)
    assert len(model.requests) == 1  # filtered against the pre-merge input, 7 sentences: a retry
    tm = result.tag_map
    assert tm["extended"] == WITCH_DONE
    assert tm["generated"] == ". ".join(generated)


def test_a_completed_sentence_is_never_printed_twice():
    """Issue 19, the mirror case: `long:` repeats the sentence the model completed in `short:`;
    it counts as input, so the "both-generated" format prints it once."""
    model = Model(" beneath the glowing signs.\nlong: " + ". ".join([WITCH_DONE, *MORE[:4]]) + ".")
    result = run(ExpandRequest(**WITCH_REQUEST, nl_length="long"), model)
    assert len(model.requests) == 1
    assert result.tag_map["generated"] == ". ".join(MORE[:4])
    assert result.formatted.count("beneath the glowing signs") == 1
    assert result.formatted.count(MORE[0]) == 1


@pytest.mark.parametrize("operation", ["None", "short_to_tag", "short_to_tag_to_long", "tag_to_long",
                                       "tag_to_long_to_short", "tag_to_short", "tag_to_short_to_long", "long_to_tag"])
@pytest.mark.parametrize("nl", ["", "A girl."])
def test_every_single_operation_runs(operation, nl):
    model = Model(default=" x, zk1q.\nshort: One. Two. Three. Four. Five.\nlong: Six. Seven. Eight. Nine.\ntag: zk2q")
    request = ExpandRequest(tags="1girl, solo", nl=nl, operation=operation, retries=1)
    result = run(request, model)
    assert 1 <= len(result.calls) <= 2
    assert all(c.operation == operation for c in result.calls)
    assert result.tag_map["special"] == ["1girl"] and result.tag_map["general"][0] == "solo"
    json.dumps(result.to_dict())


# ---------------------------------------------------------------------------------------------
# Seeds and determinism (docs/design.md#sampling-defaults)


def test_seed_derivation_per_operation_and_attempt():
    model = Model(default="")
    request = ExpandRequest(tags="1girl", template=BOTH, retries=2)
    result = run(request, model, seed=77)
    assert [(c.operation, c.attempt, c.seed) for c in result.calls] == [
        ("None", 0, 77), ("None", 1, 78), ("None", 2, 79),
        ("tag_to_long", 0, 1077), ("tag_to_long", 1, 1078), ("tag_to_long", 2, 1079),
    ]


def test_seeds_stay_in_llama_range():
    model = Model(default="")
    top = 2**32 - 2
    result = run(ExpandRequest(tags="1girl", template=BOTH, retries=3), model, seed=top)
    seeds = [c.seed for c in result.calls]
    assert seeds[0] == top and seeds[1] == derive_seed(top, 1) == 0
    assert all(0 <= s <= top for s in seeds)
    assert run(ExpandRequest(tags="1girl", template=TAG_ONLY, retries=0), Model(default=""), seed=2**32 - 1).seed == 0


def _noisy_model():
    counter = iter(range(1000))
    return Model(default=lambda r: ", " + ", ".join(f"zn{next(counter)}q" for _ in range(7)) + "\nlong: A. B. C. D. E.")


def test_same_seed_same_result_different_seed_different_shuffle():
    request = ExpandRequest(tags="1girl, solo", template=BOTH)
    a = run(request, _noisy_model(), seed=3).to_dict()
    b = run(request, _noisy_model(), seed=3).to_dict()
    assert a == b
    others = {tuple(run(request, _noisy_model(), seed=s).tag_map["general"]) for s in range(4, 9)}
    assert len(others) > 1


def test_global_random_state_is_neither_used_nor_changed():
    request = ExpandRequest(tags="1girl, solo", template=BOTH)
    random.seed(1)
    state = random.getstate()
    a = run(request, _noisy_model(), seed=3)
    assert random.getstate() == state
    random.seed(2)
    assert run(request, _noisy_model(), seed=3).to_dict() == a.to_dict()


# ---------------------------------------------------------------------------------------------
# Bans, syntax restoration, result shape


def test_bans_apply_to_model_tags_only():
    model = Model(", smile, gun, " + ", ".join(names("p", 40)) + "\nlong: x")
    request = ExpandRequest(tags="1girl, gun, solo", template=TAG_ONLY, bans=BanList.parse(["gun", "smile"]))
    result = run(request, model)
    assert result.tag_map["general"][:2] == ["gun", "solo"]
    assert "smile" not in result.tag_map["general"] and result.tag_map["general"].count("gun") == 1


def test_weights_break_and_loras_come_back():
    model = Model(", " + ", ".join(names("w", 40)))
    request = ExpandRequest(tags="(1girl:1.2), solo BREAK twintails, <lora:x:0.5>", template=TAG_ONLY)
    result = run(request, model)
    assert model.prompts[0].endswith("tag: 1girl, solo, twintails")
    assert result.formatted.startswith("(1girl:1.2), \n\nsolo, BREAK twintails, ")
    assert result.formatted.endswith(", <lora:x:0.5>")


@pytest.mark.parametrize("tags, expected", [("BREAK BREAK", "BREAK BREAK"), ("BREAK, BREAK BREAK", "BREAK BREAK BREAK")])
def test_breaks_without_tags_stay_separate(tags, expected):
    """Issue 20 item 8: an output with no tags once gave `BREAKBREAK`, which A1111 does not read as BREAK."""
    result = run(ExpandRequest(tags=tags, template=TAG_ONLY, retries=0), Model(""))
    assert result.formatted == expected


def test_nl_weights_come_back_and_the_model_sees_bare_text():
    # Tags + NL, tags not expanded: tag_to_long (NL level), then tag_to_short_to_long.
    model = Model(" She smiles. It rains. Wind blows.", " Extra.")
    request = ExpandRequest(tags="1girl", nl="(A girl:1.2) stands.", template=PRESETS["nl-only"], expand_tags=False,
                            retries=0)
    result = run(request, model)
    assert model.prompts[0].endswith("tag: 1girl\nlong: A girl stands.")
    assert [c.operation for c in result.calls] == ["tag_to_long", "tag_to_short_to_long"]
    assert result.formatted.startswith("(A girl:1.2) stands. ")


def test_escape_parens_option():
    model = Model(", " + ", ".join(names("y", 40)) + ", hat (object)")
    request = ExpandRequest(tags="1girl", template=TAG_ONLY, escape_parens=True)
    assert "hat \\(object\\)" in run(request, model).formatted


def test_result_to_dict_is_json_ready():
    model = Model(", " + ", ".join(names("j", 40)), " A. B. C. D.")
    d = run(ExpandRequest(tags="1girl", template=BOTH), model, seed=8).to_dict()
    json.dumps(d)
    assert set(d) >= {"formatted", "tag_map", "new_tags", "seed", "calls", "family", "operations"}
    call = d["calls"][0]
    assert set(call) == {"operation", "level", "expand", "attempt", "seed", "prompt", "completion", "n_prompt_tokens",
                         "n_tokens", "finish_reason", "prompt_seconds", "generate_seconds"}
    assert call["prompt"] == model.prompts[0] and call["completion"].startswith(", zj")


def test_parsed_input():
    info = pipeline.parsed_input(ExpandRequest(tags="(1girl:1.1), solo, hatsune miku", nl="(Hi:1.2) there."))
    assert info["tags"] == ["1girl", "solo", "hatsune miku"]
    assert info["tag_map"]["characters"] == ["hatsune miku"] and info["nl"] == "Hi there."


# ---------------------------------------------------------------------------------------------
# DTG (docs/design.md#dtg)


def test_dtg_retry_prompt_and_result():
    second = ", " + ", ".join(names("g", 30)) + ", kagamine rin, solo"
    model = Model("twintails, smile, aqua hair", second)
    request = ExpandRequest(tags=D1_TAGS, family="dtg", quality_line=True, template=TAG_ONLY)
    result = run(request, model, seed=500)
    assert model.prompts[0] == D1
    retry = model.prompts[1]
    assert retry.startswith(D1) and sorted(retry[len(D1):].split(", ")) == ["aqua hair", "smile", "twintails"]
    assert model.seeds == [500, 501]
    tm = result.tag_map
    assert tm["characters"] == ["hatsune miku", "kagamine rin"]  # re-categorised
    assert tm["general"][0] == "solo" and tm["general"].count("solo") == 1  # de-duplicated against input
    assert len(result.new_tags) == 34 and "solo" not in result.new_tags
    assert [c.operation for c in result.calls] == ["dtg", "dtg"] and result.calls[0].expand is None
    assert result.operations == []


def test_dtg_counts_only_the_tags_it_keeps():
    """Issue 19: `maid_` is the input tag `maid`, so it is not new: 2 input + 5 new tags stay
    below very_short's target (8) and the loop retries; the retry prompt writes `hat_` as `hat`."""
    model = Model(lambda r: r.prompt + "smile, maid_, bow, hat_, skirt, tail", lambda r: r.prompt + ", apron")
    request = ExpandRequest(tags="1girl, maid", family="dtg", tag_length="very_short", template=TAG_ONLY)
    result = run(request, model)
    assert len(model.requests) == 2
    head = model.prompts[0]
    retry = model.prompts[1]
    assert retry.startswith(head) and sorted(retry[len(head):].split(", ")) == ["bow", "hat", "skirt", "smile", "tail"]
    tm = result.tag_map
    assert tm["special"] == ["1girl"] and tm["general"][0] == "maid" and "maid_" not in tm["general"]
    assert len(tm["special"] + tm["general"]) == 8  # the target, counted on what is kept
    assert sorted(result.new_tags) == ["apron", "bow", "hat", "skirt", "smile", "tail"]


def test_dtg_identical_outputs_do_not_use_the_budget():
    model = Model(default="")
    result = run(ExpandRequest(tags="1girl", family="dtg"), model)
    assert len(result.calls) == 16  # 1, then 15 identical
    assert all(p == model.prompts[0] for p in model.prompts)


def test_dtg_budget_with_changing_outputs():
    counter = iter(range(100))
    model = Model(default=lambda r: f", zq{next(counter)}q")
    result = run(ExpandRequest(tags="1girl", family="dtg", retries=5), model)
    assert len(result.calls) == 6
    assert [c.seed for c in result.calls] == [1234 + i for i in range(6)]
    assert len(result.new_tags) == 6


def test_dtg_bans_filter_new_tags():
    model = Model(", gun, " + ", ".join(names("u", 40)))
    request = ExpandRequest(tags="1girl, gun", family="dtg", bans=BanList.parse(["gun"]), template=TAG_ONLY)
    result = run(request, model)
    assert result.tag_map["general"][0] == "gun" and result.tag_map["general"].count("gun") == 1
    assert "gun" not in result.new_tags


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(family="sdxl"),
        dict(tag_length="medium"),
        dict(nl_length="longest"),
        dict(operation="tag_to_everything"),
        dict(family="dtg", operation="tag_to_long"),
        dict(family="dtg", nl="A girl."),
        dict(aspect_ratio=0),
        dict(aspect_ratio=-1.0),
        dict(aspect_ratio=float("nan")),
        dict(aspect_ratio=float("inf")),
        dict(retries=-1),
        dict(retries=1000),
        dict(retries=1.5),
    ],
)
def test_validate_rejects(kwargs):
    request = ExpandRequest(tags="1girl", **kwargs)
    with pytest.raises(UsageError):
        validate(request)
    with pytest.raises(UsageError):
        first_prompt(request)


def test_validate_accepts_defaults_and_family_defaults():
    for family in ("tipo", "dtg"):
        request = ExpandRequest(tags="1girl", family=family)
        validate(request)
        assert request.params == FAMILY_DEFAULTS[family]
        assert request.effective_retries == {"tipo": 10, "dtg": 20}[family]
        assert not request.bans


@pytest.mark.parametrize("template, expected", [
    ("<|artist|> BREAK <|general|>", "ask \\(askzy\\) BREAK (smile:1.2), (long hair:1.1)"),
    ("<|general|> <|artist|>", "(smile:1.2), (long hair:1.1) ask \\(askzy\\)"),
    ("<|artist|>. <|general|>", "ask \\(askzy\\). (smile:1.2), (long hair:1.1)"),
    ("<|artist|>, <|general|>", "ask \\(askzy\\), (smile:1.2), (long hair:1.1)"),
])  # fmt: skip
def test_weights_and_escapes_survive_any_template_separator(template, expected):
    # The tags are decorated before the template places them: a template that joins fields with
    # anything but commas and newlines used to lose them (`ask (askzy) BREAK smile, ...`).
    request = ExpandRequest(tags="ask \\(askzy\\), (smile:1.2), (long hair:1.1)", template=template, expand_tags=False)
    assert run(request, Model()).formatted == expected
