"""The committed Python stubs are exactly what the protos generate."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "client" / "chronorec" / "v1"


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed")
def test_committed_stubs_match_protos(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)], check=True)
    generated = {p.name: p.read_text() for p in (tmp_path / "chronorec" / "v1").iterdir() if p.is_file()}
    committed = {p.name: p.read_text() for p in COMMITTED.iterdir() if p.is_file()}
    assert sorted(generated) == sorted(committed), "stub files differ: run python protos/generate.py"
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"stubs out of date with protos: {stale}; run python protos/generate.py"


def test_every_proto_field_is_commented():
    for proto in (ROOT / "protos" / "chronorec" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("option", "syntax"))
            is_decl = stripped.startswith(("message ", "service ", "rpc "))
            if is_field or is_decl:
                assert lines[number - 1].strip().startswith("//"), f"{proto.name}:{number + 1} lacks a comment"
