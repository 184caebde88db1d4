"""Strict validation of one compact-JWS bearer token against one pinned key (reliability.md §1).

Pure: no I/O, no asyncio, no logging, no clock. Key lookup and JWKS fetching live in ``jwks.py``; this
module judges a token against a key and one issuer's ``Rules`` at the injected time ``now``. It imports only
the standard library, PyJWT and ``authz.errors``. Every failure raises ``InvalidToken`` with a stable,
log-safe ``reason``; no message ever holds the token or a claim value. Checks, in order:

- Size, before anything else: more than ``max_token_bytes`` UTF-8 bytes is ``too_large`` (J18).
- Shape: ASCII only; exactly three ``.``-separated segments (five, a JWE, is ``encrypted``; J19, J23);
  each non-empty, only ``[A-Za-z0-9_-]`` (no ``=`` padding, whitespace or ``+/``), of a possible length,
  and canonical (the unused bits of the last character are zero), so a byte string has exactly one
  spelling (J20). Otherwise ``malformed``.
- JSON: header and payload are UTF-8 JSON objects, else ``malformed`` (as are ``NaN``/``Infinity``
  literals, nesting past the interpreter's recursion limit and integers over Python's digit limit; J21).
  A member name repeated in any object is ``duplicate_header`` / ``duplicate_claim`` (J17).
- Header: ``alg`` a string in ``rules.algorithms & ASYMMETRIC``, else ``alg_not_allowed`` (J01, J03, J31),
  and in ``validate`` equal to the key's pinned ``algorithm_name``, else ``alg_mismatch`` (J04). ``crit``
  or ``b64`` present: ``crit`` (J22). ``cty`` naming JWT: ``nested_token`` (J23); a non-string ``cty``:
  ``bad_header``. ``typ``, if present, one of ``TYPES`` in any case, else ``bad_typ`` (J28). ``kid``, if
  present, a string of at most ``MAX_KID_CHARS``, else ``bad_kid`` (J05). ``jku``, ``x5u``, ``jwk`` and
  ``x5c`` are never read: the key only ever comes from the caller (J08, J09).
- Signature: PyJWT, with ``algorithms=[key.algorithm_name]`` and minimum key lengths enforced; any failure
  is ``bad_signature`` (J24). The payload's JSON is parsed before, its claims judged only after.
- NumericDate (``exp``, ``nbf``, ``iat``): an int or float, not a bool, with ``abs(value) < 1e12`` (so
  finite; a millisecond timestamp fails) (J16). ``exp`` is required (``missing_exp``, ``bad_exp``); the
  token is ``expired`` once ``now >= exp + clock_skew`` (J10, J11). ``nbf`` gives ``not_yet_valid`` when
  ``nbf > now + clock_skew``; ``iat`` gives ``iat_in_future`` when ``iat > now + clock_skew``; equality
  passes (J12). A bad ``nbf`` or ``iat`` is ``bad_claim``.
- ``iss``: a string exactly equal to ``rules.issuer`` (no case folding, a trailing ``/`` matters), else
  ``wrong_issuer`` (J15); not read when ``rules.issuer`` is None (Apigee's verifyApiKey tokens only).
  ``aud``, when ``rules.audiences`` is non-empty: a string or a list of strings (else ``bad_claim``)
  with a value in ``rules.audiences`` (missing, empty or none matching: ``wrong_audience``) (J14). With
  no audiences configured ``aud`` is not read.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.algorithms import get_default_algorithms

from authz.errors import AuthzError

# RFC 7518 §3.3-3.5 and RFC 8037 signature algorithms, as far as this PyJWT implements them.
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
) & frozenset(get_default_algorithms())
TYPES = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})  # RFC 7519 §5.1, RFC 9068
NESTED = frozenset({"jwt", "application/jwt"})  # RFC 7519 §5.2: cty of a nested JWT
MAX_KID_CHARS = 256  # a kid is only a dictionary key
MAX_NUMERIC_DATE = 1e12  # seconds: year 33658; a millisecond timestamp is larger
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
# Minimum key lengths raise instead of warning once per request; jwks.py already drops short keys.
MIN_RSA_BITS = 2048


@dataclass(frozen=True, slots=True)
class Rules:
    """What one issuer's tokens must satisfy."""

    issuer: str | None  # exact match on "iss"; None only for Apigee's verifyApiKey tokens (iss not checked)
    audiences: frozenset[str]  # "aud" must contain one; empty set = aud not checked
    algorithms: frozenset[str]  # allowed "alg" values; only ASYMMETRIC ones are ever accepted
    clock_skew: float = 60.0  # seconds, applied to exp / nbf / iat
    max_token_bytes: int = 8192  # checked before any decoding


class InvalidToken(AuthzError):
    """A bearer JWT that must not be trusted; ``reason`` is a short, stable, log-safe code.

    The message never contains the token or any claim value.
    """

    code = "invalid_token"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid token: {reason}")


def header(token: str, rules: Rules) -> dict[str, Any]:
    """The JOSE header after the size, shape and header checks (used to pick the key by kid).

    Raises:
        InvalidToken: any rule above up to and including the header rules.
    """
    return _check_header(_object(_segments(token, rules.max_token_bytes)[0], "duplicate_header"), rules)


def validate(token: str, key: jwt.PyJWK, rules: Rules, now: float) -> dict[str, Any]:
    """The claims of ``token`` once its signature by ``key`` and its claims hold at ``now``.

    Raises:
        InvalidToken: with the ``reason`` of the first rule that fails (see the module docstring).
    """
    return check(parse(token, rules.max_token_bytes), key, rules, now)


@dataclass(frozen=True, slots=True)
class Parsed:
    """A token decoded once (shape, base64 and JSON checked), NOT verified."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def parse(token: str, max_token_bytes: int = 8192) -> Parsed:
    """Decode the three segments once; ``check`` then verifies. Raises InvalidToken."""
    head, payload, signature = _segments(token, max_token_bytes)
    header_ = _object(head, "duplicate_header")
    claims = _object(payload, "duplicate_claim")
    return Parsed(header_, claims, token.rpartition(".")[0].encode("ascii"), signature)


def check_header(parsed: Parsed, rules: Rules) -> dict[str, Any]:
    """The header rules for ``rules`` (before the key is chosen by kid). Raises InvalidToken."""
    return _check_header(parsed.header, rules)


def check(parsed: Parsed, key: jwt.PyJWK, rules: Rules, now: float) -> dict[str, Any]:
    """Header rules, the signature by ``key`` (its pinned algorithm only), then the claims at ``now``."""
    if _check_header(parsed.header, rules)["alg"] != key.algorithm_name:
        raise InvalidToken("alg_mismatch")
    _verify_signature(parsed, key)
    _check_claims(parsed.claims, rules, now)
    return parsed.claims


def _verify_signature(parsed: Parsed, key: jwt.PyJWK) -> None:
    public = key.key
    if getattr(public, "key_size", MIN_RSA_BITS) < MIN_RSA_BITS and key.algorithm_name[:2] in ("RS", "PS"):
        raise InvalidToken("bad_signature")  # a short RSA key (jwks.py drops them too)
    try:
        ok = key.Algorithm.verify(parsed.signing_input, public, parsed.signature)
    except (jwt.PyJWTError, ValueError, TypeError):
        ok = False  # e.g. an ECDSA signature of the wrong length
    if not ok:
        raise InvalidToken("bad_signature")


def _segments(token: str, max_bytes: int) -> tuple[bytes, bytes, bytes]:
    if not isinstance(token, str):
        raise InvalidToken("malformed")
    # len() first, so a huge string is refused without encoding it; surrogatepass so that a lone
    # surrogate is counted rather than raising UnicodeEncodeError.
    if len(token) > max_bytes or len(token.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidToken("too_large")
    if not token.isascii():
        raise InvalidToken("malformed")
    parts = token.split(".")  # at most max_bytes parts
    if len(parts) == 5:
        raise InvalidToken("encrypted")
    if len(parts) != 3:
        raise InvalidToken("malformed")
    return _b64(parts[0]), _b64(parts[1]), _b64(parts[2])


def _b64(segment: str) -> bytes:
    """Strict base64url (RFC 7515 §2): the alphabet, no padding, and the one canonical spelling."""
    if _SEGMENT.fullmatch(segment) is None or len(segment) % 4 == 1:
        raise InvalidToken("malformed")
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment.encode("ascii"):
        raise InvalidToken("malformed")  # non-zero unused bits in the last character
    return raw


def _object(raw: bytes, duplicate: str) -> dict[str, Any]:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise InvalidToken(duplicate)
        return result

    def no_constant(name: str) -> Any:
        raise InvalidToken("malformed")  # NaN, Infinity, -Infinity

    try:
        # Decode first: json.loads(bytes) would also accept UTF-16 and UTF-32 (RFC 8725 §3.7).
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=unique, parse_constant=no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InvalidToken("malformed") from None
    if not isinstance(value, dict):
        raise InvalidToken("malformed")
    return value


def _check_header(head: dict[str, Any], rules: Rules) -> dict[str, Any]:
    alg = head.get("alg")
    if not isinstance(alg, str) or alg not in rules.algorithms & ASYMMETRIC:
        raise InvalidToken("alg_not_allowed")
    if "crit" in head or "b64" in head:  # we implement no extension; b64 must be listed in crit
        raise InvalidToken("crit")
    cty = head.get("cty", "")
    if not isinstance(cty, str):
        raise InvalidToken("bad_header")
    if cty.isascii() and cty.lower() in NESTED:
        raise InvalidToken("nested_token")
    typ = head.get("typ", "jwt")
    if not (isinstance(typ, str) and typ.isascii() and typ.lower() in TYPES):
        raise InvalidToken("bad_typ")
    kid = head.get("kid", "")
    if not (isinstance(kid, str) and len(kid) <= MAX_KID_CHARS):
        raise InvalidToken("bad_kid")
    return head


def _numeric_date(claims: dict[str, Any], name: str, reason: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    # abs() < bound also refuses NaN and infinities, and compares a huge int without converting it.
    if isinstance(value, bool) or not isinstance(value, int | float) or not abs(value) < MAX_NUMERIC_DATE:
        raise InvalidToken(reason)
    return float(value)


def _check_claims(claims: dict[str, Any], rules: Rules, now: float) -> None:
    exp = _numeric_date(claims, "exp", "bad_exp")
    if exp is None:
        raise InvalidToken("missing_exp")
    if now >= exp + rules.clock_skew:
        raise InvalidToken("expired")
    nbf = _numeric_date(claims, "nbf", "bad_claim")
    if nbf is not None and nbf > now + rules.clock_skew:
        raise InvalidToken("not_yet_valid")
    iat = _numeric_date(claims, "iat", "bad_claim")
    if iat is not None and iat > now + rules.clock_skew:
        raise InvalidToken("iat_in_future")
    iss = claims.get("iss")
    if rules.issuer is not None and (not isinstance(iss, str) or iss != rules.issuer):
        raise InvalidToken("wrong_issuer")
    if rules.audiences:
        aud = claims.get("aud", [])
        if isinstance(aud, str):
            aud = [aud]
        if not (isinstance(aud, list) and all(isinstance(item, str) for item in aud)):
            raise InvalidToken("bad_claim")
        if rules.audiences.isdisjoint(aud):
            raise InvalidToken("wrong_audience")
