"""Where captions go and how they are written: sidecars, --out-dir, the --existing policy.

Every file is written whole or not at all: the text goes to a temporary file in the target's
folder, which is then renamed over the target (`skip` links it instead, so a caption another run
wrote meanwhile is never replaced). A rerun with `skip` (the default) resumes an interrupted run.
`append` / `prepend` put the new caption after / before the file's text, on its own line.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

from kgen_cli.caption.discovery import ImageItem
from kgen_cli.errors import UsageError


class Existing(str, Enum):
    skip = "skip"
    overwrite = "overwrite"
    append = "append"
    prepend = "prepend"


def caption_path(item: ImageItem, caption_ext: str, out_dir: Path | None) -> Path:
    """The caption file of an image: beside it, or at its relative path under `out_dir`."""
    if out_dir is None:
        return item.path.with_suffix(caption_ext)
    if item.rel.is_absolute() or ".." in item.rel.parts:
        raise UsageError(f"{item.path} is outside the dataset folder: --out-dir cannot mirror it")
    return (out_dir / item.rel).with_suffix(caption_ext)


def check_policy(items: list[ImageItem], caption_ext: str, out_dir: Path | None, existing: Existing) -> None:
    """A caption may replace its tag file only when asked for explicitly (`--existing overwrite`)."""
    if existing is Existing.overwrite:
        return
    for item in items[:1]:
        if caption_path(item, caption_ext, out_dir) == item.tag_path:
            raise UsageError("the captions would go into the tag files; that needs --existing overwrite "
                             "(or choose another --caption-ext, or --out-dir)")


def pending(path: Path, existing: Existing) -> bool:
    """Whether this image still needs a caption (False: `skip` and a caption is there)."""
    return existing is not Existing.skip or not path.exists()


def write_caption(path: Path, caption: str, existing: Existing) -> str:
    """Write one caption atomically; returns what happened: written, skipped, appended, prepended."""
    text = caption.rstrip("\n") + "\n"
    if existing in (Existing.append, Existing.prepend):
        try:
            old = path.read_text(encoding="utf-8").rstrip("\n")
        except FileNotFoundError:
            old = ""
        if old:
            text = f"{old}\n{text}" if existing is Existing.append else f"{text}{old}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if existing is Existing.skip:
            try:
                os.link(tmp, path)  # fails if the file appeared meanwhile: never replaces it
            except FileExistsError:
                return "skipped"
            except OSError:  # a file system without hard links
                if path.exists():
                    return "skipped"
                os.replace(tmp, path)
            return "written"
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {Existing.append: "appended", Existing.prepend: "prepended"}.get(existing, "written")
