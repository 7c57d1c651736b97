"""One captioning run: prepare each image, describe its tags, write its caption, report it.

Stages (the seed captioner's, run locally or over HTTP):
1. prepare: read the image header (size) and the tag file, shape the tags, decide the caption
   file; with `--existing skip` an image whose caption exists is done already (a resume).
2. describe (chat/openai, with a wiki table): each tag of the pending images that has a wiki page
   and no cached summary is summarised by the model into one line, stored in the cache as it ends.
3. caption: per image, optionally a vision model's description of the pixels (openai), then the
   caption from the template (chat/openai) or TIPO's tags-to-natural-language operation (tipo).
Every image ends in exactly one record (written, appended, prepended, skipped or error), in the
order the jobs finish; image i (sorted path order) uses seed S + i.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kgen_cli.caption import templates
from kgen_cli.caption.backends import ChatCall
from kgen_cli.caption.discovery import ImageItem, image_data_uri, image_size, read_tags
from kgen_cli.caption.output import Existing, caption_path, pending, write_caption
from kgen_cli.caption.shaping import TagShaping
from kgen_cli.caption.wiki import WIKI_PROMPT_CHARS, DescriptionCache, Wiki
from kgen_cli.errors import KgenError, StopRequested
from kgen_cli.formats.syntax import escape, tag_key
from kgen_cli.sampling import SamplingParams, derive_seed

BACKENDS = ("tipo", "chat", "openai")

# Instruct-model sampling for captions and tag summaries (the summaries are short and factual).
CHAT_PARAMS = SamplingParams(temperature=0.6, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.1, max_tokens=256)
DESCRIBE_PARAMS = SamplingParams(temperature=0.2, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.1, max_tokens=80)
VISION_PROMPT = ("Describe this image in a few sentences: who or what is in it, where things are, "
                 "what they look like and do, and the setting. Describe only what you can see.")
NONE_TEXT = "(none)"

_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S | re.I)


def clean_text(text: str) -> str:
    """A model's answer as one line: reasoning blocks (<think>...</think>) and surrounding quotes
    removed, whitespace collapsed."""
    text = " ".join(_THINK.sub(" ", text).split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


@dataclass
class CaptionSettings:
    backend: str = "tipo"
    template: str = ""  # the resolved caption template (chat/openai)
    shaping: TagShaping = field(default_factory=TagShaping)
    caption_ext: str = ".caption"
    out_dir: Path | None = None
    existing: Existing = Existing.skip
    seed: int = 0
    params: SamplingParams = CHAT_PARAMS
    describe_params: SamplingParams = DESCRIBE_PARAMS
    tipo_options: dict = field(default_factory=dict)  # temperature / max_tokens over TIPO's defaults
    nl_length: str = "long"
    vision_model: str | None = None
    fail_fast: bool = False


@dataclass
class Prepared:
    item: ImageItem
    out: Path
    tags: list[str]
    size: tuple[int, int]


@dataclass
class RunStats:
    images: int = 0
    written: int = 0
    skipped: int = 0
    failed: int = 0
    described_cached: int = 0  # tags whose summary came from the cache
    summarised: int = 0  # summarisation calls made (each ended, with a description or an error)
    summaries_failed: int = 0
    no_wiki_page: int = 0

    def summary(self, *, describe_only: bool = False) -> str:
        parts = [] if describe_only else [
            f"{self.written} captioned, {self.skipped} skipped, {self.failed} failed of {self.images} images"]
        if describe_only or self.described_cached or self.summarised or self.no_wiki_page:
            parts.append(f"tag descriptions: {self.described_cached} cached, {self.summarised} summarised"
                         f"{f' ({self.summaries_failed} failed)' if self.summaries_failed else ''}, "
                         f"{self.no_wiki_page} without a wiki page")
        return "; ".join(parts)


class FailFast(StopRequested):
    """--fail-fast: the first failed image stops the run."""


class Captioner:
    """Runs the stages over a backend (`backends.TipoBackend`, `LocalBackend` or `OpenAIBackend`),
    opened by `open_backend()` only once there is a model call to make (a rerun with every
    caption written loads no model).

    `on_record(record)` sees every image's record once, in the calling thread. `check()` runs
    between model steps and may raise StopRequested (signals) to stop: captions finished so far
    are on disk, no file is half-written. `wiki()` opens the wiki table (when a tag needs it);
    `cache` stores summaries under `model_name`."""

    def __init__(self, settings: CaptionSettings, open_backend: Callable[[], Any], *, model_name: str,
                 on_record: Callable[[dict], None], check: Callable[[], None] | None = None,
                 wiki: Callable[[], Wiki] | None = None, cache: DescriptionCache | None = None):  # fmt: skip
        self.settings, self.open_backend, self.model_name = settings, open_backend, model_name
        self._backend = None
        self.on_record, self.check, self.wiki, self.cache = on_record, check, wiki, cache
        self.stats = RunStats()
        self.uses = templates.variables(settings.template) if settings.template else set()

    @property
    def backend(self) -> Any:
        if self._backend is None:
            self._backend = self.open_backend()
        return self._backend

    @property
    def opened(self) -> Any:
        """The backend, if it was opened (None otherwise)."""
        return self._backend

    # records

    def _record(self, item: ImageItem, out: Path | None, **fields: Any) -> dict:
        record = {"index": item.index, "image": str(item.path), "tags_file": str(item.tag_path),
                  "caption_file": str(out) if out else None, "backend": self.settings.backend,
                  "model": self.model_name, "seed": derive_seed(self.settings.seed, item.index)}
        record.update(fields)
        return record

    def emit(self, record: dict) -> None:
        """Count one image's record and pass it to `on_record` (--fail-fast: stop at an error)."""
        status = record["status"]
        if status == "error":
            self.stats.failed += 1
        elif status == "skipped":
            self.stats.skipped += 1
        else:
            self.stats.written += 1
        self.on_record(record)
        if status == "error" and self.settings.fail_fast:
            raise FailFast(f"{record['image']}: {record['error']}")

    # stage 1

    def prepare(self, items: list[ImageItem]) -> list[Prepared]:
        """The images still to caption; records for those skipped or unreadable are emitted."""
        s = self.settings
        self.stats.images += len(items)
        todo = []
        for item in items:
            if self.check is not None:
                self.check()  # a signal while reading many headers stops here
            out = None
            try:
                out = caption_path(item, s.caption_ext, s.out_dir)
                if not pending(out, s.existing):
                    self.emit(self._record(item, out, status="skipped"))
                    continue
                size = image_size(item.path)
                tags = s.shaping.tags(read_tags(item.tag_path))
                if not tags:
                    raise KgenError(f"{item.tag_path}: no tags left after shaping")
            except KgenError as exc:
                self.emit(self._record(item, out, status="error", error=str(exc)))
                continue
            todo.append(Prepared(item, out, tags, size))
        return todo

    # stage 2

    def describe(self, tags: list[str]) -> dict[str, str]:
        """tag_key -> one-line description of each tag that has one (cached or summarised now)."""
        if self.wiki is None or self.cache is None:
            return {}
        display: dict[str, str] = {}
        for tag in tags:
            display.setdefault(tag_key(tag), tag)
        table = self.wiki()
        template = templates.DESCRIBE_TEMPLATE
        found = self.cache.get_many(sorted(display), table.revision, self.model_name, template)
        self.stats.described_cached += len(found)
        pages = table.pages({k for k in display if k not in found}) if len(found) < len(display) else {}
        missing = [k for k in sorted(display) if k in pages]
        self.stats.no_wiki_page += len(display) - len(found) - len(missing)
        if not missing:
            return found
        seed = self.settings.seed

        def job(key: str):
            prompt = templates.describe_prompt(display[key], pages[key][:WIKI_PROMPT_CHARS])
            answer = yield ChatCall((("user", prompt),), seed, self.settings.describe_params)
            return clean_text(answer)

        def on_result(key: str, text: str | None, error: BaseException | None) -> None:
            self.stats.summarised += 1
            if error is not None or not text:
                self.stats.summaries_failed += 1
                return
            self.cache.put(key, table.revision, self.model_name, template, text)
            found[key] = text

        self.backend.run(((k, job(k)) for k in missing), on_result, self.check)
        return found

    # stage 3

    def _values(self, p: Prepared, descriptions: dict[str, str], image_description: str) -> dict[str, str]:
        lines = [f"- {t}: {descriptions[tag_key(t)]}" for t in p.tags if tag_key(t) in descriptions]
        return {"tags": ", ".join(p.tags), "tag_descriptions": "\n".join(lines) or NONE_TEXT,
                "image_description": image_description or NONE_TEXT, "name": p.item.path.stem,
                "directory": p.item.path.parent.name, "trigger": self.settings.shaping.trigger}

    def _chat_job(self, p: Prepared, descriptions: dict[str, str]):
        s = self.settings
        seed = derive_seed(s.seed, p.item.index)
        prompts, image_description = [], ""
        if s.vision_model:
            content = [{"type": "text", "text": VISION_PROMPT},
                       {"type": "image_url", "image_url": {"url": image_data_uri(p.item.path)}}]
            prompts.append(VISION_PROMPT)
            image_description = clean_text((yield ChatCall((("user", content),), seed, s.params, s.vision_model)))
        prompt = templates.render(s.template, self._values(p, descriptions, image_description))
        prompts.append(prompt)
        caption = clean_text((yield ChatCall((("user", prompt),), seed, s.params)))
        extra = {"image_description": image_description} if s.vision_model else {}
        return {"prompts": prompts, "caption": caption, **extra}

    def _tipo_request(self, p: Prepared) -> dict:
        """The expand request of TIPO's tags-to-prose operation alone: the automatic plan with
        no tag expansion is one `tag_to_long` call whose prompt ends in the empty NL field, so
        the model writes prose and never adds tags."""
        s = self.settings
        width, height = p.size
        return {"tags": ", ".join(escape(t, "()[]") for t in p.tags), "seed": derive_seed(s.seed, p.item.index),
                "expand_tags": False, "nl_length": s.nl_length, "aspect_ratio": width / height,
                "format": "nl-only", **s.tipo_options}

    def caption(self, todo: list[Prepared], descriptions: dict[str, str] | None = None) -> None:
        s = self.settings
        started: dict[int, float] = {}
        by_index = {p.item.index: p for p in todo}

        def jobs():
            for p in todo:
                started[p.item.index] = time.perf_counter()
                yield p.item.index, (self._tipo_request(p) if s.backend == "tipo" else self._chat_job(p, descriptions or {}))

        def on_expanded(index: int, result: Any, error: BaseException | None) -> None:
            value = None if error else {"prompts": [c.prompt for c in result.calls], "caption": clean_text(result.formatted)}
            on_result(index, value, error)

        def on_result(index: int, value: dict | None, error: BaseException | None) -> None:
            p = by_index[index]
            seconds = round(time.perf_counter() - started[index], 4)
            base = {"tags": p.tags, "width": p.size[0], "height": p.size[1]}
            if error is None and not value["caption"]:
                error = KgenError("the model wrote no caption")
            if error is None:
                caption = s.shaping.caption(value["caption"])
                try:
                    status = write_caption(p.out, caption, s.existing)
                except OSError as exc:
                    error = KgenError(f"cannot write {p.out}: {exc.strerror or exc}")
            if error is not None:
                self.emit(self._record(p.item, p.out, status="error", error=str(error), **base,
                                        **({"prompts": value["prompts"]} if value else {}), seconds=seconds))
                return
            self.emit(self._record(p.item, p.out, status=status, **base, prompts=value["prompts"],
                                    **{k: v for k, v in value.items() if k not in ("prompts", "caption")},
                                    caption=caption, seconds=seconds))

        if s.backend == "tipo":
            self.backend.expand(jobs(), on_expanded, self.check)
        else:
            self.backend.run(jobs(), on_result, self.check)

    def run(self, items: list[ImageItem], *, describe_only: bool = False) -> RunStats:
        """All stages. `describe_only`: fill the description cache for every image's tags."""
        if describe_only:
            self.stats.images += len(items)
            tags = []
            for item in items:
                try:
                    tags += self.settings.shaping.tags(read_tags(item.tag_path))
                except KgenError:
                    continue
            self.describe(tags)
            return self.stats
        todo = self.prepare(items)
        descriptions = {}
        if todo and "tag_descriptions" in self.uses:
            descriptions = self.describe([t for p in todo for t in p.tags])
        if todo:
            self.caption(todo, descriptions)
        return self.stats
