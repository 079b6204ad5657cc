"""The committed stubs are exactly what the .proto generates."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATED = pathlib.Path("coordinator/generated/gemma/v1")
FILES = ["gemma_service_pb2.py", "gemma_service_pb2.pyi", "gemma_service_pb2_grpc.py"]


def test_stubs_match_the_proto(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Icoordinator/generated=protos",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         str(GENERATED.parent.parent / "gemma/v1/gemma_service.proto")],
        cwd=ROOT, check=True)
    for name in FILES:
        fresh = (tmp_path / GENERATED / name).read_text()
        committed = (ROOT / GENERATED / name).read_text()
        assert fresh == committed, f"{GENERATED / name} is stale: run `make protos`"


def test_only_the_coordinator_imports_the_stubs():
    for folder in ("gemma_core", "worker"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert "gemma_service_pb2" not in text and "import grpc" not in text, path
