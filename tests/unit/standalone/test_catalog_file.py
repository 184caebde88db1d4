import datetime as dt
from pathlib import Path

import pytest

from authz.errors import CatalogError
from authz.standalone.catalog_file import load_catalog, parse_catalog

FIXTURES = Path(__file__).parents[2] / "fixtures" / "catalog"
H = "0f5d88e1fb9d3a8ab5d4e1c2ee56b6fb7ff2b2dbbd2cbdbc0b2d55d5c4a6a0a1"


def test_valid_catalog():
    catalog = load_catalog(FIXTURES / "valid.yaml", loaded_at=5.0)
    assert set(catalog.products) == {"orders", "legacy"}
    assert catalog.products["legacy"].targets == {"legacy.example.com", "legacy.internal"}
    assert catalog.loaded_at == 5.0
    creds = catalog.credentials
    assert len(creds) == 4
    good = creds[H]
    assert (good.app_name, good.developer_email, good.products, good.active) == (
        "demo-app",
        "dev@example.com",
        ("orders",),
        True,
    )
    assert good.client_id == H[:16]
    assert creds["1" + H[1:]].active is False  # revoked credential
    legacy = creds["2" + H[1:]]  # upper-case hex is normalised
    assert legacy.active is False  # revoked app
    assert legacy.expires_at == dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()
    old = creds["3" + H[1:]]
    assert old.active is False  # inactive developer
    assert old.expires_at == dt.datetime(2031, 6, 1, tzinfo=dt.UTC).timestamp()


def test_empty_sections_are_an_empty_catalog():
    catalog = parse_catalog("products: []\ndevelopers: []\n", "c.yaml")
    assert (dict(catalog.products), dict(catalog.credentials)) == ({}, {})


CRED = f'[{{email: d@x, apps: [{{name: a, products: [p], credentials: [{{key_sha256: "{H}"}}]}}]}}]'
PRODUCT = "products: [{name: p, environments: [test]}]\n"

INVALID = [
    ("", "c.yaml: empty catalog (expected products and developers)"),
    ("products: [\n", "c.yaml: line 2: invalid YAML: expected the node content, but found '<stream end>'"),
    ("- a\n", "c.yaml: expected a mapping, got list"),
    ("product: []\n", "c.yaml: product: unknown key (did you mean 'products'?)"),
    ("products: {}\n", "c.yaml: products: expected a list, got dict"),
    (
        "products: [{name: p, enviroments: [test]}]\n",
        "c.yaml: products[0].enviroments: unknown key (did you mean 'environments'?)",
    ),
    (
        "products: [{name: p, apiResources: ['/a/**/b']}]\n",
        "c.yaml: products[0]: '**' is allowed only at the end of a resource: '/a/**/b'",
    ),
    ("products: [{name: p}, {name: p}]\n", "c.yaml: products[1].name: duplicate product 'p'"),
    (PRODUCT + "developers: [{apps: []}]\n", "c.yaml: developers[0].email: expected a non-empty string"),
    (
        PRODUCT + "developers: [{email: d, status: gone}]\n",
        "c.yaml: developers[0].status: expected one of active, inactive, got 'gone'",
    ),
    (
        PRODUCT + "developers: [{email: d, apps: [{name: a, products: [q]}]}]\n",
        "c.yaml: developers[0].apps[0].products[0]: unknown product 'q'",
    ),
    (
        PRODUCT + "developers: [{email: d, apps: [{name: a, key: x}]}]\n",
        "c.yaml: developers[0].apps[0].key: unknown key",
    ),
    (
        PRODUCT + "developers: [{email: d, apps: [{name: a, credentials: [{key_sha256: abc}]}]}]\n",
        "c.yaml: developers[0].apps[0].credentials[0].key_sha256: expected 64 hex digits (sha256 of the key)",
    ),
    (
        PRODUCT + "developers: [{email: d, apps: [{name: a, credentials: [{key: abc}]}]}]\n",
        "c.yaml: developers[0].apps[0].credentials[0].key: unknown key (did you mean 'key_sha256'?)",
    ),
    (
        PRODUCT
        + f'developers: [{{email: d, apps: [{{name: a, credentials: [{{key_sha256: "{H}", status: ok}}]}}]}}]\n',
        "c.yaml: developers[0].apps[0].credentials[0].status: expected one of approved, revoked, got 'ok'",
    ),
    (
        PRODUCT
        + f'developers: [{{email: d, apps: [{{name: a, credentials: [{{key_sha256: "{H}", expires_at: soon}}]}}]}}]\n',
        "c.yaml: developers[0].apps[0].credentials[0].expires_at: expected an ISO 8601 time, got 'soon'",
    ),
    (
        PRODUCT
        + f'developers: [{{email: d, apps: [{{name: a, credentials: [{{key_sha256: "{H}", expires_at: 5}}]}}]}}]\n',
        "c.yaml: developers[0].apps[0].credentials[0].expires_at: expected an ISO 8601 time",
    ),
    (
        PRODUCT
        + f'developers: [{{email: d, apps: [{{name: a, credentials: [{{key_sha256: "{H}"}}, {{key_sha256: "{H}"}}]}}]}}]\n',
        "c.yaml: developers[0].apps[0].credentials[1].key_sha256: duplicate credential",
    ),
    (
        PRODUCT + "developers: [{email: d, apps: [{name: 7}]}]\n",
        "c.yaml: developers[0].apps[0].name: expected a non-empty string",
    ),
    (
        PRODUCT + "developers: [{email: d, apps: [{name: a, status: 1}]}]\n",
        "c.yaml: developers[0].apps[0].status: expected a string",
    ),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_catalogs_name_file_key_and_problem(text, message):
    with pytest.raises(CatalogError) as info:
        parse_catalog(text, "c.yaml")
    assert str(info.value) == message


def test_unreadable_file(tmp_path):
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(bad)
