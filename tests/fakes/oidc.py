"""FakeOidc: a stateful fake OpenID Connect provider (an issuer such as Google or a customer's IdP).

It serves `GET {issuer_path}/.well-known/openid-configuration` (endpoint "discovery") and `GET /jwks`
(endpoint "jwks"), publishes an RSA key (RS256) and an EC P-256 key (ES256), mints tokens with `mint`, and
rotates keys (`rotate` adds a new RSA signing key, `retire` unpublishes one). Faults are knobs per
endpoint (fail, drop, malformed, chunked/oversize, delay), like FakeApigee. The same object is an
`httpx.MockTransport` handler (`fake.transport()`, origin `https://oidc.test`) and a loopback HTTP server
(`await fake.serve()`); serving moves `fake.issuer` to the bound address, so mint after serving.
Imports only the stdlib, httpx, pyjwt/cryptography and tests.fakes.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.fakes.http_server import ConnectionDropped, LoopbackServer

ENDPOINTS = frozenset({"discovery", "jwks"})
DEFAULT_ORIGIN = "https://oidc.test"  # over MockTransport: https, so discovery's jwks_uri is acceptable
DEFAULT_AUDIENCE = "authz-test"
CHUNK = 16 * 1024


@dataclass
class _Canned:
    status: int
    body: bytes
    headers: dict[str, str]
    chunked: bool = False


class FakeOidc:
    """An issuer. Tests mint with `mint`, change keys with `rotate`/`retire`, and assert on `calls`."""

    def __init__(
        self,
        issuer_path: str = "/issuer",
        clock: Callable[[], float] = time.time,
        *,
        origin: str = DEFAULT_ORIGIN,
        audience: str = DEFAULT_AUDIENCE,
    ) -> None:
        self.issuer_path = issuer_path
        self.origin = origin  # scheme://host[:port]; serve() sets it to the loopback address
        self.audience = audience
        self._clock = clock
        self.calls: collections.Counter[str] = collections.Counter()
        self.last_headers: dict[str, dict[str, str]] = {}
        self.sent_bytes: collections.Counter[str] = collections.Counter()  # bodies of chunked answers
        self.discovery_overrides: dict[str, Any] = {}  # merged over the discovery document
        self._private: dict[str, Any] = {}  # kid -> private key, retired ones included
        self._serial = 0
        self._drops: collections.Counter[str] = collections.Counter()
        self._canned: dict[str, collections.deque[_Canned]] = collections.defaultdict(collections.deque)
        self._delays: dict[str, float] = {}
        self.jwks: dict[str, Any] = {"keys": []}
        self.ec_kid = "ec-1"
        self._publish(self.ec_kid, ec.generate_private_key(ec.SECP256R1()), "ES256")
        self.rsa_kid = self.rotate()

    # -- state -----------------------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        return self.origin + self.issuer_path

    @property
    def jwks_uri(self) -> str:
        return self.origin + "/jwks"

    def discovery(self) -> dict[str, Any]:
        document = {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
        }
        return {**document, **self.discovery_overrides}

    def rotate(self) -> str:
        """Publish a new RSA key and sign with it from now on; the old ones stay until `retire`."""
        self._serial += 1
        kid = f"rsa-{self._serial}"
        self._publish(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")
        self.rsa_kid = kid
        return kid

    def retire(self, kid: str) -> None:
        """Stop publishing `kid` (tokens can still be minted with it, to test a removed key)."""
        self.jwks["keys"] = [k for k in self.jwks["keys"] if k.get("kid") != kid]

    def mint(
        self,
        claims: dict[str, Any],
        *,
        alg: str = "RS256",
        kid: str | None = None,
        headers: dict[str, Any] | None = None,
        lifetime: float = 300,
    ) -> str:
        """A signed token: iss, aud, sub, iat and exp default sensibly; `claims` override them.

        `kid` picks the signing key (default: the current key of the alg's family); an unknown kid is put in
        the header of a token signed with that default key. `headers` adds header fields; a None value
        removes one (`headers={"kid": None}` mints a token without kid).
        """
        family_kid = self.ec_kid if alg.startswith("ES") else self.rsa_kid
        private = self._private.get(kid or family_kid, self._private[family_kid])
        now = int(self._clock())
        base = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "user-1",
            "iat": now,
            "exp": int(now + lifetime),
        }
        header = {"kid": kid or family_kid, **(headers or {})}
        # PyJWT drops a falsy typ itself and refuses a None kid, so other None values are removed here.
        header = {name: value for name, value in header.items() if value is not None or name == "typ"}
        return jwt.encode({**base, **claims}, private, algorithm=alg, headers=header)

    def sign(self, header: bytes, payload: bytes, *, alg: str = "RS256", kid: str | None = None) -> str:
        """A compact JWS over exactly these header and payload bytes, signed with `alg` by `kid`'s key
        (default: the current key of the alg's family). For corpora that `mint` cannot express: duplicate
        members, float or string dates, a header that names another algorithm than the signature's."""
        private = self._private[kid or (self.ec_kid if alg.startswith("ES") else self.rsa_kid)]
        signing_input = _b64(header) + "." + _b64(payload)
        signature = jwt.get_algorithm_by_name(alg).sign(signing_input.encode("ascii"), private)
        return signing_input + "." + _b64(signature)

    def _publish(self, kid: str, private: Any, alg: str) -> None:
        self._private[kid] = private
        to_jwk = ECAlgorithm.to_jwk if alg.startswith("ES") else RSAAlgorithm.to_jwk
        public = to_jwk(private.public_key(), as_dict=True)
        self.jwks["keys"].append({**public, "kid": kid, "alg": alg, "use": "sig"})

    # -- faults ----------------------------------------------------------------------------------------

    def fail_next(
        self, endpoint: str, status: int, count: int = 1, headers: dict[str, str] | None = None
    ) -> None:
        """Answer `status` with a small JSON error (and `headers`, e.g. a Location for a 3xx)."""
        _check(endpoint, count)
        canned = _Canned(
            status, b'{"error":"injected"}', {"Content-Type": "application/json", **(headers or {})}
        )
        self._canned[endpoint].extend(canned for _ in range(count))

    def drop_next(self, endpoint: str, count: int = 1) -> None:
        """Close the connection without an answer (a ConnectError over MockTransport)."""
        _check(endpoint, count)
        self._drops[endpoint] += count

    def malformed_next(
        self,
        endpoint: str,
        body: bytes,
        status: int = 200,
        content_type: str = "application/json",
        count: int = 1,
        *,
        chunked: bool = False,
    ) -> None:
        """Answer `body`; `chunked` streams it in 16 KiB chunks without Content-Length (over MockTransport;
        the loopback server always sends a Content-Length), counting what was read in `sent_bytes`."""
        _check(endpoint, count)
        canned = _Canned(status, body, {"Content-Type": content_type}, chunked)
        self._canned[endpoint].extend(canned for _ in range(count))

    def set_delay(self, endpoint: str, seconds: float) -> None:
        """Sleep (real asyncio time) before every answer of `endpoint`, faulted ones included; 0 clears."""
        _check(endpoint, 1)
        self._delays[endpoint] = seconds

    def heal(self) -> None:
        """Forget every queued fault and delay: the issuer answers normally again."""
        self._canned.clear()
        self._drops.clear()
        self._delays.clear()

    # -- transport -------------------------------------------------------------------------------------

    async def handler(self, request: httpx.Request) -> httpx.Response:
        """Answer one request; usable as `httpx.MockTransport(fake.handler)`."""
        path = request.url.path
        if path == self.issuer_path.rstrip("/") + "/.well-known/openid-configuration":
            endpoint, answer = "discovery", self.discovery
        elif path == "/jwks":
            endpoint, answer = "jwks", lambda: self.jwks
        else:
            return httpx.Response(404, json={"error": "not_found"})
        self.calls[endpoint] += 1
        self.last_headers[endpoint] = {k.lower(): v for k, v in request.headers.items()}
        dropped = self._drops[endpoint] > 0
        canned: _Canned | None = None
        if dropped:
            self._drops[endpoint] -= 1
        elif self._canned[endpoint]:
            canned = self._canned[endpoint].popleft()
        if self._delays.get(endpoint, 0) > 0:
            await asyncio.sleep(self._delays[endpoint])
        if dropped:
            raise ConnectionDropped(f"fake oidc dropped {endpoint}", request=request)
        if canned is not None:
            content = self._chunks(endpoint, canned.body) if canned.chunked else canned.body
            return httpx.Response(canned.status, content=content, headers=canned.headers)
        if request.method != "GET":
            return httpx.Response(405, headers={"Allow": "GET"})
        return httpx.Response(
            200, content=json.dumps(answer()).encode(), headers={"Content-Type": "application/json"}
        )

    async def _chunks(self, endpoint: str, body: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(body), CHUNK):
            self.sent_bytes[endpoint] += len(body[start : start + CHUNK])
            yield body[start : start + CHUNK]

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> FakeOidcServer:
        """Start a loopback HTTP/1.1 server; from now on `issuer`, discovery and minted tokens use its address."""
        server = await LoopbackServer.start(self.handler, host, port)
        self.origin = server.base_url
        return FakeOidcServer(server, self)


class FakeOidcServer:
    """A FakeOidc served over loopback: `async with await fake.serve() as server:`."""

    def __init__(self, server: LoopbackServer, fake: FakeOidc) -> None:
        self._server = server
        self.port = server.port
        self.base_url = server.base_url
        self.issuer = fake.issuer
        self.jwks_uri = fake.jwks_uri

    async def close(self) -> None:
        await self._server.close()

    async def __aenter__(self) -> FakeOidcServer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _check(endpoint: str, count: int) -> None:
    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {sorted(ENDPOINTS)}")
    if count < 1:
        raise ValueError("count must be at least 1")
