"""The one exception tree of Clipper.

Every error carries a stable integer ``code`` and a stable ``name`` that also
travel on the wire (see ``docs/protocol.md``), so a client in any language can
map a server error back onto the same class.

Three branches:

* :class:`RequestError` -- misuse by the caller; bad input also subclasses
  :class:`ValueError`.
* :class:`ServingError` -- the model or the server could not answer.
* :class:`InternalError` -- a fault inside Clipper itself.
"""

from __future__ import annotations

from typing import Callable, Iterator

__all__ = [
    "ClipperError",
    "RequestError",
    "ProtocolError",
    "MalformedFrameError",
    "FrameTooLargeError",
    "UnsupportedVersionError",
    "UnknownMessageTypeError",
    "LimitExceededError",
    "InvalidInputError",
    "UnknownApplicationError",
    "DTypeMismatchError",
    "ShapeMismatchError",
    "InputTooLargeError",
    "InvalidLabelError",
    "DuplicateRequestIdError",
    "InvalidConfigError",
    "UnknownModelError",
    "AuthenticationError",
    "PermissionDeniedError",
    "UnsupportedMediaTypeError",
    "MisdirectedRequestError",
    "ServingError",
    "ModelError",
    "WrongOutputCountError",
    "NoModelAvailableError",
    "DeadlineExceededError",
    "ContainerFailedError",
    "QueueFullError",
    "OverloadedError",
    "ShuttingDownError",
    "StateUnavailableError",
    "ConnectionClosedError",
    "ClientTimeoutError",
    "InternalError",
    "error_for_code",
]


class ClipperError(Exception):
    """Base of every Clipper error.

    ``code`` and ``name`` are stable: they travel on the wire and never change
    meaning between versions.
    """

    code: int = 1
    name: str = "CLIPPER_ERROR"

    def __init__(self, message: str = "", *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"[{self.name} {self.code}] {self.message}"

    def __reduce__(self) -> tuple[Callable[..., ClipperError], tuple[type[ClipperError], str, int]]:
        return (_rebuild, (type(self), self.message, self.code))


def _rebuild(cls: type[ClipperError], message: str, code: int) -> ClipperError:
    return cls(message, code=code)


# ---------------------------------------------------------------- caller misuse
class RequestError(ClipperError):
    """The request cannot be served as sent; sending it again will not help."""

    code = 200
    name = "REQUEST_ERROR"


class ProtocolError(RequestError):
    """The bytes on the connection do not follow the wire protocol."""

    code = 100
    name = "PROTOCOL_ERROR"


class MalformedFrameError(ProtocolError, ValueError):
    """A frame's body is not a valid msgpack message of a known form."""

    code = 101
    name = "MALFORMED_FRAME"


class FrameTooLargeError(ProtocolError, ValueError):
    """A frame declares a length above the server's ``max_frame_bytes``."""

    code = 102
    name = "FRAME_TOO_LARGE"


class UnsupportedVersionError(ProtocolError):
    """No protocol version is shared by the client and the server."""

    code = 103
    name = "UNSUPPORTED_VERSION"


class UnknownMessageTypeError(ProtocolError, ValueError):
    """The message type code is not one this server knows."""

    code = 104
    name = "UNKNOWN_MESSAGE_TYPE"


class LimitExceededError(ProtocolError, ValueError):
    """A message exceeds a decoding limit (nesting depth, string, array size)."""

    code = 105
    name = "LIMIT_EXCEEDED"


class DuplicateRequestIdError(ProtocolError, ValueError):
    """A request reuses the id of a PREDICT or FEEDBACK still awaiting its reply on the same
    connection. The earlier request is unaffected (it still gets its own reply)."""

    code = 106
    name = "DUPLICATE_REQUEST_ID"


class InvalidInputError(RequestError, ValueError):
    """The query input is not acceptable for the application."""

    code = 201
    name = "INVALID_INPUT"


class UnknownApplicationError(RequestError, LookupError):
    """No application is registered under that name."""

    code = 202
    name = "UNKNOWN_APPLICATION"


class DTypeMismatchError(InvalidInputError):
    """The input's dtype is not the application's input dtype."""

    code = 203
    name = "DTYPE_MISMATCH"


class ShapeMismatchError(InvalidInputError):
    """The input's shape is not the application's input shape."""

    code = 204
    name = "SHAPE_MISMATCH"


class InputTooLargeError(InvalidInputError):
    """The input exceeds ``max_input_bytes``."""

    code = 205
    name = "INPUT_TOO_LARGE"


class InvalidLabelError(InvalidInputError):
    """A FEEDBACK label does not fit the application's output kind (a class for ``label``, a finite
    number for ``number``, a class index for ``probabilities``, a vector of finite numbers for
    ``vector``)."""

    code = 212
    name = "INVALID_LABEL"


class InvalidConfigError(RequestError, ValueError):
    """A name, version, dtype, shape or SLO given to management is not valid."""

    code = 206
    name = "INVALID_CONFIG"


class UnknownModelError(InvalidConfigError, LookupError):
    """A management request names a model or version that is not deployed."""

    code = 207
    name = "UNKNOWN_MODEL"


class AuthenticationError(RequestError):
    """The request carries no credential, or one this server does not know
    (a missing or wrong API key or admin token). HTTP 401."""

    code = 208
    name = "UNAUTHENTICATED"


class PermissionDeniedError(RequestError):
    """The credential is valid but does not grant this request (an API key
    used for an application it does not name). HTTP 403."""

    code = 209
    name = "PERMISSION_DENIED"


class UnsupportedMediaTypeError(RequestError):
    """An HTTP request whose ``Content-Type`` is not ``application/json``
    where JSON is required (the admin API refuses browser "simple requests"). HTTP 415."""

    code = 210
    name = "UNSUPPORTED_MEDIA_TYPE"


class MisdirectedRequestError(RequestError):
    """An HTTP request whose ``Host`` header names another server than the one
    it reached (a DNS-rebinding page, or a wrong address). HTTP 421."""

    code = 211
    name = "MISDIRECTED_REQUEST"


# -------------------------------------------------------------- serving faults
class ServingError(ClipperError):
    """The model or the server could not produce an answer for this query."""

    code = 300
    name = "SERVING_ERROR"


class ModelError(ServingError):
    """The model's ``predict`` raised; the message is the model's own."""

    code = 301
    name = "MODEL_ERROR"


class WrongOutputCountError(ModelError):
    """The model returned a different number of outputs than inputs."""

    code = 302
    name = "WRONG_OUTPUT_COUNT"


class NoModelAvailableError(ServingError):
    """The application has no linked model, or the model has no replica."""

    code = 303
    name = "NO_MODEL_AVAILABLE"


class DeadlineExceededError(ServingError, TimeoutError):
    """The query's deadline passed and the application has no default output."""

    code = 304
    name = "DEADLINE_EXCEEDED"


class ContainerFailedError(ServingError):
    """The model container died or went silent while it held the query."""

    code = 305
    name = "CONTAINER_FAILED"


class QueueFullError(ServingError):
    """The model's queue is at ``max_queue_length``: the server is overloaded."""

    code = 306
    name = "QUEUE_FULL"


class OverloadedError(ServingError):
    """Admission control refused the query at arrival: the model's queue could not serve it within the
    application's SLO (or a byte budget of the frontend is spent). Sending it again later may succeed;
    REST answers 503 with ``Retry-After``."""

    code = 309
    name = "OVERLOADED"


class ShuttingDownError(ServingError):
    """The frontend is shutting down: it takes no new query, and what was still waiting at the end of
    its drain gets this error."""

    code = 310
    name = "SHUTTING_DOWN"


class StateUnavailableError(ServingError):
    """The state store could not be read in time (it is down, or slow): a feedback whose user's
    policy state could not be loaded learns nothing, rather than overwrite what the store holds
    with a fresh state. Sending it again later may succeed; REST answers 503."""

    code = 311
    name = "STATE_UNAVAILABLE"


class ConnectionClosedError(ServingError, ConnectionError):
    """The connection closed before the answer arrived (client side)."""

    code = 307
    name = "CONNECTION_CLOSED"


class ClientTimeoutError(ServingError, TimeoutError):
    """The client stopped waiting after its own timeout (client side)."""

    code = 308
    name = "CLIENT_TIMEOUT"


# -------------------------------------------------------------- internal faults
class InternalError(ClipperError):
    """A fault inside Clipper; please report it."""

    code = 500
    name = "INTERNAL_ERROR"


def _all_subclasses(cls: type[ClipperError]) -> Iterator[type[ClipperError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


_BY_CODE: dict[int, type[ClipperError]] = {ClipperError.code: ClipperError}
for _cls in _all_subclasses(ClipperError):
    if _cls.code in _BY_CODE:  # pragma: no cover - guarded by a test
        raise RuntimeError(f"duplicate error code {_cls.code}")
    _BY_CODE[_cls.code] = _cls


def error_for_code(code: int, message: str) -> ClipperError:
    """Build the exception whose class carries ``code``.

    An unknown code (from a newer server) maps onto the branch it falls in by
    its hundreds, so a client still catches it as a RequestError or ServingError.
    """
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = {1: ProtocolError, 2: RequestError, 3: ServingError}.get(code // 100, InternalError)
    return cls(message, code=code)
