"""Command-line flags and environment variables generated from a config dataclass.

Every field ``max_num_seqs`` of a config dataclass becomes the flag ``--max-num-seqs``
and the environment variable ``TESSERA_MAX_NUM_SEQS``. A flag wins over the variable,
which wins over the field's default; a field without a default must come from one of
the two. This is the one module that reads settings from the environment. Torch-free,
so every process (gateway, launcher, scheduler, executor) builds its command line here.

    parser = argparse.ArgumentParser()
    add_config_args(parser, SchedulerServerConfig)
    config = config_from_args(SchedulerServerConfig, parser.parse_args())
    child_argv = config_to_argv(executor_config)   # the same flags, to start a child

Field types: int, float, str, bool (``--flag`` / ``--no-flag``; the variable takes
1/0, true/false, yes/no, on/off), ``X | None``, whose value ``none`` means None, and
``tuple[str, ...]`` (``--flag a b``; the variable takes ``a,b``). A field's help text is
``field(metadata={"help": ...})``; every flag's help names its variable and default.
Parsers are made with ``allow_abbrev=False``: ``--max-num-seq`` is an error, not
``--max-num-seqs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

ENV_PREFIX = "TESSERA_"
_NONE = "none"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser for a config's flags: no abbreviations (a prefix of a flag is an error)."""
    return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)


def add_config_args(
    parser: argparse.ArgumentParser, config_cls: type, skip: Iterable[str] = ()
) -> None:
    """Add one flag per field of ``config_cls`` (except ``skip``) to ``parser``."""
    hints = typing.get_type_hints(config_cls)
    skipped = set(skip)
    for f in dataclasses.fields(config_cls):
        if f.name in skipped:
            continue
        base, optional = _unwrap(hints[f.name], config_cls, f.name)
        default = "required" if _default(f) is dataclasses.MISSING else repr(_default(f))
        text = f.metadata.get("help", "")
        help_text = f"{text} (env {env_name(f.name)}; default {default})".strip()
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if base is tuple:
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                nargs="+",
                default=argparse.SUPPRESS,
                metavar="NAME",
                help=help_text,
            )
            continue
        if base is bool and not optional:
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        parse = _parser(base, optional)
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            type=parse,
            default=argparse.SUPPRESS,  # absent from args: fall back to env, then default
            metavar=base.__name__.upper(),
            help=help_text,
        )


def config_from_args(
    config_cls: type,
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Any:
    """Build ``config_cls`` from flags, then environment, then defaults.

    Raises ValueError naming the variable or flag at fault, or whatever the config's
    own validation raises.
    """
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(config_cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
        elif env_name(f.name) in environ:
            base, optional = _unwrap(hints[f.name], config_cls, f.name)
            text = environ[env_name(f.name)]
            try:
                values[f.name] = _parser(base, optional)(text)
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise ValueError(f"{env_name(f.name)}={text!r}: {e}") from None
        elif _default(f) is dataclasses.MISSING:
            raise ValueError(f"{flag_name(f.name)} (or {env_name(f.name)}) is required")
    return config_cls(**values)


def config_to_argv(config: Any, skip: Iterable[str] = ()) -> list[str]:
    """The flags that make ``config_from_args`` rebuild ``config`` (every field, so the
    child's environment cannot change what the parent chose)."""
    skipped = set(skip)
    argv: list[str] = []
    for f in dataclasses.fields(config):
        if f.name in skipped:
            continue
        value = getattr(config, f.name)
        if isinstance(value, bool):
            argv.append(flag_name(f.name) if value else "--no-" + flag_name(f.name)[2:])
        elif isinstance(value, tuple):
            if value:
                argv += [flag_name(f.name), *value]
        else:
            # One token, so that a value starting with "-" is not read as a flag.
            argv.append(f"{flag_name(f.name)}={_NONE if value is None else value}")
    return argv


# -- helpers ---------------------------------------------------------------------


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _unwrap(tp: Any, config_cls: type, name: str) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a field annotation."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"{config_cls.__name__}.{name}: unsupported type {tp}")
        tp = args[0]
    if tp == tuple[str, ...]:
        return tuple, optional
    if tp not in (int, float, str, bool):
        raise TypeError(f"{config_cls.__name__}.{name}: unsupported type {tp}")
    return tp, optional


def _parser(base: type, optional: bool) -> Callable[[str], Any]:
    convert: Callable[[str], Any] = _parse_bool if base is bool else base
    if base is tuple:
        convert = _parse_names

    def parse(text: str) -> Any:
        if optional and text.strip().lower() == _NONE:
            return None
        return convert(text)

    parse.__name__ = base.__name__  # argparse names the type in its error message
    return parse


def _parse_names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected one of {_TRUE + _FALSE}, got {text!r}")
