"""The committed stubs are exactly what the .proto generates."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATED = pathlib.Path("coordinator/generated/gemma/v1")
PROTOS = sorted(p.stem for p in (ROOT / "protos/gemma/v1").glob("*.proto"))
FILES = [f"{stem}{suffix}" for stem in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


def test_stubs_match_the_proto(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Icoordinator/generated=protos",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         *(str(GENERATED.parent.parent / f"gemma/v1/{stem}.proto") for stem in PROTOS)],
        cwd=ROOT, check=True)
    for name in FILES:
        fresh = (tmp_path / GENERATED / name).read_text()
        committed = (ROOT / GENERATED / name).read_text()
        assert fresh == committed, f"{GENERATED / name} is stale: run `make protos`"


def test_only_the_coordinator_imports_the_stubs():
    for folder in ("gemma_core", "worker"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert "_pb2" not in text and "import grpc" not in text, path
