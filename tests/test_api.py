"""The Python API (`import kgen_cli as kgen`): same results as the CLI, errors raised, layers kept.

Model tests run the real SmolLM2 GGUF and compare the API with the CLI within one run (same
machine, same kernels): they assert equality and structure, never a figure of one CPU's logits.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import kgen_cli as kgen
from kgen_main import run_main

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = REPO_ROOT / "kgen_cli"
PROMPT = "1girl, (red hair:1.2), BREAK, dragon horns"
FAST_ENGINE = {"threads": 1, "n_ctx": 512}
FAST_OPTIONS = {"retries": 0, "max_tokens": 24}
FAST_ARGS = ("--threads", "1", "--n-ctx", "512", "--retries", "0", "--max-tokens", "24")
TIMING_KEYS = ("prompt_seconds", "generate_seconds")

model = pytest.mark.model


def _calls(calls) -> list[dict]:
    """Model calls without their timings (which differ from run to run)."""
    out = []
    for call in calls:
        call = call if isinstance(call, dict) else call.to_dict()
        out.append({k: v for k, v in call.items() if k not in TIMING_KEYS})
    return out


# ---------------------------------------------------------------------------------------------
# Layers and import cost
# ---------------------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; `from kgen_cli import commands` counts)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_only_the_command_layer_imports_commands_and_only_the_engine_imports_llama_cpp():
    wrong_layer, llama = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        names = _imports(path)
        in_commands = rel.startswith("commands/") or rel == "cli.py"
        if not in_commands and any(n == "kgen_cli.commands" or n.startswith("kgen_cli.commands.") for n in names):
            wrong_layer.append(rel)
        if rel != "engine.py" and any(n == "llama_cpp" or n.startswith("llama_cpp.") for n in names):
            llama.append(rel)
    assert wrong_layer == [], f"library modules importing the command layer: {wrong_layer}"
    assert llama == [], f"modules other than engine.py importing llama_cpp: {llama}"


def test_the_library_option_types_do_not_import_typer():
    for rel in ("options.py", "api.py", "runner.py", "batchjobs.py", "pipeline.py", "samplers.py"):
        assert not any(n.split(".")[0] in ("typer", "click", "rich") for n in _imports(PACKAGE / rel)), rel


def test_the_package_exports_are_lazy():
    code = (
        "import sys, kgen_cli as kgen\n"
        "assert 'kgen_cli.api' not in sys.modules\n"
        "help(kgen.load)\n"
        "names = [kgen.load, kgen.Generator, kgen.show_prompt, kgen.GenerationOptions, kgen.EngineOptions,\n"
        "         kgen.ExpandResult, kgen.KgenError, kgen.UsageError, kgen.ModelNotFoundError]\n"
        "heavy = [m for m in ('llama_cpp', 'huggingface_hub', 'typer') if m in sys.modules]\n"
        "assert heavy == [], heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "load(model" in out.stdout and out.stdout.endswith("ok\n")
    with pytest.raises(AttributeError):
        kgen.no_such_name  # noqa: B018


# ---------------------------------------------------------------------------------------------
# Options and errors without a model
# ---------------------------------------------------------------------------------------------


def test_show_prompt_equals_the_cli(tmp_path):
    code, out, err = run_main("expand", PROMPT, "--show-prompt", "--tag-length", "short", "--ar", "0.5")
    assert code == 0, err
    assert kgen.show_prompt(PROMPT, tag_length="short", aspect_ratio=0.5) == out[:-1]
    code, out, err = run_main("expand", "1girl, solo", "--show-prompt", "--model", "x-dtg.gguf", "--family", "dtg")
    assert code == 0, err
    assert kgen.show_prompt("1girl, solo", family="dtg") == out[:-1] != kgen.show_prompt("1girl, solo")


@pytest.mark.parametrize(("options", "cli", "message"), [
    ({"width": 832}, ("--width", "832"), "--width and --height go together"),
    ({"format": "<|nope"}, ("--format", "<|nope"), None),
    ({"ban": ["re:("]}, ("--ban", "re:("), None),
    ({"operation": "sideways"}, ("--operation", "sideways"), "unknown TIPO operation"),
    ({"top_p": 0.0}, ("--top-p", "0"), "top_p must be in (0, 1]"),
])  # fmt: skip
def test_an_invalid_option_gives_the_cli_message(options, cli, message):
    """The API and the CLI validate in one place: the same UsageError text."""
    with pytest.raises(kgen.UsageError) as raised:
        kgen.show_prompt("1girl", **options)
    code, out, err = run_main("expand", "1girl", "--show-prompt", *cli)
    assert code == 2 and out == ""
    assert str(raised.value) in err
    if message:
        assert message in str(raised.value)


def test_errors_are_raised_as_kgen_errors_with_exit_codes(tmp_path):
    with pytest.raises(kgen.UsageError) as raised:
        kgen.show_prompt("1girl", tag_lenght="short")
    assert raised.value.exit_code == 2 and "tag_lenght" in str(raised.value)
    with pytest.raises(kgen.UsageError):
        kgen.show_prompt("1girl", family="dart")
    with pytest.raises(kgen.ModelNotFoundError) as missing:
        kgen.load(str(tmp_path / "tipo-missing.gguf"))
    assert missing.value.exit_code == 1
    with pytest.raises(kgen.UsageError):
        kgen.load(str(tmp_path / "tipo-missing.gguf"), gpu_layers="some")
    with pytest.raises(kgen.UsageError):
        kgen.load(str(tmp_path / "tipo-missing.gguf"), n_ctx=10)
    with pytest.raises(kgen.ModelNotFoundError):
        kgen.load("tipo-500m-ft-q8_0", download=False)
    bad = tmp_path / "tipo-bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(kgen.EngineError):
        kgen.load(str(bad))


def test_generation_options_update_like_a_batch_line():
    base = kgen.GenerationOptions(aspect_ratio=2.0, tag_length="long")
    moved = base.updated({"width": 832, "height": 1216, "tag_length": "short", "seed": None})
    assert (moved.aspect_ratio, moved.width, moved.tag_length) == (None, 832, "short")
    assert base.updated({"aspect_ratio": 0.5}).updated({}).aspect_ratio == 0.5
    request = moved.request("1girl", family="tipo")
    assert request.aspect_ratio == pytest.approx(832 / 1216) and request.tag_length == "short"


# ---------------------------------------------------------------------------------------------
# On the model: the API gives what the CLI gives
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen(model_path):
    with kgen.load(str(model_path), family="tipo", **FAST_ENGINE,
                   defaults=kgen.GenerationOptions(**FAST_OPTIONS)) as generator:
        yield generator


@model
def test_expand_equals_kgen_expand_json(gen, model_path):
    result = gen.expand(PROMPT, seed=5, tag_length="short")
    code, out, err = run_main("expand", PROMPT, "--model", str(model_path), "--family", "tipo", *FAST_ARGS,
                              "--seed", "5", "--tag-length", "short", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert result.formatted == doc["formatted"]
    assert _calls(result.calls) == _calls(doc["calls"]) and result.calls
    assert result.seed == 5 and result.to_dict()["tag_map"] == doc["tag_map"]
    assert set(result.tags) == {"special", "characters", "copyrights", "artist", "general", "quality", "meta", "rating"}
    assert "dragon horns" in result.tags["general"]
    assert result.timings["model_calls"] == len(result.calls)
    assert isinstance(result.nl, str)


@model
def test_a_keyboard_interrupt_leaves_the_generator_usable(gen):
    first = gen.expand(PROMPT, seed=9)

    def interrupt(_text: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gen.expand(PROMPT, seed=9, on_text=interrupt)
    again = gen.expand(PROMPT, seed=9)
    assert again.formatted == first.formatted and _calls(again.calls) == _calls(first.calls)


@model
def test_variants_equal_kgen_expand_n(model_path):
    args = ("--threads", "1", "--retries", "0", "--max-tokens", "24", "--seed", "3")
    code, out, err = run_main("expand", PROMPT, "--model", str(model_path), "--family", "tipo", *args,
                              "-n", "16", "--json")
    assert code == 0, err
    doc = json.loads(out)
    with kgen.load(str(model_path), family="tipo", threads=1,
                   defaults=kgen.GenerationOptions(**FAST_OPTIONS), parallel=17) as g:
        result = g.variants(PROMPT, n=16, seed=3)
    lines = [v.formatted for v in result]
    assert lines == [v["formatted"] for v in doc["variants"]]
    assert len(set(lines)) == len(lines) == len(result)
    if result.stop_reason == "complete":
        assert len(lines) == 16
    assert result.to_dict()["totals"]["sampler"] == "tgts"


@model
def test_expand_many_is_in_input_order_and_equals_kgen_batch(model_path, tmp_path):
    prompts = ["1girl, solo", "cat, outdoors", "dragon horns", "", "1boy, hat", "scenery"]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(p or "# nothing" for p in prompts) + "\n", encoding="utf-8")
    prompts = [p for p in prompts if p]
    code, out, err = run_main("batch", str(source), "--model", str(model_path), "--family", "tipo", *FAST_ARGS,
                              "--seed", "40", "--parallel", "3", "--output-format", "jsonl", "--no-timings", "-q")
    assert code == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    with kgen.load(str(model_path), family="tipo", **FAST_ENGINE, lazy=True,
                   defaults=kgen.GenerationOptions(**FAST_OPTIONS)) as g:
        items = list(g.expand_many(prompts, parallel=3, seed=40))
    assert [item.formatted for item in items] == [d["formatted"] for d in docs]
    assert [_calls(item.calls) for item in items] == [_calls(d["calls"]) for d in docs]
    assert [item.seed for item in items] == [40 + i for i in range(len(prompts))]


@model
def test_expand_many_yields_a_bad_item_error_in_its_place(gen):
    requests = ["1girl", {"tags": "cat", "tag_length": "huge"}, {"tags": "dog", "seed": 7}, 42]
    items = list(gen.expand_many(requests, parallel=2, seed=1))
    assert [type(i).__name__ for i in items] == ["ExpandResult", "UsageError", "ExpandResult", "UsageError"]
    assert items[2].seed == 7 and "tag_length" in str(items[1])
    stopped = gen.expand_many((f"tag{i}" for i in range(100)), parallel=2, seed=1)
    assert next(stopped).seed == 1
    stopped.close()  # stops early: the sequences go back
    again = list(gen.expand_many(requests, parallel=2, seed=1))
    assert [getattr(i, "formatted", str(i)) for i in again] == [getattr(i, "formatted", str(i)) for i in items]
