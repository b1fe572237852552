"""Where a listener is reachable from: loopback or not."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback_host"]


def is_loopback_host(host: str | None) -> bool:
    """True when ``host`` (a bind address or name) reaches only this machine.

    ``localhost``, 127.0.0.0/8 and ::1 are; a wildcard (``0.0.0.0``, ``::``,
    ``*``, empty) and every other address or name are not.
    """
    if not host:
        return False
    h = host.strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):  # RFC 6761: *.localhost resolves to loopback
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
