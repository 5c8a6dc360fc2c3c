"""DESIGN §2, enforced on the import graph of ``modelfs/`` and ``store/`` (installed as
``modelfs_store``), read from the source with ``ast``:

- no import cycle anywhere, lazy imports inside functions included;
- nothing imports ``modelfs.cli`` (but ``modelfs.__main__``); ``modelfs.mount`` never does;
- the store never imports ``modelfs``, pyfuse3 or the CLI libraries, and of third-party
  packages only the allowed ones;
- the plain modules of the mount (tree, errno table, open files, run-state) have no pyfuse3;
- no imports below the first definition of a module;
- every module named in the module table of ``docs/architecture.md`` exists, and every
  module that exists is named there.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"modelfs": REPO / "modelfs", "modelfs_store": REPO / "store"}
FORBIDDEN_IN_STORE = {"modelfs", "pyfuse3", "click", "rich", "typer"}
ALLOWED_THIRD_PARTY_IN_STORE = {"httpx", "httpcore", "trio", "cryptography", "sqlite_utils"}
NO_PYFUSE3 = ("modelfs.mount.tree", "modelfs.mount.views", "modelfs.mount.errnos", "modelfs.mount.openfiles",
              "modelfs.mount.runstate", "modelfs.mount.config", "modelfs.mount.control", "modelfs.mount.identity",
              "modelfs.mount.notify", "modelfs.mount.links", "modelfs.mount.holders", "modelfs.mount.server",
              "modelfs.mount.peer", "modelfs.mount.api", "modelfs.mount.jobs", "modelfs.mount.socketclient")
MAY_IMPORT_CLI = {"modelfs.__main__"}


def module_name(path: Path) -> str:
    for name, root in PACKAGES.items():
        if path.is_relative_to(root):
            parts = [name, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join(parts)
    raise ValueError(path)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for root in PACKAGES.values() for p in sorted(root.rglob("*.py"))}


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """Every module ``name`` imports (absolute names), wherever the import statement is."""
    known = set(known)
    package = name if _is_package(path) else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            out.add(target)
            # ``from pkg import mod`` imports the module pkg.mod
            out |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = source_modules()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def internal(graph: Mapping[str, set[str]]) -> dict[str, set[str]]:
    return {m: {t for t in targets if t in graph} for m, targets in graph.items()}


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return [*stack[stack.index(t):], t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def root(name: str) -> str:
    return name.split(".")[0]


def test_no_import_cycles():
    assert find_cycle(internal(import_graph())) is None


def test_nothing_imports_the_cli():
    offenders = {m: sorted(t for t in targets if t == "modelfs.cli" or t.startswith("modelfs.cli."))
                 for m, targets in import_graph().items()
                 if not m.startswith("modelfs.cli") and m not in MAY_IMPORT_CLI}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_the_mount_never_imports_the_cli():
    graph = import_graph()
    mount = [m for m in graph if m.startswith("modelfs.mount")]
    assert len(mount) >= 8
    def cli(t: str) -> bool:  # modelfs.client is not the CLI
        return t == "modelfs.cli" or t.startswith("modelfs.cli.")
    assert {m: sorted(t for t in graph[m] if cli(t)) for m in mount if any(cli(t) for t in graph[m])} == {}


def test_store_never_imports_frontends():
    graph = import_graph()
    store = [m for m in graph if root(m) == "modelfs_store"]
    assert len(store) >= 15
    offenders = {m: sorted({root(t) for t in graph[m]} & FORBIDDEN_IN_STORE) for m in store}
    assert {m: o for m, o in offenders.items() if o} == {}


def test_store_third_party_imports_are_the_allowed_ones():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    graph = import_graph()
    for m in (m for m in graph if root(m) == "modelfs_store"):
        extra = {root(t) for t in graph[m]} - stdlib - ALLOWED_THIRD_PARTY_IN_STORE - {"modelfs_store"}
        assert not extra, f"{m} imports {sorted(extra)}"


@pytest.mark.parametrize("module", NO_PYFUSE3)
def test_plain_mount_modules_have_no_pyfuse3(module):
    graph = import_graph()
    assert module in graph, f"{module} is listed here but missing"
    assert "pyfuse3" not in {root(t) for t in graph[module]}


def late_imports(path: Path) -> list[int]:
    """Line numbers of module-level imports that come after a def or class."""
    seen_definition = False
    late = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            seen_definition = True
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and seen_definition:
            late.append(node.lineno)
    return late


def test_no_imports_at_the_bottom_of_a_file():
    assert {m: late_imports(p) for m, p in source_modules().items() if late_imports(p)} == {}


def documented_modules() -> set[str]:
    """Modules named in the first column of docs/architecture.md's module table."""
    text = (REPO / "docs" / "architecture.md").read_text()
    names: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        for path in re.findall(r"`([\w/]+\.py)`", first):
            names.add(module_name(REPO / path))
    return names


def test_every_documented_module_exists_and_every_module_is_documented():
    documented = documented_modules()
    actual = {m for m in source_modules() if not m.endswith("__main__")}
    actual -= {"modelfs", "modelfs_store", "modelfs.mount"}  # empty package markers
    assert sorted(documented - actual) == [], "listed in docs/architecture.md but missing"
    assert sorted(actual - documented) == [], "missing from docs/architecture.md's module table"


# -- the checker itself ----------------------------------------------------------------------
def test_checker_finds_a_cycle_and_a_forbidden_import(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    bad = tmp_path / "bad.py"
    bad.write_text("import pyfuse3\n\ndef f():\n    from modelfs.cli import main\n\nimport os\n")
    found = imports_of("modelfs_store.bad", bad, ())
    assert {root(t) for t in found} & FORBIDDEN_IN_STORE == {"pyfuse3", "modelfs"}
    assert late_imports(bad) == [6]


def test_relative_imports_resolve(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from . import tree\nfrom .errnos import errno_for\nfrom .. import cli\n")
    known = {"modelfs.mount.tree", "modelfs.mount.errnos", "modelfs.cli"}
    assert imports_of("modelfs.mount.x", f, known) >= known
