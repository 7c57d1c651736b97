"""Finding a dataset's images and their tag files, and reading what a caption needs of them.

Images are found by extension (case-insensitive) in a folder, optionally recursively (a folder
reached twice through symlinks is scanned once), or listed one per line in a FILELIST (relative
paths are relative to the list's folder). Their order is the sorted order of their paths relative
to the root: image i gets seed S + i, whatever order the file system lists them in.

Only the image header is read for the size (Pillow's `Image.open` is lazy). Pixels are decoded
only for a vision stage (`image_data_uri`), with Pillow's decompression-bomb limit enforced.
"""

from __future__ import annotations

import base64
import io
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from kgen_cli.errors import KgenError, UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
FILELIST_MAX_BYTES = 64 << 20
TAG_FILE_MAX_BYTES = 1 << 20
VISION_MAX_SIDE = 1024  # the longest side of the image a vision model is sent


class ItemError(KgenError):
    """One image cannot be captioned (unreadable image or tag file): its record's error."""


@dataclass(frozen=True)
class ImageItem:
    index: int  # position in sorted path order: the image's seed is S + index
    path: Path  # the image
    rel: Path  # path relative to the dataset root (mirrored under --out-dir)
    tag_path: Path  # the same-name tag file (may be missing)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def check_extension(ext: str, option: str) -> str:
    """'.txt' or 'txt' -> '.txt'; refuses an empty one or one with a path separator."""
    ext = ext.strip()
    if ext and not ext.startswith("."):
        ext = "." + ext
    if len(ext) < 2 or "/" in ext or os.sep in ext or ext.lower() in IMAGE_EXTENSIONS:
        raise UsageError(f"{option} must be a file extension such as .txt, not {ext!r}")
    return ext


def find_images(source: Path, *, recursive: bool, tags_ext: str) -> tuple[Path, list[ImageItem]]:
    """(dataset root, images in sorted order) of a folder or a FILELIST."""
    if source.is_dir():
        root = source
        paths = list(_scan(source, recursive))
    elif source.is_file():
        if recursive:
            raise UsageError("--recursive applies to a folder, not a FILELIST")
        root = source.parent
        paths = _read_filelist(source)
    else:
        raise UsageError(f"{source} is neither a folder nor a file list")
    rels = sorted({Path(os.path.relpath(p, root)) for p in paths}, key=lambda p: p.as_posix())
    items = []
    for i, rel in enumerate(rels):
        path = root / rel
        items.append(ImageItem(i, path, rel, path.with_suffix(tags_ext)))
    return root, items


def _scan(folder: Path, recursive: bool):
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            st = current.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop, or the same folder linked twice
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = list(os.scandir(current))
        except OSError as exc:
            if current == folder:
                raise UsageError(f"cannot read {folder}: {exc.strerror}") from None
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    if recursive:
                        stack.append(path)
                elif entry.is_file() and is_image(path):
                    yield path
            except OSError:
                continue


def _read_filelist(path: Path) -> list[Path]:
    from kgen_cli.paths import read_small_file

    text = read_small_file(path, "file list", FILELIST_MAX_BYTES)
    paths = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry = Path(line).expanduser()
        entry = entry if entry.is_absolute() else path.parent / entry
        if not is_image(entry):
            raise UsageError(f"{path}:{number}: {line} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
        paths.append(entry)
    return paths


_header_lock = threading.Lock()


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels. ItemError when the
    file is missing, not an image, or of a format other than the supported ones."""
    from PIL import Image, UnidentifiedImageError

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ItemError("not a regular file")  # a fifo would block the reader
    except FileNotFoundError:
        raise ItemError("no such file") from None
    except OSError as exc:
        raise ItemError(f"cannot read the image: {exc.strerror}") from None
    with _header_lock:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # no pixels are decoded here
        try:
            with Image.open(path) as im:
                fmt, size = (im.format or "").lower(), im.size
        except FileNotFoundError:
            raise ItemError("no such file") from None
        except UnidentifiedImageError:
            raise ItemError("not a readable image") from None
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow's parsers raise these on bad headers
            raise ItemError(f"cannot read the image header ({exc})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    if fmt not in ("png", "jpeg", "webp", "bmp", "dib", "gif", "mpo"):
        raise ItemError(f"a {fmt.upper() or 'unknown'} image, not one of png, jpeg, webp, bmp, gif")
    if size[0] <= 0 or size[1] <= 0:
        raise ItemError(f"the image has no pixels ({size[0]}x{size[1]})")
    return size


def image_data_uri(path: Path, max_side: int = VISION_MAX_SIDE) -> str:
    """The image (a GIF's first frame) as a `data:image/png;base64,...` URI for a vision model,
    scaled down to `max_side`. Decodes the pixels with Pillow's decompression-bomb guard on."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                raise ItemError(f"{width}x{height} pixels is over Pillow's decompression-bomb limit "
                                f"({Image.MAX_IMAGE_PIXELS})")
            im.seek(0)
            im.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale
            frame = im.convert("RGB")
    except ItemError:
        raise
    except Image.DecompressionBombError as exc:
        raise ItemError(f"over Pillow's decompression-bomb limit ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ItemError(f"cannot decode the image ({exc})") from None
    frame.thumbnail((max_side, max_side))
    out = io.BytesIO()
    frame.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def read_tags(path: Path) -> str:
    """The tag file's text. ItemError when it is missing, empty, not UTF-8, not a regular file
    (a fifo is never waited on) or larger than TAG_FILE_MAX_BYTES."""
    from kgen_cli.paths import read_small_file

    if not path.exists():
        raise ItemError(f"no tag file {path}")
    try:
        text = read_small_file(path, "tag file", TAG_FILE_MAX_BYTES)
    except UsageError as exc:
        raise ItemError(str(exc)) from None
    if not text.strip():
        raise ItemError(f"tag file {path} is empty")
    return text
