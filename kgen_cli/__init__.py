"""kgen: prompt upsampling with TIPO and DanTagGen models on llama.cpp.

The Python API (docs/api.md):

    import kgen_cli as kgen
    with kgen.load("tipo-500m-q8_0") as gen:
        result = gen.expand("1girl, dragon horns", seed=1, tag_length="long")
        print(result.formatted)

Kept import-light on purpose: the names below are imported on first use (module `__getattr__`),
so `kgen --help` does not load libllama, huggingface_hub or the tag lists.
"""

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "load": "kgen_cli.api",
    "Generator": "kgen_cli.api",
    "show_prompt": "kgen_cli.api",
    "GenerationOptions": "kgen_cli.options",
    "EngineOptions": "kgen_cli.options",
    "ExpandResult": "kgen_cli.pipeline",
    "VariantsResult": "kgen_cli.runner",
    "KgenError": "kgen_cli.errors",
    "UsageError": "kgen_cli.errors",
    "RegistryError": "kgen_cli.errors",
    "ModelNotFoundError": "kgen_cli.errors",
    "DownloadError": "kgen_cli.errors",
    "EngineError": "kgen_cli.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kgen_cli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
