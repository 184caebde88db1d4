"""RemoteTokenKeys: the remote-token JWKS, cached, refreshed, and used to decode verifyApiKey tokens.

Parsing and the cache itself are tested generically in tests/unit/jwt/test_jwks_cache.py.
"""

import base64
import json

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from authz.apigee.client import ApigeeClient
from authz.apigee.jwks import BadToken, RemoteTokenKeys
from authz.apigee.signer import BasicAuthorizer
from authz.metrics import new_metrics
from tests.fakes.apigee import FakeApigee
from tests.support.clock import FakeClock

CERTS = "http://apigee.test/remote-token/certs"
OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
THIRD = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def rsa_jwk(private: rsa.RSAPrivateKey, **fields: str) -> dict:
    return {**RSAAlgorithm.to_jwk(private.public_key(), as_dict=True), **fields}


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def fake(clock):
    return FakeApigee(basic_auth=("k", "s"), clock=clock.now)


@pytest.fixture
def metrics():
    return new_metrics()


@pytest.fixture
async def keys(fake, clock, metrics):
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        client = ApigeeClient(
            http, "http://apigee.test/remote-service", BasicAuthorizer("k", "s"), metrics, "org", "test"
        )
        keys = RemoteTokenKeys(client, CERTS, "org", metrics, clock)
        yield keys
        await keys.close()


def refreshes(metrics, result):
    return (
        metrics.registry.get_sample_value(
            "jwks_refreshes_total", {"org": "org", "provider": "apigee-remote-token", "result": result}
        )
        or 0
    )


async def test_refresh_loads_the_key_pinned_to_its_algorithm(keys, fake, metrics):
    assert keys.key(fake.signing_kid) is None  # nothing before the first fetch
    assert await keys.refresh()
    key = keys.key(fake.signing_kid)
    assert key is not None and key.algorithm_name == "RS256"
    assert keys.key(None) is key  # one key, token without kid
    assert keys.key("other") is None
    assert refreshes(metrics, "ok") == 1


@pytest.mark.parametrize(
    "fault",
    [
        lambda f: f.fail_next("certs", 500),
        lambda f: f.fail_next("certs", 403),
        lambda f: f.drop_next("certs"),
        lambda f: f.malformed_next("certs", b"<html>hi</html>", content_type="text/html"),
        lambda f: f.malformed_next("certs", b"[]"),
        lambda f: f.malformed_next("certs", b'{"keys": []}'),
        lambda f: f.malformed_next("certs", b'{"keys": [], "x": "' + b"x" * 300_000 + b'"}'),
    ],
    ids=["500", "403", "dropped", "html", "array", "empty", "oversize"],
)
async def test_a_failed_refresh_keeps_the_last_good_keys(keys, fake, metrics, fault):
    await keys.refresh()
    good = keys.key(fake.signing_kid)
    fault(fake)
    assert not await keys.refresh()
    assert keys.key(fake.signing_kid) is good
    assert (refreshes(metrics, "ok"), refreshes(metrics, "error")) == (1, 1)


def sign(claims, key=OTHER, alg="RS256", kid="test", headers=None):
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, **(headers or {})})


@pytest.fixture
async def loaded(keys, fake):
    fake.jwks["keys"].append(rsa_jwk(OTHER, kid="test", alg="RS256"))
    await keys.refresh()
    return keys


def claims(clock, **extra):
    now = int(clock.now())
    return {"aud": "remote-service-client", "iat": now, "nbf": now, "exp": now + 900, **extra}


async def test_decode_accepts_a_good_token_and_ignores_iss(loaded, clock):
    token = sign(
        claims(clock, iss="https://some.host/remote-service/verifyApiKey", aud=["x", "remote-service-client"])
    )
    assert (await loaded.decode(token, 10))["iss"].startswith("https://")


async def test_decode_leeway_on_exp_nbf_iat(loaded, clock):
    now = int(clock.now())
    assert await loaded.decode(sign(claims(clock, exp=now - 9)), 10)
    assert await loaded.decode(sign(claims(clock, nbf=now + 9, iat=now + 9)), 10)
    with pytest.raises(BadToken):
        await loaded.decode(sign(claims(clock, exp=now - 10)), 10)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, payload: dict, alg="RS256") -> str:
    """A token PyJWT refuses to encode, signed with OTHER (or not at all for alg none)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if alg == "none":
        return signing_input + "."
    algorithm = RSAAlgorithm(RSAAlgorithm.SHA256)
    return f"{signing_input}.{b64(algorithm.sign(signing_input.encode(), OTHER))}"


def bad_tokens(clock):
    now = int(clock.now())
    good = claims(clock)
    no_exp = {k: v for k, v in good.items() if k != "exp"}
    return {
        "bad-signature": sign(good, key=THIRD),
        "alg-none": forge({"alg": "none", "typ": "JWT", "kid": "test"}, good, alg="none"),
        "hs256": sign(good, key="secret-secret-secret-secret-secret", alg="HS256"),
        "rs512-for-rs256-key": sign(good, alg="RS512"),
        "no-exp": sign(no_exp),
        "expired": sign({**good, "exp": now - 60}),
        "exp-string": sign({**good, "exp": str(now + 900)}),
        "exp-bool": sign({**good, "exp": True}),
        "exp-huge": sign({**good, "exp": 10**400}),
        "nbf-future": sign({**good, "nbf": now + 60}),
        "iat-future": sign({**good, "iat": now + 60}),
        "wrong-aud": sign({**good, "aud": "someone-else"}),
        "no-aud": sign({k: v for k, v in good.items() if k != "aud"}),
        "unknown-kid": sign(good, kid="unknown"),
        "kid-not-string": forge({"alg": "RS256", "kid": 5}, good),
        "kid-too-long": sign(good, kid="k" * 300),
        "garbage": "not.a.jwt",
        "two-segments": "abc.def",
        "huge": "a" * 20_000,
    }


@pytest.mark.parametrize("name", list(bad_tokens(FakeClock())))
async def test_decode_rejects(loaded, clock, name):
    with pytest.raises(BadToken) as info:
        await loaded.decode(bad_tokens(clock)[name], 10)
    assert "eyJ" not in str(info.value)  # the message never carries the token
