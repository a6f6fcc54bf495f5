"""CURVE authentication and encryption for Tessera's internal ZeroMQ links.

DESIGN. Two kinds of link carry protobuf between processes: gateway DEALERs to the
scheduler's ROUTER, and the scheduler's ROUTER to its executors. The scheduler binds both;
gateways and executors connect. By default every link is on an ``ipc://`` path (guarded
by the socket file's permissions) or loopback TCP, which only this machine can reach.
A link that other machines can reach must use CURVE, ZeroMQ's Curve25519 handshake:

    address                                  keys configured    no keys
    ipc://, inproc://                        plain              plain
    tcp:// on 127.0.0.0/8, ::1, localhost    CURVE              plain
    tcp:// (or another transport) elsewhere  CURVE              refused: ValueError

so configuring keys turns CURVE on for every TCP link, loopback included (how the
tests exercise it), and forgetting them where it matters stops the process at start
with a message saying what to set. The binding side (``ServerKeys``) holds its key
pair and the public keys of the clients it accepts; a ZAP handler in its ZeroMQ
context (pyzmq's ThreadAuthenticator) refuses every other key, so a peer without an
authorized key never completes the handshake and nothing it sends is read. Each
connecting side (``ClientKeys``) holds its own key pair and the server's public key,
so it also knows it talks to the real scheduler. An executor the scheduler starts
itself authenticates with the scheduler's own pair, which the server always accepts.

Keys are ZeroMQ certificate files: ``NAME.key`` holds the public key, ``NAME.key_secret``
the pair (written 0600). Make them with

    python -m tessera.common.curve KEY_DIR scheduler gateway executor

and give the scheduler ``scheduler.key_secret`` plus a directory of the clients'
``*.key`` files, and each client its own ``*.key_secret`` plus ``scheduler.key``.
Torch-free: the scheduler and the gateway import it.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)

ZAP_DOMAIN = b"tessera"
_LOCAL_TRANSPORTS = ("ipc://", "inproc://")
_KEY_LENGTH = 40  # a Curve25519 key in Z85 text
_MAX_LOGGED_KEYS = 64  # refused keys logged once each, up to this many


def is_local(address: str) -> bool:
    """Whether only this machine can reach ``address``: ipc, inproc, loopback TCP."""
    if address.startswith(_LOCAL_TRANSPORTS):
        return True
    if not address.startswith("tcp://"):
        return False
    # "tcp://source;destination" connects from source: the destination is what counts.
    host = address.removeprefix("tcp://").rpartition(";")[2].rpartition(":")[0]
    host = host.removeprefix("[").removesuffix("]")
    if host in ("", "localhost"):  # no host: scheduler.executor_link.bind uses 127.0.0.1
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, an interface name, "*"
        return False


def is_secured(address: str) -> bool:
    """Whether configured keys apply to a link on ``address`` (every non-ipc one)."""
    return not address.startswith(_LOCAL_TRANSPORTS)


def check_link(address: str, has_keys: bool, flags: str) -> None:
    """ValueError if ``address`` is reachable from elsewhere and no keys are set."""
    if not has_keys and not is_local(address):
        raise ValueError(
            f"{address} can be reached from other machines, so its ZeroMQ link needs "
            f"CURVE keys: set {flags} (make keys with `python -m tessera.common.curve DIR "
            "NAME...`), or use an ipc:// path or a loopback address"
        )


def check_pair(a: str | None, b: str | None, names: str) -> bool:
    """Whether both of two key settings are given; ValueError if only one is."""
    if (a is None) != (b is None):
        raise ValueError(f"{names} go together: set both or neither")
    return a is not None


# -- keys ----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ServerKeys:
    """The binding side: its key pair and the client keys it accepts (Z85 text)."""

    public: bytes
    secret: bytes = field(repr=False)
    authorized: frozenset[bytes] = field(repr=False)

    @classmethod
    def load(cls, secret_key_file: str, authorized_keys: str) -> ServerKeys:
        """ValueError naming the file at fault if a key cannot be read."""
        public, secret = load_key_pair(secret_key_file)
        return cls(public, secret, load_authorized_keys(authorized_keys) | {public})

    def start_authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """The ZAP handler of ``ctx``; it must run before any secured socket binds (a
        CURVE server without one would accept any client key). Stop it before the
        context is destroyed."""
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("zmq.auth"))
        auth.start()
        auth.configure_curve_callback(ZAP_DOMAIN.decode(), _Allowlist(self.authorized))
        return auth

    def secure(self, socket: zmq.Socket, address: str) -> None:
        """Make ``socket`` a CURVE server if ``address`` is secured; call before bind."""
        if is_secured(address):
            socket.curve_secretkey = self.secret
            socket.curve_publickey = self.public
            socket.curve_server = True
            socket.zap_domain = ZAP_DOMAIN


@dataclass(slots=True, frozen=True)
class ClientKeys:
    """A connecting side: its own key pair and the server's public key (Z85 text)."""

    public: bytes
    secret: bytes = field(repr=False)
    server_public: bytes

    @classmethod
    def load(cls, secret_key_file: str, server_key_file: str) -> ClientKeys:
        """ValueError naming the file at fault if a key cannot be read."""
        public, secret = load_key_pair(secret_key_file)
        return cls(public, secret, load_public_key(server_key_file))

    def secure(self, socket: zmq.Socket, address: str) -> None:
        """Make ``socket`` a CURVE client if ``address`` is secured; call before connect."""
        if is_secured(address):
            socket.curve_serverkey = self.server_public
            socket.curve_publickey = self.public
            socket.curve_secretkey = self.secret


def client_keys(secret_key_file: str | None, server_key_file: str | None) -> ClientKeys | None:
    if secret_key_file is None or server_key_file is None:
        return None
    return ClientKeys.load(secret_key_file, server_key_file)


def load_key_pair(path: str) -> tuple[bytes, bytes]:
    public, secret = _read_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key: give the NAME.key_secret file")
    return public, _checked(secret, path)


def load_public_key(path: str) -> bytes:
    """The public key of a NAME.key file (a NAME.key_secret file works too)."""
    return _read_certificate(path)[0]


def load_authorized_keys(path: str) -> frozenset[bytes]:
    """The public keys of every ``*.key`` file in a directory, or of one file."""
    files = sorted(Path(path).glob("*.key")) if os.path.isdir(path) else [Path(path)]
    keys = frozenset(load_public_key(str(f)) for f in files)
    if not keys:
        raise ValueError(f"no public keys (*.key files) in {path}")
    return keys


def _read_certificate(path: str) -> tuple[bytes, bytes | None]:
    if not zmq.has("curve"):
        raise ValueError("this libzmq was built without CURVE support")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the CURVE key file {path}: {e}") from None
    return _checked(public, path), secret


def _checked(key: bytes, path: str) -> bytes:
    if len(key) != _KEY_LENGTH:
        raise ValueError(f"{path}: a CURVE key is {_KEY_LENGTH} Z85 characters, not {len(key)}")
    return key


class _Allowlist:
    """The ZAP handler's verdict on a client key; refused keys are logged once each."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys
        self.refused: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        if key not in self.refused and len(self.refused) < _MAX_LOGGED_KEYS:
            self.refused.add(key)
            logger.warning("refused a ZeroMQ peer whose CURVE key %s is not authorized",
                           key.decode(errors="replace"))
        return False


# -- key generation ---------------------------------------------------------------------


def write_key_pair(directory: str, name: str) -> bool:
    """Write ``NAME.key`` and ``NAME.key_secret`` (0600) unless they exist; True if new."""
    public_file = Path(directory) / f"{name}.key"
    secret_file = Path(directory) / f"{name}.key_secret"
    if public_file.exists() or secret_file.exists():
        return False
    public, secret = zmq.curve_keypair()
    Path(directory).mkdir(parents=True, exist_ok=True)
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(certificate_text(public, secret))
    public_file.write_text(certificate_text(public))
    return True


def certificate_text(public: bytes, secret: bytes | None = None) -> str:
    """A key in the ZeroMQ certificate format: NAME.key (public only) or, with the
    secret, NAME.key_secret."""
    lines = ["# A Tessera CURVE key (ZeroMQ certificate format)", "metadata", "curve",
             f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tessera.common.curve",
        description="write CURVE key pairs for Tessera's ZeroMQ links (existing ones are kept)",
        allow_abbrev=False,
    )
    parser.add_argument("directory", help="where NAME.key and NAME.key_secret go")
    parser.add_argument("names", nargs="+", help="one key pair per name, e.g. scheduler gateway")
    args = parser.parse_args(argv)
    for name in args.names:
        made = write_key_pair(args.directory, name)
        print(f"{'wrote' if made else 'kept'} {Path(args.directory) / name}.key(_secret)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
