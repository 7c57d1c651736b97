"""A small captioning dataset the tests write with Pillow, and a PNG whose header claims a huge size."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

# name -> (size, Pillow format, tag file text)
GOOD = {
    "a.png": ((64, 96), "PNG", "1girl, solo, long_hair, (blue_eyes:1.2), smile"),
    "b.jpg": ((120, 80), "JPEG", "1boy, outdoors, sky, tree"),
    "c.webp": ((50, 50), "WEBP", "cat, no_humans, sitting"),
    "d.BMP": ((30, 60), "BMP", "1girl, red_dress, standing"),
    "sub/e.gif": ((40, 20), "GIF", "landscape, mountain, snow"),
    "sub/f.JPEG": ((33, 77), "JPEG", "dog, grass, running"),
}
BAD = {"corrupt.png": "not a readable image", "notags.png": "no tag file"}


def make_dataset(root: Path, *, bad: bool = True) -> Path:
    from PIL import Image

    for name, (size, fmt, tags) in GOOD.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (200, 120, 40)).save(path, fmt)
        path.with_suffix(".txt").write_text(tags)
    if bad:
        (root / "corrupt.png").write_bytes(b"this is not an image")
        (root / "corrupt.txt").write_text("1girl")
        Image.new("RGB", (8, 8)).save(root / "notags.png")
    (root / "readme.md").write_text("not an image")
    return root


def good_images(root: Path, recursive: bool = True) -> list[Path]:
    return sorted(root / n for n in GOOD if recursive or "/" not in n)


def huge_png_header(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A PNG whose header says width x height (no pixel data worth decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path
