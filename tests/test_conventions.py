"""Everyday conventions (issue 18 items 8-11): -t is --threads and --temp the temperature, the
random seed in a terminal and --seed -1, -v against llama.cpp's log, multi-line stdin."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kgen_main import run_main
from tests.terminal import run_in_terminal, strip_ansi

ROOT = Path(__file__).resolve().parent.parent
FAST = ("--family", "tipo", "--retries", "0", "--max-tokens", "8", "--format", "tag-only")
LLAMA_LOG = re.compile(r"llama_model_loader|llama_context|load_tensors|print_info")


def _kgen(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kgen_cli", *args], capture_output=True, text=True, cwd=ROOT,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL, timeout=180)  # fmt: skip


# --- 8. -t / --temp -----------------------------------------------------------------------------


def test_t_is_threads_and_temp_is_temperature_in_the_help():
    from tests.terminal import strip_ansi

    out = strip_ansi(run_main("expand", "--help")[1])
    assert re.search(r"--threads\s+-t\b", out) and re.search(r"--temperature,\s*--temp\b", out)


@pytest.mark.parametrize(("value", "warned"), [("3", True), ("2", False), ("0.5", False)])
def test_a_temperature_above_2_is_warned_about_on_stderr(value, warned):
    code, out, err = run_main("expand", "1girl", "-m", "x-tipo.gguf", "--temp", value, "--show-prompt")
    assert code == 0 and out.startswith("aspect_ratio")
    assert ("warning: temperature" in err) is warned
    if warned:
        assert "-t is --threads" in err and err.count("\n") == 1


@pytest.mark.model
def test_t_sets_threads_and_temp_the_temperature(model_path):
    proc = _kgen("expand", "1girl", "-m", str(model_path), *FAST, "-t", "1", "--temp", "0.7", "--seed", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["engine"]["n_threads"] == 1 and doc["sampling"]["temperature"] == 0.7


# --- 9. the random seed -------------------------------------------------------------------------


@pytest.mark.model
def test_a_random_seed_is_shown_on_stderr_in_a_terminal_never_on_stdout(model_path):
    run = run_in_terminal("expand", "1girl", "-m", str(model_path), *FAST, "-t", "1", shared=False)
    assert run.returncode == 0, run.stderr
    assert re.fullmatch(r"seed \d+", run.stderr.strip().splitlines()[0])
    assert "seed" not in run.stdout
    minus_one = run_in_terminal("expand", "1girl", "-m", str(model_path), *FAST, "-t", "1", "--seed", "-1", shared=False)
    assert re.fullmatch(r"seed \d+", minus_one.stderr.strip().splitlines()[0])
    given = run_in_terminal("expand", "1girl", "-m", str(model_path), *FAST, "-t", "1", "--seed", "5", shared=False)
    assert "seed" not in given.stderr


@pytest.mark.model
def test_seed_minus_one_is_random_and_piped_runs_say_nothing(model_path):
    seeds = set()
    for _ in range(2):
        proc = _kgen("expand", "1girl", "-m", str(model_path), *FAST, "-t", "1", "--seed", "-1", "--json")
        assert proc.returncode == 0 and "seed" not in proc.stderr  # not a terminal: the JSON has it
        seeds.add(json.loads(proc.stdout)["seed"])
    assert all(0 <= s <= 2**32 - 2 for s in seeds)


# --- 10. -v against llama.cpp's log -------------------------------------------------------------


@pytest.mark.model
def test_v_is_kgens_diagnostics_and_vv_or_llama_log_add_llama_cpps_log(model_path):
    base = ("expand", "1girl", "-m", str(model_path), *FAST, "-t", "1", "--seed", "1")
    plain = _kgen(*base)
    assert plain.returncode == 0 and plain.stderr == ""
    v = _kgen(*base, "-v")
    assert v.returncode == 0
    assert "seed 1" in v.stderr and "threads 1" in v.stderr and "model " in v.stderr and "tok/s" in v.stderr
    assert not LLAMA_LOG.search(v.stderr) and len(v.stderr.splitlines()) < 10
    for extra in (("-vv",), ("--llama-log",)):
        loud = _kgen(*base, *extra)
        assert loud.returncode == 0 and LLAMA_LOG.search(loud.stderr)
    assert v.stdout == plain.stdout  # stdout never changes


@pytest.mark.model
def test_batch_v_has_no_llama_log(model_path, tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("1girl\n1boy\n")
    proc = _kgen("batch", str(src), "-m", str(model_path), *FAST, "-t", "1", "--seed", "1", "-v")
    assert proc.returncode == 0 and "base seed 1" in proc.stderr and "1 threads" in proc.stderr
    assert not LLAMA_LOG.search(proc.stderr)


# --- 11. stdin ----------------------------------------------------------------------------------


def test_multi_line_stdin_is_one_prompt_with_a_note_pointing_to_batch():
    proc = _kgen("expand", "-m", "x-tipo.gguf", "--show-prompt", stdin="1girl, solo,\nlong hair\n\n")
    assert proc.returncode == 0
    assert "tag: 1girl, solo, long hair" in proc.stdout  # joined, as before
    assert proc.stderr == "note: the 2 lines on stdin are one prompt; `kgen batch -` expands one prompt per line\n"
    one = _kgen("expand", "-m", "x-tipo.gguf", "--show-prompt", stdin="1girl, solo\n")
    assert one.returncode == 0 and one.stderr == ""


def test_no_prompt_with_a_terminal_on_stdin_is_a_usage_error():
    run = run_in_terminal("expand", "-m", "x-tipo.gguf", "--show-prompt", shared=False)
    assert run.returncode == 2 and run.stdout == ""
    assert strip_ansi(run.stderr).startswith("Error: no prompt: give the tags as an argument, or pipe them on stdin")
    nl_only = run_in_terminal("expand", "-m", "x-tipo.gguf", "--nl", "A girl on a hill.", "--show-prompt", shared=False)
    assert nl_only.returncode == 0 and "A girl on a hill." in nl_only.stdout  # an NL-only prompt is one
