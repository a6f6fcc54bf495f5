"""Generate the Python and gRPC stubs of ``proto/tessera/v1/*.proto`` in place.

``make proto`` and the Dockerfile run this file by path (the package may not be installed
yet). protoc names a stub's imports after the .proto's path (``proto.tessera.v1``); the
installed package's name is ``tessera.proto.tessera.v1``, so those import lines are
rewritten. The stubs are never committed or edited by hand.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
STUB_DIR = ROOT / "proto" / "tessera" / "v1"
_IMPORT = re.compile(r"^from proto\.tessera\.v1 import ", re.M)


def main() -> int:
    protos = sorted(str(p.relative_to(ROOT)) for p in STUB_DIR.glob("*.proto"))
    args = ["protoc", "-I", str(ROOT), "--python_out", str(ROOT), "--pyi_out", str(ROOT),
            "--grpc_python_out", str(ROOT), *protos]
    if protoc.main(args) != 0:
        return 1
    for stub in [*STUB_DIR.glob("*_pb2*.py"), *STUB_DIR.glob("*_pb2*.pyi")]:
        text = stub.read_text()
        stub.write_text(_IMPORT.sub("from tessera.proto.tessera.v1 import ", text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
