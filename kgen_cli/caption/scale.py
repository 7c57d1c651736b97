"""`kgen caption --ray`: the captioning run on a Ray cluster, each actor holding one model.

The driver finds the images (as a local run numbers them: image i gets seed S + i) and cuts them
into fixed shards of `shard_size` images by index; the shards are the rows of a Ray Dataset and
`scale.map_on_actors` runs them on an actor pool. Each actor (`_CaptionWorker`) opens its backend
once (a TIPO `Generator` or a local instruct model, on `threads` CPUs) and runs a `Captioner` over
each shard's images exactly as a local `kgen caption` runs over its dataset: the same stages,
records and seeds. The records come back to the driver, which prints and counts them.

Exactly once: every caption file is written whole by `output.write_caption` (a temporary file
renamed or linked into place), so a shard Ray retries after its actor died, or a rerun, cannot
leave a half-written caption. With `--existing skip` (the default) the retried shard skips the
captions the lost actor finished and writes the rest; with `overwrite` it writes them again, in
place. `append` and `prepend` would add a second caption to a file the lost actor had finished,
so `--ray` refuses them (`check_ray_policy`). The images and the caption folder must be on a path
every node sees (a shared or network file system): a caption is a file beside its image.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from kgen_cli.caption.discovery import ImageItem
from kgen_cli.caption.output import Existing
from kgen_cli.caption.run import CaptionSettings, Captioner
from kgen_cli.errors import UsageError
from kgen_cli.scale import Cluster, crash_hook, map_on_actors

RAY_BACKENDS = ("tipo", "chat")  # models the actors hold; an openai server scales by itself


def check_ray_policy(backend: str, existing: Existing) -> None:
    """What --ray cannot do, as usage errors before any image is read."""
    if backend not in RAY_BACKENDS:
        raise UsageError(f"--ray runs a model on each actor (--backend {' or '.join(RAY_BACKENDS)}); "
                         f"an {backend} server takes concurrent requests with --parallel instead")
    if existing in (Existing.append, Existing.prepend):
        raise UsageError(f"--existing {existing.value} is not safe to retry (a shard Ray runs again would add "
                         f"its captions twice); with --ray use skip or overwrite")


@dataclass
class CaptionJob:
    """What every actor needs: the run's settings (seed included), the backend and the model it
    loads (a registry name, or a file's full path), and the engine options of `backends.load_*`
    (`threads` is the actor's)."""

    settings: CaptionSettings
    backend: str
    model: str
    model_name: str
    max_tokens: int
    engine: dict
    chat_template: str | None = None
    wiki: str | None = None
    crash: dict | None = None  # tests only: see scale.crash_hook


def shard_rows(items: list[ImageItem], shard_size: int) -> list[dict]:
    """The images cut into shards of `shard_size` by index, one Ray row each."""
    if shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    rows = []
    for start in range(0, len(items), shard_size):
        part = [[i.index, str(i.path), str(i.rel), str(i.tag_path)] for i in items[start:start + shard_size]]
        rows.append({"shard": json.dumps(part)})
    return rows


def shard_items(text: str) -> list[ImageItem]:
    return [ImageItem(index, Path(path), Path(rel), Path(tags)) for index, path, rel, tags in json.loads(text)]


def open_backend(job: CaptionJob):
    """The job's backend, loaded (what each actor holds)."""
    from kgen_cli.caption import backends

    if job.backend == "chat":
        return backends.load_chat(Path(job.model), chat_template=job.chat_template, max_tokens=job.max_tokens,
                                  **job.engine)
    return backends.load_tipo(job.model, max_tokens=job.max_tokens, **job.engine)


class _CaptionWorker:
    """The Ray actor: one backend (the model loaded at the first image that needs it); each call
    captions the images of a Ray batch's shards and returns their records."""

    def __init__(self, job: CaptionJob):
        self.job = job
        self.backend = None
        self.table = None
        self.actor = f"{os.uname().nodename}:{os.getpid()}"

    def _open(self):
        if self.backend is None:
            self.backend = open_backend(self.job)
        return self.backend

    def _wiki(self):
        """The wiki table, read once per actor (when a tag first needs describing), not per shard."""
        if self.table is None:
            from kgen_cli.caption.wiki import open_wiki

            self.table = open_wiki(self.job.wiki)
        return self.table

    def __call__(self, batch: dict) -> dict:
        job = self.job
        out: list[str] = []
        crash = crash_hook(job.crash) or (lambda: None)
        wiki = cache = None
        if job.wiki:
            from kgen_cli.caption.wiki import CACHE_FILE, DescriptionCache
            from kgen_cli.paths import kgen_home

            cache = DescriptionCache(kgen_home() / CACHE_FILE)  # each node's own cache
            wiki = self._wiki

        def on_record(record: dict) -> None:
            out.append(json.dumps(record, ensure_ascii=False))
            crash()

        try:
            for text in batch["shard"]:
                captioner = Captioner(job.settings, self._open, model_name=job.model_name, on_record=on_record,
                                      wiki=wiki, cache=cache)
                captioner.run(shard_items(str(text)))
        finally:
            if cache is not None:
                cache.close()
        return {"record": out, "actor": [self.actor] * len(out)}


def run(items: list[ImageItem], job: CaptionJob, cluster: Cluster, *, shard_size: int, watch: Callable = iter,
        verbose: bool = False) -> Iterator[tuple[dict, str]]:
    """Caption `items` on Ray; yields (record, actor) for each image, the record as a local run's
    `on_record` gets it, as its shard finishes (the caller shows progress by records: Ray Data's
    bars stay off)."""
    for row in map_on_actors(shard_rows(items, shard_size), _CaptionWorker, {"job": job}, cluster, watch=watch,
                             verbose=verbose):
        yield json.loads(row["record"]), str(row["actor"])
