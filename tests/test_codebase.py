"""Rules of the codebase that a reviewer would otherwise have to remember: lint, format, layering."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_lint_and_format_are_clean() -> None:
    for command in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_app_is_a_library_without_ray() -> None:
    offenders = [
        str(path.relative_to(ROOT)) for path in (ROOT / "app").rglob("*.py") if "ray" in imported_modules(path)
    ]
    assert not offenders, f"app/ must not import ray (Ray glue lives in deployments/): {offenders}"
