"""Model families: what kgen does differently for TIPO, DanTagGen, or any family registered here.

A family is one module (its prompt builder, parser and post-processing; e.g. `formats/tipo.py`)
plus one `register(Family(...))`. The registration names:

- `run(ctx)`: the family's part of an expand job (`pipeline.run_expand`), a generator that makes
  its model calls with `yield from ctx.call(prompt, ...)` (see `pipeline.JobContext`), applies
  its retry rule, and returns `(tag_map, new_tags, operations)`: the final tags by category
  (`formats.tags.FIELDS`, plus the `extended`/`generated` NL strings), the tags the model added,
  and the plan that ran (a list of dicts, may be empty);
- `sampling`: its default `SamplingParams`; `retries`: its default retry count;
- `validate(request)`: family-specific request checks (raise UsageError), or None;
- `file_words`: words in a GGUF file name that say the family (`registry.guess_family`);
- `quality_line`: whether its prompts may carry the DTG `quality:` line (`quality_line_file`:
  which local file names have it).

Nothing else in kgen tests a family's name. `tests/test_families.py` registers a toy family and
runs it through `kgen expand`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kgen_cli.errors import UsageError
from kgen_cli.sampling import SamplingParams

DEFAULT_FAMILY = "tipo"  # a local file whose name says no family is prompted as this


@dataclass(frozen=True)
class Family:
    name: str
    run: Callable[[Any], Any]
    sampling: SamplingParams
    retries: int
    validate: Callable[[Any], None] | None = None
    file_words: tuple[str, ...] = ()
    quality_line: bool = False
    quality_line_file: Callable[[str], bool] | None = None


_FAMILIES: dict[str, Family] = {}
_builtin_loaded = False


def register(family: Family) -> Family:
    """Make `family` available under its name (`--family NAME`, `models.yaml`'s `family:`)."""
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    _FAMILIES.pop(name, None)


def names() -> list[str]:
    _load_builtin()
    return list(_FAMILIES)


def get(name: str) -> Family:
    """The family registered as `name`; UsageError for an unknown one."""
    _load_builtin()
    try:
        return _FAMILIES[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown model family {name!r}; expected {' or '.join(_FAMILIES)}") from None


def guess(file_name: str) -> str | None:
    """The family a GGUF file name says (its `file_words`), or None. Later registrations are
    asked first (a DTG file may also say "tipo")."""
    _load_builtin()
    lowered = file_name.lower()
    for family in reversed(_FAMILIES.values()):
        if any(word in lowered for word in family.file_words):
            return family.name
    return None


def _lazy(name: str) -> Callable[[Any], Any]:
    """`pipeline.<name>`, imported on first call: listing families (the registry does) must not
    import the pipeline and its formats."""

    def call(arg: Any) -> Any:
        from kgen_cli import pipeline

        return getattr(pipeline, name)(arg)

    return call


def _load_builtin() -> None:
    global _builtin_loaded
    if _builtin_loaded:
        return
    _builtin_loaded = True
    from kgen_cli.sampling import FAMILY_DEFAULTS

    builtin = (
        Family("tipo", _lazy("run_tipo"), FAMILY_DEFAULTS["tipo"], retries=10, validate=_lazy("validate_tipo"),
               file_words=("tipo",)),
        Family("dtg", _lazy("run_dtg"), FAMILY_DEFAULTS["dtg"], retries=20, validate=_lazy("validate_dtg"),
               file_words=("dtg", "dantaggen"), quality_line=True,
               # The peers name DTG files <repo>_<file>: only the delta models have the line.
               quality_line_file=lambda name: "delta" in name.lower()),
    )
    for family in builtin:  # a family registered earlier under the same name stays
        _FAMILIES.setdefault(family.name, family)
