"""The layers of DESIGN.md: gemma_core stands alone."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = {"ray", "grpc", "worker", "coordinator"}


def imported_top_level_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_gemma_core_source_imports_neither_ray_nor_grpc():
    for path in (ROOT / "gemma_core").rglob("*.py"):
        bad = FORBIDDEN_IN_CORE & set(imported_top_level_modules(path))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_importing_gemma_core_loads_neither_ray_nor_grpc():
    code = ("import sys, gemma_core; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'grpc')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env={"KERAS_BACKEND": "jax", "PATH": "/usr/bin:/bin"},
                         check=True)
    assert out.stdout.strip() == "[]"
