"""`python -m tessera.tokenizer_svc`: run one tokenizer replica.

Every setting is a flag or an environment variable; a flag on the command line wins
over the variable, which wins over the default:

    flag              environment variable               default
    --model           TESSERA_MODEL                      smollm2-135m-instruct
    --address         TESSERA_TOKENIZER_ADDRESS          127.0.0.1:50061
    --max-workers     TESSERA_TOKENIZER_MAX_WORKERS      2
    --chat-template   TESSERA_CHAT_TEMPLATE              the model's own
    --grace-seconds   TESSERA_TOKENIZER_GRACE_SECONDS    5.0

TESSERA_MODEL is shared with the other processes, so one variable names the served
model everywhere. This module is the only place the tokenizer reads the environment.
Exit codes: 0 after SIGTERM/SIGINT, 2 (a configuration error, never restarted by the
launcher) for bad flags or variables, a model or chat template that cannot be loaded,
or an address that cannot be bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tessera.common.preflight import EXIT_CONFIG
from tessera.tokenizer_svc.server import TokenizerServerConfig, run_tokenizer_server


@dataclass(slots=True, frozen=True)
class EnvFlag:
    """A command-line flag whose default may come from an environment variable."""

    flag: str  # "--max-workers"
    env: str  # "TESSERA_TOKENIZER_MAX_WORKERS"
    type: Callable[[str], Any]
    default: Any
    help: str


def add_env_flags(
    parser: argparse.ArgumentParser, flags: Sequence[EnvFlag], environ: Mapping[str, str]
) -> None:
    """Add `flags` to `parser`, each defaulting to its variable in `environ` when set
    (converted here, so a bad value names the variable), else to its own default."""
    for spec in flags:
        default = spec.default
        raw = environ.get(spec.env)
        if raw is not None:
            try:
                default = spec.type(raw)
            except ValueError:
                parser.error(
                    f"environment variable {spec.env}={raw!r} is not a valid "
                    f"{getattr(spec.type, '__name__', 'value')} (flag {spec.flag})"
                )
        parser.add_argument(
            spec.flag,
            type=spec.type,
            default=default,
            help=f"{spec.help} (env {spec.env}; default {spec.default})",
        )


_DEFAULTS = TokenizerServerConfig()
TOKENIZER_FLAGS = (
    EnvFlag(
        "--model",
        "TESSERA_MODEL",
        str,
        _DEFAULTS.model,
        "model name, .gguf file or Hugging Face directory",
    ),
    EnvFlag(
        "--address",
        "TESSERA_TOKENIZER_ADDRESS",
        str,
        _DEFAULTS.address,
        "host:port (port 0 picks a free one) or unix:/path",
    ),
    EnvFlag(
        "--max-workers",
        "TESSERA_TOKENIZER_MAX_WORKERS",
        int,
        _DEFAULTS.max_workers,
        "threads that tokenize",
    ),
    EnvFlag(
        "--chat-template",
        "TESSERA_CHAT_TEMPLATE",
        str,
        None,
        "a Jinja chat template, or a file holding one, used instead of the model's own",
    ),
    EnvFlag(
        "--grace-seconds",
        "TESSERA_TOKENIZER_GRACE_SECONDS",
        float,
        _DEFAULTS.grace_seconds,
        "seconds in-flight calls may take to finish after SIGTERM",
    ),
)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tessera.tokenizer_svc", description="Run one Tessera tokenizer replica.",
        allow_abbrev=False,
    )
    add_env_flags(parser, TOKENIZER_FLAGS, os.environ if environ is None else environ)
    args = parser.parse_args(argv)
    try:
        config = TokenizerServerConfig(
            model=args.model,
            address=args.address,
            max_workers=args.max_workers,
            grace_seconds=args.grace_seconds,
            chat_template=args.chat_template,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run_tokenizer_server(config)
    except (ValueError, OSError) as exc:  # a model, template or address that cannot work
        logging.getLogger("tokenizer_svc").error("%s", exc)
        return EXIT_CONFIG  # the launcher does not restart it: a restart fails the same way
    return 0


if __name__ == "__main__":
    sys.exit(main())
