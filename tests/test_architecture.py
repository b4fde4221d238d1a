"""The house rules (shared/DESIGN.md, "Rooms"), checked on the import graph.

Every ``.py`` file under a rule's roots is parsed with ``ast``; its imports are read wherever they
stand (module level, inside functions and classes, under ``if TYPE_CHECKING``), so an import moved
into a function to dodge a cycle still counts. Edges are explicit imports only: ``from pkg import
mod`` is an edge to ``pkg.mod`` when that is a module, else to ``pkg``; the implicit import of a
module's parent packages is not an edge (a package's ``__init__`` that lazily re-exports its
children would otherwise always be a cycle).

Rules, each checked over its own roots:

* no import cycle among modules;
* the engine (``worker/compression``) imports neither ``service`` nor ``celery``;
* nothing under ``service/`` imports ``torch``;
* ``service/core`` (shared by both halves) imports neither FastAPI / Starlette nor ``service.api``
  nor torch; keyed on paths that may not exist yet: over zero files it holds trivially, and it
  checks every file as soon as they exist;
* no module imports a private (``_``-prefixed) name of another project module (``from m import
  _x``, ``m._x`` on an imported module, or a ``_``-prefixed module);
* no ``.py`` file is longer than ``MAX_LINES`` lines;
* inside the engine no module imports another engine module inside a function (that is how
  cycles were dodged); only a package's ``__init__`` may, for its lazy (PEP 562) exports that keep
  ``import worker.compression.spec`` torch-free. Heavy optional third-party imports (transformers,
  matplotlib, onnxruntime.quantization) may sit in functions, with a comment saying why.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

ROOTS = ["service", "worker", "kdq"]
"""Roots of the cycle, private-name and file-size rules: both halves and the client."""
ENGINE_ROOTS = ["worker/compression"]
SERVICE_ROOTS = ["service"]
CORE_ROOTS = ["service/core"]
API_PACKAGE = "service.api"
PROJECT_PACKAGES = ("worker", "service", "kdq")
MAX_LINES = 450
SIZE_EXEMPT: set[str] = set()
"""Generated files under the roots (repository-relative paths) the size rule skips: none today."""
MIN_ENGINE_MODULES = 30
"""The engine rules must have walked at least this many modules (so they cannot pass vacuously)."""


@dataclass(frozen=True)
class Import:
    target: str
    """The module imported from (absolute, dotted)."""
    names: tuple[str, ...]
    """The names taken from it (``from m import a, b``); empty for ``import m``."""
    line: int
    in_function: bool


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    imports: list[Import] = field(default_factory=list)

    @property
    def rel(self) -> str:
        return self.path.relative_to(REPO).as_posix()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(name: str, is_package: bool, tree: ast.Module) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, (), child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append(Import(target, tuple(a.name for a in child.names), child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _walk(roots: list[str]) -> dict[str, Module]:
    out: dict[str, Module] = {}
    for root in roots:
        base = REPO / root
        files = sorted(base.rglob("*.py")) if base.is_dir() else ([base] if base.is_file() else [])
        for path in files:
            name = _module_name(path)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            out[name] = Module(name, path, tree, _imports(name, path.name == "__init__.py", tree))
    return out


ALL_MODULES = _walk([*PROJECT_PACKAGES])
"""Every project module: resolves ``from pkg import name`` to a module or to the package."""


def _edges(module: Module) -> Iterator[tuple[str, Import]]:
    """(imported module, import) for every import, ``from pkg import mod`` resolved to ``pkg.mod``."""
    for imp in module.imports:
        if not imp.names:
            yield imp.target, imp
            continue
        for n in imp.names:
            sub = f"{imp.target}.{n}"
            yield (sub if sub in ALL_MODULES else imp.target), imp


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# --- the rules --------------------------------------------------------------------------------


def _cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself."""
    graph = {name: sorted({t for t, _ in _edges(m) if t in modules}) for name, m in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan, iterative over each node's successors
        nonlocal counter
        work = [(v, iter(graph[v]))]
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, successors = work[-1]
            advanced = False
            for w in successors:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))

    for v in graph:
        if v not in index:
            strongconnect(v)
    return found


def _forbidden(modules: dict[str, Module], packages: tuple[str, ...]) -> list[str]:
    return [f"{m.rel}:{imp.line} imports {target}"
            for m in modules.values() for target, imp in _edges(m)
            if any(_is_under(target, p) for p in packages)]


def _private_names(modules: dict[str, Module]) -> list[str]:
    def private(n: str) -> bool:
        return n.startswith("_") and not n.startswith("__")

    problems = []
    for m in modules.values():
        bound: dict[str, str] = {}  # local name -> the project module it is bound to
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in ALL_MODULES:
                        bound[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if f"{_target_of(m, node)}.{a.name}" in ALL_MODULES:
                        bound[a.asname or a.name] = f"{_target_of(m, node)}.{a.name}"
        for imp in m.imports:
            if not any(_is_under(imp.target, p) for p in PROJECT_PACKAGES):
                continue
            names = [*imp.target.split(".")[1:], *imp.names]
            problems += [f"{m.rel}:{imp.line} imports the private name {n!r} (from {imp.target})"
                         for n in names if private(n)]
        for node in ast.walk(m.tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and private(node.attr)):
                problems.append(f"{m.rel}:{node.lineno} uses the private name {node.value.id}.{node.attr} "
                                f"of {bound[node.value.id]}")
    return problems


def _target_of(m: Module, node: ast.ImportFrom) -> str:
    return next(i.target for i in m.imports if i.line == node.lineno)


def _long_files(roots: list[str]) -> list[str]:
    out = []
    for m in _walk(roots).values():
        if m.rel in SIZE_EXEMPT or m.rel.startswith(("tests/", "bench/")):
            continue
        n = len(m.path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            out.append(f"{m.rel}: {n} lines")
    return out


# --- the tests ----------------------------------------------------------------------------------


def test_the_engine_rules_walk_the_whole_engine() -> None:
    engine = _walk(ENGINE_ROOTS)
    assert len(engine) > MIN_ENGINE_MODULES, sorted(engine)
    assert len(_walk(ROOTS)) >= len(engine)
    assert sum(len(m.imports) for m in engine.values()) > 5 * MIN_ENGINE_MODULES


@pytest.mark.parametrize("roots", [ROOTS], ids=lambda r: "+".join(r))
def test_no_import_cycle(roots: list[str]) -> None:
    cycles = _cycles(_walk(roots))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(("roots", "packages"), [
    (ENGINE_ROOTS, ("service", "celery")),
    (SERVICE_ROOTS, ("torch",)),
    (CORE_ROOTS, ("fastapi", "starlette", API_PACKAGE, "torch")),
    (["kdq"], ("service", "worker", "torch", "fastapi", "starlette", "sqlalchemy", "celery")),
], ids=["engine-no-service-or-celery", "service-no-torch", "core-no-fastapi-api-torch", "client-http-only"])
def test_forbidden_imports(roots: list[str], packages: tuple[str, ...]) -> None:
    problems = _forbidden(_walk(roots), packages)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("roots", [ROOTS], ids=lambda r: "+".join(r))
def test_no_private_names_of_other_modules(roots: list[str]) -> None:
    problems = _private_names(_walk(roots))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("roots", [ROOTS], ids=lambda r: "+".join(r))
def test_no_file_over_the_line_limit(roots: list[str]) -> None:
    problems = _long_files(roots)
    assert not problems, f"over {MAX_LINES} lines:\n" + "\n".join(problems)


@pytest.mark.parametrize("roots", [ENGINE_ROOTS], ids=lambda r: "+".join(r))
def test_no_engine_import_inside_a_function(roots: list[str]) -> None:
    problems = _engine_imports_in_functions(_walk(roots))
    assert not problems, "\n".join(problems)


def _engine_imports_in_functions(modules: dict[str, Module]) -> list[str]:
    return [f"{m.rel}:{imp.line} imports {imp.target} inside a function"
            for m in modules.values() if m.path.name != "__init__.py"
            for imp in m.imports if imp.in_function and _is_under(imp.target, "worker.compression")]


def test_the_rules_catch_what_they_are_for(tmp_path: Path) -> None:
    """Each checker finds a planted violation (so a green run means something)."""
    a = Module("pkg.a", REPO / "pkg/a.py", ast.parse(""), [Import("pkg.b", ("x",), 1, True)])
    b = Module("pkg.b", REPO / "pkg/b.py", ast.parse(""), [Import("pkg.a", ("y",), 1, False)])
    assert _cycles({"pkg.a": a, "pkg.b": b}) == [["pkg.a", "pkg.b"]]
    c = Module("worker.c", REPO / "worker/c.py", ast.parse(""), [Import("celery", (), 3, True)])
    assert _forbidden({"worker.c": c}, ("service", "celery")) == ["worker/c.py:3 imports celery"]
    src = "from worker.compression.types import _hidden\nfrom worker.compression.students import zoo\nzoo._x\n"
    tree = ast.parse(src)
    d = Module("worker.d", REPO / "worker/d.py", tree, _imports("worker.d", False, tree))
    assert len(_private_names({"worker.d": d})) == 2
    e = Module("worker.compression.e", REPO / "worker/compression/e.py", ast.parse(""),
               [Import("worker.compression.types", ("Teacher",), 7, True)])
    assert _engine_imports_in_functions({"worker.compression.e": e}) == [
        "worker/compression/e.py:7 imports worker.compression.types inside a function"]
