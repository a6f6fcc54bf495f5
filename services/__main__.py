"""``python -m tessera.services``: run one gateway process (flags or TESSERA_* variables)."""

import sys

from tessera.common.cli_args import add_config_args, config_from_args, config_parser
from tessera.services.gateway import GatewayConfig, run_gateway

parser = config_parser(
    "python -m tessera.services",
    "Tessera gateway: the public gRPC API and the OpenAI-compatible HTTP API",
)
add_config_args(parser, GatewayConfig)
args = parser.parse_args()
try:
    config = config_from_args(GatewayConfig, args)
except ValueError as e:  # a setting at fault, named: no traceback
    parser.error(str(e))
sys.exit(run_gateway(config))
