"""`kgen batch --ray`: the batch on a Ray cluster (Ray Data), exactly once, resumable.

The input (a file, a directory or glob of files, or any path pyarrow reads: `s3://`, `gs://`)
is numbered as one input, the files one after another, by the rule of a local `kgen batch`
(`batchio.read_records`): record i keeps its index, line number and seed S + i. The driver
scans it once and cuts it into fixed shards of `shard_size` records by global index, each a list
of byte ranges (`Shard`); the shards are the rows of a Ray Dataset. `map_batches` runs them on an
actor pool: each actor (`_ShardWorker`) holds one `Generator` (`api.load`; `num_cpus=T` reserved,
llama.cpp on T threads) and expands a shard as a local `kgen batch` expands its input
(`Generator.batch`: continuous batching, `--parallel` sequences). A shard's records go to
`part-NNNNNN.jsonl` in the output directory, written whole (a temporary file renamed over it): a
task Ray retries after an actor died, or a rerun, replaces the file and never duplicates a record. `--resume` runs only
the shards without a file. The part files hold the records in index order, so concatenating them
in name order gives the ordered JSONL (`--merge` prints it).

Each shard is a batch of its own (its decoder starts empty), so a shard's output depends only on
its records and the options: a retried shard reproduces the same records on the same hardware,
and with `--parallel 1` every record equals the local `kgen batch --parallel 1` record. With more
parallel sequences the batch composition (which inputs decode together) shapes the arithmetic, as
between local runs with different inputs; docs/scale-out.md says what is guaranteed.

Ray is imported only here and only by `run_batch`; without it installed `--ray` is a usage error.
"""

from __future__ import annotations

import glob
import io
import json
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from kgen_cli.batchio import bounded_lines, detect_format, error_record, read_records, result_record
from kgen_cli.errors import KgenError, UsageError
from kgen_cli.options import EngineOptions, GenerationOptions

RAY_EXTRA = "pip install 'kgen-cli[ray]'"
PART = "part-{:06d}.jsonl"
MANIFEST = "kgen-run.json"
DEFAULT_SHARD_SIZE = 256
_BOM = b"\xef\xbb\xbf"


# ---------------------------------------------------------------------------------------------
# Storage: local paths with os, anything with a scheme through pyarrow's file systems


def _remote(path: str) -> bool:
    return "://" in path


def _pa_fs(path: str):
    from pyarrow import fs as pafs

    try:
        return pafs.FileSystem.from_uri(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for unknown schemes, bad buckets
        raise UsageError(f"cannot open {path}: {exc}") from None


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name if _remote(directory) else os.path.join(directory, name)


def list_inputs(spec: str) -> list[tuple[str, int]]:
    """The input files of `spec` as (path, size), in the order they are numbered: a file; a
    directory's files (not its sub-directories; names starting with '.' or '_' skipped, as Ray
    skips them); or a local glob, sorted by name."""
    if _remote(spec):
        from pyarrow import fs as pafs

        filesystem, path = _pa_fs(spec)
        scheme = spec.split("://", 1)[0]
        info_ = filesystem.get_file_info(path)
        if info_.type == pafs.FileType.File:
            return [(spec, info_.size)]
        if info_.type != pafs.FileType.Directory:
            raise UsageError(f"cannot read {spec}: no such file or directory")
        found = filesystem.get_file_info(pafs.FileSelector(path))
        files = sorted((f for f in found if f.type == pafs.FileType.File and not f.base_name.startswith((".", "_"))),
                       key=lambda f: f.path)
        paths = [(f"{scheme}://{f.path}", f.size) for f in files]
    elif any(c in spec for c in "*?["):
        paths = [(p, os.path.getsize(p)) for p in sorted(glob.glob(spec)) if os.path.isfile(p)]
    elif os.path.isdir(spec):
        names = sorted(n for n in os.listdir(spec) if not n.startswith((".", "_")))
        paths = [(p, os.path.getsize(p)) for p in (os.path.join(spec, n) for n in names) if os.path.isfile(p)]
    elif os.path.isfile(spec):
        paths = [(spec, os.path.getsize(spec))]
    else:
        raise UsageError(f"cannot read {spec}: no such file or directory")
    if not paths:
        raise UsageError(f"no input files in {spec}")
    return paths


def _open_read(path: str):
    if _remote(path):
        filesystem, p = _pa_fs(path)
        return io.BufferedReader(filesystem.open_input_file(p))  # readline(n) and seek, as a file has
    try:
        return open(path, "rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _write_whole(directory: str, name: str, data: bytes) -> None:
    """`directory/name` appears complete or not at all: written to a hidden temporary name first
    (synced, on a local disk), then renamed over it (on an object store: moved, which publishes
    the object whole)."""
    path = _join(directory, name)
    tmp = _join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        if _remote(directory):
            filesystem, remote_tmp = _pa_fs(tmp)
            with filesystem.open_output_stream(remote_tmp) as out:
                out.write(data)
            filesystem.move(remote_tmp, _pa_fs(path)[1])
            return
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            _delete(directory, os.path.basename(tmp))
        except OSError:
            pass
        raise


def _listdir(directory: str) -> list[str]:
    if _remote(directory):
        from pyarrow import fs as pafs

        filesystem, p = _pa_fs(directory)
        try:
            found = filesystem.get_file_info(pafs.FileSelector(p, allow_not_found=True))
        except OSError as exc:
            raise UsageError(f"cannot list {directory}: {exc}") from None
        return [f.base_name for f in found if f.type == pafs.FileType.File]
    return os.listdir(directory) if os.path.isdir(directory) else []


def _read_bytes(path: str) -> bytes:
    with _open_read(path) as fh:
        return fh.read()


def _delete(directory: str, name: str) -> None:
    path = _join(directory, name)
    if _remote(path):
        filesystem, p = _pa_fs(path)
        filesystem.delete_file(p)
    else:
        os.unlink(path)


# ---------------------------------------------------------------------------------------------
# Shards


@dataclass(frozen=True)
class Segment:
    """Bytes [start, end) of one input file, holding records from `first_index` on; the file's
    lines before it, and the earlier files', number `lines_before` lines."""

    path: str
    start: int
    end: int
    first_index: int
    lines_before: int


@dataclass(frozen=True)
class Shard:
    number: int
    first_index: int
    count: int
    segments: tuple[Segment, ...]

    @property
    def name(self) -> str:
        return PART.format(self.number)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Shard:
        d = json.loads(text)
        return cls(d["number"], d["first_index"], d["count"], tuple(Segment(**s) for s in d["segments"]))


@dataclass
class Plan:
    """The input cut into shards: what `--resume` checks it is still the same."""

    inputs: list[tuple[str, int]]
    shard_size: int
    input_format: str
    shards: list[Shard] = field(default_factory=list)
    records: int = 0

    def layout(self) -> dict:
        return {"inputs": [list(p) for p in self.inputs], "shard_size": self.shard_size,
                "input_format": self.input_format, "records": self.records, "shards": len(self.shards)}


def plan_shards(spec: str, shard_size: int, input_format: str | None) -> Plan:
    """Scan the input once (lines are classified, never parsed) and cut it into shards of
    `shard_size` records by global index. The format is detected from the first prompt line of
    the whole input, as a local batch detects it."""
    if shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    inputs = list_inputs(spec)
    fmt = input_format
    shards: list[Shard] = []
    index = lines_before = 0
    current: list = []  # [first_index, [Segment, ...]] of the shard being cut

    def close_shard() -> None:
        if current:
            shards.append(Shard(len(shards), current[0], index - current[0], tuple(current[1])))
            current.clear()

    for path, _size in inputs:
        seg_start = seg_index = None
        seg_lines = lines_before
        where = {"offset": 0, "start": 0, "lines": 0}

        def raw_lines(fh):
            for raw in bounded_lines(fh):
                where["start"] = where["offset"]
                where["offset"] += len(raw)
                where["lines"] += 1
                if where["lines"] == 1 and lines_before and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]  # each file's BOM, as a shard reads it (file 1: read_records)
                yield raw

        with _open_read(path) as fh:
            for rec in read_records(raw_lines(fh), "lines", first_index=index, lines_before=lines_before):
                if fmt is None and rec.error is None:
                    fmt = detect_format(rec.fields["tags"])
                if index % shard_size == 0:
                    if seg_start is not None:
                        current[1].append(Segment(path, seg_start, where["start"], seg_index, seg_lines))
                    close_shard()
                    current[:] = [index, []]
                    seg_start, seg_index, seg_lines = where["start"], index, rec.line - 1
                elif seg_start is None:  # a shard going on from the previous file
                    seg_start, seg_index, seg_lines = 0, index, lines_before
                index += 1
        if seg_start is not None:
            current[1].append(Segment(path, seg_start, where["offset"], seg_index, seg_lines))
        lines_before += where["lines"]
    close_shard()
    return Plan(inputs, shard_size, fmt or "lines", shards, index)


def shard_records(shard: Shard, input_format: str):
    """The shard's input records, numbered as in the whole input."""
    for seg in shard.segments:
        with _open_read(seg.path) as fh:
            fh.seek(seg.start)
            data = fh.read(seg.end - seg.start)
        if seg.start == 0 and seg.lines_before and data.startswith(_BOM):
            data = data[len(_BOM):]
        yield from read_records(bounded_lines(io.BytesIO(data)), input_format, first_index=seg.first_index,
                                lines_before=seg.lines_before)


# ---------------------------------------------------------------------------------------------
# One shard on one engine (what an actor does; no Ray here)


@dataclass
class Job:
    """What every actor needs: the batch's options as the command checked them, and where to
    write. `engine` is the command's EngineOptions (its `threads` unused: each actor runs on
    `threads`); `model` is what each actor loads, set by `run_batch`: a registry name (resolved,
    and fetched if missing, on each node) or a local file's full path."""

    options: GenerationOptions
    engine: EngineOptions
    threads: int = 1
    variants: int = 1
    parallel: int = 16
    sampler: str | None = None
    group_size: int | None = None
    exploration: float | None = None
    timings: bool = True
    model: str | None = None  # run_batch sets the rest
    out: str = ""
    input_format: str = "lines"
    base_seed: int = 0
    crash: dict | None = None  # tests only: see crash_hook


def load_job_model(job: Job, **kwargs):
    """A `Generator` for the job's model (`kgen_cli.api.load`), its context opened at the first
    shard; `kwargs` go to `load`."""
    from kgen_cli.api import load

    e = job.engine
    return load(job.model, family=e.family, gpu_layers=e.gpu_layers, threads=job.threads, n_ctx=e.n_ctx,
                context_length=e.context_length, verbose=e.verbose, defaults=job.options, lazy=True, **kwargs)


def run_shard(gen, shard: Shard, job: Job, *, on_record: Callable[[], None] | None = None) -> dict:
    """Expand one shard on a Generator as a local `kgen batch` expands its records (`gen.batch`:
    the same context sizing, continuous batching and seeds), write its part file whole, and
    return its figures (records, failed, generated tokens, seconds)."""
    started = time.perf_counter()
    lines: dict[int, str] = {}
    counts = {"failed": 0, "tokens": 0}

    def on_done(rec, result, error) -> None:
        if error is not None:
            counts["failed"] += 1
            lines[rec.index] = error_record(rec, error, default_nl=job.options.nl)
        else:
            counts["tokens"] += result["tokens"]
            lines[rec.index] = result_record(rec, result, default_nl=job.options.nl, timings=job.timings)
        if on_record is not None:
            on_record()

    run, _ = gen.batch(parallel=job.parallel, variants=job.variants, seed=job.base_seed, sampler=job.sampler,
                       group_size=job.group_size, exploration=job.exploration)
    run.on_done = on_done
    run.run(shard_records(shard, job.input_format))
    expected = range(shard.first_index, shard.first_index + shard.count)
    if sorted(lines) != list(expected):
        raise KgenError(f"internal error: shard {shard.number} gave records {sorted(lines)[:5]}..., "
                        f"expected {shard.first_index}..{expected[-1]} (has the input changed?)")
    _write_whole(job.out, shard.name, "".join(lines[i] + "\n" for i in expected).encode("utf-8"))
    return {"shard": shard.number, "records": shard.count, "failed": counts["failed"], "tokens": counts["tokens"],
            "seconds": time.perf_counter() - started}


class _ShardWorker:
    """The Ray actor: one Generator (the model loaded once); each call expands the shards of a
    Ray batch."""

    def __init__(self, job: Job):
        self.job = job
        self.gen = load_job_model(job)
        self.actor = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        rows: dict[str, list] = {k: [] for k in ("shard", "records", "failed", "tokens", "seconds", "actor",
                                                  "load_seconds")}
        for text in batch["shard"]:
            engine = self.gen.engine
            summary = run_shard(self.gen, Shard.from_json(str(text)), self.job, on_record=crash_hook(self.job.crash))
            loaded = self.gen.load_seconds if self.gen.engine is not engine else 0.0  # opened for this shard
            summary.update(actor=self.actor, load_seconds=loaded, seconds=summary["seconds"] - loaded)
            for key, value in summary.items():
                rows[key].append(value)
        return rows

def crash_hook(crash: dict | None) -> Callable[[], None] | None:
    """Tests only (`Job.crash`): called after each finished record, the first actor to reach
    `crash["after"]` records of a shard while `crash["marker"]` does not exist creates the
    marker and exits its process: an actor lost mid-shard, which Ray replaces."""
    if not crash:
        return None
    seen = [0]

    def on_record() -> None:
        seen[0] += 1
        if seen[0] == crash["after"]:
            try:
                os.close(os.open(crash["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os._exit(1)

    return on_record


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class Cluster:
    """Where and how wide: `address` None starts a local Ray (or joins the one this process has
    already started); `actors` is (min, max), autoscaling when they differ."""

    address: str | None = None
    actors: tuple[int, int] | None = None
    threads: int = 1
    gpus: float = 0.0


def parse_actors(text: str | None) -> tuple[int, int] | None:
    """`N` or `N:M` (autoscaling between N and M actors)."""
    if text is None:
        return None
    low, sep, high = text.partition(":")
    try:
        pair = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise UsageError(f"--actors must be N or N:M, not {text!r}") from None
    if pair[0] < 1 or pair[1] < pair[0]:
        raise UsageError(f"--actors {text}: need 1 <= N <= M")
    return pair


def require_ray():
    """Ray, or the one-line usage error that names the extra."""
    try:
        import ray
        import ray.data  # noqa: F401 - the ray[data] part: pyarrow, pandas
    except ImportError:
        raise UsageError(f"--ray needs Ray Data: {RAY_EXTRA}") from None
    return ray


@dataclass
class Prepared:
    """A run checked against its output directory, before any model or Ray is touched: the
    plan, the shards still to run, the seed (--seed, else a resumed run's) and the files a fresh
    run replaces (an earlier run's parts and manifest, a lost actor's temporary files)."""

    out: str
    plan: Plan
    todo: list[Shard]
    seed: int | None
    stale: list[str]


def prepare(spec: str, out: str, *, shard_size: int = DEFAULT_SHARD_SIZE, input_format: str | None = None,
            resume: bool = False, seed: int | None = None) -> Prepared:
    """Plan the shards of `spec` and check `out` against them. A fresh run replaces an earlier
    run's files (as `-o FILE` overwrites a file); `--resume` needs the manifest of the same
    input and shard size, keeps the finished parts and, without --seed, the earlier seed."""
    if not _remote(out) and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"with --ray, -o names a directory; {out} is a file")
    plan = plan_shards(spec, shard_size, input_format)
    names = _listdir(out)
    stale = [n for n in names if n.startswith(".part-") and n.endswith(".tmp")]
    done: set[str] = set()
    if resume:
        if MANIFEST not in names:
            raise UsageError(f"cannot --resume: {out} holds no {MANIFEST}")
        previous = json.loads(_read_bytes(_join(out, MANIFEST)))
        if previous.get("layout") != plan.layout():
            raise UsageError(f"cannot --resume into {out}: it holds a run of other input files or another "
                             f"--shard-size; use a new -o DIR")
        if seed is None:
            seed = previous.get("seed")
        done = {n for n in names if n.startswith("part-")}
    else:
        stale += [n for n in names if (n.startswith("part-") and n.endswith(".jsonl")) or n == MANIFEST]
    return Prepared(out, plan, [s for s in plan.shards if s.name not in done], seed, stale)


def _start_output(prepared: Prepared, seed: int) -> None:
    out = prepared.out
    if _remote(out):
        filesystem, path = _pa_fs(out)
        filesystem.create_dir(path, recursive=True)  # a no-op on object stores
    else:
        os.makedirs(out, exist_ok=True)
    for name in prepared.stale:
        try:
            _delete(out, name)
        except FileNotFoundError:
            pass
    write_manifest(out, prepared.plan, seed)


def written(prepared: Prepared) -> int:
    """How many of the run's shards have their part file."""
    return len({s.name for s in prepared.plan.shards} & set(_listdir(prepared.out)))


def write_manifest(out: str, plan: Plan, seed: int) -> None:
    _write_whole(out, MANIFEST, json.dumps({"layout": plan.layout(), "seed": seed}, indent=1).encode())


def merge(out: str, plan: Plan, write: Callable[[bytes], None]) -> None:
    """The part files in shard order: one JSONL ordered by index."""
    missing = [s.name for s in plan.shards if s.name not in set(_listdir(out))]
    if missing:
        raise KgenError(f"cannot merge: {len(missing)} shards not written yet ({missing[0]}, ...); "
                        f"--resume completes them")
    for shard in plan.shards:
        write(_read_bytes(_join(out, shard.name)))


@dataclass
class RunStats:
    """What a run did: shards planned, skipped (--resume) and written, and per actor its shards,
    records, generated tokens and busy seconds (the cost model's tokens/s per actor)."""

    shards: int = 0
    skipped: int = 0
    written: int = 0
    records: int = 0
    failed: int = 0
    tokens: int = 0
    actors: dict = field(default_factory=dict)

    def add(self, row: dict) -> None:
        self.written += 1
        self.records += int(row["records"])
        self.failed += int(row["failed"])
        self.tokens += int(row["tokens"])
        a = self.actors.setdefault(str(row["actor"]), {"shards": 0, "records": 0, "tokens": 0, "seconds": 0.0,
                                                       "load_seconds": 0.0})
        a["shards"] += 1
        a["records"] += int(row["records"])
        a["tokens"] += int(row["tokens"])
        a["seconds"] += float(row["seconds"])
        a["load_seconds"] += float(row["load_seconds"])

    def actor_lines(self) -> list[str]:
        return [f"actor {name}: {a['shards']} shards, {a['records']} prompts, {a['tokens']} tokens in "
                f"{a['seconds']:.1f}s ({a['tokens'] / max(a['seconds'], 1e-9):.1f} tokens/s, "
                f"{a['records'] / max(a['seconds'], 1e-9):.2f} prompts/s), model loaded in {a['load_seconds']:.1f}s"
                for name, a in sorted(self.actors.items())]


def run_batch(prepared: Prepared, job: Job, cluster: Cluster, *, stats: RunStats | None = None,
              watch: Callable = iter, progress: bool = False, verbose: bool = False,
              on_log: Callable[[str], None] | None = None) -> RunStats:
    """Run the shards still to run on Ray and return the figures. The model is resolved here
    first (a registry model fetched once, a missing file an error before Ray starts; `on_log`
    gets the notes). `watch` wraps the stream of finished shards (the command makes its waits
    interruptible by its signals); `stats` fills as shards finish, so a caller that is
    interrupted still knows what was written."""
    from dataclasses import fields, replace
    from enum import Enum

    from kgen_cli.runner import random_seed

    model = model_for_actors(job.engine.model, family=job.engine.family, progress=progress, on_log=on_log)
    plain = {f.name: getattr(job.options, f.name) for f in fields(job.options)}  # the CLI's enums as values
    options = replace(job.options, **{k: v.value for k, v in plain.items() if isinstance(v, Enum)})
    seed = random_seed() if prepared.seed is None else prepared.seed
    job = replace(job, options=options, model=model, out=prepared.out, input_format=prepared.plan.input_format,
                  base_seed=seed)
    _start_output(prepared, seed)
    stats = stats if stats is not None else RunStats()
    stats.shards = len(prepared.plan.shards)
    stats.skipped = stats.shards - len(prepared.todo)
    if not prepared.todo:
        return stats
    rows = [{"shard": s.to_json()} for s in prepared.todo]
    for row in map_on_actors(rows, _ShardWorker, {"job": job}, cluster, watch=watch, progress=progress,
                             verbose=verbose):
        stats.add(row)
    return stats


def model_for_actors(model: str | None, *, family: str | None, **load_kwargs) -> str:
    """What each actor loads: a registry model by name (fetched here first, once; each node
    resolves its own copy), a local file by its full path (missing: an error before Ray starts)."""
    from kgen_cli.api import load

    with load(model, family=family, lazy=True, **load_kwargs) as gen:
        resolved = gen.model
    return model if resolved.spec is not None else str(Path(resolved.path).resolve())


def map_on_actors(rows: list[dict], worker: type, kwargs: dict, cluster: Cluster, *, watch: Callable = iter,
                  progress: bool = False, verbose: bool = False) -> Iterator[dict]:
    """Run `worker` over `rows` on a pool of Ray actors and yield its output rows as they come.

    Each row is one Ray batch (`batch_size=1`); each actor is one `worker(**kwargs)` (its model
    loaded once) with `cluster.threads` CPUs (and `cluster.gpus` GPUs) reserved. A local Ray is
    started for the call (and stopped after it) unless this process already joined one. `watch`
    wraps the stream (the command makes its waits interruptible by its signals); an interrupted
    or failed run stops Ray Data's execution, its actors with it."""
    ray = require_ray()
    _ray_notes_off_stdout(verbose)
    started_here = not ray.is_initialized()
    if started_here:
        _init_ray(ray, cluster.address, verbose)
    out = _pool_rows(ray, rows, worker, kwargs, cluster, progress, verbose)
    try:
        yield from watch(out)
    except ray.exceptions.RayError as exc:
        raise _ray_failure(exc) from exc
    finally:
        out.close()
        if started_here:
            ray.shutdown()


_RAY_NOTES = {"show": False}  # the cluster's error notes on stderr (--verbose) or nowhere


def _ray_notes_off_stdout(verbose: bool) -> None:
    """Ray's driver prints the cluster's error notes ("Task ... will be retried" after an actor
    died) on stdout, whatever `log_to_driver` says (`ray._private.worker.listen_error_messages`
    calls `print_to_stdstream` with `is_err` False). kgen's stdout carries results only: they go
    to stderr with --verbose, else nowhere (a failure that matters reaches kgen as an exception).
    Patched by name in Ray's module, where the listener looks it up; a Ray without it is left be."""
    _RAY_NOTES["show"] = verbose
    try:
        from ray._private import worker
    except ImportError:
        return
    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "kgen", False):
        return

    def print_to_stdstream(data, *args, **kwargs):
        if data.get("pid") == "raylet" and not data.get("is_err"):
            if not _RAY_NOTES["show"]:
                return
            data = {**data, "is_err": True}
        return original(data, *args, **kwargs)

    print_to_stdstream.kgen = True
    worker.print_to_stdstream = print_to_stdstream


def _ray_failure(exc: BaseException) -> KgenError:
    """What failed on the cluster, as one line: an actor's own KgenError (a model missing on a
    node) as it was raised, anything else by the last line of Ray's report (its traceback's)."""
    import re

    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, KgenError):
            return e
        todo += [e.__cause__, getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), BaseException)
                 else None]
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if ln.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return KgenError(f"on Ray: {last.removeprefix('kgen_cli.errors.')}")


def _init_ray(ray, address: str | None, verbose: bool) -> None:
    """Start a local Ray or join a cluster. Ray's own chatter on stderr (start-up notes, its C++
    core's warnings about Ray Data's actors, the actors' llama.cpp log) only with --verbose."""
    import logging

    if not verbose:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # read by Ray's C++ core as it starts
    kwargs: dict[str, Any] = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    try:
        with _stderr_held(not verbose):
            if address is None:
                ray.init(include_dashboard=False, **kwargs)  # a local Ray (or RAY_ADDRESS's cluster)
            else:
                ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = "a local Ray" if address is None else f"Ray at {address}"
        raise KgenError(f"cannot start {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


@contextmanager
def _stderr_held(hold: bool):
    """File descriptor 2 (where Ray's C++ core writes, past Python's sys.stderr) caught while
    Ray starts, and shown only if starting fails."""
    if not hold:
        yield
        return
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            caught.seek(0)
            sys.stderr.write(caught.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _pool_rows(ray, rows: list[dict], worker: type, kwargs: dict, cluster: Cluster, progress: bool,
               verbose: bool) -> Iterator[dict]:
    """The worker's output rows, as Ray's actors finish the input rows."""
    import logging

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    if not verbose:  # Ray Data's notes stay in its log files, off stderr
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler):  # failures reach the caller as exceptions
                handler.setLevel(logging.CRITICAL)
    if cluster.actors is not None:
        low, high = cluster.actors
    else:  # as many actors as the cluster has CPUs for
        low = high = max(1, int(ray.cluster_resources().get("CPU", 1) // cluster.threads))
    high = min(high, len(rows))  # more actors than rows would only load the model for nothing
    low = min(low, high)
    strategy = ray.data.ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=1)
    items = ray.data.from_items(rows, override_num_blocks=len(rows))
    done = items.map_batches(worker, fn_constructor_kwargs=kwargs, batch_size=1, compute=strategy,
                              num_cpus=cluster.threads, num_gpus=cluster.gpus or None)
    yield from done.iter_rows()
