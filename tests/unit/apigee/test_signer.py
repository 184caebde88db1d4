import base64

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from authz.apigee.signer import BasicAuthorizer, InternalJWTAuthorizer
from tests.support.clock import FakeClock


def _pem(key, fmt):
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()


def test_basic_authorizer_and_its_repr_hides_the_secret():
    auth = BasicAuthorizer("key", "s3cret")
    assert auth.authorization() == "Basic " + base64.b64encode(b"key:s3cret").decode()
    assert "s3cret" not in repr(auth)


def test_internal_jwt_claims_lifetime_and_renewal():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    clock = FakeClock(now=1_800_000_000.0)
    for fmt in (serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8):
        auth = InternalJWTAuthorizer("2021-05-01T10:00:00Z", _pem(key, fmt), clock)
        header = auth.authorization()
        token = header.removeprefix("Bearer ")
        assert jwt.get_unverified_header(token) == {
            "alg": "RS256",
            "typ": "JWT",
            "kid": "2021-05-01T10:00:00Z",
        }
        claims = jwt.decode(
            token, key.public_key(), algorithms=["RS256"], audience="remote-service-client",
            issuer="apigee-remote-service-envoy", options={"verify_exp": False, "verify_iat": False},
        )  # fmt: skip
        assert claims["exp"] - claims["iat"] == 600
        assert claims["iat"] == int(clock.now())
        clock.advance(29)
        assert auth.authorization() == header  # reused within 30 s
        clock.advance(1)
        assert auth.authorization() != header  # renewed every 30 s
        assert "BEGIN" not in repr(auth)
