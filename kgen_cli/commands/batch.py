"""`kgen batch`: expand a prompt file or stdin."""

from kgen_cli.errors import KgenError


def batch() -> None:
    """Expand every prompt of a file or stdin (not implemented yet)."""
    raise KgenError("kgen batch is not implemented yet")
