"""TLS contexts, built once from PEM files named in the configuration."""

from __future__ import annotations

import ssl
from pathlib import Path

from ..errors import InvalidConfigError

__all__ = ["server_context", "client_context"]


def server_context(cert_file: str, key_file: str | None, what: str) -> ssl.SSLContext:
    """A server-side context for ``what`` (TLS 1.2 or newer) from a certificate chain and its key."""
    if not cert_file or not key_file:
        raise InvalidConfigError(f"TLS for {what} needs both a certificate file and a key file")
    for f in (cert_file, key_file):
        if not Path(f).expanduser().is_file():
            raise InvalidConfigError(f"TLS for {what}: {f!r} is not a file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(Path(cert_file).expanduser()), str(Path(key_file).expanduser()))
    except (ssl.SSLError, OSError) as exc:
        raise InvalidConfigError(f"TLS for {what}: cannot load certificate {cert_file!r} with key {key_file!r}: "
                                 f"{exc}") from None
    return ctx


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
