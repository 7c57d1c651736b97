"""Caption prompt templates: three presets (as the seed captioner ships) or the user's `@FILE`.

A template is the user message sent to the instruct model. `{name}` inserts a variable (`{{` and
`}}` are literal braces); an unknown variable is a usage error, reported before any model loads.
Variables: {tags} (the shaped tags, comma-separated), {tag_descriptions} (one "tag: description"
line per described tag), {image_description} (the vision stage's text), {name} (the image's file
name without extension), {directory} (its folder's name), {trigger} (--trigger).
"""

from __future__ import annotations

import re
from pathlib import Path

from kgen_cli.errors import UsageError
from kgen_cli.formats.templates import MAX_TEMPLATE_BYTES

VARIABLES = ("tags", "tag_descriptions", "image_description", "name", "directory", "trigger")

# The instructions come first and the image's own text last: every prompt of a run then starts
# with the same long prefix, which kgen's scheduler decodes once and shares (and a server's
# prompt cache reuses), so only the tags and the answer cost time per image.
_RULES = (
    "Write in plain English, present tense, as one paragraph. Describe only what the tags say; "
    "do not invent details, do not list the tags, do not mention tags, Danbooru or the image file. "
    "Reply with the caption only."
)
_DESCRIPTION = ("A description of the image by another model follows the tags; it may be wrong where it "
                "contradicts them.")

PRESETS: dict[str, str] = {
    "short": (
        "Write a short caption (one to three sentences) for an image. " + _RULES + " " + _DESCRIPTION + "\n\n"
        "What the tags mean:\n{tag_descriptions}\n\n"
        "Image tags: {tags}\n\n"
        "Image description: {image_description}"
    ),
    "short-no-description": (
        "Write a short caption (one to three sentences) for an image. " + _RULES + "\n\n"
        "What the tags mean:\n{tag_descriptions}\n\n"
        "Image tags: {tags}"
    ),
    "long": (
        "Write a detailed caption (a paragraph of four to eight sentences) for an image: the subject, "
        "their appearance and clothing, pose and expression, then the setting, composition and style. "
        + _RULES + " " + _DESCRIPTION + "\n\n"
        "What the tags mean:\n{tag_descriptions}\n\n"
        "Image tags: {tags}\n\n"
        "Image description: {image_description}"
    ),
}

# The summarisation prompt of the tag-description stage (its text is part of the cache key).
DESCRIBE_TEMPLATE = (
    "Below is the wiki entry of the Danbooru tag \"{tag}\". In one short sentence, say what the tag "
    "means when it is used on an image, so that someone who never saw the wiki understands it. "
    "Reply with the sentence only.\n\nWiki entry:\n{wiki}"
)

_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def resolve_template(spec: str) -> str:
    """A preset name or `@FILE` (UTF-8, at most MAX_TEMPLATE_BYTES) -> the template text, validated."""
    if spec.startswith("@"):
        from kgen_cli.paths import read_small_file

        path = Path(spec[1:]).expanduser()
        text, origin = read_small_file(path, "template file", MAX_TEMPLATE_BYTES), str(path)
    elif spec in PRESETS:
        text, origin = PRESETS[spec], f"preset {spec}"
    else:
        raise UsageError(f"unknown template {spec!r}; use a preset ({', '.join(PRESETS)}) or @FILE")
    if not text.strip():
        raise UsageError(f"the template {origin} is empty")
    variables(text, origin)
    return text


def variables(template: str, origin: str = "the template") -> set[str]:
    """The variables a template uses; UsageError for an unknown one or a lone brace."""
    used = set()
    for match in _FIELD.finditer(template):
        token = match.group(0)
        if token in ("{{", "}}"):
            continue
        name = match.group(1)
        if name is None:
            raise UsageError(f"a lone '{token}' in {origin}: write {token * 2} for a literal brace")
        if name not in VARIABLES:
            known = ", ".join("{" + v + "}" for v in VARIABLES)
            raise UsageError(f"unknown variable {{{name}}} in {origin}; known: {known}")
        used.add(name)
    return used


def render(template: str, values: dict[str, str]) -> str:
    """The template with its variables filled (a missing value is empty)."""
    def fill(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        return values.get(match.group(1), "")

    return _FIELD.sub(fill, template)


def describe_prompt(tag: str, wiki: str) -> str:
    return DESCRIBE_TEMPLATE.replace("{tag}", tag).replace("{wiki}", wiki)
