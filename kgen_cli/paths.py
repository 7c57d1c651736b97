"""Where kgen keeps its own files."""

from __future__ import annotations

import os
from pathlib import Path


def kgen_home(create: bool = True) -> Path:
    """`KGEN_HOME` if set, else the platform config dir (e.g. ~/.config/kgen)."""
    env = os.environ.get("KGEN_HOME")
    if env:
        home = Path(env).expanduser()
    else:
        import typer

        home = Path(typer.get_app_dir("kgen"))
    if create:
        home.mkdir(parents=True, exist_ok=True)
    return home


def package_data(*parts: str) -> Path:
    """A file shipped inside the package (kgen_cli/data/...)."""
    return Path(__file__).resolve().parent.joinpath("data", *parts)
