"""The package's shape: no import circle, every module importable on its own, no function-local
import of minilm code, no backend name outside the seam, and a README map that names every module."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
# Source folder -> the package it installs as (kernels/ is installed as minilm.kernels).
PACKAGE_ROOTS = {REPO / "minilm": "minilm", REPO / "kernels": "minilm.kernels"}


def module_files():
    """{dotted module name: path} for every module minilm installs."""
    modules = {}
    for root, package in PACKAGE_ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = module_files()


def _resolve(module, node):
    """The absolute name an ImportFrom / Import node refers to, from inside `module`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.split(".")
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    # `from . import ops` names a module; `from .ops import linear` names a module's attribute
    names = [f"{target}.{alias.name}" for alias in node.names]
    return [name if name in MODULES else target for name in names]


def imports(module, top_level_only):
    """The minilm modules `module` imports (at module level, or anywhere)."""
    tree = ast.parse(MODULES[module].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= {name for name in _resolve(module, node) if name in MODULES}
    return found


def _with_parents(name):
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(MODULES)


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def module_graph():
    """module -> the modules importing it runs: what it imports, with their packages, except its own
    packages (Python has started those before the module itself)."""
    return {
        m: set().union(set(), *[_with_parents(i) for i in imports(m, top_level_only=True)]) - _with_parents(m)
        for m in MODULES
    }


def test_there_is_no_import_circle():
    graph = module_graph()
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_the_circle_check_catches_a_circle():
    graph = module_graph()
    graph["minilm.io.registry"] = graph["minilm.io.registry"] | {"minilm.io.load"}  # load imports registry
    assert find_cycle(graph) is not None


def test_registry_is_a_leaf():
    assert imports("minilm.io.registry", top_level_only=False) == set()


# cli.py imports the package only after parsing arguments, so that `minilm --help` answers at once.
LAZY_IMPORT_ALLOWED = {"minilm.cli"}


def test_no_function_local_imports_of_minilm_code():
    offenders = []
    for module in MODULES:
        if module in LAZY_IMPORT_ALLOWED:
            continue
        local = imports(module, top_level_only=False) - imports(module, top_level_only=True)
        offenders += [f"{module} -> {name}" for name in sorted(local)]
    assert not offenders, "function-local imports of minilm modules: " + ", ".join(offenders)


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if not m.startswith("minilm.kernels.cupy") and m != "minilm.__main__")
)
def test_module_imports_on_its_own(module):
    """Each module imported first, in a fresh interpreter (an order-dependent circle fails here).
    cupy needs a GPU; __main__ runs the command line."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


BACKEND_NAMES = {"numba", "cupy"}


def test_no_backend_names_in_minilm_outside_the_seam():
    """Model code never knows which backend runs: only ops.py names them (kernels/ are the backends)."""
    offenders = []
    for module, path in MODULES.items():
        if module.startswith("minilm.kernels") or module == "minilm.ops":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in BACKEND_NAMES:
                offenders.append(f"{module}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def readme_map():
    """The text of the README's "Where things are" section."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Where things are\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README has no '## Where things are' section"
    return match.group(1)


def test_readme_map_names_every_module_and_fits_on_a_screen():
    section = readme_map()
    missing = []
    for path in MODULES.values():
        if path.name == "__init__.py":
            continue
        # named: the file's name in a row that names its folder (`minilm/io/`, `numba/`, ...)
        folder = path.parent.name + "/"
        rows = [line for line in section.splitlines() if folder in line]
        if not any(re.search(rf"(?<![\w.]){re.escape(path.stem)}(\.py)?(?!\w)", row) for row in rows):
            missing.append(path.relative_to(REPO).as_posix())
    assert not missing, f"README's map does not name: {missing}"
    assert len(section.strip().splitlines()) <= 40, "the map should fit on one screen"
