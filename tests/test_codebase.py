"""Rules of the codebase that a reviewer would otherwise have to remember: lint, format, layering."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
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


# A per-line ignore names its error code and then says why: `# type: ignore[code]  # reason`.
TYPE_IGNORE = re.compile(r"#\s*type:\s*ignore(?P<codes>\[[^\]]*\])?(?P<after>.*)$")


def test_type_checking_has_no_blanket_ignores_and_each_line_ignore_says_why() -> None:
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert not {"ignore_errors", "disable_error_code"} & set(mypy), "no error is ignored for the whole tree"
    for override in mypy.get("overrides", []):
        assert set(override) == {"module", "ignore_missing_imports"}, f"only untyped imports may be skipped: {override}"
    offenders = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        if path.relative_to(ROOT).parts[0] not in {"app", "deployments", "client", "bench", "tests", "scripts"}:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found = TYPE_IGNORE.search(line)
            if found and (not found["codes"] or not re.match(r"\s+#\s*\S", found["after"])):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "write `# type: ignore[code]  # why`:\n" + "\n".join(offenders)
