"""Model files on disk: cache lookup without network, hub downloads, sha256 checks, local quantisation.

Files go to the shared Hugging Face cache (`HF_HUB_CACHE`, default ~/.cache/huggingface/hub)
unless `--local-dir` asks for a directory; kgen remembers such files in `<kgen home>/local-files.json`
so later runs find them. Progress bars are huggingface_hub's tqdm bars on stderr
(`HF_HUB_DISABLE_PROGRESS_BARS=1` or `--quiet` turns them off). With `HF_HUB_OFFLINE=1` only files
already on disk are used.

A file whose size or sha256 the registry knows is checked after every download and before first
use; every file hashed is recorded with its sha256 in `<kgen home>/verified.json` (by real path,
size and mtime), so a 500 MB model is hashed once, not on every run, and `kgen models list` can
say "corrupt" for a file that failed without hashing it again ("unverified" until it is first
used). A file that fails is deleted after a download, and refused when found on disk.

A locally quantised variant (`NAME@QTYPE`) lives in `<kgen home>/quantized/NAME-QTYPE.gguf`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from kgen_cli.console import err_console, human_size, info
from kgen_cli.errors import DownloadError, EngineError, ModelNotFoundError, UsageError
from kgen_cli.paths import kgen_home
from kgen_cli.quant import LOCAL_QUANT_TYPES, QUANTIZABLE_SOURCES
from kgen_cli.registry import (
    ModelSpec,
    Registry,
    ResolvedModel,
    derive_quantized,
    existing_file,
    registry_spec_only,
    user_registry_path,
)

VERIFIED_FILE = "verified.json"
HUB_SIZES_FILE = "hub-sizes.json"
# Seconds one request to the hub may take before kgen gives up on it; a failed attempt is tried
# once more, so an unreachable hub fails in seconds (huggingface_hub alone retries for ~25 s).
HUB_TIMEOUT = 4.0
UNREACHABLE_HINT = "check the network; HF_HUB_OFFLINE=1 uses downloaded models only, -m PATH a local .gguf"
LOCAL_FILES_FILE = "local-files.json"
QUANTIZED_DIR = "quantized"
_CHUNK = 1 << 20


# huggingface_hub takes a noticeable time to import (httpx and friends), so it is imported on
# first use only. These module-level proxies are also the seam tests patch
# (`kgen_cli.download.hf_hub_download`).
def hf_hub_download(**kwargs: Any) -> str:
    from huggingface_hub import hf_hub_download as impl

    return impl(**kwargs)


def try_to_load_from_cache(**kwargs: Any) -> Any:
    from huggingface_hub import try_to_load_from_cache as impl

    return impl(**kwargs)


def hub_file_size(repo: str, file: str, *, timeout: float) -> int | None:
    """The file's size on the hub, from one HEAD request (no retry); raises the hub's errors,
    or the HTTP client's for a hub that cannot be reached."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    return get_hf_file_metadata(hf_hub_url(repo, file), timeout=timeout).size


def is_offline() -> bool:
    """huggingface_hub's offline switch (`HF_HUB_OFFLINE`, read once when it is imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hf_cache_dir() -> str | None:
    """`HF_HUB_CACHE` as set now, else None (huggingface_hub's own default from HF_HOME).
    Read per call: huggingface_hub reads it once at import."""
    value = os.environ.get("HF_HUB_CACHE")
    return os.path.expanduser(os.path.expandvars(value)) if value else None


# --- lookup without network ---------------------------------------------------------------------


def quantized_path(spec: ModelSpec) -> Path:
    """Where the `NAME@QTYPE` variant is (or will be) kept."""
    if spec.source is None:
        raise ValueError(f"{spec.name} is not a local quantisation")
    return kgen_home(create=False) / QUANTIZED_DIR / f"{spec.source.name}-{spec.quant}.gguf"


def local_path(spec: ModelSpec, *, verify: bool = True) -> Path | None:
    """The model's file if it is on disk (never touches the network), else None.

    Looks at kgen's quantised outputs, files kgen downloaded with `--local-dir`, then the HF cache.
    With `verify`, a file that fails its registry size/sha256 raises DownloadError (hashed once,
    then remembered)."""
    if spec.source is not None:
        path = quantized_path(spec)
        return path if path.is_file() else None
    if spec.path is not None:  # the user's own file, named in their models.yaml
        path = Path(spec.path)
        if not path.is_file():
            return None
    else:
        path = _recorded_local_file(spec) or _cached_file(spec)
    if path is not None and verify:
        _check_file(spec, path, delete_bad=False)
    return path


def local_quantized(registry: Registry) -> list[ModelSpec]:
    """The `NAME@QTYPE` variants present in `<kgen home>/quantized/`, in registry order."""
    folder = kgen_home(create=False) / QUANTIZED_DIR
    if not folder.is_dir():
        return []
    present = {p.name for p in folder.glob("*.gguf")}
    found = []
    for spec in registry:
        if spec.quant not in QUANTIZABLE_SOURCES:
            continue
        for qtype in LOCAL_QUANT_TYPES:
            if f"{spec.name}-{qtype}.gguf" in present:
                found.append(derive_quantized(spec, qtype))
    return found


def _cached_file(spec: ModelSpec) -> Path | None:
    try:
        found = try_to_load_from_cache(repo_id=spec.repo, filename=spec.file, cache_dir=hf_cache_dir())
    except (ValueError, OSError):  # an unusable cache dir or repo id: not cached
        return None
    # A str is a path; None or the _CACHED_NO_EXIST sentinel mean "not here".
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def disk_status(spec: ModelSpec) -> tuple[str, Path | None, str | None]:
    """(status, path, problem) for `models list` and `kgen info`, never hashing: status is
    "yes", "unverified" or "corrupt" (see `file_state`) for a file on disk, "no" without one."""
    path = local_path(spec, verify=False)
    if path is None:
        return "no", None, None
    state, problem = file_state(spec, path)
    return {"ok": "yes"}.get(state, state), path, problem


def file_state(spec: ModelSpec, path: Path) -> tuple[str, str | None]:
    """What is known about a file on disk without hashing it, as (state, problem):

    - "ok": it matches every check the registry has, or the sha256 recorded for it does;
    - "unverified": the registry has a sha256 that this file (at its size and mtime) was never
      hashed against; the first use (`models path`, a run) hashes it;
    - "corrupt": a wrong size, an unreadable file, or a recorded sha256 that is not the registry's
      (`problem` says which). `models path` and the commands refuse it."""
    try:
        real = path.resolve()
        stat = real.stat()
    except OSError as exc:
        return "corrupt", f"cannot be read ({exc.strerror})"
    if problem := _wrong_size(spec, stat.st_size):
        return "corrupt", problem
    if spec.sha256 is None:
        return "ok", None
    digest = _recorded_digest(real, stat)
    if digest is None:
        return "unverified", None
    return ("ok", None) if digest == spec.sha256 else ("corrupt", _wrong_digest(spec, digest))


def _wrong_size(spec: ModelSpec, size: int) -> str | None:
    return f"is {size} bytes, expected {spec.size}" if spec.size is not None and size != spec.size else None


def _wrong_digest(spec: ModelSpec, digest: str) -> str:
    return f"has sha256 {digest}, expected {spec.sha256}"


def _identity(path: Path | None) -> tuple[int, int, int] | None:
    """(device, inode, mtime) of the file behind `path`, None when there is none."""
    try:
        st = path.resolve().stat() if path is not None else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns) if st is not None else None


def _recorded_local_file(spec: ModelSpec) -> Path | None:
    entry = _read_state(LOCAL_FILES_FILE).get(spec.name)
    if not isinstance(entry, dict) or entry.get("repo") != spec.repo or entry.get("file") != spec.file:
        return None
    path = Path(str(entry.get("path", "")))
    return path if path.is_file() else None


# --- --model to a file on disk -------------------------------------------------------------------


def resolve_model(model: str | None, family: str | None, *, download_missing: bool = False) -> ResolvedModel:
    """`--model`/`--family` to a GGUF on disk. `model` is a registry name (None: the default),
    `NAME@QTYPE`, or a path to a local .gguf. A registry model that is not on disk raises
    ModelNotFoundError with the `kgen models download` hint, unless `download_missing` fetches it
    (never with HF_HUB_OFFLINE set)."""
    return locate(registry_spec_only(model, family), download_missing=download_missing)


def locate(resolved: ResolvedModel, *, download_missing: bool = False, quiet: bool = False) -> ResolvedModel:
    """A model from `registry.registry_spec_only` with its file on disk (fetched when
    `download_missing` and not offline; `quiet`: without the hub's progress bars), so that a run
    resolves its model once and looks its file up once."""
    if resolved.spec is None:  # a local path
        path = existing_file(resolved.name)
        return replace(resolved, name=str(path), path=path)
    if resolved.path is not None:
        return resolved
    spec = resolved.spec
    if spec.path is not None:  # the user's own file, named in their models.yaml
        return replace(resolved, path=existing_file(spec.path, f"model '{spec.name}', path: in models.yaml"))
    path = local_path(spec)
    if path is None:
        if download_missing and not is_offline():
            path = download(spec, quiet=quiet)
        else:
            raise not_downloaded(spec.name)
    return replace(resolved, path=path)


def not_downloaded(name: str) -> ModelNotFoundError:
    hint = f"run: kgen models download {name}"
    if is_offline():
        hint = f"HF_HUB_OFFLINE is set; unset it, then {hint}"
    return ModelNotFoundError(f"model '{name}' is not downloaded", hint=hint)


# --- downloads ----------------------------------------------------------------------------------


def download(
    spec: ModelSpec,
    *,
    local_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    quiet: bool = False,
    quant: str | None = None,
    offline: bool | None = None,
) -> Path:
    """Fetch the model's GGUF from the hub (into the HF cache, or `local_dir`), check it, return it.

    `quant` (or a `NAME@QTYPE` spec) quantises an F16 model locally after fetching it; `force` then
    quantises again (the F16 is fetched as usual). `offline` defaults to HF_HUB_OFFLINE: only a
    file already on disk is returned."""
    if quant is not None:
        spec = derive_quantized(spec, quant)
    if spec.path is not None:
        raise UsageError(f"'{spec.name}' is a local file (path: in models.yaml): there is nothing to download")
    if offline is None:
        offline = is_offline()
    if spec.source is not None:
        return _quantize_locally(spec, local_dir=local_dir, force=force, quiet=quiet, offline=offline)
    return _fetch(spec, local_dir=local_dir, force=force, quiet=quiet, offline=offline)


def _fetch(spec: ModelSpec, *, local_dir: str | os.PathLike[str] | None, force: bool, quiet: bool,
           offline: bool) -> Path:  # fmt: skip
    kwargs: dict[str, Any] = {"repo_id": spec.repo, "filename": spec.file}
    if local_dir is not None:
        kwargs["local_dir"] = str(Path(local_dir).expanduser())
    else:
        kwargs["cache_dir"] = hf_cache_dir()
    kwargs["force_download"] = force
    kwargs["local_files_only"] = offline
    before = None if force else _identity(Path(kwargs["local_dir"]) / spec.file if local_dir is not None
                                          else _cached_file(spec))  # fmt: skip
    if before is None and not offline:
        size = _probe(spec)  # fails in seconds when the hub cannot be reached
        if not quiet:
            how_big = f" ({human_size(size)})" if size is not None else ""
            info(f"downloading {spec.name}{how_big} from {spec.repo}")
    with _progress_bars(enabled=not quiet), _quiet_hub_log():
        try:
            found = hf_hub_download(**kwargs)
        except Exception as exc:
            error = _download_error(spec, exc, offline=offline)
            if error is None:
                raise
            raise error from exc
    path = Path(found)
    # Only what the hub just wrote may be deleted: a file that was already there (the user's own
    # in --local-dir, or a cached one returned offline) is refused and left alone.
    _check_file(spec, path, delete_bad=before is None or _identity(path) != before)
    if local_dir is not None:
        _record_local_file(spec, path)
    return path


def _probe(spec: ModelSpec) -> int | None:
    """Ask the hub for the file before downloading it: its size (the registry's when known), or
    one DownloadError line within seconds when the hub cannot be reached or refuses the file."""
    for attempt in range(2):
        try:
            size = hub_file_size(spec.repo, spec.file, timeout=HUB_TIMEOUT)
        except Exception as exc:
            if _unreachable(exc):
                if attempt == 0:
                    continue
                reason = " ".join(str(exc).split())[:200] or type(exc).__name__
                raise DownloadError(f"{spec.name}: cannot reach the Hugging Face hub ({reason})",
                                    hint=UNREACHABLE_HINT) from exc  # fmt: skip
            error = _download_error(spec, exc, offline=False)
            if error is None:
                raise
            raise error from exc
        if size is not None:
            _remember_hub_sizes({(spec.repo, spec.file): size})
        return spec.size if spec.size is not None else size
    raise AssertionError("unreachable")  # pragma: no cover


def _unreachable(exc: Exception) -> bool:
    """A failure to talk to the hub at all (DNS, refused, timeout), not an answer from it. The
    HTTP client differs between huggingface_hub versions (requests, httpx), so by kind: an
    OSError or one of the client library's own errors, never an HTTP status from the hub."""
    from huggingface_hub import errors

    if isinstance(exc, (errors.HfHubHTTPError, errors.HFValidationError, errors.OfflineModeIsEnabled)):
        return False
    client = type(exc).__module__.split(".")[0]
    return isinstance(exc, (OSError, TimeoutError)) or client in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def hub_sizes(specs: list[ModelSpec]) -> dict[str, int]:
    """Sizes on the hub of registry files whose entry has none, by model name: remembered in
    `<kgen home>/hub-sizes.json`, asked of the hub (in parallel, HUB_TIMEOUT each, at most once
    a run after a failure to reach it) only for files not yet known and only when online."""
    known = _read_state(HUB_SIZES_FILE)
    sizes = {s.name: known[f"{s.repo}/{s.file}"] for s in specs if isinstance(known.get(f"{s.repo}/{s.file}"), int)}
    missing = [s for s in specs if s.name not in sizes]
    if not missing or is_offline():
        return sizes
    from concurrent.futures import ThreadPoolExecutor

    unreachable = []

    def ask(spec: ModelSpec) -> int | None:
        if unreachable:
            return None
        try:
            return hub_file_size(spec.repo, spec.file, timeout=HUB_TIMEOUT)
        except Exception as exc:  # a listing shows '-' for what it could not learn
            if _unreachable(exc):
                unreachable.append(exc)
            return None

    with _quiet_hub_log(), ThreadPoolExecutor(max_workers=8) as pool:
        found = dict(zip(missing, pool.map(ask, missing)))
    learned = {(s.repo, s.file): size for s, size in found.items() if size is not None}
    _remember_hub_sizes(learned)
    sizes.update({s.name: size for s, size in found.items() if size is not None})
    return sizes


def _remember_hub_sizes(sizes: dict[tuple[str, str], int]) -> None:
    if sizes:
        state = _read_state(HUB_SIZES_FILE)
        state.update({f"{repo}/{file}": size for (repo, file), size in sizes.items()})
        _write_state(HUB_SIZES_FILE, state)


def _download_error(spec: ModelSpec, exc: Exception, *, offline: bool) -> DownloadError | None:
    """One line for each hub failure; None for anything that is not a download problem."""
    from huggingface_hub import errors

    what = f"{spec.repo}/{spec.file}"
    detail = " ".join(str(exc).split())[:300]
    override = f"override the entry in {user_registry_path()}"
    # Order matters: LocalEntryNotFoundError and RemoteEntryNotFoundError are EntryNotFoundErrors,
    # GatedRepoError is a RepositoryNotFoundError, and most of them are HfHubHTTPError/OSError.
    if isinstance(exc, errors.LocalEntryNotFoundError):
        if offline:
            return DownloadError(f"{spec.name}: {what} is not downloaded and HF_HUB_OFFLINE is set",
                                 hint="unset HF_HUB_OFFLINE to download it")  # fmt: skip
        return DownloadError(f"{spec.name}: cannot reach the Hugging Face hub and {what} is not cached",
                             hint=UNREACHABLE_HINT)  # fmt: skip
    if isinstance(exc, errors.GatedRepoError):
        return DownloadError(f"{spec.name}: {spec.repo} is gated on the hub",
                             hint="accept its terms on huggingface.co, then `hf auth login` or set HF_TOKEN")  # fmt: skip
    if isinstance(exc, errors.RepositoryNotFoundError):
        return DownloadError(f"{spec.name}: repository {spec.repo} not found on the hub",
                             hint=f"check its 'repo' ({override})")  # fmt: skip
    if isinstance(exc, errors.RevisionNotFoundError):
        return DownloadError(f"{spec.name}: revision not found in {spec.repo}: {detail}")
    if isinstance(exc, errors.EntryNotFoundError):
        return DownloadError(f"{spec.name}: {spec.file} not found in {spec.repo}",
                             hint=f"check its 'file' ({override})")  # fmt: skip
    if isinstance(exc, errors.HfHubHTTPError):
        return DownloadError(f"{spec.name}: download of {what} failed: {detail}")
    if isinstance(exc, (errors.HFValidationError, OSError)):
        return DownloadError(f"{spec.name}: download of {what} failed: {detail}")
    return None


@contextmanager
def _quiet_hub_log() -> Iterator[None]:
    """huggingface_hub logs every retry of an unreachable hub as a WARNING on stderr (10 lines
    before the one error kgen prints for it); keep those for KGEN_DEBUG=1."""
    import logging

    from kgen_cli.console import debug_enabled

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    if not debug_enabled():
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _progress_bars(*, enabled: bool) -> Iterator[None]:
    """Turn huggingface_hub's bars off for the block (`--quiet`); HF_HUB_DISABLE_PROGRESS_BARS
    is honoured by huggingface_hub itself either way."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    already = are_progress_bars_disabled()
    with warnings.catch_warnings():  # HF_HUB_DISABLE_PROGRESS_BARS=0 wins and would warn
        warnings.simplefilter("ignore")
        disable_progress_bars()
    try:
        yield
    finally:
        if not already:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable_progress_bars()


def _quantize_locally(spec: ModelSpec, *, local_dir: str | os.PathLike[str] | None, force: bool, quiet: bool,
                      offline: bool) -> Path:  # fmt: skip
    assert spec.source is not None
    target = quantized_path(spec)
    if target.is_file() and not force:
        return target
    source = _fetch(spec.source, local_dir=local_dir, force=False, quiet=quiet, offline=offline)
    try:
        from kgen_cli.engine import quantize_model  # imports llama_cpp
    except ImportError as exc:
        raise EngineError(f"cannot quantise {spec.source.name}: {exc}",
                          hint="local quantisation needs llama-cpp-python (pip install -e .)") from exc  # fmt: skip

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    if not quiet:
        err_console.print(f"quantising {spec.source.name} to {spec.quant}: {target}", markup=False, highlight=False)
    try:
        quantize_model(source, partial, spec.quant)
        if not partial.is_file():
            raise EngineError(f"quantising {spec.source.name} to {spec.quant} produced no file")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


# --- removal ------------------------------------------------------------------------------------


def remove(spec: ModelSpec) -> list[tuple[Path, int]]:
    """Delete what kgen downloaded or made for the model: its file (in the HF cache the blob and
    the snapshot's link to it; a --local-dir file kgen recorded) and its local quantisations
    (`NAME@QTYPE`: only that one). Returns (path, bytes freed) for each file deleted."""
    if spec.path is not None:
        raise UsageError(f"'{spec.name}' is your own file (path: in models.yaml); kgen does not delete it")
    if spec.source is not None:
        files = [quantized_path(spec)]
    else:
        files = [_recorded_local_file(spec), _cached_file(spec)]
        folder = kgen_home(create=False) / QUANTIZED_DIR
        files += [folder / f"{spec.name}-{qtype}.gguf" for qtype in LOCAL_QUANT_TYPES]
    removed = []
    for path in files:
        if path is None or not (path.is_file() or path.is_symlink()):
            continue
        real = path.resolve()
        size = real.stat().st_size if real.is_file() else 0
        real.unlink(missing_ok=True)
        if path.is_symlink():
            path.unlink(missing_ok=True)
        removed.append((path, size))
    if spec.source is None:
        state = _read_state(LOCAL_FILES_FILE)
        if state.pop(spec.name, None) is not None:
            _write_state(LOCAL_FILES_FILE, state)
    return removed


# --- size / sha256 checks -----------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file(spec: ModelSpec, path: Path, *, delete_bad: bool) -> None:
    """Compare the file with the registry's size and sha256 (when known). A downloaded file that
    fails is deleted (`delete_bad`); one found on disk is refused."""
    if spec.size is None and spec.sha256 is None:
        return
    real = path.resolve()
    try:
        stat = real.stat()
    except OSError as exc:
        raise DownloadError(f"{spec.name}: cannot read {path}: {exc.strerror}") from exc
    problem = _wrong_size(spec, stat.st_size)
    if problem is None and spec.sha256 is not None:
        digest = _recorded_digest(real, stat)
        if digest is None:
            digest = file_sha256(real)
            _record_digest(real, stat, digest)  # a bad one too: `models list` then says "corrupt"
        if digest != spec.sha256:
            problem = _wrong_digest(spec, digest)
    if problem is None:
        return
    if delete_bad:
        real.unlink(missing_ok=True)
        if path.is_symlink():
            path.unlink(missing_ok=True)
        raise DownloadError(
            f"{spec.name}: the downloaded {spec.file} {problem}; it was deleted",
            hint=f"download it again; if it fails again, the registry is wrong: override the entry in {user_registry_path()}",
        )
    raise DownloadError(f"{spec.name}: {path} {problem}", hint=f"run: kgen models download {spec.name} --force")


def _recorded_digest(real: Path, stat: os.stat_result) -> str | None:
    """The sha256 recorded for this file when it had this size and mtime, else None."""
    entry = _read_state(VERIFIED_FILE).get(str(real))
    if not isinstance(entry, dict) or (entry.get("size"), entry.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
        return None
    digest = entry.get("sha256")
    return digest if isinstance(digest, str) else None


def _record_digest(real: Path, stat: os.stat_result, sha256: str) -> None:
    state = _read_state(VERIFIED_FILE)
    state = {key: value for key, value in state.items() if os.path.exists(key)}  # forget deleted files
    state[str(real)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    _write_state(VERIFIED_FILE, state)


def _record_local_file(spec: ModelSpec, path: Path) -> None:
    state = _read_state(LOCAL_FILES_FILE)
    state[spec.name] = {"repo": spec.repo, "file": spec.file, "path": str(path.resolve())}
    _write_state(LOCAL_FILES_FILE, state)


# --- kgen's small state files -------------------------------------------------------------------


def _read_state(name: str) -> dict[str, Any]:
    try:
        data = json.loads((kgen_home(create=False) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(name: str, data: dict[str, Any]) -> None:
    """Atomic replace, so a concurrent reader never sees half a file. Losing the write only
    costs a re-hash later, so failures are ignored."""
    try:
        home = kgen_home()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=home)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
        os.replace(tmp, home / name)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
