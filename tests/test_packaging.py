"""The wheel carries what an installed kgen needs: models.yaml, the tag lists and their licence."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"could not build the wheel here: {proc.stderr.strip().splitlines()[-1:]}")
    (path,) = out.glob("kgen_cli-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_ships_registry_tag_lists_and_licence(wheel):
    names = set(wheel.namelist())
    for required in [
        "kgen_cli/models.yaml",
        "kgen_cli/data/tag-lists/artist.txt",
        "kgen_cli/data/tag-lists/characters.txt",
        "kgen_cli/data/tag-lists/copyrights.txt",
        "kgen_cli/data/tag-lists/meta.txt",
        "kgen_cli/data/tag-lists/LICENSE-KGen",
    ]:
        assert required in names, required
    assert wheel.read("kgen_cli/models.yaml") == (ROOT / "models.yaml").read_bytes()


def test_wheel_declares_the_console_script(wheel):
    entry_points = next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))
    assert "kgen = kgen_cli:main" in wheel.read(entry_points).decode()
