"""`kgen info`: llama.cpp build, GPU offload, directories, downloaded models."""

from kgen_cli.errors import KgenError


def info() -> None:
    """Show llama.cpp's version and system info, GPU support, kgen's directories and models."""
    raise KgenError("kgen info is not implemented yet")
