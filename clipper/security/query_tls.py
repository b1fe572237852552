"""TLS on the query ports (msgpack and REST), and the warning for ports exposed without protection.

One server-side :class:`ssl.SSLContext`, built once at the frontend's start
from ``tls_cert_file`` and ``tls_key_file`` (PEM), serves both query ports.
TLS 1.2 is the oldest version accepted. The msgpack framing inside TLS is the
same as over plain TCP (docs/protocol.md, section 1).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ..errors import InvalidConfigError
from .net import is_loopback_host as is_loopback

__all__ = ["server_tls_context", "query_tls_context", "is_loopback", "exposure_warning"]


def _readable(what: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InvalidConfigError(f"{what} {str(path)!r} does not exist") from None
    except OSError as exc:
        raise InvalidConfigError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None


def server_tls_context(cert_file: str | Path, key_file: str | Path,
                       names: tuple[str, str] = ("tls_cert_file", "tls_key_file")) -> ssl.SSLContext:
    """A server-side context (TLS 1.2 or later) with the certificate chain and key of these PEM files.

    Raises :class:`InvalidConfigError` naming the file at fault: missing,
    unreadable, not PEM, an encrypted key, or a key that does not match the
    certificate. ``names`` are the settings' names the messages use.
    """
    cert_name, key_name = names
    cert, key = Path(cert_file), Path(key_file)
    # Each file on its own first, so the error names the one that is wrong.
    cert_pem = _readable(cert_name, cert)
    key_pem = _readable(key_name, key)
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise InvalidConfigError(f"{cert_name} {str(cert)!r} holds no PEM certificate "
                                 f"(expected a '-----BEGIN CERTIFICATE-----' block)")
    if b"PRIVATE KEY-----" not in key_pem:
        raise InvalidConfigError(f"{key_name} {str(key)!r} holds no PEM private key "
                                 f"(expected a '-----BEGIN PRIVATE KEY-----' block)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2

    def no_passphrase():
        # Without this callback OpenSSL would prompt on the terminal and block the start.
        raise InvalidConfigError(f"{key_name} {str(key)!r} is encrypted; the frontend needs an unencrypted key "
                                 f"(readable by its user only)")

    try:
        ctx.load_cert_chain(str(cert), str(key), password=no_passphrase)
    except InvalidConfigError:
        raise
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise InvalidConfigError(f"{key_name} {str(key)!r} does not hold the key of the certificate in "
                                     f"{cert_name} {str(cert)!r}") from None
        raise InvalidConfigError(f"cannot load the TLS certificate {str(cert)!r} with the key {str(key)!r}: "
                                 f"{reason}") from None
    except OSError as exc:  # the files changed under us
        raise InvalidConfigError(f"cannot read the TLS files {str(cert)!r}, {str(key)!r}: {exc}") from None
    return ctx


def query_tls_context(cfg, base_dir: str | Path | None = None) -> ssl.SSLContext | None:
    """The query ports' context from a :class:`~clipper.config.FrontendConfig`; None without TLS.

    Relative paths are taken from ``base_dir`` (the frontend's base folder).
    Raises :class:`InvalidConfigError` when only one of the two files is
    given, or as :func:`server_tls_context`.
    """
    cert, key = cfg.tls_cert_file, cfg.tls_key_file
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = ("tls_cert_file", "tls_key_file") if key is None else ("tls_key_file", "tls_cert_file")
        raise InvalidConfigError(f"{given} is set but {missing} is not: TLS on the query ports needs both "
                                 f"(--tls-cert FILE --tls-key FILE)")

    def resolve(p) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() or base_dir is None else Path(base_dir) / p

    return server_tls_context(resolve(cert), resolve(key))


def exposure_warning(cfg) -> str | None:
    """The one warning for query ports listening off loopback without TLS or without API keys; else None."""
    if cfg.query_port is None and cfg.rest_port is None:
        return None
    if is_loopback(cfg.host):
        return None
    tls = cfg.tls_cert_file is not None and cfg.tls_key_file is not None
    keys = bool(cfg.require_api_keys)
    if tls and keys:
        return None
    missing, why, how = [], [], []
    if not tls:
        missing.append("TLS")
        why.append("queries, answers and credentials cross the network in clear text")
        how.append("--tls-cert FILE --tls-key FILE (tls_cert_file, tls_key_file in [frontend])")
    if not keys:
        missing.append("API keys")
        why.append("any client that reaches the ports can query every application")
        how.append("--require-api-keys (require_api_keys = true in [frontend]) and "
                   "`clipper api-key create --app NAME`")
    return (f"clipper: warning: the query ports listen on {cfg.host!r}, off loopback, without "
            f"{' and without '.join(missing)}: {'; '.join(why)}. Turn on: {'; '.join(how)}.")
