"""The client side of TLS (servers: :mod:`.query_tls`)."""

from __future__ import annotations

import ssl
from pathlib import Path

from ..errors import InvalidConfigError

__all__ = ["client_context"]


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the server: the system's CAs, plus ``cafile`` when given
    (a private CA, or a self-signed server certificate)."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile:
        try:
            ctx.load_verify_locations(cafile=str(Path(cafile).expanduser()))
        except (ssl.SSLError, OSError) as exc:
            raise InvalidConfigError(f"cannot load the CA file {cafile!r}: {exc}") from None
    return ctx
