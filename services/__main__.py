"""``python -m services``: run one gateway process (flags or TESSERA_* variables)."""

import argparse

from executor.cli_args import add_config_args, config_from_args
from services.gateway import GatewayConfig, run_gateway

parser = argparse.ArgumentParser(prog="python -m services", description="Tessera gRPC gateway")
add_config_args(parser, GatewayConfig)
run_gateway(config_from_args(GatewayConfig, parser.parse_args()))
