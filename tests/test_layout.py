"""The packages import one way: every import of every module, read from the source (nothing is run), is one
that ARCHITECTURE.md's table of packages allows, and the table itself has no back-arrow; Ray and MLflow are
imported only where its table of libraries says."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from spaces.errors import DETTUNE_PACKAGES

REPO = Path(__file__).resolve().parents[1]


def table(header: str) -> dict[str, set[str]]:
    """The rows of ARCHITECTURE.md's table under ``header``, in its order: first word -> the other words."""
    found = re.search(rf"```text\n{header}\n(?P<rows>.*?)```", (REPO / "ARCHITECTURE.md").read_text(), re.DOTALL)
    assert found, f"ARCHITECTURE.md lost its table {header!r}"
    rows: dict[str, set[str]] = {}
    for line in found["rows"].splitlines():
        first, *others = line.split()
        rows[first] = set(others) - {"-"}
    return rows


def allowed_imports() -> dict[str, set[str]]:
    """Each package and the packages of ours it may import."""
    return table("package +imports of ours")


def imported_packages(path: Path) -> set[str]:
    """The top-level names ``path`` imports, at module level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def our_packages() -> set[str]:
    return {p.parent.name for p in REPO.glob("*/__init__.py")}


def test_the_table_names_every_package() -> None:
    assert set(allowed_imports()) == our_packages()


def test_every_package_counts_as_ours_when_blaming_a_bug() -> None:
    """``raised_by_dettune`` tells a bug from a library's error by these packages' folders."""
    assert set(DETTUNE_PACKAGES) == our_packages()


def test_the_table_has_no_back_arrow() -> None:
    """Each package may import only packages above it in the table, so no two packages can import each other."""
    table = allowed_imports()
    order = list(table)
    for package, imports in table.items():
        below = {other for other in imports if order.index(other) >= order.index(package)}
        assert not below, f"{package} may import {sorted(below)}, which are not above it"


@pytest.mark.parametrize("package", sorted(our_packages()))
def test_imports_go_one_way(package: str) -> None:
    ours = our_packages()
    allowed = allowed_imports()[package] | {package}
    wrong = {f"{path.relative_to(REPO)} imports {name}"
             for path in sorted((REPO / package).rglob("*.py"))
             for name in imported_packages(path) & ours - allowed}
    assert not wrong, "\n".join(sorted(wrong))


@pytest.mark.parametrize(("library", "users"), sorted(table("library +imported only by").items()))
def test_libraries_are_imported_only_where_the_table_says(library: str, users: set[str]) -> None:
    wrong = {str(path.relative_to(REPO)) for package in our_packages() - users
             for path in sorted((REPO / package).rglob("*.py")) if library in imported_packages(path)}
    assert not wrong, f"{library} imported by {sorted(wrong)}"
