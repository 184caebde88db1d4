"""S-06 (reliability.md §6.1): the service's token validation against Envoy's jwt_authn, on one corpus.

The same keys (a FakeOidc's RS256 and ES256 keys) go to Envoy inline (``envoy/jwt-authn-only.yaml``:
``local_jwks``, ``require_expiration: true``, jwt_authn only) and to the service through the fake's JWKS
URL (``auth.jwt_providers``, behind ``envoy/sidecar.yaml``). Every token of the corpus (valid ones, and
the attack catalogue of reliability.md §1) is sent through both; a side accepts when the request gets a
200. The rule: every token the service accepts, Envoy accepts too, and every token Envoy rejects, the
service rejects, except the cases in ``SERVICE_STRICTER`` and ``SERVICE_LENIENT`` with their reasons.
Each case states the service's verdict and the other side follows from the two lists, so a documented
difference that disappears fails as well as one that appears.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwt.algorithms import RSAAlgorithm, get_default_algorithms

from devstack.envoy import render, start_envoy
from devstack.procs import Proc, free_port
from devstack.stack import Stack
from tests.fakes.oidc import FakeOidc
from tests.support.catalogs import catalog_yaml
from tests.support.fake_thread import OidcThread

if TYPE_CHECKING:
    from tests.e2e.conftest import StackFactory

pytestmark = pytest.mark.e2e

AUDIENCE = "https://orders.example.com"
PATH = "/v1/orders/1"  # granted by the provider's fixed product, so the service's 200 is the token's alone
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
DROP = object()  # a claim or header value that removes the member
# What a rejection may look like: 401 (403 for jwt_authn's audience check), or 431 from Envoy's header
# limit before either judges. Never a 5xx: that would be the service failing to decide, not a verdict.
REJECTIONS = {401, 403, 431}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _json(value: dict[str, Any] | bytes) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


JWE = _b64(b'{"alg":"dir","enc":"A128GCM"}') + "..e30.e30.e30"  # five segments: encrypted (J23)


def _appended(claims: dict[str, Any], **members: str) -> bytes:
    """``claims`` as JSON with ``members`` appended verbatim (raw JSON values; a name may repeat one)."""
    extra = "".join(f', "{name}": {value}' for name, value in members.items())
    return (json.dumps(claims)[:-1] + extra + "}").encode()


class Tokens:
    """Builds the corpus with the issuer's keys (signing on the fake's loop) and an attacker's key."""

    def __init__(self, oidc: OidcThread) -> None:
        self._oidc = oidc
        self._serial = itertools.count()
        self.issuer = oidc.issuer
        self.rsa_kid, self.ec_kid = oidc.call(lambda: (oidc.fake.rsa_kid, oidc.fake.ec_kid))
        self.jwks: dict[str, Any] = oidc.call(lambda: copy.deepcopy(oidc.fake.jwks))
        self.attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @property
    def now(self) -> int:
        """Read when a token is built, so the times are relative to when it is sent."""
        return int(time.time())

    def rsa_jwk(self) -> dict[str, Any]:
        return next(k for k in self.jwks["keys"] if k["kid"] == self.rsa_kid)

    def rsa_pem(self) -> bytes:
        public = RSAAlgorithm.from_jwk(self.rsa_jwk())
        return public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def claims(self, **changes: Any) -> dict[str, Any]:
        """Valid claims (unique by ``jti``) with ``changes``; a ``DROP`` value removes the claim."""
        base = {"iss": self.issuer, "aud": AUDIENCE, "sub": "user-1", "iat": self.now, "exp": self.now + 300}
        merged = {**base, "jti": f"c{next(self._serial)}", **changes}
        return {name: value for name, value in merged.items() if value is not DROP}

    def header(self, alg: str = "RS256", **changes: Any) -> dict[str, Any]:
        kid = self.ec_kid if alg.startswith("ES") else self.rsa_kid
        merged = {"alg": alg, "typ": "JWT", "kid": kid, **changes}
        return {name: value for name, value in merged.items() if value is not DROP}

    def signed(
        self,
        payload: dict[str, Any] | bytes | None = None,
        header: dict[str, Any] | bytes | None = None,
        *,
        alg: str = "RS256",
    ) -> str:
        """Exactly these bytes (JSON-encoded when a dict), signed by the issuer's key for ``alg``."""
        head = _json(header if header is not None else self.header(alg))
        body = _json(payload if payload is not None else self.claims())
        return self._oidc.call(self._oidc.fake.sign, head, body, alg=alg)

    def signature(self) -> str:
        """The signature segment of a valid token."""
        return self.signed().split(".")[2]

    def claimed(self, **changes: Any) -> str:
        """A token signed by the issuer with ``claims(**changes)``."""
        return self.signed(self.claims(**changes))

    def headed(self, alg: str = "RS256", **changes: Any) -> str:
        """A token signed by the issuer's key for ``alg`` with ``header(alg, **changes)``."""
        return self.signed(header=self.header(alg, **changes), alg=alg)

    def with_signature(
        self, signature: bytes, header: dict[str, Any] | None = None, alg: str = "RS256"
    ) -> str:
        """Valid claims under ``header`` (default: the issuer's for ``alg``) with ``signature``, whatever it is."""
        head = _json(header if header is not None else self.header(alg))
        return f"{_b64(head)}.{_b64(_json(self.claims()))}.{_b64(signature)}"

    def hs256(self, secret: bytes) -> str:
        """HS256 with ``secret`` (the RS/HS key confusion, J03), the RSA key's kid in the header."""
        signing_input = f"{_b64(_json(self.header('HS256', kid=self.rsa_kid)))}.{_b64(_json(self.claims()))}"
        return f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"

    def by_attacker(self, **header: Any) -> str:
        """RS256, signed by a key the issuer never published, with extra header members."""
        signing_input = f"{_b64(_json(self.header(**header)))}.{_b64(_json(self.claims()))}"
        signature = get_default_algorithms()["RS256"].sign(signing_input.encode(), self.attacker)
        return f"{signing_input}.{_b64(signature)}"

    def attacker_jwk(self) -> dict[str, Any]:
        return {**RSAAlgorithm.to_jwk(self.attacker.public_key(), as_dict=True), "kid": self.rsa_kid}


def _es256_der(t: Tokens) -> str:
    """A valid ES256 token with its R||S signature re-encoded as ASN.1 DER (J24)."""
    head, body, signature = t.signed(alg="ES256").split(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    return f"{head}.{body}.{_b64(der)}"


def _duplicate_exp(t: Tokens) -> str:
    """``exp`` twice, past then future: a parser that keeps the last one sees a valid token (J17)."""
    return t.signed(_appended(t.claims(exp=t.now - 3600), exp=str(t.now + 300)))


def _flip(token: str) -> str:
    """The token with one signature character changed (a bad signature of the right length)."""
    head, body, signature = token.split(".")
    middle = len(signature) // 2
    changed = "A" if signature[middle] != "A" else "B"
    return f"{head}.{body}.{signature[:middle]}{changed}{signature[middle + 1 :]}"


def _standard_alphabet(t: Tokens) -> str:
    """A valid token spelled in base64 (``+/``) instead of base64url (J20); minted until it differs."""
    while True:
        token = t.signed()
        if "-" in token or "_" in token:
            return token.replace("-", "+").replace("_", "/")


@dataclass(frozen=True)
class Case:
    build: Callable[[Tokens], str]
    service_accepts: bool
    scheme: str = "Bearer "  # the Authorization header is scheme + token


def _valid(build: Callable[[Tokens], str]) -> Case:
    return Case(build, True)


def _invalid(build: Callable[[Tokens], str]) -> Case:
    return Case(build, False)


CASES: dict[str, Case] = {
    # Valid: both accept.
    "valid_rs256": _valid(lambda t: t.signed()),
    "valid_es256": _valid(lambda t: t.signed(alg="ES256")),
    "aud_list_with_one_match": _valid(lambda t: t.claimed(aud=["https://other.example", AUDIENCE])),
    "expired_within_skew": _valid(lambda t: t.claimed(exp=t.now - 30)),
    "nbf_within_skew": _valid(lambda t: t.claimed(nbf=t.now + 30)),
    "typ_at_jwt": _valid(lambda t: t.headed(typ="at+jwt")),
    "no_typ": _valid(lambda t: t.headed(typ=DROP)),
    "float_exp": _valid(lambda t: t.claimed(exp=t.now + 300.5)),
    "exp_in_exponent_notation": _valid(lambda t: t.signed(_appended(t.claims(exp=DROP), exp=f"{t.now + 300}0e-1"))),
    "unknown_header_member": _valid(lambda t: t.headed(**{"x-trace": "abc"})),
    "jku_header_ignored": _valid(lambda t: t.headed(jku="http://127.0.0.1:9/jwks")),
    # alg none and its spellings (J01): empty signature, or a real one.
    **{f"alg_{alg}": _invalid(lambda t, alg=alg: t.with_signature(b"", header=t.header(alg)))
       for alg in ("none", "None", "NONE", "nOnE")},
    "alg_none_with_signature": _invalid(lambda t: t.with_signature(b"\x01" * 256, header=t.header("none"))),
    # Key confusion and algorithm substitution (J03, J04).
    "hs256_with_public_pem": _invalid(lambda t: t.hs256(t.rsa_pem())),
    "hs256_with_public_jwk": _invalid(lambda t: t.hs256(json.dumps(t.rsa_jwk()).encode())),
    "rs512_with_the_rs256_key": _invalid(lambda t: t.headed("RS512")),
    "ps256_with_the_rs256_key": _invalid(lambda t: t.headed("PS256")),
    "es256_header_rsa_kid": _invalid(lambda t: t.headed("ES256", kid=t.rsa_kid)),
    "rs256_header_ec_kid": _invalid(lambda t: t.headed(kid=t.ec_kid)),
    # kid and header key material (J05-J09).
    "unknown_kid": _invalid(lambda t: t.headed(kid="rsa-404")),
    "kid_other_case": _invalid(lambda t: t.headed(kid=t.rsa_kid.upper())),
    "kid_not_a_string": _invalid(lambda t: t.headed(kid=1)),
    "kid_path_traversal": _invalid(lambda t: t.headed(kid="../../../../dev/null")),
    "embedded_jwk_of_attacker": _invalid(lambda t: t.by_attacker(jwk=t.attacker_jwk())),
    "jku_to_attacker_keys": _invalid(lambda t: t.by_attacker(jku="http://127.0.0.1:9/attacker-jwks")),
    # Times (J10-J13, J16).
    "expired": _invalid(lambda t: t.claimed(exp=t.now - 3600)),
    "expired_beyond_skew": _invalid(lambda t: t.claimed(exp=t.now - 120)),
    "nbf_in_future": _invalid(lambda t: t.claimed(nbf=t.now + 3600)),
    "missing_exp": _invalid(lambda t: t.claimed(exp=DROP)),
    "exp_string": _invalid(lambda t: t.claimed(exp=str(t.now + 300))),
    "exp_bool": _invalid(lambda t: t.claimed(exp=True)),
    "exp_null": _invalid(lambda t: t.claimed(exp=None)),
    "exp_negative": _invalid(lambda t: t.claimed(exp=-1)),
    "exp_beyond_uint64": _invalid(lambda t: t.claimed(exp=10**20)),
    "nbf_string": _invalid(lambda t: t.claimed(nbf="0")),
    "iat_string": _invalid(lambda t: t.claimed(iat="0")),
    # Audience and issuer (J14, J15).
    "wrong_aud": _invalid(lambda t: t.claimed(aud="https://other.example")),
    "missing_aud": _invalid(lambda t: t.claimed(aud=DROP)),
    "empty_aud_list": _invalid(lambda t: t.claimed(aud=[])),
    "aud_number": _invalid(lambda t: t.claimed(aud=123)),
    "aud_list_with_a_number": _invalid(lambda t: t.claimed(aud=[AUDIENCE, 1])),
    "wrong_iss": _invalid(lambda t: t.claimed(iss="https://accounts.google.com")),
    "iss_trailing_slash": _invalid(lambda t: t.claimed(iss=t.issuer + "/")),
    "iss_other_case": _invalid(lambda t: t.claimed(iss=t.issuer.upper())),
    "missing_iss": _invalid(lambda t: t.claimed(iss=DROP)),
    "iss_list": _invalid(lambda t: t.claimed(iss=[t.issuer])),
    # Parser hardening (J17-J21).
    "duplicate_exp_past_then_future": _invalid(_duplicate_exp),
    "duplicate_alg_in_header": _invalid(lambda t: t.signed(header=b'{"alg":"none","alg":"RS256"}')),
    "header_not_json": _invalid(lambda t: t.signed(header=b"not json")),
    "header_json_array": _invalid(lambda t: t.signed(header=b'["RS256"]')),
    "payload_not_json": _invalid(lambda t: t.signed(b"not json")),
    "payload_json_array": _invalid(lambda t: t.signed(b"[1, 2]")),
    "payload_invalid_utf8": _invalid(lambda t: t.signed(_json(t.claims(sub="@")).replace(b"@", b"\xff"))),
    "standard_base64_alphabet": _invalid(_standard_alphabet),
    "two_segments": _invalid(lambda t: t.signed().rsplit(".", 1)[0]),
    "four_segments": _invalid(lambda t: t.signed() + ".e30"),
    "jwe_five_segments": _invalid(lambda t: JWE),
    "oversized_over_envoys_header_limit": _invalid(lambda t: t.claimed(pad="a" * 70_000)),
    "empty_token": Case(lambda t: "", False, scheme="Bearer"),
    # Signatures (J24).
    "signature_bit_flip": _invalid(lambda t: _flip(t.signed())),
    "signature_of_another_token": _invalid(lambda t: t.signed().rsplit(".", 1)[0] + "." + t.signature()),
    "signature_by_attacker_with_the_real_kid": _invalid(lambda t: t.by_attacker()),
    "signature_truncated": _invalid(lambda t: t.signed()[:-4]),
    "signature_empty": _invalid(lambda t: t.with_signature(b"")),
    "es256_r_s_zero": _invalid(lambda t: t.with_signature(bytes(64), alg="ES256")),
    "es256_r_s_n": _invalid(lambda t: t.with_signature(P256_N.to_bytes(32, "big") * 2, alg="ES256")),
    "es256_der_signature": _invalid(_es256_der),
    # Documented differences below.
    "crit_unknown": _invalid(lambda t: t.headed(crit=["x-unknown"], **{"x-unknown": 1})),
    "b64_false": _invalid(lambda t: t.headed(b64=False, crit=["b64"])),
    "padded_signature": _invalid(lambda t: t.signed() + "=="),
    "no_kid_rs256_two_keys": _invalid(lambda t: t.headed(kid=DROP)),
    "no_kid_es256_two_keys": _invalid(lambda t: t.headed("ES256", kid=DROP)),
    "iat_in_future": _invalid(lambda t: t.claimed(iat=t.now + 3600)),
    "typ_unknown": _invalid(lambda t: t.headed(typ="foo")),
    "cty_nested_jwt": _invalid(lambda t: t.headed(cty="JWT")),
    "too_large_for_the_service": _invalid(lambda t: t.claimed(pad="a" * 9000)),
    "exp_in_milliseconds": _invalid(lambda t: t.claimed(exp=(t.now + 300) * 1000)),
    "lowercase_scheme": Case(lambda t: t.signed(), True, scheme="bearer "),
}  # fmt: skip

# Envoy accepts, the service rejects.
SERVICE_STRICTER: dict[str, str] = {
    "crit_unknown": "RFC 7515 §4.1.11: a crit extension the recipient does not implement must be rejected "
    "(J22); Envoy's jwt_authn ignores crit",
    "b64_false": "b64 (RFC 7797) changes what is signed and must be listed in crit; the service implements "
    "no extension, Envoy ignores both",
    "padded_signature": "RFC 7515 §2: base64url without padding, one spelling per token (J20); Envoy's "
    "decoder accepts '=' padding",
    "no_kid_rs256_two_keys": "without a kid the service uses only the key of a one-key set; Envoy tries "
    "every key of the JWKS (J06: CPU per token grows with the key count)",
    "no_kid_es256_two_keys": "as no_kid_rs256_two_keys",
    "iat_in_future": "the service rejects iat beyond the clock skew (J12); Envoy does not check iat",
    "typ_unknown": "the service takes typ JWT or at+jwt only (J28); Envoy does not check typ",
    "cty_nested_jwt": "nested tokens are refused (J23); Envoy does not read cty",
    "too_large_for_the_service": "8 KiB cap before any decoding (J18); Envoy's only limit is the 60 KiB "
    "header limit",
    "exp_in_milliseconds": "a NumericDate of 1e12 or more (here a millisecond timestamp) is refused (J16); "
    "Envoy takes it as a date far in the future",
}
# The service accepts, Envoy rejects.
SERVICE_LENIENT: dict[str, str] = {
    "lowercase_scheme": "RFC 7235 §2.1: the auth-scheme is case-insensitive; Envoy's default extraction "
    "matches the 'Bearer ' prefix case-sensitively and sees no token (401 'Jwt is missing')",
}


@dataclass
class Verdict:
    status: int
    body: str

    @property
    def accepted(self) -> bool:
        return self.status == 200


@dataclass
class Pair:
    """The oracle (Envoy, jwt_authn only) and the stack (Envoy + ext_authz + the service)."""

    oracle: Proc
    oracle_url: str
    stack: Stack
    tokens: Tokens
    http: httpx.Client

    def ask(self, base_url: str, authorization: str) -> Verdict:
        response = self.http.get(base_url + PATH, headers={"authorization": authorization})
        return Verdict(response.status_code, response.text[:120])

    def logs(self) -> str:
        return f"{self.stack.logs()}\n--- oracle ---\n{self.oracle.log_tail()}"


@pytest.fixture(scope="module")
def pair(module_authz_stack: StackFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with OidcThread(FakeOidc(audience=AUDIENCE)) as oidc, httpx.Client(timeout=5.0, trust_env=False) as http:
        tokens = Tokens(oidc)
        provider = {
            "name": "corpus",
            "issuer": oidc.issuer,
            "audiences": [AUDIENCE],
            "jwks_uri": oidc.jwks_uri,
            "products": ["orders"],
        }
        stack = module_authz_stack(
            catalog_yaml(), {"auth": {"jwt_providers": [provider]}}, api_name="orders-api"
        )
        out: Path = tmp_path_factory.mktemp("oracle")
        listen_port, admin_port = free_port(), free_port()
        config = render(
            "jwt-authn-only.yaml",
            out,
            LISTEN_PORT=listen_port,
            ADMIN_PORT=admin_port,
            JWT_ISSUER=oidc.issuer,
            JWT_AUDIENCE=AUDIENCE,
            JWKS_INLINE=json.dumps(json.dumps(tokens.jwks)),
        )
        oracle = start_envoy(config, admin_port, out / "logs", name="oracle")
        try:
            yield Pair(oracle, f"http://127.0.0.1:{listen_port}", stack, tokens, http)
        finally:
            oracle.stop()


def test_documented_differences_name_cases_of_the_right_kind():
    assert set(SERVICE_STRICTER) | set(SERVICE_LENIENT) <= set(CASES)
    assert not any(CASES[name].service_accepts for name in SERVICE_STRICTER)
    assert all(CASES[name].service_accepts for name in SERVICE_LENIENT)


@pytest.mark.parametrize("name", list(CASES))
def test_service_and_envoy_agree_but_for_the_documented_differences(pair, name):
    case = CASES[name]
    authorization = case.scheme + case.build(pair.tokens)
    envoy = pair.ask(pair.oracle_url, authorization)
    service = pair.ask(pair.stack.url, authorization)
    differs = name in SERVICE_STRICTER or name in SERVICE_LENIENT
    expected = (case.service_accepts, case.service_accepts != differs)
    assert (service.accepted, envoy.accepted) == expected, f"service {service}, envoy {envoy}\n{pair.logs()}"
    assert service.accepted or service.status in REJECTIONS, service  # never a 503: it could not decide
    assert envoy.accepted or envoy.status in REJECTIONS, envoy
