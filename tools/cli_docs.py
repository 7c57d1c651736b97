"""Writes docs/cli.md from the CLI itself: `python tools/cli_docs.py docs/cli.md`.

Plain Markdown, readable as text: no HTML entities (Typer's own `utils docs` writes `&#x27;`),
the help option as the CLI has it (`-h, --help`), each command's examples as a console block.
tests/test_docs.py fails when the committed file is stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import typer  # noqa: E402

from kgen_cli.cli import app  # noqa: E402

_TAG_LIKE = re.compile(r"<(?=[A-Za-z|/!])")  # `<lora:x>`, `<|field|>`: would read as HTML


def _text(help_text: str) -> str:
    """Rich-escaped help (`\\[default: ...]`) as Markdown text (a backslash of its own doubled)."""
    text = help_text.replace("\\[", "[").replace("\\", "\\\\")
    return _TAG_LIKE.sub(r"\\<", text)


def _body(help_text: str) -> str:
    return "\n\n".join(_text(p) for p in help_text.split("\n\n"))


def _epilog(epilog: str) -> str:
    note, sep, examples = epilog.partition("Examples:\n")
    out = _body(note.strip()) + "\n\n" if note.strip() else ""
    if sep:
        lines = [line.strip() for line in examples.splitlines() if line.strip()]
        out += "**Examples**:\n\n```console\n" + "".join(f"$ {line}\n" for line in lines) + "```\n\n"
    return out


def _command(command, ctx, path: str, depth: int) -> str:
    out = f"{'#' * depth} `{path}`\n\n"
    if command.help:
        out += _body(command.help) + "\n\n"
    out += f"**Usage**:\n\n```console\n$ {path} {' '.join(command.collect_usage_pieces(ctx))}\n```\n\n"
    records = [(p.param_type_name, p.get_help_record(ctx)) for p in command.get_params(ctx)]
    for kind, title in (("argument", "Arguments"), ("option", "Options")):
        rows = [record for k, record in records if k == kind and record is not None]
        if rows:
            out += f"**{title}**:\n\n" + "".join(
                f"* `{name}`" + (f": {_text(help_)}" if help_ else "") + "\n" for name, help_ in rows
            ) + "\n"
    if command.epilog:
        out += _epilog(command.epilog)
    if isinstance(command, typer.core.TyperGroup):
        names = command.list_commands(ctx)
        out += "**Commands**:\n\n" + "".join(
            f"* `{name}`: {_text(command.get_command(ctx, name).get_short_help_str(limit=200))}\n" for name in names
        ) + "\n"
        for name in names:
            sub = command.get_command(ctx, name)
            sub_ctx = sub.make_context(name, [], parent=ctx, resilient_parsing=True)
            out += _command(sub, sub_ctx, f"{path} {name}", depth + 1)
    return out


def render() -> str:
    command = typer.main.get_command(app)
    ctx = command.make_context("kgen", [], resilient_parsing=True)
    return _command(command, ctx, "kgen", 1).strip() + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/cli_docs.py OUTPUT.md")
    Path(sys.argv[1]).write_text(render(), encoding="utf-8")
