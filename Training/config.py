"""Frozen dataclass configs for every Training verb: command-line flags, config files, saved JSON.

A verb declares its configuration as a frozen dataclass with a comment per field (the help
text comes from ``field(metadata={"help": ...})``). :func:`parse` builds the command line from
it: every field is a ``--flag``; ``--config FILE`` (YAML or JSON) may hold any of the fields;
flags given on the command line override the file; the file overrides the defaults. The
effective config is saved as JSON next to the verb's outputs with :func:`save`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from StrokePredictorLib.errors import StrokePredictorError

T = TypeVar("T")


class ConfigError(StrokePredictorError, ValueError):
    """A config file or flag is invalid."""


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """Strip ``Optional``; return (type, optional)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def _convert(name: str, annotation: Any, value: Any) -> Any:
    base, optional = _base_type(annotation)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"Config field '{name}' may not be empty.")
    origin = typing.get_origin(base)
    try:
        if origin in (tuple, list):
            args = [a for a in typing.get_args(base) if a is not Ellipsis] or [str]
            items = value.split(",") if isinstance(value, str) else list(value)
            converted = [_convert(name, args[min(i, len(args) - 1)], item) for i, item in enumerate(items)]
            return tuple(converted) if origin is tuple else converted
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return base(value)
        if base is Path:
            return Path(value)
    except (TypeError, ValueError):
        kind = getattr(base, "__name__", base)
        raise ConfigError(f"Config field '{name}': {value!r} is not a valid {kind}.") from None
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"Config file {path} cannot be read: {error.strerror}.") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as error:  # noqa: BLE001 - any parser error is the user's file
        raise ConfigError(f"Config file {path} is not valid {path.suffix.lstrip('.').upper()}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of field: value.")
    return data


def build(cls: type[T], values: dict[str, Any], *, source: str = "config") -> T:
    """Instantiate ``cls`` from a dict, converting types and refusing unknown keys."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(names))}.")
    kwargs = {name: _convert(name, hints[name], value) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: {error}") from None


def make_parser(cls: type, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix such as --ru is an error, not a silent --run (or --resume).
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file with any of the fields below; flags override it")
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        help_text = f.metadata.get("help", "")
        base, _ = _base_type(hints[f.name])
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{help_text} (default: {default})")
        elif typing.get_origin(base) in (tuple, list):
            shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                action="append",
                                help=f"{help_text}; comma-separated or repeated (default: {shown})")
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"{help_text} (default: {default})")
    return parser


def parse(cls: type[T], argv: list[str], description: str, prog: str | None = None) -> T:
    """Parse ``argv`` into a ``cls`` instance: defaults < ``--config`` file < flags."""
    return parse_given(cls, argv, description, prog)[0]


def parse_given(cls: type[T], argv: list[str], description: str,
                prog: str | None = None) -> tuple[T, frozenset[str]]:
    """Like :func:`parse`, and also return the names of the fields the user gave (as a flag or
    in the ``--config`` file), so that a verb can tell a typed value from a default."""
    parser = make_parser(cls, description, prog)
    namespace = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_file = namespace.pop("config", None)
    if config_file:
        values.update(load_file(config_file))
    for name, value in namespace.items():
        if isinstance(value, list):  # repeated flag of a tuple/list field: each may hold commas
            items = [item for entry in value for item in str(entry).split(",") if item != ""]
            namespace[name] = items[0] if len(items) == 1 and items[0].lower() in ("none", "null") else items
    values.update(namespace)
    config = build(cls, values, source=f"config file {config_file}" if config_file else "command line")
    return config, frozenset(values)


def to_dict(config: Any) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def save(config: Any, path: str | os.PathLike) -> Path:
    """Save the effective config as JSON (atomically; an existing file is replaced)."""
    from StrokePredictorLib.io import write_json

    return write_json(to_dict(config), path, overwrite=True)
