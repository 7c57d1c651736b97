"""`kgen expand`: upsample one prompt."""

from kgen_cli.errors import KgenError


def expand() -> None:
    """Expand one prompt (not implemented yet)."""
    raise KgenError("kgen expand is not implemented yet")
