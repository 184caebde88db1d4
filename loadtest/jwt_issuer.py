"""A bench-only JWT issuer for cases (e) and (f): one RSA key, its JWKS on loopback, RS256 tokens.

The service fetches the JWKS once at start from ``python -m http.server`` serving a static ``jwks.json``
(a subprocess, stopped by PID like the bench's other children). Tokens are compact JWS signed with
``cryptography`` directly: one RSA-2048 signature costs about 0.2 ms here, so case (f)'s 100k+ distinct
tokens are signed in a process pool on every CPU before the case starts (nothing is measured then).
Each token differs only in its ``jti``, so every one has its own signature and none can hit the
service's verified-token cache.

Imports the standard library, cryptography and :mod:`devstack` only; never the ``authz`` package.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from devstack.procs import Proc, free_port, wait_port_open

ISSUER = "https://issuer.bench.invalid"
AUDIENCE = "authz-bench"
PROVIDER = "bench"
KID = "bench-rsa-1"
TOKEN_LIFETIME = 3600  # seconds: outlasts any bench run
CHUNK = 5_000  # tokens per pool task
READY_TIMEOUT = 15.0


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _uint(value: int) -> str:
    return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass(frozen=True)
class Issuer:
    """An RSA-2048 signing key, its public JWKS, and the claims every token carries."""

    private_pem: bytes = field(repr=False)
    jwks: dict[str, Any]
    issued_at: int

    @classmethod
    def new(cls) -> Issuer:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        numbers = key.public_key().public_numbers()
        jwk = {
            "kty": "RSA",
            "kid": KID,
            "alg": "RS256",
            "use": "sig",
            "n": _uint(numbers.n),
            "e": _uint(numbers.e),
        }
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cls(pem, {"keys": [jwk]}, int(time.time()))

    def mint(self, serials: Sequence[int]) -> list[str]:
        """One RS256 token per serial (its ``jti``), in this process."""
        key = serialization.load_pem_private_key(self.private_pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TypeError("the issuer key is not an RSA private key")
        head = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": KID}, separators=(",", ":")).encode())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "bench-app",
            "azp": "bench-client",
            "iat": self.issued_at,
            "exp": self.issued_at + TOKEN_LIFETIME,
        }
        tokens = []
        for serial in serials:
            payload = _b64(json.dumps({**claims, "jti": f"{serial:08d}"}, separators=(",", ":")).encode())
            signing_input = f"{head}.{payload}"
            signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
            tokens.append(f"{signing_input}.{_b64(signature)}")
        return tokens

    def mint_many(self, count: int, first: int = 0) -> list[str]:
        """``count`` distinct tokens (serials ``first``...), signed in a pool of one process per CPU."""
        ranges = [
            range(start, min(start + CHUNK, first + count)) for start in range(first, first + count, CHUNK)
        ]
        if len(ranges) <= 1:
            return self.mint(ranges[0]) if ranges else []
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            return [token for chunk in pool.map(self.mint, ranges) for token in chunk]


def provider_overrides(jwks_uri: str) -> dict[str, Any]:
    """The ``auth.jwt_providers`` entry (deep-merged into the authz config): the bench product, fixed."""
    provider = {
        "name": PROVIDER,
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "jwks_uri": jwks_uri,
        "algorithms": ["RS256"],
        "products": ["bench"],
        "claims": {"client_id": "azp", "application": "sub"},
    }
    return {"auth": {"jwt_providers": [provider]}}


def serve_jwks(issuer: Issuer, work_dir: Path, log_dir: Path, name: str) -> tuple[Proc, str]:
    """Serve ``issuer.jwks`` as ``work_dir/<name>/jwks.json`` on loopback; return the server (logging to
    ``log_dir/<name>.log``) and the ``jwks_uri``."""
    directory = work_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "jwks.json").write_text(json.dumps(issuer.jwks))
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "http.server",
        str(port),
        "--bind",
        "127.0.0.1",
        "--directory",
        str(directory),
    ]
    proc = Proc(name, argv, log_dir)
    try:
        wait_port_open(port, READY_TIMEOUT, proc)
    except BaseException:
        proc.stop()
        raise
    return proc, f"http://127.0.0.1:{port}/jwks.json"


def write_lines(path: Path, tokens: Iterable[str]) -> Path:
    """One token a line (the format ``wrk_tokens.lua`` reads)."""
    with path.open("w", encoding="ascii") as out:
        for token in tokens:
            out.write(token)
            out.write("\n")
    return path
