"""Generates the Python stubs of protos/chronorec/v1 into client/chronorec/v1 (or another folder)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "client"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "chronorec" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Runs grpc_tools.protoc on every proto; stubs land in `<out_dir>/chronorec/v1/`."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    package = out_dir / "chronorec" / "v1" / "__init__.py"
    if not package.exists():
        package.write_text('"""Generated protobuf and gRPC stubs of the chronorec.v1 API."""\n')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder that receives chronorec/v1/")
    generate(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
