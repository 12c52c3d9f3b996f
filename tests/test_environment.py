"""app/environment.py is the one place SEEDVC_* variables are named and read, and the README documents each of them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from app import environment
from app.environment import ServiceEnvironment, browser_tests_enabled, client_api_key

ROOT = Path(__file__).resolve().parent.parent
VARIABLE = re.compile(r"SEEDVC_[A-Z0-9_]+")
CODE = ("app", "deployments", "client", "bench", "scripts")


def test_the_service_environment_is_read_from_its_variables_and_blank_is_unset() -> None:
    given = {
        "SEEDVC_MODEL": "/models/seedvc",
        "SEEDVC_VOICE_STORE": "s3://bucket/voices",
        "SEEDVC_API_KEYS": "main=k1,partner=k2",
        "SEEDVC_ADMIN_KEY": "admin",
        "SEEDVC_TOKEN_SECRET": "",  # listed in an env file, left blank
        "SEEDVC_RTP_HOST": "10.0.0.5",
        "SEEDVC_API_KEY": "a client's key: not the service's",
    }
    assert ServiceEnvironment.read(given) == ServiceEnvironment(
        model="/models/seedvc",
        voice_store="s3://bucket/voices",
        api_keys="main=k1,partner=k2",
        admin_key="admin",
        token_secret=None,
        turn_secret=None,
        rtp_host="10.0.0.5",
    )
    assert ServiceEnvironment.read({}) == ServiceEnvironment()


def test_client_key_and_browser_switch() -> None:
    assert client_api_key({"SEEDVC_API_KEY": "k"}) == "k"
    assert client_api_key({"SEEDVC_API_KEY": ""}) is None and client_api_key({}) is None
    assert browser_tests_enabled({"SEEDVC_BROWSER_TESTS": "1"})
    assert not browser_tests_enabled({"SEEDVC_BROWSER_TESTS": "0"}) and not browser_tests_enabled({})


def declared_variables() -> set[str]:
    return {value for value in vars(environment).values() if isinstance(value, str) and VARIABLE.fullmatch(value)}


def test_every_service_variable_is_a_field_of_the_service_environment() -> None:
    assert set(environment.SERVICE_VARIABLES) <= declared_variables()
    fields = ServiceEnvironment.__dataclass_fields__
    assert len(fields) == len(environment.SERVICE_VARIABLES)
    every_one_set = {name: f"value of {name}" for name in environment.SERVICE_VARIABLES}
    assert all(value is not None for value in vars(ServiceEnvironment.read(every_one_set)).values())


def named_variables(path: Path) -> list[str]:
    """String literals that are exactly a SEEDVC_* name: what code passes to os.environ (prose mentions are longer)."""
    tree = ast.parse(path.read_text())
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and VARIABLE.fullmatch(node.value)
    ]


def test_no_other_module_names_a_seedvc_variable() -> None:
    own = ROOT / "app" / "environment.py"
    offenders = {
        str(path.relative_to(ROOT)): names
        for folder in CODE
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != own and (names := named_variables(path))
    }
    assert not offenders, f"read SEEDVC_* variables through app/environment.py: {offenders}"


def test_the_readme_table_documents_every_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = {match.group(1): line for line in readme.splitlines() if (match := re.match(r"\| `(SEEDVC_\w+)` \|", line))}
    missing = declared_variables() - set(rows)
    assert not missing, f"README's environment table lacks {sorted(missing)}"
    assert "test-only" in rows[environment.BROWSER_TESTS]
