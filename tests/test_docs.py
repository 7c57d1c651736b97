"""docs/cli.md is generated from the Typer app (tools/cli_docs.py); this fails when it is stale."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "python tools/cli_docs.py docs/cli.md"


def test_cli_reference_is_up_to_date(tmp_path):
    out = tmp_path / "cli.md"
    subprocess.run([sys.executable, "tools/cli_docs.py", str(out)], cwd=ROOT, check=True, capture_output=True)
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert out.read_text(encoding="utf-8") == committed, f"docs/cli.md is stale; run: {REGENERATE}"


def test_defaults_written_into_help_survive_rich_markup():
    # Rich reads "[default: ...]" as a style tag and drops it unless the bracket is escaped.
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for shown in ("[default: TIPO 10, DTG 20]", "[default: tgts when -n > 1]", "[default: 0.95]"):
        assert shown in committed


def test_cli_reference_is_plain_markdown_with_the_short_help_option_and_examples():
    import re

    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert not re.search(r"&(#x?[0-9a-fA-F]+|[a-z]+);", committed)  # no HTML entities
    assert "* `-h, --help`: Show this message and exit." in committed
    assert "--help`" not in committed.replace("-h, --help`", "")
    sections = committed.split("\n## ")[1:]  # every command (and sub-command) has its examples
    assert sections and all(s.count("**Examples**:") >= 1 for s in sections)
    assert r"\<lora:…>" in committed  # would read as an HTML tag


def test_every_command_shows_two_or_three_examples_and_no_hard_line_breaks_in_its_help():
    from kgen_cli.cli import app
    import typer

    root = typer.main.get_command(app)
    ctx = root.make_context("kgen", [], resilient_parsing=True)
    commands = [(root, "kgen")]
    for name in root.list_commands(ctx):
        sub = root.get_command(ctx, name)
        commands.append((sub, name))
        if isinstance(sub, typer.core.TyperGroup):
            commands += [(sub.get_command(ctx, n), f"{name} {n}") for n in sub.list_commands(ctx)]
    for command, name in commands:
        if name == "models":
            continue  # a group: its sub-commands carry the examples
        lines = (command.epilog or "").partition("Examples:\n")[2].splitlines()
        assert 2 <= len(lines) <= 3 or name == "kgen" and len(lines) == 3, name
        for paragraph in (command.help or "").split("\n\n"):
            assert "\n" not in paragraph.strip(), f"{name}: a line break inside a help paragraph"


def test_retries_range_in_help_matches_the_pipeline():
    from kgen_cli.commands._options import RetriesOpt
    from kgen_cli.pipeline import MAX_RETRIES

    assert RetriesOpt.__metadata__[0].max == MAX_RETRIES


# --------------------------------------------------------------------------- docs in the repository

# Notes outside the repository that comments once cited; a reader has only the repository.
OUTSIDE_NOTES = re.compile(r"FORMATS\.md|PEERS\.md|LLAMA_CPP\.md|CAPTION_AND_SCALE\.md|shared/reference|§")
PENDING: set[str] = set()  # files still to be rewritten (none left)


def _sources():
    for folder in ("kgen_cli", "tests", "benchmarks"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_comments_cite_only_files_in_the_repository():
    found = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        if rel in PENDING or path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE_NOTES.search(line):
                found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, "cite docs/ instead of notes outside the repository:\n" + "\n".join(found)


def test_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):]
    package = ROOT / "kgen_cli"
    missing = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if path.name == "__init__.py" and path.parent != package:
            rel = path.parent.relative_to(package).as_posix() + "/"  # a subpackage: its folder
            if path.parent.name in ("commands", "formats"):
                continue  # their modules are listed one by one
        if f"`{rel}`" not in layout and f"`kgen_cli/{rel}`" not in layout:
            missing.append(rel)
    assert not missing, f"README.md's layout table does not list: {missing}"


def _anchors(markdown: str) -> set[str]:
    """Explicit `<a id>`s and GitHub's heading slugs."""
    ids = set(re.findall(r'<a id="([^"]+)"', markdown))
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        ids.add(slug)
    return ids


def test_links_to_sections_of_the_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
            linked = (page.parent / target).resolve() if target else page
            if linked.exists() and anchor not in _anchors(linked.read_text(encoding="utf-8")):
                broken.append(f"{page.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, f"links to sections that do not exist: {broken}"


def test_readme_quick_start_comes_first_and_the_set_up_commands_are_the_ones_ci_runs():
    from kgen_cli.console import human_size
    from kgen_cli.registry import load_registry

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
    assert len(commands) == 2
    quick, _, developer = readme.partition("## Development set-up")
    assert "## Quick start" in quick and "pip install .\n" in quick and "[test]" not in quick
    for command in commands:
        assert f"\n{command}\n" in developer
    default = load_registry().default_spec  # what the quick start says the first run downloads
    assert f"`{default.name}` ({human_size(default.size)}" in quick and default.repo in quick
