"""Command-line flags built from a settings dataclass, each with an environment-variable fallback."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def setting(default: Any = dataclasses.MISSING, *, help: str, group: str | None = None,
            choices: tuple[str, ...] | None = None, flag: str | None = None, short: str | None = None,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is also a flag: `--name-with-dashes` (or `flag`), its help text,
    the argument group it is listed in, and its allowed values."""
    metadata = {"help": help, "group": group, "choices": choices, "flag": flag, "short": short}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def flag_name(spec: dataclasses.Field) -> str:
    return spec.metadata.get("flag") or spec.name.replace("_", "-")


def env_name(prefix: str, spec: dataclasses.Field) -> str:
    """`<prefix>_<FLAG>`: CHRONOREC_TRAIN_STEPS for --steps; a boolean's variable holds its positive
    form (CHRONOREC_TRAIN_PREPARE=0 is --no-prepare)."""
    return f"{prefix}_{flag_name(spec).replace('-', '_').upper()}"


def _value_type(annotation: Any) -> tuple[type, bool, bool]:
    """(scalar type, optional, list) of a field annotation such as `int | None` or `list[str]`."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        if len(members) != 1:
            raise TypeError(f"unsupported flag type {annotation!r}")
        annotation = members[0]
        origin = typing.get_origin(annotation)
    if origin is list:
        return typing.get_args(annotation)[0], optional, True
    return annotation, optional, False


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")


def _from_env(spec: dataclasses.Field, kind: type, is_list: bool, text: str) -> Any:
    if kind is bool:
        return _parse_bool(text)
    if is_list:
        return [kind(part.strip()) for part in text.split(",") if part.strip()]
    value = kind(text)
    choices = spec.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}")
    return value


def add_settings_flags(parser: argparse.ArgumentParser, cls: type, *, env_prefix: str,
                       environ: Mapping[str, str] | None = None) -> None:
    """One flag per field of the dataclass `cls`, with the field's metadata (see `setting`).

    A flag left out takes its value from `<env_prefix>_<FLAG>` when that is set, else the field's
    default. Booleans get `--x` and `--no-x`; a list is repeatable (comma-separated in the
    environment); a field without a default (a list too) is a required flag unless its variable is set. A
    variable that does not parse stops the parser with an error that names it.
    """
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    groups: dict[str | None, Any] = {None: parser}
    for spec in dataclasses.fields(cls):
        if "help" not in spec.metadata:
            continue
        group_title = spec.metadata.get("group")
        if group_title not in groups:
            groups[group_title] = parser.add_argument_group(group_title)
        target = groups[group_title]
        kind, _, is_list = _value_type(hints[spec.name])
        variable = env_name(env_prefix, spec)
        has_default = spec.default is not dataclasses.MISSING or spec.default_factory is not dataclasses.MISSING
        default = spec.default if spec.default is not dataclasses.MISSING else (
            spec.default_factory() if spec.default_factory is not dataclasses.MISSING else None)
        from_env = variable in environ and environ[variable].strip() != ""
        if from_env:
            try:
                default = _from_env(spec, kind, is_list, environ[variable])
            except ValueError as exc:
                parser.error(f"{variable}={environ[variable]!r} is not a valid value for --{flag_name(spec)}: {exc}")
        required = not has_default and not from_env
        if required:
            suffix = f"required unless {variable} is set"
        elif kind is bool and default is not None:
            suffix = f"default {'on' if default else 'off'}; env {variable}"
        else:
            shown = "none" if default is None or (is_list and not default) else (
                ",".join(map(str, default)) if is_list else default)
            suffix = f"default {shown}; env {variable}"
        # argparse formats help with %: a literal one must be doubled.
        help_text = f"{spec.metadata['help']} ({suffix})".replace("%", "%%")
        names = ([spec.metadata["short"]] if spec.metadata.get("short") else []) + [f"--{flag_name(spec)}"]
        options: dict[str, Any] = {"dest": spec.name, "help": help_text, "default": default}
        if kind is bool:
            names.append(f"--no-{flag_name(spec)}")
            options["action"] = _Toggle
        elif is_list:
            # Given on the command line, the flag's values replace the default instead of extending it.
            options.update(action=_ReplaceDefaultAppend, type=kind, metavar=spec.name.upper(),
                           required=required or None)
        else:
            choices = spec.metadata.get("choices")
            options.update(type=kind, choices=choices, metavar=None if choices else spec.name.upper())
            options["required"] = required or None
        target.add_argument(*names, **{k: v for k, v in options.items() if v is not None or k == "default"})


class _Toggle(argparse.Action):
    """`--x` sets True, `--no-x` False (argparse's BooleanOptionalAction, without the default it
    appends to the help on some Python versions: ours already says it)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


class _ReplaceDefaultAppend(argparse.Action):
    """`append`, except that the first use on the command line drops the default list."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = f"_{self.dest}_given"
        current = list(getattr(namespace, self.dest) or []) if getattr(namespace, seen, False) else []
        current.append(values)
        setattr(namespace, self.dest, current)
        setattr(namespace, seen, True)


@dataclasses.dataclass
class Verbosity:
    """The flag every trainer command has before its own."""

    verbose: bool = setting(False, short="-v", help="log progress at INFO level")


def settings_from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """An instance of `cls` from the parsed flags (fields without a flag: `values` or their default)."""
    given = vars(args)
    picked = {spec.name: given[spec.name] for spec in dataclasses.fields(cls) if spec.name in given}
    return cls(**{**picked, **values})


__all__ = ["Verbosity", "add_settings_flags", "env_name", "flag_name", "setting", "settings_from_args"]
