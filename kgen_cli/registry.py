"""The model registry (`models.yaml`) and what `--model` names (`download.locate` finds its file).

The packaged `models.yaml` lists every known TIPO/DTG GGUF; `<kgen home>/models.yaml` adds or
replaces entries by name and may change the default. Both are validated strictly: a typo is an
error that names the file and the entry, never a silently ignored key.

`--model` accepts four spellings:

- a registry name: `tipo-500m-q8_0` (an entry of the user's models.yaml may name a local file
  with `path:` instead of `repo`/`file`);
- a registry name with `@QTYPE`: `tipo-500m-ft@Q8_0`, the F16 model quantised locally by
  `kgen models download tipo-500m-ft --quant Q8_0` (same as `kgen models download tipo-500m-ft@Q8_0`);
- a path to a local `.gguf` file (`--family` says how to prompt it, else the file name, else
  `KGEN_FAMILY`);
- `hf:OWNER/REPO/FILE.gguf`: any GGUF on the hub, downloaded like a registry model (the family
  as for a local file).

Import-light: yaml is imported only when a registry is loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kgen_cli import families
from kgen_cli.errors import ModelNotFoundError, RegistryError, UsageError
from kgen_cli.paths import kgen_home
from kgen_cli.quant import LOCAL_QUANT_TYPES, QUANTIZABLE_SOURCES

REGISTRY_FILE = "models.yaml"
# The largest user models.yaml read (the packaged one, ~40 entries, is ~10 KB).
MAX_REGISTRY_BYTES = 1 << 20
# One model call's context (prompt + new tokens) is min(context_length, N_CTX_CAP) by default.
N_CTX_CAP = 2048
QUANT_SEPARATOR = "@"
HUB_PREFIX = "hf:"
FAMILY_ENV = "KGEN_FAMILY"  # the family of a local or hf: file whose name says neither

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_QUANT_RE = re.compile(r"[A-Z0-9][A-Z0-9_]*")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. `source` is set only for a locally quantised variant (`NAME@QTYPE`):
    then `repo`/`file` are the source's hub file and `quant` is the local target type. `path`
    is set only for a user's entry naming a local file: then `repo`/`file` are None, and
    `quant`/`context_length` may be unknown (None: the GGUF and the runner decide)."""

    name: str
    family: str
    repo: str | None
    file: str | None
    quant: str | None
    context_length: int | None
    quality_line: bool = False
    size: int | None = None
    sha256: str | None = None
    description: str | None = None
    base: str | None = None
    source: ModelSpec | None = None
    path: str | None = None

    @property
    def n_ctx(self) -> int | None:
        """One model call's context (prompt + new tokens) by default; None when unknown."""
        return None if self.context_length is None else min(self.context_length, N_CTX_CAP)

    @property
    def is_local_quant(self) -> bool:
        return self.source is not None

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "family": self.family,
            "repo": self.repo,
            "file": self.file,
            "quant": self.quant,
            "size": self.size,
            "sha256": self.sha256,
            "context_length": self.context_length,
            "n_ctx": self.n_ctx,
            "quality_line": self.quality_line,
            "description": self.description,
            "base": self.base,
        }
        if self.path is not None:
            data["local_path"] = self.path
        if self.source is not None:
            data["quantized_locally_from"] = self.source.name
        return data


@dataclass(frozen=True)
class ResolvedModel:
    """What `--model` came to: a display name, the GGUF (None only from `registry_spec_only` for a
    registry model), the prompt family, the registry entry (None for a local path) and whether the
    DTG prompt carries a `quality:` line. `family_assumed`: a local file whose name says neither
    family and no `--family`, prompted as TIPO (the commands say so on stderr)."""

    name: str
    path: Path | None
    family: str
    spec: ModelSpec | None
    quality_line: bool
    family_assumed: bool = False

    @property
    def context_length(self) -> int | None:
        """The model's trained context from the registry; None for a local file (the GGUF says)."""
        return self.spec.context_length if self.spec is not None else None

    @property
    def n_ctx(self) -> int | None:
        """One model call's default context for a registry model: min(context_length, 2048)."""
        return self.spec.n_ctx if self.spec is not None else None


# --- the registry -------------------------------------------------------------------------------

# key -> (type, required in a hub entry). An entry with `path` (a local file, user's models.yaml
# only) needs name, family and path, and has no repo/file.
_FIELDS: dict[str, tuple[type, bool]] = {
    "name": (str, True),
    "family": (str, True),
    "repo": (str, True),
    "file": (str, True),
    "quant": (str, True),
    "context_length": (int, True),
    "quality_line": (bool, False),
    "size": (int, False),
    "sha256": (str, False),
    "description": (str, False),
    "base": (str, False),
    "path": (str, False),
}
_PATH_ENTRY_REQUIRED = ("name", "family", "path")
_TYPE_WORDS = {str: "a string", int: "an integer", bool: "true or false"}
_TOP_LEVEL = ("default", "models")


@dataclass(frozen=True)
class Registry:
    """The merged registry: entries in file order (packaged first, then the user's additions)."""

    models: Mapping[str, ModelSpec]
    default: str  # the default model's name
    sources: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)

    def __contains__(self, name: object) -> bool:
        return name in self.models

    @property
    def default_spec(self) -> ModelSpec:
        return self.models[self.default]

    def get(self, name: str) -> ModelSpec:
        """The entry called `name`, or its locally quantised variant for `NAME@QTYPE`."""
        base_name, sep, qtype = name.partition(QUANT_SEPARATOR)
        spec = self.models.get(base_name)
        if spec is None:
            raise ModelNotFoundError(f"unknown model '{base_name}'{_did_you_mean(base_name, self.models)}",
                                     hint="see: kgen models list")  # fmt: skip
        if sep:
            return derive_quantized(spec, qtype)
        return spec


def derive_quantized(spec: ModelSpec, qtype: str) -> ModelSpec:
    """The `NAME@QTYPE` variant of an F16/BF16/F32 registry model, quantised locally by kgen."""
    if spec.source is not None:
        raise UsageError(f"'{spec.name}' is already a local quantisation")
    if spec.path is not None:
        raise UsageError(f"'{spec.name}' is a local file (path: in models.yaml); kgen quantises hub downloads only")
    target = qtype.strip().upper()
    if target not in LOCAL_QUANT_TYPES:
        raise UsageError(f"unknown quantisation type '{qtype}'", hint=f"choose one of {', '.join(LOCAL_QUANT_TYPES)}")
    if (spec.quant or "").upper() not in QUANTIZABLE_SOURCES:
        raise UsageError(
            f"'{spec.name}' is already quantised ({spec.quant}); kgen quantises only F16/BF16/F32 models",
            hint="pick an F16 model such as tipo-500m-ft",
        )
    return replace(
        spec,
        name=f"{spec.name}{QUANT_SEPARATOR}{target}",
        quant=target,
        size=None,
        sha256=None,
        base=spec.name,
        description=f"{spec.name} quantised locally to {target}",
        source=spec,
    )


def packaged_registry() -> tuple[str, str]:
    """(display path, text) of the packaged models.yaml: inside the wheel, else the repository
    root next to the package (editable or source install)."""
    from importlib.resources import files

    resource = files("kgen_cli").joinpath(REGISTRY_FILE)
    if resource.is_file():
        return str(resource), resource.read_text(encoding="utf-8")
    source_tree = Path(__file__).resolve().parent.parent / REGISTRY_FILE
    try:
        return str(source_tree), source_tree.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"the packaged {REGISTRY_FILE} is missing ({exc.strerror})",
                            hint="reinstall kgen-cli") from exc  # fmt: skip


def user_registry_path() -> Path:
    return kgen_home(create=False) / REGISTRY_FILE


def load_registry() -> Registry:
    """The packaged registry merged with `<kgen home>/models.yaml`, validated."""
    where, text = packaged_registry()
    default, entries = _parse(where, text, require_models=True)
    models = {spec.name: spec for spec in entries}
    sources = [where]

    user = user_registry_path()
    if user.is_file():
        try:
            if user.stat().st_size > MAX_REGISTRY_BYTES:
                raise RegistryError(f"{user}: larger than {MAX_REGISTRY_BYTES} bytes, not a model registry")
            user_text = user.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{user}: cannot be read ({exc})") from exc
        user_default, user_entries = _parse(str(user), user_text, require_models=False, local_paths=user.parent)
        for spec in user_entries:
            models[spec.name] = spec  # same name: the user's entry replaces the packaged one
        default = user_default or default
        where = str(user)
        sources.append(where)

    for spec in models.values():
        if spec.base is not None and spec.base not in models:
            raise RegistryError(f"{where}: entry '{spec.name}': base '{spec.base}' is not a registry model"
                                f"{_did_you_mean(spec.base, models)}")  # fmt: skip
    if default is None:
        raise RegistryError(f"{where}: no 'default' model")
    if default not in models:
        raise RegistryError(f"{where}: default '{default}' is not a registry model{_did_you_mean(default, models)}")
    return Registry(models=models, default=default, sources=tuple(sources))


def _strict_loader() -> type:
    """yaml's SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen = set()
            for key_node, _value in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the constructor below reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}'", key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, StrictLoader.construct_mapping)
    return StrictLoader


def load_yaml(where: str, text: str) -> Any:
    """A YAML document of kgen's (models.yaml, config.yaml), strictly: a key given twice is an
    error, and any problem is one RegistryError line naming the file (and the line)."""
    import yaml

    try:
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader
    except RecursionError:
        raise RegistryError(f"{where}: invalid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RegistryError(f"{where}: invalid YAML{at}: {problem}") from exc


def _parse(where: str, text: str, *, require_models: bool,
           local_paths: Path | None = None) -> tuple[str | None, list[ModelSpec]]:  # fmt: skip
    """`local_paths`: the folder relative `path:` entries are resolved against; None refuses
    `path:` (the packaged registry lists hub files only)."""
    data = load_yaml(where, text)
    if data is None and not require_models:
        return None, []
    if not isinstance(data, dict):
        raise RegistryError(f"{where}: expected a mapping with 'default' and 'models'")
    for key in data:
        if key not in _TOP_LEVEL:
            raise RegistryError(f"{where}: unknown top-level key '{key}'{_did_you_mean(str(key), _TOP_LEVEL)}")

    default = data.get("default")
    if default is not None and not isinstance(default, str):
        raise RegistryError(f"{where}: 'default' must be a model name")
    raw_models = data.get("models")
    if raw_models is None:
        if require_models:
            raise RegistryError(f"{where}: missing 'models'")
        raw_models = []
    if not isinstance(raw_models, list):
        raise RegistryError(f"{where}: 'models' must be a list of entries")

    specs: list[ModelSpec] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_models, start=1):
        spec = _parse_entry(where, index, raw, local_paths)
        if spec.name in seen:
            raise RegistryError(f"{where}: entry '{spec.name}': duplicate name")
        seen.add(spec.name)
        specs.append(spec)
    return default, specs


def _parse_entry(where: str, index: int, raw: object, local_paths: Path | None) -> ModelSpec:
    label = f"entry #{index}"
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        label = f"entry '{raw['name']}'"

    def fail(problem: str) -> RegistryError:
        return RegistryError(f"{where}: {label}: {problem}")

    if not isinstance(raw, dict):
        raise fail("expected a mapping of keys")
    for key in raw:
        if key not in _FIELDS:
            raise fail(f"unknown key '{key}'{_did_you_mean(str(key), _FIELDS)}")
    local = "path" in raw
    if local and local_paths is None:
        raise fail("'path' is for your own models.yaml only")
    if local and ("repo" in raw or "file" in raw):
        raise fail("give either 'path' (a local file) or 'repo' and 'file' (a hub file), not both")
    for key, (kind, required) in _FIELDS.items():
        if key not in raw:
            if (key in _PATH_ENTRY_REQUIRED) if local else required:
                raise fail(f"missing key '{key}'")
            continue
        value = raw[key]
        # bool is an int in Python; `size: true` must not pass as 1.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise fail(f"'{key}' must be {_TYPE_WORDS[kind]}, not {_yaml_type(value)}")

    name, family, repo, file, quant = (raw.get(k) for k in ("name", "family", "repo", "file", "quant"))
    if not _NAME_RE.fullmatch(name):
        raise fail("'name' must be lower-case letters, digits, '.', '_' or '-' (starting with a letter or digit)")
    if family not in families.names():
        raise fail(f"'family' must be one of {', '.join(families.names())}, not '{family}'")
    path = None
    if local:
        if not raw["path"].strip():
            raise fail("'path' must name a .gguf file")
        path = str(local_paths / Path(raw["path"]).expanduser())  # relative: to the models.yaml
    else:
        if not _REPO_RE.fullmatch(repo):
            raise fail(f"'repo' must look like owner/name, not '{repo}'")
        if not file.lower().endswith(".gguf"):
            raise fail(f"'file' must be a .gguf file, not '{file}'")
        if not _is_repo_file(file):
            raise fail(f"'file' must be a path inside the repository (no leading '/', no '..'), not '{file}'")
    if quant is not None and not _QUANT_RE.fullmatch(quant):
        raise fail(f"'quant' must be an upper-case llama.cpp type such as F16 or Q8_0, not '{quant}'")
    if raw.get("context_length") is not None and raw["context_length"] <= 0:
        raise fail("'context_length' must be positive")
    if raw.get("size") is not None and raw["size"] <= 0:
        raise fail("'size' must be a positive number of bytes")
    sha256 = raw.get("sha256")
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not _SHA256_RE.fullmatch(sha256):
            raise fail("'sha256' must be 64 hexadecimal digits")
    quality_line = raw.get("quality_line", False)
    if quality_line and not families.get(family).quality_line:
        raise fail("'quality_line' applies to dtg models only")

    return ModelSpec(
        name=name,
        family=family,
        repo=repo,
        file=file,
        quant=quant,
        context_length=raw.get("context_length"),
        quality_line=quality_line,
        size=raw.get("size"),
        sha256=sha256,
        description=raw.get("description"),
        base=raw.get("base"),
        path=path,
    )


def _is_repo_file(file: str) -> bool:
    """A hub file name: relative, '/'-separated, without '.' or '..' parts that could leave the
    download directory (huggingface_hub would refuse it only mid-download)."""
    parts = file.split("/")
    return "\\" not in file and ":" not in file and all(p not in ("", ".", "..") for p in parts)


def _yaml_type(value: object) -> str:
    if value is None:
        return "empty"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)  # fmt: skip


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- --model resolution -------------------------------------------------------------------------


def registry_spec_only(model: str | None, family: str | None) -> ResolvedModel:
    """`--model`/`--family` to a model, without looking for its file (`download.locate` does):
    `model` is a registry name (None: the default), `NAME@QTYPE`, `hf:OWNER/REPO/FILE.gguf` or a
    path to a local .gguf. A registry or hub model comes back with `path=None`; a local path (or
    a `path:` entry's file) is not checked."""
    family = check_family(family)
    if model is not None and looks_like_path(model):
        return _resolve_path(model, family)
    if model is not None and model.strip().startswith(HUB_PREFIX):
        spec = hub_spec(model, family)
        chosen, assumed = file_family(Path(spec.file), family)
        return ResolvedModel(name=spec.name, path=None, family=chosen, spec=spec,
                             quality_line=_delta_quality_line(chosen, spec.file), family_assumed=assumed)  # fmt: skip
    spec = lookup(load_registry(), model)
    chosen = family or spec.family
    return ResolvedModel(name=spec.name, path=None, family=chosen, spec=spec,
                         quality_line=spec.quality_line and families.get(chosen).quality_line)


def guess_family(path: Path) -> str | None:
    """The family a file name says (tipo, dtg, ...), as the peers name their files; None when it
    says none."""
    return families.guess(path.name)


def looks_like_path(model: str) -> bool:
    """Registry names never hold a path separator nor end in .gguf; `hf:` names a hub file."""
    if model.strip().startswith(HUB_PREFIX):
        return False
    return model.lower().endswith(".gguf") or "/" in model or os.sep in model


def lookup(registry: Registry, model: str | None) -> ModelSpec:
    """The entry `--model` names: None (the default), a name, `NAME@QTYPE`, or `hf:OWNER/REPO/FILE`."""
    if model is None:
        return registry.default_spec
    model = model.strip()
    return hub_spec(model) if model.startswith(HUB_PREFIX) else registry.get(model)


def hub_spec(model: str, family: str | None = None) -> ModelSpec:
    """`hf:OWNER/REPO/FILE.gguf` (FILE may sit in folders) as an entry of its own, downloaded and
    cached like a registry model. Its family is chosen as for a local file."""
    ref = model.strip()[len(HUB_PREFIX):]
    owner, _, rest = ref.partition("/")
    repo_name, _, file = rest.partition("/")
    repo = f"{owner}/{repo_name}"
    if not _REPO_RE.fullmatch(repo) or not file.lower().endswith(".gguf") or not _is_repo_file(file):
        raise UsageError(f"'{model}' is not {HUB_PREFIX}OWNER/REPO/FILE.gguf",
                         hint="e.g. hf:KBlueLeaf/TIPO-500M-ft/TIPO-500M-ft-F16.gguf")  # fmt: skip
    chosen, _ = file_family(Path(file), family)
    return ModelSpec(name=f"{HUB_PREFIX}{repo}/{file}", family=chosen, repo=repo, file=file, quant=None,
                     context_length=None)  # fmt: skip


def file_family(path: Path, family: str | None) -> tuple[str, bool]:
    """(family, assumed) of a file kgen knows only by its name: `--family`, else what the name
    says, else KGEN_FAMILY, else TIPO, kgen's default (`assumed`: the commands say so)."""
    chosen = family or guess_family(path) or check_family(os.environ.get(FAMILY_ENV) or None, FAMILY_ENV)
    return (chosen, False) if chosen else (families.DEFAULT_FAMILY, True)


def check_family(family: str | None, where: str | None = None) -> str | None:
    """`family` lower-cased, None for None; UsageError for anything else (`where`: the source
    named in the message when it is not --family)."""
    if family is None:
        return None
    lowered = family.strip().lower()
    if lowered not in families.names():
        raise UsageError(f"unknown family '{family}'" + (f" ({where})" if where else ""),
                         hint=f"use --family {' or --family '.join(families.names())}")  # fmt: skip
    return lowered


def existing_file(model: str, what: str | None = None) -> Path:
    """The local model file `model` names, resolved; ModelNotFoundError when there is none
    (`what` says where the name came from)."""
    path = Path(model).expanduser()
    where = f" ({what})" if what else ""
    if not path.exists():
        raise ModelNotFoundError(f"no such model file: {model}{where}")
    if not path.is_file():
        raise ModelNotFoundError(f"not a file: {model}{where}")
    return path.resolve()


def _delta_quality_line(family: str, file_name: str) -> bool:
    """Whether a file known only by its name has the quality line: its family's rule decides
    (DTG: the peers name files <repo>_<file>, and only the delta models have the line)."""
    rule = families.get(family).quality_line_file
    return rule is not None and rule(Path(file_name).name)


def _resolve_path(model: str, family: str | None) -> ResolvedModel:
    path = Path(model).expanduser()
    # A renamed or fine-tuned file: KGEN_FAMILY, else TIPO, kgen's default family, not an error.
    chosen, assumed = file_family(path, family)
    return ResolvedModel(name=str(path), path=path, family=chosen, spec=None,
                         quality_line=_delta_quality_line(chosen, path.name), family_assumed=assumed)  # fmt: skip


def family_note(resolved: ResolvedModel) -> str | None:
    """The stderr line for a family that was assumed, not told; None otherwise."""
    if not resolved.family_assumed:
        return None
    return (f"note: '{Path(resolved.name).name}' names neither TIPO nor DTG: prompting it as TIPO "
            f"(--family dtg for a DanTagGen model; {FAMILY_ENV}=tipo or =dtg sets it for every such file)")
