"""Checks a process makes before it loads anything: the ports it will listen on are free,
the files it was given can be read, the model names something.

A busy port or a wrong path found here costs a fraction of a second and ends the
process with one line and ``EXIT_CONFIG``; found after the weights have loaded it cost
a minute and a traceback. The launcher (``tessera serve``) runs every check of every
child before it starts any, and treats a child that exits with ``EXIT_CONFIG`` as fatal:
a restart would only repeat the error.

Torch-free: the launcher and the gateway run it before they import anything heavy.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable

# The exit code of a fatal configuration error (a bad flag, model, path or port), the
# same as argparse's for a bad flag. Never restarted.
EXIT_CONFIG = 2


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and says what to change."""


def check_port_free(host: str, port: int, what: str) -> None:
    """ConfigError if ``port`` on ``host`` cannot be listened on now.

    Binds the way the servers do (SO_REUSEADDR, so a port in TIME_WAIT is free, and never
    SO_REUSEPORT, so a port another server listens on is busy even when that server set
    SO_REUSEPORT itself), then lets go at once. Port 0 (the system picks) is always free.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"{what}: cannot resolve host {host!r}: {e.strerror}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # the v4 address is checked on its own
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(address)
                s.listen(1)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"{what}: port {port} on {host} is in use by another process; stop "
                        f"it or choose another port"
                    ) from None
                if e.errno == errno.EADDRNOTAVAIL and family == socket.AF_INET6:
                    continue  # no IPv6 on this machine: the server binds v4 only
                raise ConfigError(f"{what}: cannot listen on {host}:{port}: {e.strerror}"
                                  ) from None


def check_ports_differ(ports: Iterable[tuple[str, int]]) -> None:
    """ConfigError if two of the named ports (0 aside) are the same."""
    seen: dict[int, str] = {}
    for what, port in ports:
        if port and port in seen:
            raise ConfigError(f"{what} and {seen[port]} are both port {port}")
        seen[port] = what


def check_readable_file(path: str | None, what: str) -> None:
    """ConfigError unless ``path`` (when set) is a file this process can read."""
    if path is None:
        return
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: no such file: {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what}: cannot read {path} (permission denied)")
