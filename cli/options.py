"""Argument groups generated from the settings classes (Polygraphy's `tools/args` groups,
llama-cpp-python's settings-driven CLI): a flag, its default, its help and its environment
variable are read off the field, so two commands that take a setting take it the same way.

`add_settings(parser, GuardSettings, ...)` adds a group; `settings_from(args, Cls)` builds
the object back from the parsed namespace. With `environment=True` (the serving commands)
each option's default comes from its `SIREN_...` variable when that is set, as
text-embeddings-inference reads its own; a bad value is refused naming the variable.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterable, Optional

from siren_runtime.settings import env_of, flag_of, settings_fields

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class BadEnvironment:
    """The default of an option whose SIREN_... variable holds a value it does not take: an
    error only when that option is used and not given on the command line
    (`check_environment`), so a bad SIREN_PORT does not break `siren score`."""

    def __init__(self, message: str):
        self.message = message

    def __repr__(self) -> str:
        return f"<bad environment: {self.message}>"


def check_environment(args: argparse.Namespace) -> None:
    """Refuse, naming the variable, any parsed option still holding a bad environment value."""
    for value in vars(args).values():
        if isinstance(value, BadEnvironment):
            raise ValueError(value.message)


def _parse_env(field, raw: str):
    kind, name = field.metadata["kind"], env_of(field)
    try:
        if kind in ("flag", "no_flag", "switch"):
            word = raw.strip().lower()
            if word not in _TRUE | _FALSE:
                raise ValueError("expected 1/0, true/false, yes/no or on/off")
            return word in _TRUE
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        choices = field.metadata.get("choices")
        if choices and raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return raw
    except ValueError as e:
        return BadEnvironment(f"environment variable {name}={raw!r}: {e}")


def _default_text(field, default) -> str:
    kind = field.metadata["kind"]
    if kind in ("flag", "no_flag") or default is None or default == "" or isinstance(default, BadEnvironment):
        return ""
    if kind == "switch":
        return f" (default: {'on' if default else 'off'})"
    return f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"


def add_settings(parser, cls, title: Optional[str] = None, *, environment: bool = False,
                 only: Optional[Iterable[str]] = None, skip: Iterable[str] = (), positional: bool = True):
    """Add `cls`'s settings to `parser` as one argument group; returns the group.
    only / skip: field names to take or leave out; positional: add the positional ones."""
    group = parser.add_argument_group(title) if title else parser
    wanted = set(only) if only is not None else None
    for field in settings_fields(cls):
        if field.name in set(skip) or (wanted is not None and field.name not in wanted):
            continue
        kind, help_text = field.metadata["kind"], field.metadata["help"]
        default = field.default
        env_name = env_of(field)
        if environment and os.environ.get(env_name) not in (None, ""):
            default = _parse_env(field, os.environ[env_name])     # SIREN_VERIFY=0 means --no-verify
        env_text = (f" [env: {env_name}{ {'flag': '=1', 'no_flag': '=0'}.get(kind, '') }]" if environment else "")
        if kind == "more":            # more positionals after the first (the variable: comma-separated)
            if positional:
                from_env = os.environ.get(env_name, "") if environment else ""
                group.add_argument(field.name, nargs="*", help=help_text + env_text,
                                   default=[v.strip() for v in from_env.split(",") if v.strip()] or list(default),
                                   metavar=field.metadata.get("metavar"))
            continue
        if kind == "append":
            group.add_argument(flag_of(field), dest=field.name, action="append", default=None,
                               help=help_text + env_text + " (repeat it)")
            continue
        if kind == "positional":
            if not positional:
                continue
            nargs = "?" if environment and default else None
            group.add_argument(field.name, help=help_text + env_text, metavar=field.metadata.get("metavar"),
                               nargs=nargs, **({"default": default} if nargs else {}))
            continue
        common = dict(dest=field.name, default=default, help=help_text + _default_text(field, default) + env_text)
        if kind == "flag":
            group.add_argument(flag_of(field), action="store_true", **common)
        elif kind == "no_flag":
            group.add_argument(flag_of(field), action="store_false", **common)
        elif kind == "switch":
            group.add_argument(flag_of(field), action=argparse.BooleanOptionalAction, **common)
        else:
            choices = field.metadata.get("choices")
            metavar = field.metadata.get("metavar") or (None if choices else flag_of(field)[2:].upper().replace("-", "_"))
            group.add_argument(flag_of(field), type={"int": int, "float": float, "str": str}[kind],
                               choices=choices, metavar=metavar, **common)
    return group


def settings_from(args: argparse.Namespace, cls, **values):
    """An instance of `cls` from the parsed options it declares (others ignored); `values`
    fill or override fields. A list-valued option (more bundles, repeated --name) becomes a
    tuple; an unset repeated option, its environment variable's comma-separated items."""
    given = {}
    for f in settings_fields(cls):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.metadata["kind"] == "append" and value is None:
            value = [v.strip() for v in os.environ.get(env_of(f), "").split(",") if v.strip()]
        if f.metadata["kind"] in ("more", "append"):
            value = tuple(value or ())
        given[f.name] = value
    return cls(**{**given, **values})


def option_rows(parser: argparse.ArgumentParser) -> dict:
    """Every option of a parser: its flags -> (default, help). What the serve / serve-ray
    comparison and the CLI reference read."""
    rows = {}
    for action in parser._actions:
        if action.option_strings:
            rows[tuple(action.option_strings)] = (action.default, action.help)
    return rows


__all__ = ["add_settings", "settings_from", "option_rows", "check_environment", "BadEnvironment"]
