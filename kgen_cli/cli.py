"""The `kgen` command: assembles the sub-commands and funnels every error into one line.

Each command lives in `kgen_cli/commands/<name>.py`; this module only wires them. Nothing here
imports llama_cpp or loads tag lists, so `kgen --help` stays fast.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Annotated, Optional

import typer
from typer._click import exceptions as click_exceptions

from kgen_cli import __version__
from kgen_cli.commands import batch as batch_cmd
from kgen_cli.commands import caption as caption_cmd
from kgen_cli.commands import expand as expand_cmd
from kgen_cli.commands import info as info_cmd
from kgen_cli.commands import models as models_cmd
from kgen_cli.console import (
    debug_enabled,
    err_console,
    examples,
    help_as_usage_error,
    plain_output,
    reflow,
    stand_in_for_closed_streams,
)
from kgen_cli.errors import KgenError, OutputClosed

app = typer.Typer(
    name="kgen",
    invoke_without_command=True,  # alone: the help on stderr, exit 2 (root below)
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    context_settings={"help_option_names": ["-h", "--help"]},
)
for _name, _module in (("expand", expand_cmd), ("batch", batch_cmd), ("caption", caption_cmd), ("info", info_cmd)):
    _function = getattr(_module, _name)
    app.command(_name, help=reflow(_function.__doc__), epilog=_module.EXAMPLES)(_function)
app.add_typer(models_cmd.app, name="models")


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            llama = version("llama-cpp-python")
        except PackageNotFoundError:
            llama = "not installed"
        typer.echo(f"kgen {__version__} (llama-cpp-python {llama})")
        raise typer.Exit()


@app.callback(epilog=examples(
    'kgen expand "1girl, dragon horns"',
    "kgen batch prompts.txt -o out.txt",
    "kgen models list",
))  # fmt: skip
def root(
    ctx: typer.Context,
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    """Prompt upsampling for text-to-image models (TIPO, DanTagGen) on llama.cpp.

    Results go to stdout, diagnostics to stderr. Set KGEN_DEBUG=1 to see tracebacks.
    """
    if ctx.invoked_subcommand is None:
        help_as_usage_error(ctx)


def _fail(message: str, code: int) -> None:
    err_console.print(f"[red]Error:[/red] {message}", soft_wrap=True, markup=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: the one error funnel (one line on stderr, exit 1 or 2).

    With KGEN_DEBUG=1 the traceback is printed first; the error line and exit status stay the same.
    """
    stand_in_for_closed_streams()
    if plain_output():  # Typer's help console would still use bold under NO_COLOR
        from typer import rich_utils

        rich_utils.COLOR_SYSTEM = None
    args = sys.argv[1:] if argv is None else argv
    named_shell = _completion_shell(args)
    preset = os.environ.get(_TYPER_NO_SHELL_DETECTION)  # the user's own setting stays
    if named_shell:
        os.environ[_TYPER_NO_SHELL_DETECTION] = "1"  # read while the command is built, and by its callback
    command = typer.main.get_command(app)
    if (bad := _not_utf8(args)) is not None:
        _fail(f"argument {bad} is not valid UTF-8", 2)
    try:
        # Without standalone mode click returns typer.Exit's code instead of exiting.
        from kgen_cli.config import default_map

        code = command.main(args=argv, prog_name="kgen", standalone_mode=False, default_map=default_map(command))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except SystemExit as exc:
        # click and rich answer a broken pipe while they print (--help, --version into `| head`)
        # with a silent exit 1; kgen's own writes end with 141 there (OutputClosed), and so this.
        broken = exc.__context__
        if exc.code == 1 and isinstance(broken, OSError) and broken.errno == errno.EPIPE:
            _quiet_broken_pipe()
        raise
    except typer.Abort:
        _fail("interrupted", 130)
    except click_exceptions.UsageError as exc:
        _traceback()
        ctx = exc.ctx
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _fail(f"{_escape(exc.format_message())}{where}", 2)
    except KgenError as exc:
        _traceback()
        message = str(exc) + (f" ({exc.hint})" if exc.hint else "")
        _fail(_escape(message), exc.exit_code)
    except (BrokenPipeError, OutputClosed):
        _quiet_broken_pipe()
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except click_exceptions.ClickException as exc:
        _traceback()
        _fail(_escape(exc.format_message()), exc.exit_code)
    except Exception as exc:  # the funnel: no traceback unless KGEN_DEBUG=1
        _traceback()
        hint = "" if debug_enabled() else " (set KGEN_DEBUG=1 for the traceback)"
        _fail(_escape(f"{type(exc).__name__}: {exc}".splitlines()[0]) + hint, 1)
    else:
        sys.exit(code if isinstance(code, int) else 0)
    finally:
        if named_shell and preset is None:
            os.environ.pop(_TYPER_NO_SHELL_DETECTION, None)


# Typer's switch from "the shell this runs under" (shellingham) to a named shell for
# --show-completion / --install-completion (its options then take SHELL: bash, zsh, fish, ...).
_TYPER_NO_SHELL_DETECTION = "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION"
_COMPLETION_OPTIONS = ("--show-completion", "--install-completion")


def _completion_shell(args: list[str]) -> bool:
    """Whether a completion option names its shell (`kgen --show-completion zsh`): Typer would
    otherwise ignore the name and use the shell it detects. Without a name, a shell that cannot
    be detected (no shell among kgen's parents) is a usage error, not Typer's "Shell  not
    supported.\""""
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            return False  # a command: its arguments are not kgen's options
        if arg.startswith(tuple(f"{option}=" for option in _COMPLETION_OPTIONS)):
            return True
        if arg not in _COMPLETION_OPTIONS:
            continue
        if i + 1 < len(args) and not args[i + 1].startswith("-"):
            return True
        import shellingham
        from typer.completion import Shells

        try:
            shellingham.detect_shell()
        except shellingham.ShellDetectionFailure:
            first, *others = (shell.value for shell in Shells)
            _fail(f"cannot tell which shell runs kgen: name it, e.g. 'kgen {arg} {first}' (or {', '.join(others)})", 2)
    return False


def _not_utf8(args: list[str]) -> str | None:
    """The first argument Python could only decode with surrogate escapes (bytes that are not
    UTF-8), shown escaped; it would otherwise fail deep inside, or reach stdout as raw bytes."""
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return ascii(arg)
    return None


def _traceback() -> None:
    """KGEN_DEBUG=1: the current exception's traceback on stderr (before the one-line error)."""
    if debug_enabled():
        import traceback

        sys.stderr.flush()
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(" ".join(text.split()))


def _quiet_broken_pipe() -> None:
    # The reader went away (`kgen ... | head`): stop quietly, and keep Python's exit-time flush
    # of stdout from printing a second BrokenPipeError.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(128 + signal.SIGPIPE)


if __name__ == "__main__":
    main()
