"""What a terminal receives, stream by stream (issue 18): help on a bare command, the batch
progress line, live streaming, NO_COLOR / TERM=dumb. Run under real pseudo-terminals."""

from __future__ import annotations

import re

import pytest

from tests.terminal import run_in_terminal, screen, strip_ansi

ESC = "\x1b"
FAST = ("--family", "tipo", "--retries", "0", "--max-tokens", "8", "--format", "tag-only", "--threads", "1")
PROMPTS = [f"1girl, prompt {i}" for i in range(6)]


# --- 1. `kgen` / `kgen models` alone ------------------------------------------------------------


@pytest.mark.parametrize("args", [(), ("models",)])
def test_a_bare_command_prints_its_help_once_on_stderr_and_exits_2(args):
    run = run_in_terminal(*args, shared=False)
    assert run.returncode == 2
    assert run.stdout == ""
    usage = "Usage: kgen models" if args else "Usage: kgen [OPTIONS] COMMAND"
    assert strip_ansi(run.stderr).count(usage) == 1
    assert strip_ansi(run.stderr).count("Options") == 1


@pytest.mark.parametrize("args", [(), ("models",)])
def test_a_bare_command_piped_prints_nothing_on_stdout(args):
    import subprocess
    import sys

    from tests.terminal import ROOT

    proc = subprocess.run([sys.executable, "-m", "kgen_cli", *args], capture_output=True, text=True, cwd=ROOT,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("Usage:") == 1
    assert ESC not in proc.stderr  # not a terminal: no colour


# --- 3. NO_COLOR / TERM=dumb --------------------------------------------------------------------


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_help_and_errors_have_no_escape_codes_under_no_color_or_a_dumb_terminal(env):
    assert ESC not in run_in_terminal("--help", env=env).stdout
    assert ESC not in run_in_terminal("expand", "--help", env=env).stdout
    bad = run_in_terminal("expand", "x", "--seed", "-5", env=env)
    assert bad.returncode == 2 and "Error:" in bad.stdout and ESC not in bad.stdout
    assert ESC in run_in_terminal("--help").stdout  # the control: a terminal gets colour otherwise


@pytest.mark.model
@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}, {"NO_COLOR": "1", "TERM": "dumb"}])
def test_live_stream_has_no_escape_codes_under_no_color_or_a_dumb_terminal(model_path, env):
    run = run_in_terminal("expand", "1girl, solo", "-m", str(model_path), *FAST, "--seed", "1", "-v", env=env)
    assert run.returncode == 0, run.stdout
    assert ESC not in run.stdout
    plain = run_in_terminal("expand", "1girl, solo", "-m", str(model_path), *FAST, "--seed", "1")
    assert f"{ESC}[2m" in plain.stdout  # the control: dimmed live text in a colour terminal


# --- 2. batch's progress line ------------------------------------------------------------------


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(p + "\n" for p in PROMPTS), encoding="utf-8")
    return path


@pytest.mark.model
def test_batch_progress_never_reaches_stdout(model_path, prompt_file):
    run = run_in_terminal("batch", str(prompt_file), "-m", str(model_path), *FAST, "--seed", "1",
                          "--parallel", "2", shared=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    results = run.stdout.split("\n")[:-1]
    assert len(results) == len(PROMPTS)
    assert all(line.startswith("1girl, prompt") for line in results)  # --format tag-only keeps the input first
    assert "\r" not in run.stdout and "expanding" not in run.stdout and ESC not in run.stdout
    assert "expanding" in run.stderr and f"{len(PROMPTS)}/{len(PROMPTS)}" in run.stderr
    assert screen(run.stderr) == []  # the line is erased at the end


@pytest.mark.model
@pytest.mark.parametrize("env", [{}, {"NO_COLOR": "1"}])
def test_batch_results_print_cleanly_above_the_progress_line_on_one_terminal(model_path, prompt_file, env):
    run = run_in_terminal("batch", str(prompt_file), "-m", str(model_path), *FAST, "--seed", "1",
                          "--parallel", "2", env=env)  # fmt: skip
    assert run.returncode == 0, run.stdout
    assert "expanding" in run.stdout  # the line was drawn (stdout and stderr are one terminal here)
    lines = screen(run.stdout)
    assert len(lines) == len(PROMPTS)
    for line in lines:
        assert line.startswith("1girl, prompt") and "expanding" not in line and "prompts/s" not in line
    assert ESC not in run.stdout  # the progress line is drawn with carriage returns and spaces only


def test_progress_line_writes_only_to_stderr_and_erases_itself_around_results(capsys, monkeypatch):
    from kgen_cli import console

    monkeypatch.setattr(console, "stderr_is_tty", lambda: True)
    with console.status_line() as line:
        line.show("expanding 0/2")
        console.write_result("first")
        console.write_whole(__import__("sys").stdout, "second\n")  # how batch writes its results
        console.info("line 3: a message")
        line.show("expanding 2/2")
    captured = capsys.readouterr()
    assert captured.out == "first\nsecond\n"
    assert ESC not in captured.err
    # Each write found the line erased, and it came back after it.
    blank = "\r" + " " * len("expanding 0/2") + "\r"
    assert captured.err.startswith("expanding 0/2" + blank)
    assert "line 3: a message\n" in captured.err
    assert captured.err.count("expanding 0/2") == 4  # first draw + three redraws
    assert captured.err.endswith("expanding 2/2\r" + " " * len("expanding 2/2") + "\r")


def test_progress_line_is_off_when_stderr_is_not_a_terminal(capsys):
    from kgen_cli import console

    with console.status_line() as line:
        assert line is None
        console.write_result("only this")
    assert capsys.readouterr() == ("only this\n", "")


def test_progress_text_counts_rates_and_time_left():
    from kgen_cli.commands.batch import _progress_text

    assert _progress_text(0, 6, 0, 0.0) == "expanding [--------------------] 0/6"
    text = _progress_text(3, 6, 60, 2.0)
    assert text.startswith("expanding [##########----------] 3/6 1.50 prompts/s, 30 tok/s, 0:00:02 left")
    assert _progress_text(4, None, 8, 2.0) == "expanding 4 2.00 prompts/s, 4 tok/s"
    assert not re.search(r"\s{2,}", text)


def test_progress_line_never_wraps_on_a_narrow_terminal(capsys, monkeypatch):
    from kgen_cli import console

    monkeypatch.setattr(console, "stderr_is_tty", lambda: True)
    monkeypatch.setattr(console, "_stderr_columns", lambda: 20)
    with console.status_line() as line:
        line.show("expanding [##########----------] 3/6 1.50 prompts/s")
    err = capsys.readouterr().err
    assert err.startswith("expanding [########\r")  # 19 columns: a carriage return still reaches it
