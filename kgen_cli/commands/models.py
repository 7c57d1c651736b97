"""`kgen models list | download | path`: the registry, the hub and the files on disk.

Results (the list, a path) go to stdout; progress bars and messages to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from kgen_cli import download as dl
from kgen_cli.console import examples, help_as_usage_error, human_size, info, make_console, stdout_is_tty, write_result
from kgen_cli.errors import ModelNotFoundError, UsageError
from kgen_cli.registry import (
    LOCAL_QUANT_TYPES,
    ModelSpec,
    Registry,
    load_registry,
    lookup,
    looks_like_path,
)

app = typer.Typer(invoke_without_command=True)


@app.callback()
def models(ctx: typer.Context) -> None:
    """List, download and locate TIPO/DTG GGUF models."""
    if ctx.invoked_subcommand is None:  # `kgen models` alone: the help on stderr, exit 2
        help_as_usage_error(ctx)


NameArg = Annotated[
    Optional[str],
    typer.Argument(
        metavar="NAME",
        help="A registry name (see `kgen models list`), or NAME@QTYPE for an F16 model quantised "
        "locally (e.g. tipo-500m-ft@Q8_0). Default: the registry's default model.",
        show_default=False,
    ),
]


@app.command(
    "list",
    epilog=examples(
        "kgen models list",
        "kgen models list | cut -f1,5",
        "kgen models list --json",
        note="Piped, each model is one tab-separated line without a header: "
        "name, family, quant, size in bytes (- if unknown), downloaded (yes, no, unverified: sha256 not "
        "checked yet, corrupt: fails its check), default (yes/no). Sizes the registry lacks come from "
        "the hub's metadata (online, remembered).",
    ),
)
def list_models(
    json_: Annotated[bool, typer.Option("--json", help="One JSON array with every field of every model.")] = False,
) -> None:
    """List the registry's models: a table in a terminal, tab-separated lines when piped."""
    registry = load_registry()
    specs = [*registry, *dl.local_quantized(registry)]
    hub = dl.hub_sizes([spec for spec in specs if spec.size is None and spec.repo is not None and not spec.is_local_quant])
    rows = [_row(registry, spec, hub.get(spec.name)) for spec in specs]
    if json_:
        write_result(json.dumps(rows, indent=2))
    elif stdout_is_tty():
        _print_table(rows)
    else:
        for row in rows:
            size = "-" if row["size"] is None else str(row["size"])
            fields = [row["name"], row["family"], row["quant"] or "-", size, row["status"], _yes(row["default"])]
            write_result("\t".join(fields))


@app.command("download", epilog=examples(
    "kgen models download",
    "kgen models download tipo-500m-ft --quant Q8_0",
    "kgen models download hf:OWNER/REPO/FILE.gguf",
))  # fmt: skip
def download_model(
    name: NameArg = None,
    local_dir: Annotated[
        Optional[Path],
        typer.Option("--local-dir", metavar="DIR", file_okay=False,
                     help="Download into DIR instead of the shared Hugging Face cache."),  # fmt: skip
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Download again even if cached (with --quant: quantise again).")
    ] = False,
    quant: Annotated[
        Optional[str],
        typer.Option("--quant", metavar="QTYPE",
                     help=f"Quantise an F16 model locally to QTYPE ({', '.join(LOCAL_QUANT_TYPES)}); "
                     "use the result as --model NAME@QTYPE."),  # fmt: skip
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages.")] = False,
) -> None:
    """Download a model from the Hugging Face hub and print its local path."""
    spec = _lookup(load_registry(), name)
    if quant is not None and spec.is_local_quant:
        if quant.strip().upper() != spec.quant:
            raise UsageError(f"'{spec.name}' and --quant {quant} disagree", hint="give the type once")
        quant = None
    write_result(str(dl.download(spec, local_dir=local_dir, force=force, quiet=quiet, quant=quant)))


@app.command("path", epilog=examples("kgen models path", 'ls -l "$(kgen models path dtg-delta-q6_k)"'))
def model_path(name: NameArg = None) -> None:
    """Print the local path of a downloaded model (exit 1 if it is not downloaded)."""
    spec = _lookup(load_registry(), name)
    path = dl.local_path(spec)
    if path is None and spec.path is not None:
        raise ModelNotFoundError(f"model '{spec.name}': no such file {spec.path} (path: in models.yaml)")
    if path is None:
        raise dl.not_downloaded(spec.name)
    write_result(str(path))


@app.command(
    "rm",
    epilog=examples("kgen models rm tipo-500m-ft", "kgen models rm tipo-500m-ft@Q8_0",
                    note="Files the user named with path: in models.yaml are never deleted."),
)
def remove_model(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A registry name, NAME@QTYPE (that quantisation only), or hf:OWNER/REPO/FILE.gguf.", show_default=False)],
) -> None:
    """Delete a downloaded model (and its local quantisations); print each deleted file and the space freed."""
    spec = _lookup(load_registry(), name)
    removed = dl.remove(spec)
    if not removed:
        raise dl.not_downloaded(spec.name)
    for path, _size in removed:
        write_result(str(path))
    info(f"removed {spec.name}: {human_size(sum(size for _path, size in removed))} freed")


def _lookup(registry: Registry, name: str | None) -> ModelSpec:
    if name is not None and looks_like_path(name):
        raise UsageError(f"'{name}' is a file path; this command takes a registry name or hf:OWNER/REPO/FILE.gguf",
                         hint="see: kgen models list")  # fmt: skip
    return lookup(registry, name)


def _row(registry: Registry, spec: ModelSpec, hub_size: int | None) -> dict:
    status, path, problem = dl.disk_status(spec)  # no hashing here: "unverified" until first used
    row = spec.to_dict()
    if spec.size is None:  # the file on disk, else the hub's metadata
        row["size"] = path.stat().st_size if path is not None and status != "corrupt" else hub_size
    row.update(status=status, downloaded=status in ("yes", "unverified"), path=None if path is None else str(path),
               problem=problem, default=spec.name == registry.default)  # fmt: skip
    return row


def _yes(value: bool) -> str:
    return "yes" if value else "no"


_STATUS_STYLE = {"yes": "[green]yes[/green]", "unverified": "[yellow]unverified[/yellow]",
                 "corrupt": "[red]corrupt[/red]", "no": "no"}  # fmt: skip


def _print_table(rows: list[dict]) -> None:
    from rich.table import Table

    notes = ["* default"]
    if any(row["status"] == "unverified" for row in rows):
        notes.append("unverified: sha256 not checked yet (the first use checks it, or: kgen models path NAME)")
    if any(row["status"] == "corrupt" for row in rows):
        notes.append("corrupt: fails its size or sha256 check (kgen models download NAME --force)")
    table = Table(caption="\n".join(notes), caption_justify="left")
    for header in ("Name", "Family", "Quant", "Size", "Downloaded", "Repository"):
        table.add_column(header, justify="right" if header == "Size" else "left", no_wrap=header == "Name")
    for row in rows:
        name = f"[bold]{row['name']} *[/bold]" if row["default"] else row["name"]
        table.add_row(name, row["family"], row["quant"] or "-", human_size(row["size"]), _STATUS_STYLE[row["status"]],
                      row["repo"] or row.get("local_path"))  # fmt: skip
    make_console(stderr=False).print(table)
