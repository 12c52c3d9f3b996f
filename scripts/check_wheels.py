"""Does every pinned requirement install from wheels on each Python that pyproject.toml admits, on Linux x86_64?

Usage (from the repo root, with the project's venv: `make check-wheels` runs this; CI runs it through scripts/test):

    .venv/bin/python scripts/check_wheels.py                    # requirements.txt + requirements-dev.txt, every 3.x
    .venv/bin/python scripts/check_wheels.py --python 3.13 -r requirements.txt

The Python versions are those `requires-python` admits (pyproject.toml), so widening that range widens this check.
For each version, pip's own resolver resolves the requirement files together (as `pip install -e ".[dev]"` installs
them, transitive dependencies included) for CPython on manylinux x86_64, wheels only (no sdist builds), in dry-run
mode: nothing is installed. The versions resolve concurrently; each prints one line; any failure prints pip's error
and the exit status is 1.

Metadata only: with `--dry-run` pip >= 25.3 stops after the resolution instead of downloading every chosen wheel
(torch and its CUDA libraries are several GB per Python version), and `fast-deps` reads each wheel's metadata with
HTTP range requests, because the index here does not advertise the separate .metadata files (PEP 658) that would
make that unnecessary. requirements-dev.txt pins a pip that does both. The indexes are whatever pip's configuration
names (pip.conf, PIP_* variables), as for any install.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENT_FILES = ("requirements.txt", "requirements-dev.txt")
MIN_PIP = Version("25.3")  # the first pip whose --dry-run does not download the resolved wheels
# pip does not widen one --platform to older tags, so every manylinux tag a Linux x86_64 machine accepts is named:
# glibc 2.5 (manylinux1) up to 2.39 (Ubuntu 24.04's glibc; Debian 13 has 2.41), and the legacy aliases.
PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(5, 40)),
    "manylinux1_x86_64",
    "manylinux2010_x86_64",
    "manylinux2014_x86_64",
)


@dataclass(frozen=True)
class Resolution:
    python: str
    ok: bool
    distributions: int  # how many distributions pip would install (0 when it failed)
    error: str  # pip's error output when it failed


def admitted_pythons(requires_python: str) -> list[str]:
    """The Python 3 minor versions a `requires-python` specifier admits, e.g. ">=3.11,<3.14" -> 3.11, 3.12, 3.13."""
    spec = SpecifierSet(requires_python)
    return [f"3.{minor}" for minor in range(50) if spec.contains(f"3.{minor}")]


def resolve_command(python: str, requirement_files: list[Path], report: Path) -> list[str]:
    """The pip command that resolves the files for CPython `python` on Linux x86_64, metadata only."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    command += ["--use-feature=fast-deps", "--only-binary=:all:", "--implementation", "cp", "--python-version", python]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    for path in requirement_files:
        command += ["-r", str(path)]
    return [*command, "--report", str(report)]


def resolve(python: str, requirement_files: list[Path]) -> Resolution:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        done = subprocess.run(resolve_command(python, requirement_files, report), capture_output=True, text=True)
        if done.returncode != 0:
            # pip's warnings (locations it skips, fast-deps being experimental) are noise here; its errors say which
            # requirement failed.
            lines = [line for line in done.stderr.splitlines() if not line.startswith("WARNING:")]
            return Resolution(python, False, 0, "\n".join(lines).strip())
        return Resolution(python, True, len(json.loads(report.read_text())["install"]), "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", action="append", help="a version to check (repeatable; default: requires-python's)")
    parser.add_argument("-r", dest="files", action="append", type=Path, help="a requirement file (repeatable)")
    args = parser.parse_args()
    if Version(version("pip")) < MIN_PIP:
        print(f"pip {version('pip')} downloads every wheel in a dry run; need pip >= {MIN_PIP} (requirements-dev.txt)")
        return 2
    requires_python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    pythons = args.python or admitted_pythons(requires_python)
    files = args.files or [ROOT / name for name in REQUIREMENT_FILES]
    print(f"resolving {', '.join(str(f) for f in files)} for Python {', '.join(pythons)} (Linux x86_64, wheels only)")
    with ThreadPoolExecutor(len(pythons)) as pool:
        results = list(pool.map(lambda python: resolve(python, files), pythons))
    for result in results:
        if result.ok:
            print(f"Python {result.python}: ok, {result.distributions} wheels would install")
        else:
            print(f"Python {result.python}: FAILED\n{result.error}")
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
