"""authz.jwt.validate against the JWT attack catalogue (reliability.md §1, S-01..S-05), with real keys.

Tokens are signed for real (``jwt.encode``, or ``forge`` for exact header and payload bytes), so a
rejection comes from the rule under test and not from a broken signature, unless the case says so.
"""

import ast
import base64
import hashlib
import hmac
import json
import random
import re
import socket
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from jwt.algorithms import get_default_algorithms

import authz.jwt.validate as module
from authz.errors import AuthzError
from authz.jwt.validate import ASYMMETRIC, InvalidToken, Rules, header, parse, validate

ALGS = get_default_algorithms()
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC256 = ec.generate_private_key(ec.SECP256R1())
EC384 = ec.generate_private_key(ec.SECP384R1())
ED = ed25519.Ed25519PrivateKey.generate()
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

NOW = 1_700_000_000.0
ISS = "https://issuer.example"
RULES = Rules(issuer=ISS, audiences=frozenset({"api"}), algorithms=ASYMMETRIC)
CLAIMS = {
    "iss": ISS,
    "aud": "api",
    "sub": "alice",
    "exp": 1_700_000_300,
    "nbf": 1_699_999_990,
    "iat": 1_699_999_990,
}
REASONS = {
    "too_large", "malformed", "encrypted", "duplicate_header", "duplicate_claim", "alg_not_allowed",
    "alg_mismatch", "crit", "nested_token", "bad_header", "bad_typ", "bad_kid", "bad_signature",
    "missing_exp", "bad_exp", "expired", "not_yet_valid", "iat_in_future", "bad_claim", "wrong_issuer",
    "wrong_audience",
}  # fmt: skip
SIGNERS = {"RS256": RSA, "RS384": RSA, "RS512": RSA, "PS256": RSA, "PS512": RSA, "ES256": EC256,
           "ES384": EC384}  # fmt: skip
if "EdDSA" in ASYMMETRIC:  # PyJWT with cryptography supports it here; the set says so either way
    SIGNERS["EdDSA"] = ED


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def raw(value: dict | list | str) -> bytes:
    """JSON text as given (a str is taken verbatim, for duplicates and odd literals)."""
    return value.encode() if isinstance(value, str) else json.dumps(value, separators=(",", ":")).encode()


def forge(head: dict | str, claims: dict | str, private=RSA, alg: str = "RS256") -> str:
    """A token whose header and payload are exactly these JSON texts, truly signed by ``private``."""
    signing_input = f"{b64(raw(head))}.{b64(raw(claims))}"
    algorithm = ALGS[alg]
    return f"{signing_input}.{b64(algorithm.sign(signing_input.encode(), algorithm.prepare_key(private)))}"


def pin(private, alg: str) -> jwt.PyJWK:
    """The public JWK of ``private`` pinned to ``alg``, as jwks.py yields it."""
    return jwt.PyJWK(ALGS[alg].to_jwk(private.public_key(), as_dict=True), alg)


def obj(*members: str) -> str:
    """A JSON object text from raw ``"name":value`` members, duplicates and odd literals kept."""
    return "{" + ",".join(members) + "}"


ISS_M, AUD_M, EXP_M = f'"iss":"{ISS}"', '"aud":"api"', '"exp":1700000300'


def hs256(secret: bytes, head: dict, claims: dict) -> str:
    signing_input = f"{b64(raw(head))}.{b64(raw(claims))}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


RS256_KEY = pin(RSA, "RS256")
ES256_KEY = pin(EC256, "ES256")
TOKEN = jwt.encode(CLAIMS, RSA, algorithm="RS256", headers={"kid": "k1"})


def outcome(token: str, key: jwt.PyJWK = RS256_KEY, rules: Rules = RULES, now: float = NOW) -> str:
    """``"ok"`` when ``validate`` returns the token's claims, else the rejection reason."""
    try:
        claims = validate(token, key, rules, now)
    except InvalidToken as exc:
        return exc.reason
    assert claims == json.loads(unb64(token.split(".")[1]))
    return "ok"


def rs256(head: dict | None = None, **claims) -> str:
    return forge({"alg": "RS256", **(head or {})}, {**CLAIMS, **claims})


# --- accepted tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", sorted(SIGNERS))
def test_valid_token_is_accepted_and_its_claims_returned(alg):
    token = jwt.encode(CLAIMS, SIGNERS[alg], algorithm=alg, headers={"kid": "k1"})
    assert validate(token, pin(SIGNERS[alg], alg), RULES, NOW) == CLAIMS
    assert header(token, RULES) == {"alg": alg, "typ": "JWT", "kid": "k1"}


def test_minimal_token_without_typ_kid_nbf_iat_is_accepted():
    claims = {"iss": ISS, "aud": ["other", "api"], "exp": 1_700_000_300}
    assert validate(forge({"alg": "RS256"}, claims), RS256_KEY, RULES, NOW) == claims


# --- J01-J04, J31: algorithm confusion (S-01) ------------------------------------------------------


@pytest.mark.parametrize("spelling", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["", b64(b"x"), TOKEN.split(".")[2]])
def test_alg_none_is_rejected_in_every_spelling(spelling, signature):
    token = f"{b64(raw({'alg': spelling, 'typ': 'JWT'}))}.{b64(raw(CLAIMS))}.{signature}"
    lenient = replace(RULES, algorithms=ASYMMETRIC | {"none", "None", "NONE", "nOnE"})
    expected = "malformed" if signature == "" else "alg_not_allowed"  # an empty segment fails first
    assert outcome(token) == outcome(token, rules=lenient) == expected


@pytest.mark.parametrize(
    "alg", [None, "", "HS256", "HS512", "RS256 ", "rs256", "ES256K", "RSA-OAEP", 256, ["RS256"], {"a": 1}]
)
def test_alg_outside_the_asymmetric_allow_list_is_rejected(alg):
    head = {} if alg is None else {"alg": alg}
    assert outcome(forge(head, CLAIMS)) == "alg_not_allowed"


PUBLIC = RSA.public_key()
KEY_AS_SECRET = {
    "pem": PUBLIC.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    "pkcs1": PUBLIC.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
    "jwk": ALGS["RS256"].to_jwk(PUBLIC).encode(),
    "ssh": PUBLIC.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
}


@pytest.mark.parametrize("form", sorted(KEY_AS_SECRET))
def test_hs256_signed_with_the_public_key_is_rejected(form):
    token = hs256(KEY_AS_SECRET[form], {"alg": "HS256", "typ": "JWT"}, CLAIMS)
    with_hs = replace(RULES, algorithms=frozenset({"HS256", "RS256"}))  # config cannot enable HMAC
    assert outcome(token) == outcome(token, rules=with_hs) == "alg_not_allowed"


def test_an_hmac_key_is_never_usable_even_when_key_and_token_agree():
    secret = b"0123456789abcdef0123456789abcdef"
    key = jwt.PyJWK({"kty": "oct", "k": b64(secret)})
    assert key.algorithm_name == "HS256"
    token = hs256(secret, {"alg": "HS256"}, CLAIMS)
    assert outcome(token, key, replace(RULES, algorithms=frozenset({"HS256"}))) == "alg_not_allowed"


@pytest.mark.parametrize("alg", ["PS256", "RS512", "RS384", "PS512"])
def test_rs256_pinned_key_refuses_another_rsa_algorithm(alg):
    token = jwt.encode(CLAIMS, RSA, algorithm=alg)
    assert outcome(token, RS256_KEY) == "alg_mismatch"
    assert outcome(token, pin(RSA, alg)) == "ok"  # the same token and key material, pinned right


def test_key_of_another_type_refuses_the_token():
    token = jwt.encode(CLAIMS, EC256, algorithm="ES256")
    assert outcome(token, RS256_KEY) == "alg_mismatch"
    assert outcome(jwt.encode(CLAIMS, RSA, algorithm="RS256"), ES256_KEY) == "alg_mismatch"


def test_pinned_algorithm_outside_the_rules_is_rejected():
    token = jwt.encode(CLAIMS, RSA, algorithm="PS256")
    assert outcome(token, pin(RSA, "PS256"), replace(RULES, algorithms=frozenset({"RS256"}))) == (
        "alg_not_allowed"
    )


ES_TOKEN = jwt.encode(CLAIMS, EC256, algorithm="ES256")
ES_INPUT, ES_SIG = ES_TOKEN.rsplit(".", 1)
ES_DER = EC256.sign(ES_INPUT.encode(), ec.ECDSA(hashes.SHA256()))
EC_SIGNATURES = {
    "r=s=0": bytes(64),
    "r=s=n": P256_N.to_bytes(32, "big") * 2,
    "der": ES_DER,
    "63 bytes": unb64(ES_SIG)[:-1],
    "65 bytes": unb64(ES_SIG) + b"\x00",
    "128 bytes": unb64(ES_SIG) * 2,
    "es384 length": bytes(96),
    "another message": unb64(jwt.encode({**CLAIMS, "sub": "bob"}, EC256, algorithm="ES256").split(".")[2]),
}


@pytest.mark.parametrize("case", sorted(EC_SIGNATURES))
def test_bad_ecdsa_signatures_are_rejected(case):
    assert outcome(f"{ES_INPUT}.{b64(EC_SIGNATURES[case])}", ES256_KEY) == "bad_signature"
    assert outcome(ES_TOKEN, ES256_KEY) == "ok"


def test_ecdsa_signature_malleability_is_not_a_forgery():
    # (r, n - s) verifies as well as (r, s): ECDSA as JOSE uses it has no low-s rule. The claims are still
    # the signer's, but a token string is not a unique id for them (do not dedupe by token string).
    r, s = decode_dss_signature(ES_DER)
    twin = f"{ES_INPUT}.{b64(r.to_bytes(32, 'big') + (P256_N - s).to_bytes(32, 'big'))}"
    assert twin != f"{ES_INPUT}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
    assert outcome(twin, ES256_KEY) == "ok"


def test_signature_of_another_key_or_of_other_content_is_rejected():
    assert outcome(jwt.encode(CLAIMS, ATTACKER_RSA, algorithm="RS256")) == "bad_signature"
    h, _, s = TOKEN.split(".")
    assert outcome(f"{h}.{b64(raw({**CLAIMS, 'sub': 'admin'}))}.{s}") == "bad_signature"


# --- J05-J09: key selection from the header (S-02) -------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the validator touched the network")

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_module_imports_nothing_that_does_io_or_logs():
    tree = ast.parse(Path(module.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"__future__", "base64", "json", "re", "dataclasses", "typing", "jwt", "jwt.algorithms",
                     "authz.errors"}  # fmt: skip
    assert "PyJWKClient" not in Path(module.__file__).read_text()  # the one PyJWT class that fetches


ODD_KIDS = ["../../dev/null", "x' UNION SELECT '1';--", "|sleep 10", "", "k" * 256, "é\u0000\n"]


@pytest.mark.parametrize("kid", ODD_KIDS)
def test_kid_is_opaque_and_only_returned_for_lookup(kid, no_network):
    token = rs256({"kid": kid})
    assert header(token, RULES)["kid"] == kid
    assert outcome(token) == "ok"


@pytest.mark.parametrize("kid", [123, None, ["k1"], {"k": 1}, True, "k" * 257])
def test_kid_that_is_not_a_short_string_is_rejected(kid):
    token = rs256({"kid": kid})
    with pytest.raises(InvalidToken) as caught:
        header(token, RULES)
    assert caught.value.reason == outcome(token) == "bad_kid"


def _self_signed_cert(private) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
    start = datetime(2023, 1, 1, tzinfo=UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(1).not_valid_before(start).not_valid_after(start + timedelta(days=3650))
        .sign(private, hashes.SHA256())
    )  # fmt: skip
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


ATTACKER_HEADERS = {
    "jku": {"jku": "http://127.0.0.1:9/jwks.json"},
    "x5u": {"x5u": "https://attacker.example/cert.pem"},
    "jwk": {"jwk": ALGS["RS256"].to_jwk(ATTACKER_RSA.public_key(), as_dict=True)},
    "x5c": {"x5c": [_self_signed_cert(ATTACKER_RSA)]},
}


@pytest.mark.parametrize("field", sorted(ATTACKER_HEADERS))
def test_key_material_in_the_header_is_ignored(field, no_network):
    head = {"alg": "RS256", "kid": "k1", **ATTACKER_HEADERS[field]}
    assert outcome(forge(head, CLAIMS, ATTACKER_RSA)) == "bad_signature"  # self-signed: refused
    assert outcome(forge(head, CLAIMS, RSA)) == "ok"  # signed by the configured key: the field is inert


# --- J10-J16: claims and time (S-03) ---------------------------------------------------------------


def _claims_token(**raw_values: str) -> str:
    """A signed token whose payload has these claims as raw JSON literals (None drops the claim)."""
    members = {"iss": json.dumps(ISS), "aud": '"api"', "exp": "1700000300", **raw_values}
    return forge({"alg": "RS256"}, obj(*(f'"{k}":{v}' for k, v in members.items() if v is not None)))


EXP_CASES = [
    (None, "missing_exp"), ('"9999999999"', "bad_exp"), ("true", "bad_exp"), ("false", "bad_exp"),
    ("null", "bad_exp"), ("[1700000300]", "bad_exp"), ('{"v":1}', "bad_exp"), ("1e12", "bad_exp"),
    ("1000000000000", "bad_exp"), ("1700000300000", "bad_exp"), ("9" * 400, "bad_exp"),
    ("-" + "9" * 400, "bad_exp"), ("1e400", "bad_exp"), ("-1e400", "bad_exp"), ("NaN", "malformed"),
    ("Infinity", "malformed"), ("-Infinity", "malformed"), ("9" * 5000, "malformed"),
    ("1700000300", "ok"), ("1700000300.5", "ok"), ("1.7000003e9", "ok"), ("-5", "expired"), ("0", "expired"),
]  # fmt: skip


@pytest.mark.parametrize(("literal", "expected"), EXP_CASES)
def test_exp_is_required_and_strictly_typed(literal, expected):
    assert outcome(_claims_token(exp=literal)) == expected


@pytest.mark.parametrize("name", ["nbf", "iat"])
@pytest.mark.parametrize("literal", ['"1"', "true", "null", "[1]", "1e400", "1e12", "9" * 400])
def test_nbf_and_iat_of_the_wrong_type_are_bad_claims(name, literal):
    assert outcome(_claims_token(**{name: literal})) == "bad_claim"


E = 1_700_000_000  # an exp, nbf or iat; skew 60 unless stated
TIME_CASES = [
    # (claim, value, now, skew, expected): expired iff now >= exp + skew
    ("exp", E, E + 60, 60, "expired"),
    ("exp", E, E + 60 - 1e-6, 60, "ok"),
    ("exp", E, E + 61, 60, "expired"),
    ("exp", E, E, 0, "expired"),
    ("exp", E, E - 1e-6, 0, "ok"),
    ("exp", E - 60 - 1, E, 60, "expired"),  # S-03: exp = now - skew - 1
    ("exp", E - 60 + 1, E, 60, "ok"),  # S-03: exp = now - skew + 1
    # not yet valid iff nbf > now + skew (iat alike)
    ("nbf", E, E - 60, 60, "ok"),
    ("nbf", E, E - 60 - 1e-6, 60, "not_yet_valid"),
    ("nbf", E, E - 61, 60, "not_yet_valid"),
    ("nbf", E, E, 0, "ok"),
    ("nbf", E, E - 1e-6, 0, "not_yet_valid"),
    ("iat", E, E - 60, 60, "ok"),
    ("iat", E, E - 60 - 1e-6, 60, "iat_in_future"),
    ("iat", E + 1e6, E, 60, "iat_in_future"),
    ("iat", 0, E, 60, "ok"),  # an old iat is fine: no maximum age
]


@pytest.mark.parametrize(("claim", "value", "now", "skew", "expected"), TIME_CASES)
def test_time_boundaries(claim, value, now, skew, expected):
    claims = {"iss": ISS, "aud": "api", "exp": E + 10**6, claim: value}
    rules = replace(RULES, clock_skew=skew)
    assert outcome(forge({"alg": "RS256"}, claims), rules=rules, now=now) == expected


@pytest.mark.parametrize(
    "iss",
    [ISS + "/", ISS.upper(), "https://issuer.example.evil", "https://issuer", " " + ISS, [ISS], 5, None],
)
def test_issuer_must_match_exactly(iss):
    assert outcome(rs256(iss=iss)) == "wrong_issuer"


def test_missing_issuer_is_wrong():
    assert outcome(forge({"alg": "RS256"}, {k: v for k, v in CLAIMS.items() if k != "iss"})) == "wrong_issuer"


AUD_CASES = [
    ("api", "ok"), (["x", "api"], "ok"), (["api", "api"], "ok"), ("API", "wrong_audience"),
    (["x"], "wrong_audience"), ([], "wrong_audience"), ("", "wrong_audience"), (123, "bad_claim"),
    (["api", 1], "bad_claim"), ({"api": 1}, "bad_claim"), (None, "bad_claim"), (True, "bad_claim"),
]  # fmt: skip


@pytest.mark.parametrize(("aud", "expected"), AUD_CASES)
def test_audience_must_contain_a_configured_one(aud, expected):
    assert outcome(rs256(aud=aud)) == expected


def test_missing_audience_is_wrong_and_unchecked_when_none_configured():
    token = forge({"alg": "RS256"}, {k: v for k, v in CLAIMS.items() if k != "aud"})
    assert outcome(token) == "wrong_audience"
    no_aud = replace(RULES, audiences=frozenset())
    assert outcome(token, rules=no_aud) == outcome(rs256(aud={"odd": 1}), rules=no_aud) == "ok"


# --- J17-J23: parser hardening (S-04) --------------------------------------------------------------

DUPLICATES = {
    "exp": obj(ISS_M, AUD_M, '"exp":1', '"exp":9999999999'),
    "iss": obj('"iss":"https://evil"', ISS_M, AUD_M, EXP_M),
    "nested": obj(ISS_M, AUD_M, EXP_M, '"x":{"a":1,"a":2}'),
}


@pytest.mark.parametrize("case", sorted(DUPLICATES))
def test_duplicate_claims_are_rejected(case):
    token = forge({"alg": "RS256"}, DUPLICATES[case])
    assert outcome(token) == "duplicate_claim"
    with pytest.raises(InvalidToken, match="duplicate_claim"):
        parse(token)


@pytest.mark.parametrize(
    "head",
    ['{"alg":"RS256","alg":"RS256"}', '{"alg":"none","alg":"RS256"}', '{"alg":"RS256","kid":"a","kid":"b"}'],
)
def test_duplicate_header_members_are_rejected(head):
    token = forge(head, CLAIMS)
    assert outcome(token) == "duplicate_header"
    with pytest.raises(InvalidToken, match="duplicate_header"):
        header(token, RULES)


HEADER_CASES = [
    ({"crit": ["exp"], "exp": 1}, "crit"), ({"crit": []}, "crit"), ({"crit": ["b64"], "b64": False}, "crit"),
    ({"b64": True}, "crit"), ({"b64": False}, "crit"), ({"cty": "JWT"}, "nested_token"),
    ({"cty": "jwt"}, "nested_token"), ({"cty": "application/JWT"}, "nested_token"), ({"cty": 5}, "bad_header"),
    ({"cty": None}, "bad_header"),
    ({"typ": "JWT"}, "ok"), ({"typ": "jwt"}, "ok"), ({"typ": "at+JWT"}, "ok"), ({"typ": "application/at+jwt"}, "ok"),
    ({"typ": "application/jwt"}, "ok"), ({"typ": "JOSE"}, "bad_typ"), ({"typ": ""}, "bad_typ"),
    ({"typ": "secevent+jwt"}, "bad_typ"), ({"typ": 1}, "bad_typ"), ({"typ": None}, "bad_typ"),
    ({"typ": "\u0130t+jwt"}, "bad_typ"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "expected"), HEADER_CASES)
def test_header_rules(extra, expected):
    token = rs256(extra)
    assert outcome(token) == expected
    if expected != "ok":
        with pytest.raises(InvalidToken, match=expected):
            header(token, RULES)


H, P, S = TOKEN.split(".")
BAD_UTF8 = b64(b'{"iss":"\xff"}')
WITH_BOM = b64(b"\xef\xbb\xbf" + raw(CLAIMS))
SHAPES = {
    "empty": "",
    "one segment": H,
    "two segments": f"{H}.{P}",
    "stripped signature": f"{H}.{P}.",
    "empty header": f".{P}.{S}",
    "empty payload": f"{H}..{S}",
    "dots only": "..",
    "four segments": f"{H}.{P}.{S}.{S}",
    "padded signature": f"{TOKEN}==",
    "padded header": f"{H}=.{P}.{S}",
    "padding inside": f"{H}.{P}=.{S}",
    "space": f"{H}.{P}.{S[:100]} {S[100:]}",
    "trailing newline": f"{TOKEN}\n",
    "leading space": f" {TOKEN}",
    "tab": f"{H}\t.{P}.{S}",
    "standard alphabet": f"{H}.{P}.+/{S[2:]}",
    "impossible length": f"{H}.{P}.{S[:-1]}",  # 341 characters: 1 more than a multiple of 4
    "non-alphabet": f"{H}.{P}.!!{S}",
    "non-ascii": f"{H}.{P}.{S}é",
    "lone surrogate": f"{H}.{P}.\ud800",
    "header not json": f"{b64(b'not json')}.{P}.{S}",
    "payload not json": f"{H}.{b64(b'{exp: 1}')}.{S}",
    "header array": forge("[]", CLAIMS),
    "payload array": forge({"alg": "RS256"}, "[1700000300]"),
    "payload string": forge({"alg": "RS256"}, '"claims"'),
    "payload null": forge({"alg": "RS256"}, "null"),
    "payload invalid utf-8": f"{H}.{BAD_UTF8}.{S}",
    "payload utf-16": f"{H}.{b64(raw(CLAIMS).decode().encode('utf-16'))}.{S}",
    "payload bom": f"{H}.{WITH_BOM}.{S}",
    "payload NaN": forge({"alg": "RS256"}, obj(ISS_M, AUD_M, EXP_M, '"x":NaN')),
    "trailing data": forge({"alg": "RS256"}, raw(CLAIMS).decode() + "{}"),
}


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_malformed_tokens_are_rejected(case):
    assert outcome(SHAPES[case]) == "malformed"


def test_non_canonical_base64_spelling_is_rejected():
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(S) % 4 == 2  # 256 bytes: the last character carries 2 bits and 4 unused ones
    twin = S[:-1] + alphabet[alphabet.index(S[-1]) ^ 1]
    assert unb64(twin) == unb64(S) and twin != S
    assert outcome(f"{H}.{P}.{twin}") == "malformed"


def test_jwe_is_rejected_as_encrypted():
    jwe_header = b64(raw({"alg": "RSA-OAEP", "enc": "A256GCM"}))
    assert outcome(f"{jwe_header}.{b64(b'k' * 256)}.{b64(b'iv')}.{b64(b'ct')}.{b64(b'tag')}") == "encrypted"
    assert outcome(f"{jwe_header}.{P}.{S}") == "alg_not_allowed"


DEEP = "[" * 50_000 + "]" * 50_000


def test_deep_nesting_raises_invalid_token_not_recursion_error():
    # 50k levels only fit under a raised cap; past any interpreter's JSON recursion limit either way.
    big = replace(RULES, max_token_bytes=10**6)
    in_claim = forge({"alg": "RS256"}, obj(ISS_M, AUD_M, EXP_M, f'"x":{DEEP}'))
    in_header = forge(obj('"alg":"RS256"', f'"x":{DEEP}'), CLAIMS)
    assert outcome(in_claim) == outcome(in_header) == "too_large"
    assert outcome(in_claim, rules=big) == outcome(in_header, rules=big) == "malformed"
    with pytest.raises(InvalidToken, match="malformed"):
        parse(in_claim, max_token_bytes=10**6)
    with pytest.raises(InvalidToken, match="malformed"):
        header(in_header, big)


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("a" * 1_000_000, "too_large"),
        (TOKEN + "." * 400_000, "too_large"),
        ("." * 400_000, "too_large"),
        ("!" * 8193, "too_large"),  # the size comes before any other check
        ("é" * 5000, "too_large"),  # 5000 characters but 10000 bytes
        ("\ud800" * 4097, "too_large"),  # lone surrogates are counted, not an encoding error
        (rs256(pad="x" * 6000), "too_large"),  # a real, valid token over the cap
    ],
)
def test_oversized_tokens_are_rejected_before_decoding(token, expected):
    assert outcome(token) == expected
    with pytest.raises(InvalidToken, match=expected):
        header(token, RULES)
    with pytest.raises(InvalidToken, match=expected):
        parse(token)


def test_many_dots_under_a_large_cap_are_malformed():
    assert outcome("." * 400_000, rules=replace(RULES, max_token_bytes=10**6)) == "malformed"


def test_size_cap_is_inclusive():
    token = rs256()
    assert outcome(token, rules=replace(RULES, max_token_bytes=len(token))) == "ok"
    assert outcome(token, rules=replace(RULES, max_token_bytes=len(token) - 1)) == "too_large"


# --- the other entry points and the error itself ---------------------------------------------------


def test_parse_reads_the_payload_without_checking_anything_else():
    forged = jwt.encode({"iss": "https://other", "exp": 1}, ATTACKER_RSA, algorithm="RS256")
    assert parse(forged).claims == {"iss": "https://other", "exp": 1}
    with pytest.raises(InvalidToken, match="too_large"):
        parse(TOKEN, max_token_bytes=len(TOKEN) - 1)


def test_header_does_not_verify_the_signature():
    forged = jwt.encode(CLAIMS, ATTACKER_RSA, algorithm="RS256", headers={"kid": "k1"})
    assert header(forged, RULES)["kid"] == "k1"


def test_messages_hold_only_the_reason_never_the_token_or_claims():
    secret = "s3cr3t-claim-value"
    cases = [rs256(sub=secret, iss=secret), rs256(sub=secret, exp=1), rs256({"kid": secret * 20}),
             rs256({"kid": 1}, sub=secret), f"{TOKEN}.{secret}", secret]  # fmt: skip
    for token in cases:
        with pytest.raises(InvalidToken) as caught:
            validate(token, RS256_KEY, RULES, NOW)
        assert str(caught.value) == f"invalid token: {caught.value.reason}"
        assert caught.value.reason in REASONS
    assert issubclass(InvalidToken, AuthzError) and InvalidToken.code == "invalid_token"


def test_every_reason_is_raised_somewhere_and_named_in_the_module_docstring():
    raised = set(re.findall(r'InvalidToken\("([a-z_]+)"\)', Path(module.__file__).read_text()))
    passed = set(re.findall(r'(?:_object|_numeric_date)\(.*"([a-z_]+)"\)', Path(module.__file__).read_text()))
    assert passed == {"duplicate_header", "duplicate_claim", "bad_exp", "bad_claim"}
    assert raised | passed == REASONS
    assert set(re.findall(r"``([a-z_]+)``", module.__doc__ or "")) >= REASONS


# --- S-05: seeded mutation property test ------------------------------------------------------------

MUTATION_ALGS = ["none", "None", "HS256", "RS512", "PS256", "ES256", "EdDSA", "RS256 ", "", 1]
MUTATION_VALUES = [None, 0, 1, -1, True, "1700000300", 9_999_999_999, 1e300, [], {}, ISS + "/", "api",
                   ["api"]]  # fmt: skip


def _edit_json(segment: str, rng: random.Random, alg: bool) -> str:
    data = json.loads(unb64(segment))
    if not isinstance(data, dict):
        raise ValueError("not an object")
    name = rng.choice([*data, "kid", "crit", "jwk", "jku", "cty", "typ", "exp", "iss", "aud", "admin"])
    choice = rng.random()
    if choice < 0.2:
        data.pop(name, None)
    elif alg and choice < 0.5:
        data["alg"] = rng.choice(MUTATION_ALGS)
    else:
        data[name] = rng.choice(MUTATION_VALUES)
    text = json.dumps(data, separators=rng.choice([(",", ":"), (", ", ": ")]), sort_keys=rng.random() < 0.5)
    return b64(text.encode())


def _mutate(token: str, rng: random.Random) -> str:
    parts = token.split(".")
    op = rng.randrange(13)
    i = rng.randrange(len(parts))
    if op == 0 and parts[i]:  # flip one bit of the decoded bytes of one segment, re-encoded
        try:
            data = bytearray(unb64(parts[i]))
        except ValueError:
            return token[::-1]
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        parts[i] = b64(bytes(data))
    elif op == 1 and token:  # flip one bit of one character
        j = rng.randrange(len(token))
        return token[:j] + chr(ord(token[j]) ^ (1 << rng.randrange(8))) + token[j + 1 :]
    elif op == 2:  # swap or duplicate segments
        parts = [rng.choice(parts) for _ in range(rng.choice([2, 3, 3, 3, 4, 5]))]
    elif op in (3, 4) and len(parts) == 3:  # header or claim edit, re-encoded and NOT re-signed
        try:
            parts[op - 3] = _edit_json(parts[op - 3], rng, alg=op == 3)
        except ValueError:
            return token + "."
    elif op == 5:  # padding
        parts[i] += rng.choice(["=", "==", "==="])
    elif op == 6:  # the standard alphabet
        parts[i] = parts[i].replace("-", "+").replace("_", "/")
    elif op == 7:
        return token[: rng.randrange(len(token) + 1)]
    elif op == 8:
        return rng.choice(
            [token + token, token + "." + token, token + "." + parts[-1], token + parts[-1][:8]]
        )
    elif op == 9:  # whitespace or a stray character
        j = rng.randrange(len(token) + 1)
        return token[:j] + rng.choice(" \t\n\r=.+/!é\x00") + token[j:]
    elif op == 10 and token:
        j = rng.randrange(len(token))
        return token[:j] + token[j + 1 :]
    elif op == 11 and parts[i]:  # change the low bits of the last character (unused bits among them)
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = parts[i][-1]
        if last in alphabet:
            parts[i] = parts[i][:-1] + alphabet[alphabet.index(last) ^ rng.randrange(1, 16)]
    elif op == 12 and len(parts) == 3:  # the same JSON re-encoded with padding, not re-signed
        try:
            parts[i] = base64.urlsafe_b64encode(unb64(parts[i])).decode()
        except ValueError:
            return token + "="
    return ".".join(parts)


@pytest.mark.parametrize(("alg", "seed"), [("RS256", 1), ("ES256", 2), ("PS256", 3)])
def test_mutated_tokens_never_validate_and_only_raise_invalid_token(alg, seed):
    """~700 stacked mutations per algorithm: nothing but the original string validates.

    No canonicalisation is needed: base64url is checked for its one canonical spelling, and a signature
    covers the exact header and payload strings. (An ECDSA (r, n - s) twin would also verify — see
    test_ecdsa_signature_malleability_is_not_a_forgery — but these mutations cannot produce one.)
    """
    key = pin(SIGNERS[alg], alg)
    original = jwt.encode(CLAIMS, SIGNERS[alg], algorithm=alg, headers={"kid": "k1"})
    rng = random.Random(seed)
    reasons: Counter[str] = Counter()
    for _ in range(700):
        token = original
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            token = _mutate(token, rng)
        for call in (lambda t: header(t, RULES), parse):
            try:
                call(token)
            except InvalidToken as exc:
                assert exc.reason in REASONS
        try:
            claims = validate(token, key, RULES, NOW)
        except InvalidToken as exc:
            assert exc.reason in REASONS
            reasons[exc.reason] += 1
        else:
            assert token == original and claims == CLAIMS
            reasons["ok"] += 1
    # The mutations reach every stage, not just the first check.
    assert {"malformed", "bad_signature", "alg_not_allowed", "encrypted", "ok"} <= set(reasons), reasons


def test_issuer_none_does_not_read_iss():
    rules = Rules(issuer=None, audiences=RULES.audiences, algorithms=ASYMMETRIC)
    for iss in ("https://any.example", 5, None):
        token = forge({"alg": "RS256"}, {**CLAIMS, "iss": iss})
        assert validate(token, RS256_KEY, rules, NOW)["iss"] == iss


def test_a_short_rsa_key_never_verifies():
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    token = forge({"alg": "RS256"}, CLAIMS, private=weak)
    assert outcome(token, key=pin(weak, "RS256")) == "bad_signature"
