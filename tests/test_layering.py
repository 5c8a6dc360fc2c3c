"""DESIGN §2: store/ never imports modelfs/, pyfuse3 or the CLI libraries."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_STORE = {"modelfs", "pyfuse3", "click", "rich", "typer"}
ALLOWED_THIRD_PARTY_IN_STORE = {"httpx", "httpcore", "trio", "cryptography", "sqlite_utils"}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_store_never_imports_frontends():
    files = sorted((REPO / "store").rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(REPO)): sorted(imported_roots(f) & FORBIDDEN_IN_STORE)
                 for f in files if imported_roots(f) & FORBIDDEN_IN_STORE}
    assert offenders == {}


def test_store_third_party_imports_are_the_allowed_ones():
    import sys
    stdlib = set(sys.stdlib_module_names)
    for f in sorted((REPO / "store").rglob("*.py")):
        extra = imported_roots(f) - stdlib - ALLOWED_THIRD_PARTY_IN_STORE - {"store", "__future__"}
        assert not extra, f"{f.name} imports {sorted(extra)}"


def test_tree_module_has_no_pyfuse3():
    tree = REPO / "modelfs" / "tree.py"
    if tree.exists():
        assert "pyfuse3" not in imported_roots(tree)


def test_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pyfuse3\nfrom modelfs.cli import main\n")
    assert imported_roots(bad) & FORBIDDEN_IN_STORE == {"pyfuse3", "modelfs"}
