"""`kgen models list | download | path`."""

import typer

app = typer.Typer(help="List, download and locate TIPO/DTG GGUF models.", no_args_is_help=True)


@app.command("list")
def list_models() -> None:
    """List the registry's models (not implemented yet)."""
