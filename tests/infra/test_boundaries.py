"""infra/ describes where code runs, never what it does: from the product it may import only setting
names, error names and the deploy step list (DESIGN section 2)."""

from __future__ import annotations

import ast

from tests.infra.conftest import REPO

ALLOWED = {"maas.settings", "maas.errors", "maas.services.deploy"}


def test_infra_imports_only_names_from_maas() -> None:
    seen: dict[str, set[str]] = {}
    for path in [*sorted((REPO / "infra").glob("*.py")), REPO / "app.py"]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                if module == "maas" or module.startswith("maas."):
                    seen.setdefault(module, set()).add(path.name)
    assert set(seen) <= ALLOWED, seen
    assert "maas.services.deploy" in seen  # the state machine is generated from the step list
