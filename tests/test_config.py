"""config.yaml (issue 18 item 12): option defaults per command, validated strictly, shown by
`kgen info`; the command line wins. Shell completion through Typer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kgen_main import run_main

ROOT = Path(__file__).resolve().parent.parent


def _config(home: Path, text: str) -> None:
    (home / "config.yaml").write_text(text, encoding="utf-8")


def _target(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("target:"))


def test_config_sets_defaults_and_the_command_line_wins(isolated_home):
    args = ("expand", "1girl", "-m", "x-tipo.gguf", "--show-prompt")
    assert _target(run_main(*args)[1]) == "target: <|long|>"  # the built-in default
    _config(isolated_home, "expand:\n  tag-length: short\n  ban: [watermark]\nbatch:\n  parallel: 8\n")
    assert _target(run_main(*args)[1]) == "target: <|short|>"
    assert _target(run_main(*args, "--tag-length", "very_long")[1]) == "target: <|very_long|>"


def test_config_defaults_reach_the_commands_as_values(isolated_home):
    from kgen_cli.cli import app
    from kgen_cli.config import default_map
    import typer

    _config(isolated_home, "expand:\n  format: tag-only\n  ban: watermark\nbatch:\n  parallel: 8\n"
                           "models download:\n  quiet: true\n")  # fmt: skip
    assert default_map(typer.main.get_command(app)) == {
        "expand": {"format_": "tag-only", "ban": ["watermark"]},  # one value for a repeatable option: a list
        "batch": {"parallel": 8},
        "models": {"download": {"quiet": True}},
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("expnd:\n  format: x\n", "unknown command 'expnd' (did you mean 'expand'?)"),
        ("expand:\n  formt: x\n", "expand: unknown option 'formt' (did you mean 'format'?)"),
        ("batch:\n  parallel: 0\n", "batch: 'parallel': "),
        ("expand:\n  tag_length: medium\n", "expand: 'tag_length': "),
        ("expand:\n  seed: [1, 2]\n", "expand: 'seed' takes one value, not a list"),
        ("expand:\n  resume: true\n", "expand: unknown option 'resume'"),
        ("expand: 3\n", "'expand' must be a mapping of option names to values"),
        ("- expand\n", "expected a mapping of commands to their option defaults"),
        ("expand:\n  format: [\n", "invalid YAML (line"),
        ("expand:\n  format: a\n  format: b\n", "duplicate key 'format'"),
    ],
)  # fmt: skip
def test_a_bad_config_is_one_line_naming_the_file_exit_2(isolated_home, text, message):
    _config(isolated_home, text)
    code, out, err = run_main("expand", "1girl", "-m", "x-tipo.gguf", "--show-prompt")
    assert (code, out) == (2, "")
    assert err.startswith(f"Error: {isolated_home / 'config.yaml'}: ") and message in err
    assert err.count("\n") == 1


def test_info_shows_the_config(isolated_home):
    from kgen_cli.commands.info import collect

    assert collect()["config"] == {"path": str(isolated_home / "config.yaml"), "values": None}
    _config(isolated_home, "batch:\n  parallel: 8\n")
    assert collect()["config"]["values"] == {"batch": {"parallel": 8}}


@pytest.mark.model
def test_info_text_names_the_config(isolated_home):
    _config(isolated_home, "batch:\n  parallel: 8\n")
    code, out, err = run_main("info")
    assert code == 0
    assert f"config          {isolated_home / 'config.yaml'} (batch: parallel=8)" in out.splitlines()


def _kgen(*args: str, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "kgen_cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=full, stdin=subprocess.DEVNULL)  # fmt: skip


def test_shell_completion_script_and_completions():
    script = _kgen("--show-completion", "bash", env={})  # named: no shell need run the tests
    assert script.returncode == 0 and "_KGEN_COMPLETE=complete_bash" in script.stdout
    words = _kgen(env={"_KGEN_COMPLETE": "complete_bash", "COMP_WORDS": "kgen expand --tag-length ", "COMP_CWORD": "3"})
    assert words.stdout.split() == ["very_short", "short", "long", "very_long"]
    commands = _kgen(env={"_KGEN_COMPLETE": "complete_bash", "COMP_WORDS": "kgen models ", "COMP_CWORD": "2"})
    assert {"list", "download", "path", "rm"} <= set(commands.stdout.split())


def test_a_named_shell_gets_its_own_completion_script():
    """Typer alone ignores the name and prints the script of the shell it detects."""
    zsh = _kgen("--show-completion", "zsh", env={})
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef kgen") and "_KGEN_COMPLETE=complete_zsh" in zsh.stdout
    fish = _kgen("--show-completion", "fish", env={})
    assert fish.returncode == 0 and "complete --command kgen" in fish.stdout and "_KGEN_COMPLETE=complete_fish" in fish.stdout
    bad = _kgen("--show-completion", "tcsh", env={})
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1
    assert "'tcsh' is not one of 'bash', 'zsh'" in bad.stderr
    code, out, _ = run_main("--show-completion", "zsh")  # in-process: Typer's switch is put back
    assert code == 0 and out.startswith("#compdef kgen")
    code, out, _ = run_main("--show-completion=pwsh")
    assert code == 0 and "Register-ArgumentCompleter -Native -CommandName kgen" in out
    assert "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION" not in os.environ


def test_completion_without_a_shell_that_cannot_be_detected_is_a_usage_error(monkeypatch):
    import shellingham

    def no_shell():
        raise shellingham.ShellDetectionFailure()

    monkeypatch.setattr(shellingham, "detect_shell", no_shell)
    for option in ("--show-completion", "--install-completion"):
        code, out, err = run_main(option)
        assert (code, out) == (2, "")
        assert err == f"Error: cannot tell which shell runs kgen: name it, e.g. 'kgen {option} bash' (or zsh, fish, powershell, pwsh)\n"
    assert "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION" not in os.environ
    # After a command the words are its own: a prompt that reads like the option is a prompt.
    code, out, err = run_main("expand", "--max-tokens", "8", "--show-prompt", "--", "--show-completion")
    assert code == 0 and "--show-completion" in out, err
