"""The gateway's public surface: the API key and TLS, the same on both ports.

DESIGN. Everything a client reaches goes through the gateway's two ports (gRPC and
the OpenAI HTTP API), so this is the one place that decides who gets in:

- ``BearerToken``: with an API key set, every gRPC method (reflection included) and
  every HTTP route needs ``authorization: Bearer <key>``; only the health checks (the
  ``grpc.health.v1.Health`` service, ``GET /health``) stay open, for load balancers.
  The scheme is case-insensitive; the check hashes both sides with SHA-256 and
  compares the digests with ``hmac.compare_digest``, so its time depends on neither
  the key nor the guess, nor on their lengths.
- ``TlsFiles``: a PEM certificate chain and its key put both ports on TLS; a client
  CA bundle makes it mutual TLS (a client without a certificate signed by that CA
  fails the handshake, on both ports). The files are read and checked once at start,
  so a wrong path or a key that does not match its certificate stops the gateway
  with a message, not at the first client's handshake.

The internal ZeroMQ links behind the gateway are secured apart (``executor.curve``).
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from dataclasses import dataclass, field
from typing import Any

import grpc

HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"  # gRPC methods open without a key
OPEN_HTTP_PATHS = frozenset({"/health"})  # HTTP routes open without a key


class BearerToken:
    """Checks an ``Authorization`` value against ``Bearer <api_key>``."""

    __slots__ = ("_digest",)

    def __init__(self, api_key: str) -> None:
        self._digest = _sha256(api_key.encode())

    def matches(self, authorization: bytes | str | None) -> bool:
        value = authorization.encode() if isinstance(authorization, str) else authorization
        value = value or b""
        scheme, _, key = value.partition(b" ")
        given = key.strip() if scheme.lower() == b"bearer" else b""
        # Always hash and compare, so that a malformed header costs what a wrong key does.
        return hmac.compare_digest(_sha256(given), self._digest) and bool(given)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(slots=True, frozen=True)
class TlsFiles:
    """The PEM files of the gateway's TLS (and mutual TLS, with a client CA)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    cert_chain: bytes = field(default=b"", repr=False)
    private_key: bytes = field(default=b"", repr=False)
    client_ca: bytes | None = field(default=None, repr=False)

    @classmethod
    def load(cls, cert_file: str, key_file: str, client_ca_file: str | None = None) -> TlsFiles:
        """Read and check the files; ValueError saying which one is wrong."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(
                f"cannot use the TLS certificate {cert_file} with the key {key_file}: {e}"
            ) from None
        client_ca = None
        if client_ca_file is not None:
            try:
                context.load_verify_locations(cafile=client_ca_file)
                client_ca = _read(client_ca_file)
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"cannot use the client CA file {client_ca_file}: {e}") from None
        return cls(cert_file, key_file, client_ca_file, _read(cert_file), _read(key_file),
                   client_ca)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.mutual,
        )

    def uvicorn_options(self) -> dict[str, Any]:
        """uvicorn.Config's TLS arguments."""
        options: dict[str, Any] = {"ssl_certfile": self.cert_file, "ssl_keyfile": self.key_file}
        if self.client_ca_file is not None:
            options.update(ssl_ca_certs=self.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options

    def describe(self) -> str:
        return "mutual TLS" if self.mutual else "TLS"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
