"""``python -m tessera.scheduler --model ... --gateway-address ipc://...``: one engine.

Starts the scheduler process, which starts its executor child. Every flag
``--max-num-seqs`` may also come from ``TESSERA_MAX_NUM_SEQS`` (flag > env > default).
"""

from __future__ import annotations

import sys

from tessera.common.cli_args import add_config_args, config_from_args, config_parser
from tessera.scheduler.config import SchedulerServerConfig
from tessera.scheduler.server import run_scheduler


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(
        "python -m tessera.scheduler",
        "Tessera scheduler: batches the gateways' requests onto its executor",
    )
    add_config_args(parser, SchedulerServerConfig)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(SchedulerServerConfig, args)
    except ValueError as e:
        parser.error(str(e))
    return run_scheduler(config)


if __name__ == "__main__":
    sys.exit(main())
