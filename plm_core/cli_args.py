"""Command-line options generated from config dataclasses: one option per leaf field, its help from
the field's metadata, its default printed once; parsed values come back as the same dataclasses.

    parser = argparse.ArgumentParser(..., formatter_class=HelpFormatter)
    add_config_options(parser, EngineConfig)       # --model, --max-num-seqs, --block-size, ...
    config = parse_config(parser, EngineConfig)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Union


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a real default and does not already
    say what its default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "(default" in text
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction))
            or (isinstance(action, argparse.BooleanOptionalAction) and default is False)
        ):
            return text
        return f"{text} (default: {default})"


def _scalar(hint: Any) -> type:
    """int for `int`, `int | None`, Optional[int]; same for float, str, bool; str for
    `tuple[str, ...]` (a repeated option's values, or the items of a parsed list)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _scalar(args[0])
    if origin is tuple:
        return _scalar(typing.get_args(hint)[0])
    return hint


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def fraction(text: str) -> float:
    """A number in (0, 1], for options that are shares."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one option per leaf field of `cls` (a config dataclass) to `parser`; each nested config
    dataclass gets its own group, titled by its docstring's words before the first colon."""
    hints = typing.get_type_hints(cls)
    title = (cls.__doc__ or cls.__name__).strip().split(":")[0]
    group = None
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            add_config_options(parser, hint)
        elif "help" in f.metadata:
            group = group or parser.add_argument_group(title)
            _add_option(group, f, hint)


def _add_option(group: argparse._ArgumentGroup, f: dataclasses.Field, hint: Any) -> None:
    meta = f.metadata
    kwargs: dict[str, Any] = {
        "dest": f.name,
        "default": f.default,
        "help": argparse.SUPPRESS if meta.get("hidden") else meta["help"],
    }
    kind = _scalar(hint)
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = meta.get("parse", kind)
        kwargs["metavar"] = meta.get("metavar", f.name.upper() if kind is not str else None)
        if meta.get("action") == "append":  # repeated: a list, then a tuple in the config
            kwargs.update(action="append", default=None)
        for key in ("choices", "nargs", "const"):
            if key in meta:
                kwargs[key] = meta[key]
        if "choices" in meta:
            kwargs.pop("metavar")
    group.add_argument(flag_name(f.name), *([meta["flag"]] if "flag" in meta else []), **kwargs)
    if "negative_flag" in meta:  # an older spelling of --no-NAME
        group.add_argument(
            meta["negative_flag"], dest=f.name, action="store_false", help=argparse.SUPPRESS
        )


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """`cls` (a config dataclass, nested ones included) from parsed options; `overrides` win."""
    values = vars(args)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[f.name] = config_from_args(hint, args, **overrides)
        elif f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif f.name in values:
            value = values[f.name]
            if isinstance(value, list):  # a repeated option
                kwargs[f.name] = tuple(value)
            elif value is not None or f.default is None:  # None: a repeated option never given
                kwargs[f.name] = value
    return cls(**kwargs)


def parse_config(parser: argparse.ArgumentParser, cls: type, argv: list[str] | None = None) -> Any:
    """Parses argv into `cls`; a value its validation refuses exits with a usage error."""
    args = parser.parse_args(argv)
    try:
        return config_from_args(cls, args)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
