"""Regenerates the committed gRPC code in `llumigrate/control/v1/` from
`proto/llumigrate/v1/control.proto`:

    python -m llumigrate.control.codegen

The code is committed (so the server needs no protoc at run time) and a test
regenerates it into a temporary folder and compares, so it cannot go stale.
protoc names modules after the proto's path (`llumigrate.v1`); they live in
`llumigrate.control.v1`, so that module path is rewritten. The proto's own
package stays `llumigrate.v1`.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO_FILE = "llumigrate/v1/control.proto"
OUT_DIR = Path(__file__).resolve().parent / "v1"
FILES = ("control_pb2.py", "control_pb2.pyi", "control_pb2_grpc.py")

# Lines that name the generating tools' versions; a newer grpcio-tools changes
# only these for the same proto.
_VERSION_STAMPS = (
    (re.compile(r"# Protobuf Python Version: .*"), "# Protobuf Python Version: X"),
    (re.compile(r"(Domain\.PUBLIC,\s*)\d+,\s*\d+,\s*\d+,"), r"\1X, X, X,"),
    (re.compile(r"GRPC_GENERATED_VERSION = '[^']*'"), "GRPC_GENERATED_VERSION = 'X'"),
)


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc on the proto and writes `FILES` into `out_dir`; returns
    their paths. Raises RuntimeError with protoc's exit status on failure."""
    from grpc_tools import protoc  # a build-time tool: not needed to serve

    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", str(PROTO_ROOT / PROTO_FILE)]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit status {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in FILES:
            src = Path(tmp) / "llumigrate" / "v1" / name
            dst = out_dir / name
            dst.write_text(_relocate(src.read_text()))
            written.append(dst)
        return written


def _relocate(text: str) -> str:
    """Moves module references from `llumigrate.v1` to `llumigrate.control.v1`."""
    text = text.replace("from llumigrate.v1 import", "from llumigrate.control.v1 import")
    return text.replace("'llumigrate.v1.control_pb2'", "'llumigrate.control.v1.control_pb2'")


def normalized(text: str) -> str:
    """`text` with the tools' version stamps blanked out."""
    for pattern, repl in _VERSION_STAMPS:
        text = pattern.sub(repl, text)
    return text


def main() -> int:
    if not (PROTO_ROOT / PROTO_FILE).exists():
        print(f"no {PROTO_ROOT / PROTO_FILE}: run from a source checkout", file=sys.stderr)
        return 2
    for path in generate(OUT_DIR):
        print(f"wrote {path.relative_to(REPO)}")
    shutil.rmtree(OUT_DIR / "__pycache__", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
