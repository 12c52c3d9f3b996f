"""scripts/check_wheels.py: the Python versions it checks, and a failure where one of them has no wheel.

The failure case asks the package index for real (a registry, as any install does): numpy 1.26.4 has CPython wheels
for 3.9 to 3.12 and none for 3.13, and no sdist may stand in for one.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_wheels.py"


@pytest.fixture(scope="module")
def check_wheels() -> ModuleType:
    # scripts/ is no package, so the script is loaded by path; its dataclass needs it in sys.modules.
    spec = importlib.util.spec_from_file_location("check_wheels", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_pythons_are_those_requires_python_admits(check_wheels: ModuleType) -> None:
    assert check_wheels.admitted_pythons(">=3.11,<3.14") == ["3.11", "3.12", "3.13"]
    assert check_wheels.admitted_pythons(">=3.11,<3.12") == ["3.11"]
    assert check_wheels.admitted_pythons("~=3.12") == [f"3.{minor}" for minor in range(12, 50)]


def test_a_version_without_wheels_fails_the_check(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy==1.26.4\n")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--python", "3.12", "--python", "3.13", "-r", str(requirements)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Python 3.12: ok, 1 wheels would install" in done.stdout
    assert "Python 3.13: FAILED" in done.stdout
    assert "No matching distribution found for numpy==1.26.4" in done.stdout
