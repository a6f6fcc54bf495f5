"""``python -m tessera.executor --executor-address ipc://... --model ...``: one executor process.

Normally started by the scheduler, which passes every setting as a flag. Each flag
``--max-num-seqs`` may also come from ``TESSERA_MAX_NUM_SEQS`` (flag > env > default).
"""

from __future__ import annotations

import sys

from tessera.common.cli_args import add_config_args, config_from_args, config_parser
from tessera.common.executor_config import ExecutorServerConfig
from tessera.executor.server import run_executor


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(
        "python -m tessera.executor",
        "Tessera executor: runs step plans on a device",
    )
    add_config_args(parser, ExecutorServerConfig)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(ExecutorServerConfig, args)
    except ValueError as e:
        parser.error(str(e))
    return run_executor(config)


if __name__ == "__main__":
    sys.exit(main())
