"""The layers of the README's "Layout": gemma_core stands alone (no Ray, no
gRPC) and its modules import one another without a circle."""

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


def module_name(path):
    """`gemma_core/lora_adapter.py` -> "gemma_core.lora_adapter"; a package's
    `__init__.py` -> the package's name."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(tree):
    """The import statements that run when the module is imported: those at
    module level and in class bodies and plain if/try blocks, not those in
    functions (run later) or under `if TYPE_CHECKING:` (never run)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))


def core_import_graph():
    """gemma_core module -> the gemma_core modules it imports at import time.

    `from gemma_core import x` names module `gemma_core.x` when that is a
    module; edges to the package itself are left out, since every submodule
    import runs `gemma_core/__init__.py` first, which is not a circle between
    modules."""
    paths = {module_name(path): path for path in (ROOT / "gemma_core").rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        edges = set()
        for node in top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue  # relative imports: gemma_core has none
            edges.update(t for t in targets if t in paths and t != "gemma_core")
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One cycle as a list of nodes (first == last), or None."""
    state = {}  # node -> "open" while on the stack, "done" after

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == "open":
                return stack[stack.index(successor):] + [successor]
            if successor not in state:
                found = visit(successor, stack)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [])
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_gemma_core_modules_import_no_circle():
    graph = core_import_graph()
    assert "gemma_core.backbone" in graph and graph["gemma_core.backbone"]  # the walk works
    cycle = find_cycle(graph)
    assert cycle is None, "gemma_core import circle: " + " -> ".join(cycle)
