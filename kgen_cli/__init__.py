"""kgen: prompt upsampling with TIPO and DanTagGen models on llama.cpp.

Kept import-light on purpose: `kgen --help` must not load libllama or the tag lists.
"""

__version__ = "0.1.0"


def main(argv: list[str] | None = None) -> None:
    """The console script. The CLI is imported here, so that a Ctrl-C while Python is still
    importing it ends like any other interrupt (one line, 130), not with an import traceback."""
    import sys

    try:
        from kgen_cli.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        sys.exit(130)
    cli_main(argv)
