"""Regenerate ``datum_pb2.py`` from ``datum.proto`` with grpcio-tools' bundled protoc.

Run ``python -m datumdb.proto.regenerate`` after editing the .proto (grpcio-tools is a
development dependency). ``generate(out_dir)`` is also what the test that checks the committed
module is current calls.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent


def generate(out_dir: Path) -> Path:
    """Run protoc on ``datum.proto``, writing ``datum_pb2.py`` into ``out_dir``; return its path."""
    from grpc_tools import protoc  # development dependency only

    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", str(PROTO_DIR / "datum.proto")]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_DIR / 'datum.proto'}")
    return Path(out_dir) / "datum_pb2.py"


def main() -> int:
    path = generate(PROTO_DIR)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
