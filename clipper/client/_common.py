"""What the synchronous and the asyncio client share: the answer type, request
encoding and the reading of replies. No I/O happens here."""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass, field
from typing import Any, Mapping, cast

import msgpack
import numpy as np

from .. import errors as E
from ..protocol import wire

__all__ = ["Prediction", "CLIENT_NAME", "DEFAULT_MAX_FRAME_BYTES", "DEFAULT_WINDOW"]

CLIENT_NAME = "clipper-python/0.1.0"
# Replies may carry large outputs; the client's bound on one reply frame.
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
# Requests in flight on one connection when the server does not say its limit.
DEFAULT_WINDOW = 1024
_MAX_ID = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Prediction:
    """The answer to one query.

    Attributes:
        query_id: the server's id for this query (for logs and feedback).
        output: the prediction: a number, string, bytes, list, or a read-only
            numpy array when the model returned an array.
        is_default: true when the application's default output was returned
            (no model answered in time, or the answer's confidence was below
            the application's threshold; see ``explanation``).
        explanation: why the default output was returned, else ``None``.
        extra: every optional field the server sent (``explanation``,
            ``confidence``, ``models``, ``missing``, ``low_confidence``, ...).
        confidence: the agreement among the models that answered, in [0, 1]
            (1 for a single model; ``None`` if the server did not say).
        models: the model versions (``name:version``) whose answers made
            ``output``.
        missing: the selected models that did not answer in time, each as
            ``"name:version (reason)"``.
        low_confidence: the confidence was below the application's
            ``confidence_threshold``.
    """

    query_id: int
    output: Any
    is_default: bool
    explanation: str | None = None
    extra: dict = field(default_factory=dict)
    confidence: float | None = None
    models: tuple = ()
    missing: tuple = ()
    low_confidence: bool = False


# --------------------------------------------------------------------- encoding
def _encode_default(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        return wire.encode_ndarray(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send an object of type {type(obj).__name__}")


class RequestEncoder:
    """Builds request frames. One per connection: a msgpack ``Packer`` must not
    be shared between threads, so the clients do not use ``wire.pack``'s."""

    __slots__ = ("_packer", "_next_id", "max_frame_bytes")

    def __init__(self) -> None:
        self._packer = msgpack.Packer(default=_encode_default, use_bin_type=True, autoreset=True)
        self._next_id = 0
        self.max_frame_bytes: int | None = None  # the server's, once HELLO_OK said it

    def new_id(self) -> int:
        rid = self._next_id
        self._next_id = 0 if rid == _MAX_ID else rid + 1
        return rid

    def frame(self, msg: list, what: str = "request") -> bytes:
        """Encode ``msg`` as one frame; raise InvalidInputError or
        FrameTooLargeError (before anything is sent) when it cannot travel."""
        try:
            body = self._packer.pack(msg)
        except (TypeError, ValueError, OverflowError) as exc:
            raise E.InvalidInputError(f"the {what} cannot be encoded: {exc}") from None
        limit = self.max_frame_bytes
        if limit is not None and len(body) > limit:
            raise E.FrameTooLargeError(
                f"the {what} encodes to {len(body)} bytes; the server's max_frame_bytes is {limit}")
        return wire.frame(body)


def client_limits(max_frame_bytes: int) -> wire.DecodeLimits:
    """Decoding limits for replies: a reply may be as large as a frame."""
    return wire.DecodeLimits(
        max_frame_bytes=max_frame_bytes,
        max_bin_len=max_frame_bytes,
        max_ext_len=max_frame_bytes,
    )


# ---------------------------------------------------------------------- replies
_NO_ID = object()


def reply_id(msg: object) -> Any:
    """The request id a decoded reply answers; ``None`` for an ERROR the server
    could not attribute; ``_NO_ID`` when ``msg`` is not a reply at all."""
    if type(msg) is not list or len(msg) < 2 or type(msg[0]) is not int:
        return _NO_ID
    rid = msg[1]
    if rid is None:
        return None if msg[0] == wire.ERROR else _NO_ID
    if type(rid) is not int or rid < 0:
        return _NO_ID
    return rid


def unattributed_error(msg: object) -> E.ClipperError:
    """The exception for a reply frame no request can be matched with."""
    if reply_id(msg) is None:
        return error_from_reply(cast(list, msg))
    return E.MalformedFrameError(f"the server sent a reply that is not [type, id, ...]: {_short(msg)}")


def error_from_reply(msg: list) -> E.ClipperError:
    if len(msg) < 5 or type(msg[2]) is not int:
        return E.MalformedFrameError(f"the server sent a malformed ERROR: {_short(msg)}")
    message = msg[4] if type(msg[4]) is str else repr(msg[4])
    return E.error_for_code(msg[2], message)


def _short(obj: object) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:197] + "..."


_NAMES = {wire.HELLO_OK: "HELLO_OK", wire.RESULT: "RESULT", wire.FEEDBACK_OK: "FEEDBACK_OK", wire.PONG: "PONG",
          wire.DESCRIPTION: "DESCRIPTION"}


def check_reply(msg: list, expected: int) -> E.ClipperError | None:
    """``None`` if ``msg`` is a well-formed reply of type ``expected``, else the
    exception the caller gets (the server's ERROR, or MalformedFrameError)."""
    kind = msg[0]
    if kind == wire.ERROR:
        return error_from_reply(msg)
    if kind != expected:
        return E.MalformedFrameError(
            f"the server answered with message type {kind}; expected {_NAMES[expected]} ({expected})")
    return None


def to_prediction(msg: list) -> Prediction | E.ClipperError:
    """Turn a RESULT (or ERROR) reply into a Prediction (or the exception)."""
    err = check_reply(msg, wire.RESULT)
    if err is not None:
        return err
    # Elements past the ones defined are ignored (room for later versions).
    n = len(msg)
    if n < 5 or type(msg[2]) is not int or type(msg[4]) is not bool:
        return E.MalformedFrameError(
            f"RESULT is [65, id, query_id, output, is_default, extra?]; got {_short(msg)}")
    extra = msg[5] if n > 5 else {}
    if type(extra) is not dict:
        return E.MalformedFrameError(f"RESULT extra must be a map; got {_short(extra)}")
    explanation = extra.get("explanation")
    if explanation is not None and type(explanation) is not str:
        explanation = str(explanation)
    confidence = extra.get("confidence")
    if confidence is not None and (type(confidence) not in (int, float) or isinstance(confidence, bool)):
        confidence = None
    models = extra.get("models")
    missing = extra.get("missing")
    return Prediction(msg[2], msg[3], msg[4], explanation, extra,
                      None if confidence is None else float(confidence),
                      tuple(models) if type(models) is list else (),
                      tuple(missing) if type(missing) is list else (),
                      extra.get("low_confidence") is True)


def feedback_info(msg: list) -> dict | E.ClipperError:
    """The info map of a FEEDBACK_OK (``{}`` when it has none), or the exception."""
    err = check_reply(msg, wire.FEEDBACK_OK)
    if err is not None:
        return err
    info = msg[2] if len(msg) > 2 else {}
    return info if type(info) is dict else {}


def user_options(options: Mapping | None, user: str | None) -> dict | None:
    """Request options with ``user`` merged in (``options`` is a Mapping or None)."""
    if user is None:
        return None if options is None else dict(options)
    if type(user) is not str:
        raise TypeError(f"user must be a str, got {type(user).__name__}")
    out = {} if options is None else dict(options)
    out["user"] = user
    return out


def check_hello_ok(msg: list, offered: tuple[int, ...]) -> dict:
    """Validate the answer to HELLO; return the server info, or raise."""
    err = check_reply(msg, wire.HELLO_OK)
    if err is not None:
        raise err
    info = msg[2] if len(msg) > 2 else None
    if type(info) is not dict or type(info.get("version")) is not int:
        raise E.MalformedFrameError(f"HELLO_OK is [64, id, {{version, server, limits}}]; got {_short(msg)}")
    if info["version"] not in offered:
        raise E.UnsupportedVersionError(
            f"the server chose protocol version {info['version']}; this client offered {list(offered)}")
    limits = info.get("limits")
    info["limits"] = dict(limits) if type(limits) is dict else {}
    return info


def window_from(info: dict) -> int:
    """Requests this client keeps in flight: the server's max_pending_per_connection."""
    value = info["limits"].get("max_pending_per_connection")
    if type(value) is int and value > 0:
        return value
    return DEFAULT_WINDOW


def frame_limit_from(info: dict) -> int | None:
    value = info["limits"].get("max_frame_bytes")
    return value if type(value) is int and value > 0 else None


def check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    value = float(timeout)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return None if math.isinf(value) else value


# ------------------------------------------------------------------------- TLS
def client_tls_context(tls: bool | ssl.SSLContext | None, cafile: str | None) -> ssl.SSLContext | None:
    """The context a client connects with, or None for plain TCP.

    ``tls``: False/None (plain TCP unless ``cafile`` is given), True (verify
    the server's certificate against the system's CAs, or only against
    ``cafile`` when given), or an :class:`ssl.SSLContext` used as it is.
    Raises ``TypeError``/``ValueError`` for a bad combination, ``OSError``
    when ``cafile`` cannot be read.
    """
    if isinstance(tls, ssl.SSLContext):
        if cafile is not None:
            raise ValueError("give either an ssl.SSLContext as tls or a cafile, not both")
        return tls
    if tls is not None and type(tls) is not bool:
        raise TypeError(f"tls must be True, False or an ssl.SSLContext, got {type(tls).__name__}")
    if not tls and cafile is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=None if cafile is None else str(cafile))
    except ssl.SSLError as exc:
        raise ValueError(f"cafile {str(cafile)!r} holds no usable PEM certificate: {exc.reason or exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def tls_failure(exc: BaseException, where: str) -> E.ClipperError:
    """The typed error for a TLS handshake with ``where`` that failed with ``exc``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return E.ConnectionClosedError(
            f"TLS: the certificate of {where} is not trusted: {exc.verify_message or exc.reason} (pass cafile= "
            f"with the CA that signed it, or server_hostname= when it names another host)")
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError)):
        return E.ConnectionClosedError(f"TLS: {where} closed the connection during the handshake (is it a "
                                       f"TLS port?)")
    if isinstance(exc, ssl.SSLError):
        hint = " (is it a TLS port?)" if "WRONG_VERSION_NUMBER" in str(exc) or "wrong version" in str(exc) else ""
        return E.ConnectionClosedError(f"TLS: the handshake with {where} failed: {exc.reason or exc}{hint}")
    return E.ConnectionClosedError(f"TLS: the handshake with {where} failed: {type(exc).__name__}: {exc}")


def check_api_key(api_key: str | None) -> str | None:
    if api_key is not None and (type(api_key) is not str or not api_key):
        raise TypeError(f"api_key must be a non-empty str, got {type(api_key).__name__}")
    return api_key
