"""Bearer tokens end to end: a real Envoy in front of ``python -m authz serve``, tokens from fake issuers.

* The service validates tokens itself (``auth.jwt_providers``, ``envoy/sidecar.yaml``): Google-style ID
  tokens from a FakeOidc issuer on loopback (found by OIDC discovery) grant the provider's fixed products,
  with ``azp``, ``sub`` and ``email`` as client id, application and developer; in Apigee mode tokens from
  FakeApigee's ``/remote-token/token`` grant their ``api_product_list``.
* Go-adapter style (``envoy/sidecar-jwt-authn.yaml``): Envoy's jwt_authn verifies the token and the
  service decides from the claims it passes in the metadata (``auth.jwt_provider_key``).

Outcomes are the DENY_STATUS table of authz/server/codec.py: 401 ``invalid_token`` with a Bearer
challenge, 403 ``not_authorized`` / ``invalid_claims``, 503 ``token_unavailable``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import pytest

from devstack.stack import Stack, start_stack
from tests.fakes.apigee import FakeApigee
from tests.fakes.oidc import FakeOidc
from tests.support.apigee_config import write_policy_secret
from tests.support.apigee_thread import ApigeeThread
from tests.support.catalogs import ORDERS_KEY, catalog_yaml
from tests.support.fake_thread import OidcThread
from tests.support.http_polling import outcome, poll, unavailable

if TYPE_CHECKING:
    from tests.e2e.conftest import StackFactory

pytestmark = pytest.mark.e2e

ORDERS_API = "orders-api"  # the route's apigee_api; the catalog's orders product serves /v1/orders/**
ORDERS_PATH = "/v1/orders/1"
AUDIENCE = "https://orders-7d2f9c-uc.a.run.app"  # Google ID tokens carry the service URL as aud
PROVIDER = "google"
CLAIMS = {"client_id": "azp", "application": "sub", "developer_email": "email"}
CALLER = {  # a Google service account's ID token
    "azp": "108735122960718457013",
    "sub": "108735122960718457013",
    "email": "billing@proj-7.iam.gserviceaccount.com",
    "email_verified": True,
}
CHALLENGE = 'Bearer error="invalid_token"'
_serial = itertools.count()
# Apigee mode: the products FakeApigee serves (apigee-adapter.md §3.1 shapes).
APIGEE_PRODUCTS: list[dict[str, Any]] = [
    {"name": "orders", "environments": ["test"],
     "operationGroup": {"operationConfigType": "remoteservice", "operationConfigs": [
         {"apiSource": "orders.example.com",
          "operations": [{"resource": "/v1/orders/**", "methods": ["GET", "POST"]}]}]}},
    {"name": "legacy", "environments": ["test"], "apiResources": ["/v1/**"],
     "attributes": [{"name": "apigee-remote-service-targets", "value": "legacy.example.com"}]},
]  # fmt: skip


def provider(oidc: OidcThread, **more: Any) -> dict[str, Any]:
    """An ``auth.jwt_providers`` entry for ``oidc``: keys by OIDC discovery, a fixed product."""
    return {
        "name": PROVIDER,
        "issuer": oidc.issuer,
        "audiences": [AUDIENCE],
        "products": ["orders"],
        "claims": CLAIMS,
        **more,
    }


def overrides(oidc: OidcThread, **more: Any) -> dict[str, Any]:
    """The service config: the provider, and x-apigee-* headers upstream so tests see the caller."""
    return {"auth": {"append_metadata_headers": True, "jwt_providers": [provider(oidc, **more)]}}


def mint(oidc: OidcThread, claims: dict[str, Any] | None = None, **options: Any) -> str:
    """A token from ``oidc`` (``FakeOidc.mint`` options), unique by its ``jti``: the service caches
    answers by token, so a fresh token is verified anew."""
    claims = {**CALLER, "jti": f"t{next(_serial)}", **(claims or {})}
    return oidc.call(oidc.fake.mint, claims, **options)


def send(
    http: httpx.Client,
    stack: Stack,
    token: str | None = None,
    *,
    path: str = ORDERS_PATH,
    method: str = "GET",
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    sent = dict(headers or {})
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    if key is not None:
        sent["x-api-key"] = key
    return http.request(method, stack.url + path, headers=sent)


@pytest.fixture(scope="module")
def oidc() -> Iterator[OidcThread]:
    """The module's issuer; read-only: no test rotates its keys or takes it down."""
    with OidcThread(FakeOidc(audience=AUDIENCE)) as issuer:
        yield issuer


@pytest.fixture(scope="module")
def shared(module_authz_stack: StackFactory, oidc: OidcThread) -> Stack:
    """authz validating the module issuer's tokens, behind envoy/sidecar.yaml."""
    return module_authz_stack(catalog_yaml(), overrides(oidc), api_name=ORDERS_API)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_a_valid_id_token_reaches_the_upstream_as_its_caller(shared, oidc, http, alg):
    response = send(http, shared, mint(oidc, alg=alg))
    assert response.status_code == 200, shared.logs()
    seen = response.json()["headers"]
    assert (seen["x-apigee-clientid"], seen["x-apigee-application"], seen["x-apigee-developeremail"]) == (
        CALLER["azp"],
        CALLER["sub"],
        CALLER["email"],
    )
    assert seen["x-apigee-apiproducts"] == "orders"
    assert "authorization" not in seen  # a validated token stays here, like jwt_authn without forward


@pytest.mark.parametrize(
    "token_of",
    [
        lambda o: mint(o, lifetime=-120),  # expired beyond the 60 s clock skew
        lambda o: mint(o, {"aud": "https://other-service.a.run.app"}),
        lambda o: mint(o, {"iss": "https://accounts.google.com"}),
        lambda o: jwt.encode(
            {"iss": o.issuer, "aud": AUDIENCE, "exp": 4e9, **CALLER}, None, algorithm="none"
        ),
        lambda o: "not-a-token",
    ],
    ids=["expired", "wrong-audience", "wrong-issuer", "alg-none", "garbage"],
)
def test_a_bad_token_is_401_with_a_bearer_challenge_even_next_to_a_valid_key(shared, oidc, http, token_of):
    response = send(http, shared, token_of(oidc), key=ORDERS_KEY)
    assert outcome(response) == (401, "invalid_token"), shared.logs()
    assert response.headers.get_list("www-authenticate") == [CHALLENGE]


@pytest.mark.parametrize(("method", "path"), [("GET", "/v2/orders"), ("DELETE", ORDERS_PATH)])
def test_a_valid_token_without_a_grant_is_403(shared, oidc, http, method, path):
    response = send(http, shared, mint(oidc), method=method, path=path)
    assert outcome(response) == (403, "not_authorized"), shared.logs()


def test_issuer_unreachable_at_start_is_503_until_it_heals(authz_stack, http):
    with OidcThread(FakeOidc(audience=AUDIENCE), up=False) as oidc:
        stack = authz_stack(catalog_yaml(), overrides(oidc), api_name=ORDERS_API)
        token = mint(oidc)
        late = unavailable(stack.transport, "token_unavailable")
        assert outcome(send(http, stack, token)) == late, stack.logs()
        assert outcome(send(http, stack, key=ORDERS_KEY)) == (200, "")  # API keys do not need the issuer

        oidc.up()
        seen: list[tuple[int, str]] = []

        def probe() -> tuple[int, str]:
            seen.append(outcome(send(http, stack, token)))  # the same token: a 503 is never cached
            return seen[-1]

        poll(probe, lambda o: o == (200, ""), "the token allowed once the issuer is back")
        assert set(seen) <= {late, (200, "")}, seen  # never a 401 on the way


def test_rotated_key_is_used_after_one_refetch_and_a_retired_one_is_refused(authz_stack, http):
    # An unknown kid refetches at most once per 30 s after a good fetch (J07), so a key published after
    # start-up arrives with the periodic refresh: refresh_interval 10 s (the minimum), ±10 % jitter.
    refresh = 10.0
    with OidcThread(FakeOidc(audience=AUDIENCE)) as oidc:
        stack = authz_stack(
            catalog_yaml(), overrides(oidc, refresh_interval=f"{refresh:.0f}s"), api_name=ORDERS_API
        )
        fetched = oidc.calls("jwks")
        old_kid = oidc.call(lambda: oidc.fake.rsa_kid)
        new_kid = oidc.call(oidc.fake.rotate)
        oidc.call(oidc.fake.retire, old_kid)
        rotated_at = time.monotonic()

        assert outcome(send(http, stack, mint(oidc, kid=old_kid))) == (200, ""), stack.logs()
        for _ in range(20):  # fresh tokens with the new kid: refused, and no fetch storm
            assert outcome(send(http, stack, mint(oidc, kid=new_kid))) == (401, "invalid_token")
        assert oidc.calls("jwks") == fetched

        poll(
            lambda: outcome(send(http, stack, mint(oidc, kid=new_kid))),
            lambda o: o == (200, ""),
            "a token signed with the new key",
            timeout=refresh * 1.1 + 2.0,
        )
        assert oidc.calls("jwks") == fetched + 1, f"{time.monotonic() - rotated_at:.1f}s after the rotation"
        assert outcome(send(http, stack, mint(oidc, kid=old_kid))) == (401, "invalid_token")


def test_a_new_kid_is_fetched_on_demand_after_the_cooldown(authz_stack, http):
    with OidcThread(FakeOidc(audience=AUDIENCE)) as oidc:
        stack = authz_stack(catalog_yaml(), overrides(oidc, unknown_kid_cooldown="1s"), api_name=ORDERS_API)
        fetched = oidc.calls("jwks")
        new_kid = oidc.call(oidc.fake.rotate)
        poll(
            lambda: outcome(send(http, stack, mint(oidc, kid=new_kid))),
            lambda o: o == (200, ""),
            "a token signed with a key published after start-up",
            timeout=5.0,
        )
        # Within the cooldown the new kid is refused without a fetch; after it, one fetch finds it.
        assert oidc.calls("jwks") == fetched + 1


def test_apigee_mode_remote_token_grants_its_api_product_list(
    tmp_path, echo_upstream, envoy_bin, http, transport
):
    secret = write_policy_secret(tmp_path / "policy-secret")
    fake = FakeApigee(org="demo", env="test", policy_jwks=secret.jwks)
    fake.set_products(APIGEE_PRODUCTS)
    fake.add_key(
        "orders-client-3c1f", app="orders-app", developer_email="dev@example.com", products=["orders"]
    )
    fake.add_key(
        "legacy-client-9e2a", app="legacy-app", developer_email="dev@example.com", products=["legacy"]
    )
    with ApigeeThread(fake) as apigee:
        stack = start_stack(
            tmp_path / "stack",
            None,
            echo_upstream.port,
            overrides={
                "tenant": {"remote_service_api": apigee.remote_service_url},
                "auth": {"append_metadata_headers": True},
            },
            policy_secret_dir=secret.directory,
            transport=transport,
        )
        try:

            def token(client_id: str) -> str:
                form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": "s3cret"}
                answer = http.post(f"{apigee.base_url}/remote-token/token", data=form)
                assert answer.status_code == 200, answer.text
                return str(answer.json()["access_token"])

            host = {"host": "orders.example.com"}
            response = send(http, stack, token("orders-client-3c1f"), headers=host)
            assert response.status_code == 200, stack.logs()
            seen = response.json()["headers"]
            assert (seen["x-apigee-apiproducts"], seen["x-apigee-application"]) == ("orders", "orders-app")
            assert "x-apigee-accesstoken" not in seen
            assert outcome(send(http, stack, token("legacy-client-9e2a"), headers=host)) == (
                403,
                "not_authorized",
            )
            assert apigee.calls("verifyApiKey") == 0  # the token itself is the credential
        finally:
            stack.close()
            print(f"logs of {stack.work_dir}:\n{stack.logs()}")  # shown by pytest when the test failed


# -- Go-adapter style: Envoy's jwt_authn verifies, the service reads the claims ---------------------------

JWT_AUTHN_PROVIDER = "apigee"  # the Go adapter samples' provider name and auth.jwt_provider_key


@pytest.fixture(scope="module")
def jwt_authn_stack(grpc_module_authz_stack: StackFactory, oidc: OidcThread) -> Stack:
    """authz with auth.jwt_provider_key and no jwt_providers, behind envoy/sidecar-jwt-authn.yaml."""
    service = {"auth": {"jwt_provider_key": JWT_AUTHN_PROVIDER, "append_metadata_headers": True}}
    envoy_vars = {
        "JWT_PROVIDER": JWT_AUTHN_PROVIDER,
        "JWT_ISSUER": oidc.issuer,
        "JWT_AUDIENCE": AUDIENCE,
        "JWKS_URI": oidc.jwks_uri,
        "JWKS_HOST": "127.0.0.1",
        "JWKS_PORT": oidc.port,
    }
    # jwt_authn's claims reach authz as CheckRequest metadata: the gRPC transport only (README).
    return grpc_module_authz_stack(
        catalog_yaml(),
        service,
        api_name=ORDERS_API,
        envoy_template="sidecar-jwt-authn.yaml",
        envoy_vars=envoy_vars,
    )


def apigee_claims(products: list[str] | None) -> dict[str, Any]:
    """The claims of an Apigee remote-token token (the Go adapter's required three, and two optional)."""
    claims: dict[str, Any] = {
        "client_id": "client-4d2e",
        "application_name": "claims-app",
        "developer_email": "dev@example.com",
        "scope": "",
    }
    if products is not None:
        claims["api_product_list"] = products
    return claims


def test_jwt_authn_variant_claims_decide(jwt_authn_stack, oidc, http):
    stack = jwt_authn_stack
    token = mint(oidc, apigee_claims(["orders"]))
    response = send(http, stack, token)
    assert response.status_code == 200, stack.logs()
    seen = response.json()["headers"]
    assert (seen["x-apigee-clientid"], seen["x-apigee-application"], seen["x-apigee-apiproducts"]) == (
        "client-4d2e",
        "claims-app",
        "orders",
    )
    assert seen["authorization"] == f"Bearer {token}"  # forward: true
    assert outcome(send(http, stack, mint(oidc, apigee_claims(["legacy"])))) == (403, "not_authorized")
    assert outcome(send(http, stack, mint(oidc, apigee_claims(None)))) == (403, "invalid_claims")
    # No token passes jwt_authn (allow_missing), and the service checks the API key as usual.
    assert outcome(send(http, stack, key=ORDERS_KEY)) == (200, "")
    assert outcome(send(http, stack)) == (401, "missing_credentials")


@pytest.mark.parametrize(
    ("claims", "status", "body"),
    [
        ({"exp": 1_000_000_000}, 401, "Jwt is expired"),
        ({"iss": "https://accounts.google.com"}, 401, "Jwt issuer is not configured"),
        ({"aud": "https://other-service.a.run.app"}, 403, "Audiences in Jwt are not allowed"),
    ],
    ids=["expired", "wrong-issuer", "wrong-audience"],
)
def test_jwt_authn_variant_bad_token_gets_envoys_own_answer(
    jwt_authn_stack, oidc, http, claims, status, body
):
    stack = jwt_authn_stack
    before = stack.envoy_stats()
    response = send(http, stack, mint(oidc, {**apigee_claims(["orders"]), **claims}), key=ORDERS_KEY)
    assert (response.status_code, response.text) == (status, body), stack.logs()
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="http://') and challenge.endswith(', error="invalid_token"')
    after = stack.envoy_stats()
    denied = "http.ingress_http.jwt_authn.denied"
    assert after[denied] == before[denied] + 1
    checks = [f"http.ingress_http.ext_authz.{result}" for result in ("ok", "denied", "error")]
    assert [after[name] for name in checks] == [before[name] for name in checks]  # authz was not asked
