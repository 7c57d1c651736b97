"""`<kgen home>/config.yaml`: the user's defaults for command options.

```yaml
expand:
  format: tag-only
  tag_length: short
  ban: [watermark, "re:^text"]
batch:
  parallel: 8
models download:
  quiet: true
```

A top-level key is a command (`expand`, `batch`, `models download`, ...); its keys are the
command's long option names, with `_` or `-` (`tag_length` = `tag-length`). Values go through
the same conversion and checks as on the command line. It is validated strictly, like
models.yaml: an unknown command or option, or a value the option refuses, is a one-line error
naming the file. Options given on the command line win over the file. The values become the
commands' defaults (click's `default_map`), so `--help` shows them too.

Import-light: yaml is imported only when the file exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kgen_cli.errors import RegistryError
from kgen_cli.paths import kgen_home
from kgen_cli.registry import _did_you_mean

CONFIG_FILE = "config.yaml"
# Options that only make sense for one run, never as a default.
# (These with a callback are excluded too: `_checked` runs an option's own processing.)
_NOT_DEFAULTS = ("help", "version", "install_completion", "show_completion", "resume", "show_prompt")


class ConfigError(RegistryError):
    """config.yaml is malformed or names an option that does not exist. Exit status 2."""


def config_path() -> Path:
    return kgen_home(create=False) / CONFIG_FILE


def read_config() -> dict[str, Any] | None:
    """The file's mapping as written (None when there is no file); not validated."""
    path = config_path()
    if not path.is_file():
        return None
    from kgen_cli.registry import load_yaml  # strictly, as models.yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from exc
    data = load_yaml(str(path), text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of commands to their option defaults")
    return data


def default_map(root) -> dict[str, Any] | None:
    """The validated config as click's `default_map` for the CLI's root command (a click
    Group), or None when there is no config file."""
    data = read_config()
    if data is None:
        return None
    import typer

    where = config_path()
    commands = _commands(root)
    result: dict[str, Any] = {}
    for key, options in data.items():
        name = " ".join(str(key).split())
        command = commands.get(name)
        if command is None:
            raise ConfigError(f"{where}: unknown command '{key}'{_did_you_mean(name, commands)}")
        if options is None:
            continue
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: '{name}' must be a mapping of option names to values")
        params = {_key(p): p for p in command.params
                  if p.param_type_name == "option" and p.name not in _NOT_DEFAULTS and _key(p)}  # fmt: skip
        ctx = typer.Context(command, info_name=name)
        target = result
        for part in name.split()[:-1]:
            target = target.setdefault(part, {})
        defaults = target.setdefault(name.split()[-1], {})
        for option, value in options.items():
            param = params.get(str(option).replace("-", "_"))
            if param is None:
                raise ConfigError(f"{where}: {name}: unknown option '{option}'"
                                  f"{_did_you_mean(str(option).replace('-', '_'), params)}")  # fmt: skip
            defaults[param.name] = _checked(where, name, option, param, ctx, value)
    return result


def _checked(where: Path, command: str, option: Any, param, ctx, value: Any) -> Any:
    from typer._click.exceptions import UsageError  # Typer's own click (cli.py catches the same)

    if param.multiple and not isinstance(value, list):
        value = [value]  # `ban: watermark` as a list of one
    if isinstance(value, (dict, list)) and not param.multiple:
        raise ConfigError(f"{where}: {command}: '{option}' takes one value, not a {type(value).__name__}")
    try:
        param.process_value(ctx, value)  # as from the command line: type, range, choices
    except UsageError as exc:
        raise ConfigError(f"{where}: {command}: '{option}': {' '.join(exc.format_message().split())}") from None
    return value


def _key(param) -> str | None:
    longs = [o for o in param.opts if o.startswith("--")]
    return longs[0][2:].replace("-", "_") if longs else None


def _commands(root) -> dict[str, Any]:
    """Every command that can take defaults, by its name as typed: `expand`, `models download`."""
    import typer

    found: dict[str, Any] = {}
    ctx = typer.Context(root, info_name="kgen")
    for name in root.list_commands(ctx):
        command = root.get_command(ctx, name)
        if isinstance(command, typer.core.TyperGroup):
            for sub in command.list_commands(ctx):
                found[f"{name} {sub}"] = command.get_command(ctx, sub)
        else:
            found[name] = command
    return found


