"""``python -m tessera.services``: run one gateway process (flags or TESSERA_* variables)."""

import argparse

from tessera.common.cli_args import add_config_args, config_from_args
from tessera.services.gateway import GatewayConfig, run_gateway

parser = argparse.ArgumentParser(
    prog="python -m tessera.services", description="Tessera gRPC gateway"
)
add_config_args(parser, GatewayConfig)
args = parser.parse_args()
try:
    config = config_from_args(GatewayConfig, args)
except ValueError as e:  # a setting at fault, named: no traceback
    parser.error(str(e))
run_gateway(config)
