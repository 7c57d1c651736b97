"""Where kgen keeps its own files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kgen_cli.errors import KgenError, UsageError


def kgen_home(create: bool = True) -> Path:
    """`KGEN_HOME` if set, else the platform config dir (e.g. ~/.config/kgen).

    A home that exists but is not a directory (`KGEN_HOME` set to a file), or that cannot be
    created, is a KgenError naming it."""
    env = os.environ.get("KGEN_HOME")
    if env:
        home = Path(env).expanduser()
    else:
        import typer

        home = Path(typer.get_app_dir("kgen"))
    what = "KGEN_HOME" if env else "kgen's home"
    if home.exists() and not home.is_dir():
        raise KgenError(f"{what} {home} is not a directory")
    if create:
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KgenError(f"cannot create {what} {home}: {exc.strerror or exc}") from None
    return home


def package_data(*parts: str) -> Path:
    """A file shipped inside the package (kgen_cli/data/...)."""
    return Path(__file__).resolve().parent.joinpath("data", *parts)


def check_output_file(path: Path, what: str) -> None:
    """Refuse, before any work, an output file that cannot be created: the user learns it
    at once instead of after a long run."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"cannot write {what} {path}: {parent} is not a directory")
    if path.is_dir():
        raise UsageError(f"cannot write {what} {path}: it is a directory")
    # access() also answers EROFS (a read-only file system) for root, who may write anything else.
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise UsageError(f"cannot write {what} {path}: not writable")


def read_small_file(path: Path, what: str, limit: int) -> str:
    """A small UTF-8 file the user named (@FILE templates, file lists): a regular file of at most
    `limit` bytes, a BOM dropped. Opened without blocking and checked with fstat before a byte is
    read, so that /dev/zero, /dev/stdin or a fifo is refused at once instead of read without end
    or waited on. UsageError, naming it as `what PATH`, otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{what} {path} is not a regular file")
        if info.st_size > limit:
            raise UsageError(f"{what} {path} is {info.st_size} bytes; it may have at most {limit}")
        data = os.read(fd, limit + 1)  # a file that grew meanwhile is cut here, and refused
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UsageError(f"{what} {path} is larger than {limit} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not valid UTF-8") from None
