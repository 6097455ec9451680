"""The house rules a newcomer relies on: no import cycle anywhere in toast_core (lazy imports inside
functions count too: a cycle is a cycle even when it only bites at call time), no module over 500
lines and no class over 300, and the top of toast_core/ holds only packages (the layers), so the
folder tree tells the layers. Read from the source with `ast`, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "toast_core"
MAX_MODULE_LINES, MAX_CLASS_LINES = 500, 300


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """toast_core modules `module` imports (at any depth, outside `if TYPE_CHECKING:`), and the
    packages on their way (importing a.b.c runs a/__init__ and a/b/__init__ first)."""
    path = MODULES[module]
    names: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    out: set[str] = set()
    for name in names:
        target = _resolve(name)
        if target is None:
            continue
        parts = target.split(".")
        out.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    return {m for m in out if m in MODULES and m != module and not module.startswith(m + ".")}


def import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: imports_of(m) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return cycles


def test_the_cycle_finder_sees_lazy_imports():
    """A check that cannot fail proves nothing: the run lookup and the figures import the way the
    layers say (bundles -> compare -> runs.registry), and the finder reads a lazy import as an edge."""
    assert "toast_core.views.compare" in imports_of("toast_core.storage.bundles")
    assert "toast_core.runs.registry" in imports_of("toast_core.views.compare")  # imported inside functions
    assert "toast_core.storage.bundles" not in imports_of("toast_core.views.compare")
    assert "toast_core.views" in imports_of("toast_core.methods.fort")  # inside a function too


def test_no_import_cycles_in_toast_core():
    assert import_cycles() == []


def test_no_module_over_500_lines_and_no_class_over_300():
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{name}.{node.name}: class of {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []


def _only_bytecode(folder: Path) -> bool:
    """A folder git would not see: nothing in it but `__pycache__` (what a moved package leaves behind
    in an existing checkout)."""
    return all(p.name == "__pycache__" or (p.is_dir() and _only_bytecode(p)) for p in folder.iterdir())


def top_level_strays(package: Path = PACKAGE) -> list[str]:
    """What sits at the top of `package` besides `__init__.py`, `__main__.py` and packages (folders
    with an `__init__.py`); `__pycache__` is Python's, not ours."""
    allowed = {"__init__.py", "__main__.py", "__pycache__"}
    return sorted(
        p.name
        for p in package.iterdir()
        if p.name not in allowed and not (p.is_dir() and ((p / "__init__.py").is_file() or _only_bytecode(p)))
    )


def test_the_top_of_toast_core_holds_only_packages(tmp_path):
    assert top_level_strays() == []
    # a check that cannot fail proves nothing: the old flat layout (a module beside the packages) and
    # a folder that is not a package are both reported; a moved package's leftover bytecode is not
    for name in ("__init__.py", "__main__.py", "train.py", "core/__init__.py", "notes/readme.txt",
                 "zoo/__pycache__/build.cpython-311.pyc"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    assert top_level_strays(tmp_path) == ["notes", "train.py"]
