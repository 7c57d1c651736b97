"""A model family is one module plus one registration: a toy family (its own prompt and parser)
runs end to end on SmolLM2 through `kgen expand`, with nothing else in kgen knowing its name."""

from __future__ import annotations

import json

import pytest

import kgen_cli as kgen
from kgen_cli import families
from kgen_cli.formats.tags import FIELDS
from kgen_cli.sampling import SamplingParams
from kgen_main import run_main

TOY_SAMPLING = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repeat_penalty=1.1, max_tokens=20)


# --- the toy family's module: prompt, parser, job ----------------------------------------------


def toy_prompt(tags: list[str]) -> str:
    return "Image tags: " + ", ".join(tags) + "\nMore image tags:"


def toy_parse(text: str) -> list[str]:
    tail = text.rsplit("More image tags:", 1)[-1]
    return [t.strip().lower() for t in tail.replace("\n", ",").split(",") if t.strip()]


def run_toy(ctx):
    user = [t for category in FIELDS for t in ctx.user_map[category]]
    text = yield from ctx.call(toy_prompt(user), ctx.seed, "toy", ctx.request.tag_length)
    new = [t for t in dict.fromkeys(toy_parse(text or "")) if t not in user][:6]
    tag_map = {category: list(ctx.user_map[category]) for category in FIELDS}
    tag_map["general"] += new
    tag_map.update(extended="", generated="")
    return tag_map, new, []


@pytest.fixture
def toy():
    family = families.register(families.Family("toy", run_toy, TOY_SAMPLING, retries=0, file_words=("toy-model",)))
    yield family
    families.unregister("toy")


def test_a_registered_family_is_known_everywhere_and_forgotten_after(toy):
    assert "toy" in families.names() and families.guess("my-toy-model.gguf") == "toy"
    assert kgen.show_prompt("1girl, solo", family="toy") == toy_prompt(["1girl", "solo"])
    code, out, err = run_main("expand", "1girl, solo", "--family", "toy", "--model", "x.gguf", "--show-prompt")
    assert (code, out) == (0, toy_prompt(["1girl", "solo"]) + "\n"), err
    request = kgen.GenerationOptions().request("1girl", family="toy")
    assert request.params == TOY_SAMPLING and request.effective_retries == 0


def test_an_unregistered_family_is_a_usage_error():
    code, out, err = run_main("expand", "1girl", "--family", "toy", "--model", "x.gguf", "--show-prompt")
    assert code == 2 and out == "" and "unknown family 'toy'" in err


@pytest.mark.model
def test_a_toy_family_runs_end_to_end_through_the_cli(toy, model_path):
    args = ("--model", str(model_path), "--family", "toy", "--threads", "1", "--seed", "4")
    code, out, err = run_main("expand", "1girl, solo", *args, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["family"] == "toy" and doc["model"]["family"] == "toy"
    assert doc["sampling"] == TOY_SAMPLING.to_dict()
    assert [c["prompt"] for c in doc["calls"]] == [toy_prompt(["1girl", "solo"])]  # retries 0: one call
    assert doc["calls"][0]["operation"] == "toy" and doc["operations"] == []
    expected = [t for t in dict.fromkeys(toy_parse(doc["calls"][0]["prompt"] + doc["calls"][0]["completion"]))
                if t not in ("1girl", "solo")][:6]
    assert doc["new_tags"] == expected  # parsed by the toy parser, not TIPO's
    assert set(expected) <= set(doc["tag_map"]["general"])
    code, plain, err = run_main("expand", "1girl, solo", *args)
    assert code == 0 and plain == doc["formatted"] + "\n", err
    with kgen.load(str(model_path), family="toy", threads=1) as gen:
        assert gen.expand("1girl, solo", seed=4).formatted == doc["formatted"]
