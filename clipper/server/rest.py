"""The REST query interface: HTTP/1.1 + JSON on the frontend's event loop (default port 1337).

Compatible with the original Clipper's query frontend, plus what the
selection layer adds::

    POST /<app>/predict   {"input": x, "user"?: str, "version"?: str}
                          -> {"query_id", "output", "default", "default_explanation"?,
                              "confidence", "models", "missing"?, "low_confidence"?}
    POST /<app>/predict   {"input_batch": [x, ...], "user"?: str}
                          -> {"batch_predictions": [{...} or {"error": {...}}, ...]}
    POST /<app>/update    {"input": x, "label": y, "user"?: str}  -> {"ok": true, "models", "missing"?}
    GET  /<app>           the application's input dtype and shape, SLO, output kind (also /<app>/describe)
    GET  /metrics         the original Clipper's JSON metrics (not with API keys required)
    GET  /healthz         {"status": "ok"}: the frontend is serving
    GET  /readyz          200 when every application has a linked model with a connected
                          replica, else 503 with the ones that have none

Inputs: a (nested) list of numbers for numeric applications (integers are
accepted where floats are expected), a string for ``str`` applications, and
base64 for ``bytes`` applications. Outputs: arrays become lists, bytes
base64. Every error is ``{"error": {"code", "name", "message"}, "cause": message}`` with the
codes of the msgpack protocol (an application with ``rest_format = "original"``, registered
through ``clipper_admin``, answers the original Clipper's formats: docs/rest.md); the HTTP status follows the branch (404 for an
unknown application, 400 for a bad request, 413 for a body over the limit,
503 when no model can answer, 500 for internal faults). One bad request
fails that request; the connection goes on (except after a request httptools
cannot parse, which closes it).

Requests on one connection are answered in order (HTTP/1.1 pipelining); each
is parsed by httptools, never by hand, on the shared HTTP layer
(:mod:`clipper.server.http`: bounded heads and bodies, timeouts, flow control,
the frontend-wide budget of partial bytes). ``OVERLOADED`` answers 503 with
``Retry-After: 1``; ``input_batch`` holds at most ``max_batch_items`` inputs.

With API keys required (``require_api_keys``), ``/<app>/predict`` and
``/<app>/update`` need ``Authorization: Bearer <key>``: no key, or one that is
not valid, gets 401 (``UNAUTHENTICATED``, with ``WWW-Authenticate: Bearer``);
a key that does not grant the application gets 403 (``PERMISSION_DENIED``).
``/healthz`` and ``/readyz`` stay open.
"""

from __future__ import annotations

import base64
import binascii
import logging

import httptools
import numpy as np
import orjson

from .. import errors as E
from .._native import framing
from ..security.api_keys import MAX_API_KEY_CHARS
from .http import REASONS as _REASONS
from .http import (
    HttpConnection,
    HttpHeadersConnection,
    HttpReply,
    HttpServer,
    clip,
    error_body,
    http_status,
    original_error_body,
)

log = logging.getLogger("clipper.rest")

__all__ = ["RestServer", "http_status", "error_body"]

_RETRY_AFTER = "Retry-After: 1\r\n"  # with a 503 for OVERLOADED: the client may try again shortly


_json_vector = framing.json_vector

def _error_head(exc: E.ClipperError) -> str:
    """Header lines an error's answer carries besides the usual ones."""
    return _RETRY_AFTER if type(exc) is E.OverloadedError else ""


def _to_json(obj):
    if isinstance(obj, np.ndarray):  # what OPT_SERIALIZE_NUMPY does not take (non-contiguous, odd dtypes)
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# orjson: a body of 784 numbers parses in a fifth of the standard library's time (a REST request
# went from 182 to 60 us; bench/micro/test_query_path_bench.py). NaN and infinities, which JSON cannot carry, are written as null.
_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _dumps(obj) -> bytes:
    return orjson.dumps(obj, default=_to_json, option=_OPTS)


def result_json(query_id, output, is_default, extra) -> dict:
    out = {"query_id": query_id, "output": output, "default": bool(is_default)}
    if extra:
        if "explanation" in extra:
            out["default_explanation"] = extra["explanation"]
        for k in ("confidence", "models", "missing", "low_confidence", "combined_output"):
            if k in extra:
                out[k] = extra[k]
    return out


class _Reply(HttpReply):
    """The answer to one HTTP request: complete when its ``waiting`` answers are in.

    It stands in for a connection to the query processor (``send_result``,
    ``send_error``, ``send_feedback_ok``); ``req_id`` is the item's index in
    the request (0 for a single input). Its place in the connection's reply
    order is the :class:`HttpReply` it is.
    """

    __slots__ = ("conn", "status", "payload", "items", "waiting", "batch", "feedback", "head", "original")

    def __init__(self, conn: "RestConnection", keep_alive: bool) -> None:
        self.data = None
        self.close = not keep_alive
        self.conn = conn
        self.status = 200
        self.payload: object = None
        self.items: list = []
        self.waiting = 0
        self.batch = False
        self.feedback = False
        self.head = ""  # extra header lines of the answer ("Name: value\r\n" each)
        self.original = False  # the application answers in the original Clipper's format (rest_format)

    def finish(self, status: int, payload) -> None:
        self.status, self.payload, self.waiting = status, payload, 0
        self._ready()

    def _ready(self) -> None:
        """Encode the answer and hand it to the connection (which writes it in its turn)."""
        conn = self.conn
        if conn.closed:
            return
        try:
            self.data = _http(self.status, self.payload, not self.close, self.head)
        except (TypeError, ValueError) as exc:  # an output JSON cannot carry (an odd object)
            err = E.ModelError(f"the answer cannot be encoded as JSON: {clip(str(exc), 200)}")
            self.data = _http(500, error_body(err), not self.close)
        conn.reply_ready(self)

    # -- the query processor's view
    def send_result(self, req_id, query_id, output, is_default, extra) -> None:
        if self.original and type(output) is str:
            output = _json_text(output)
        self.items[req_id] = result_json(query_id, output, is_default, extra)
        self._one_done()

    def send_error(self, req_id, exc: E.ClipperError) -> None:
        self.items[req_id] = exc
        self._one_done()

    def send_feedback_ok(self, req_id, info) -> None:
        self.items[req_id] = {"ok": True, **(info or {})}
        self._one_done()

    def _one_done(self) -> None:
        self.conn.in_flight -= 1
        self.waiting -= 1
        if self.waiting <= 0:
            self._compose()
            self._ready()

    def error_json(self, exc: E.ClipperError) -> dict:
        return original_error_body(exc) if self.original else error_body(exc)

    def _compose(self) -> None:
        # The original Clipper answers a one-item input_batch as that item alone: so do its applications.
        if self.batch and not (self.original and len(self.items) == 1):
            self.payload = {"batch_predictions": [self.error_json(x) if isinstance(x, E.ClipperError) else x
                                                  for x in self.items]}
            self.status = 200
            return
        item = self.items[0]
        if isinstance(item, E.ClipperError):
            self.status, self.payload = http_status(item), self.error_json(item)
            self.head = _error_head(item)
        else:
            self.status, self.payload = 200, item


class RestConnection(HttpConnection):
    """One HTTP client connection of the REST port: the router of the shared HTTP layer."""

    def __init__(self, server: "RestServer") -> None:
        super().__init__(server)
        self.processor = server.processor
        self.in_flight = 0  # queries of this connection awaiting answers

    # ------------------------------------------------------------ requests
    def on_request(self, body: list, keep_alive: bool) -> None:
        reply = _Reply(self, keep_alive)
        self.new_reply(reply)
        try:
            self._handle(reply, body)
        except E.ClipperError as exc:
            reply.head = self._challenge if type(exc) is E.AuthenticationError else _error_head(exc)
            reply.finish(http_status(exc), reply.error_json(exc))
        except Exception as exc:  # a bug: fail this request, keep the connection
            log.exception("internal error on a REST request")
            err = E.InternalError(f"{type(exc).__name__}: {clip(str(exc), 200)}")
            reply.finish(500, error_body(err))

    def _handle(self, reply: _Reply, body: list) -> None:
        method = self.parser.get_method()
        try:
            path = httptools.parse_url(self.url).path.decode("utf-8")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            raise E.MalformedFrameError(f"the request target {clip(self.url)!r} is not a valid URL") from None
        parts = [p for p in path.split("/") if p]
        if parts in (["healthz"], ["health"]):
            return reply.finish(200, {"status": "ok"})
        if parts == ["readyz"]:
            not_ready = self.server.not_ready()
            return reply.finish(503 if not_ready else 200,
                                {"ready": not not_ready, **({"not_ready": not_ready} if not_ready else {})})
        if method == b"GET" and (len(parts) == 1 or (len(parts) == 2 and parts[1] == "describe")):
            if parts == ["metrics"]:
                return reply.finish(200, self._metrics())
            return reply.finish(200, self._describe(parts[0]))
        if len(parts) != 2 or parts[1] not in ("predict", "update"):
            return reply.finish(404, error_body(E.RequestError(
                f"no route {method.decode()} {clip(path)}; expected POST /<app>/predict or POST /<app>/update")))
        if method != b"POST":
            return reply.finish(405, error_body(E.RequestError(f"{clip(path)} takes POST, not {method.decode()}")))
        self._authorize(parts[0])  # before the application is looked up: no key, no hint of what exists
        if self.body_too_large:
            raise E.FrameTooLargeError(f"the request body exceeds max_frame_bytes={self.server.max_body_bytes}")
        app_name = parts[0]
        route = self.processor.routes.get(app_name)
        if route is None:
            raise E.UnknownApplicationError(f"no application named {clip(app_name)!r} is registered")
        reply.original = getattr(route, "rest_original", False)  # (stand-in routes of unit tests have none)
        raw = body[0] if len(body) == 1 else b"".join(body)
        n = getattr(route, "json_vector_len", 0)
        x = _json_vector(raw, route.np_dtype, n) if n and parts[1] == "predict" else None
        if x is not None:
            # {"input": [n numbers]} for a float vector application: parsed natively into the array (no
            # Python float per number): the bits the full way (_parse_body) makes, which takes the rest
            xs, options, queue = [x], None, None
        else:
            xs, options, queue = self._parse_body(reply, route, app_name, parts[1], raw)
            if xs is None:  # (an update: answered there)
                return
        limit = self.server.limits.max_pending_per_connection
        if self.in_flight + len(xs) > limit:
            raise E.LimitExceededError(f"{self.in_flight} queries of this connection are in flight and the request "
                                       f"adds {len(xs)}; max_pending_per_connection is {limit}")
        reply.items = [None] * len(xs)
        if not xs:
            return reply.finish(200, {"batch_predictions": []})
        reply.waiting = len(xs)
        self.in_flight += len(xs)
        for i, x in enumerate(xs):
            try:
                if queue is None:
                    self.processor.predict(reply, i, app_name, self._input(route, x), options)
                else:
                    self.processor.predict_version(reply, i, app_name, self._input(route, x), queue, options)
            except E.ClipperError as exc:
                reply.send_error(i, exc)
            except Exception as exc:  # a bug fails this item only, and its count goes back
                log.exception("internal error on a REST query")
                reply.send_error(i, E.InternalError(f"{type(exc).__name__}: {clip(str(exc), 200)}"))

    def _parse_body(self, reply: _Reply, route, app_name: str, action: str, raw: bytes):
        """The body decoded in full (orjson): (inputs, options, the version's queue or None), or three
        Nones for an update, answered here."""
        data = self._json_body(raw, self.server.limits.max_decoded_objects)
        user = data.get("user")
        if user is None and isinstance(data.get("uid"), (int, str)) and not isinstance(data.get("uid"), bool):
            user = str(data["uid"])  # the original Clipper's name for it
        options = None if user is None else {"user": user}
        if action == "update":
            self._update(reply, route, app_name, data, options)
            return None, None, None
        if "input_batch" in data:
            xs = data["input_batch"]
            if type(xs) is not list:
                raise E.InvalidInputError(f"input_batch is a {type(xs).__name__}; expected a JSON array of inputs")
            max_items = self.server.limits.max_batch_items
            if len(xs) > max_items:
                raise E.InvalidInputError(f"input_batch has {len(xs)} inputs; max_batch_items is {max_items}")
            reply.batch = True
        elif "input" in data:
            xs = [data["input"]]
        else:
            raise E.InvalidInputError("the body needs \"input\" (one input) or \"input_batch\" (a list of inputs)")
        # "version" (the original Clipper's): the queries go to that version of the linked model
        version = data.get("version")
        queue = None if version is None else self.processor.version_queue(app_name, version)
        return xs, options, queue

    def _update(self, reply: _Reply, route, app_name: str, data: dict, options) -> None:
        if "input" not in data or "label" not in data:
            raise E.InvalidInputError("an update needs \"input\" and \"label\"")
        reply.feedback = True
        reply.items = [None]
        reply.waiting = 1
        self.in_flight += 1
        try:
            self.processor.feedback(reply, 0, app_name, self._input(route, data["input"]), data["label"], options)
        except E.ClipperError as exc:
            reply.send_error(0, exc)
        except Exception as exc:
            log.exception("internal error on a REST update")
            reply.send_error(0, E.InternalError(f"{type(exc).__name__}: {clip(str(exc), 200)}"))

    _challenge = 'WWW-Authenticate: Bearer realm="clipper"\r\n'  # sent with a 401

    def _describe(self, app_name: str) -> dict:
        """GET /<app>: what the application takes and answers (a client learns its input dtype and shape)."""
        self._authorize(app_name)
        route = self.processor.routes.get(app_name)
        if route is None:
            raise E.UnknownApplicationError(f"no application named {clip(app_name)!r} is registered")
        return route.describe()

    def _metrics(self) -> dict:
        """GET /metrics: the original Clipper's JSON metrics on the query port (Prometheus text stays on the
        metrics port). Not served when API keys are required: it names every application."""
        if self.server.api_keys is not None:
            raise E.PermissionDeniedError("GET /metrics is not served on the query port when API keys are "
                                          "required; read the metrics port (Prometheus text) instead")
        return metrics_json(self.processor)

    def _authorize(self, app_name: str) -> None:
        """Raise unless this request may query ``app_name`` (open here; see KeyedRestConnection)."""

    @staticmethod
    def _json_body(raw: bytes, max_objects: int) -> dict:
        # Arrays and objects are what a parser makes most of per byte ("[]," is 3 bytes, a list 56+): a body
        # longer than max_decoded_objects bytes is first checked to hold at most that many.
        if len(raw) > max_objects and raw.count(b"[") + raw.count(b"{") > max_objects:
            raise E.LimitExceededError(f"the body holds more than {max_objects} JSON arrays and objects "
                                       f"(max_decoded_objects)")
        try:
            data = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError as exc:
            raise E.InvalidInputError(f"the body is not JSON: {clip(str(exc), 200)}") from None
        if type(data) is not dict:
            raise E.InvalidInputError(f"the body must be a JSON object, not {type(data).__name__}")
        return data

    @staticmethod
    def _input(route, x):
        """JSON to the application's input type: base64 for bytes applications."""
        if route.opaque == "bytes":
            if type(x) is not str:
                raise E.InvalidInputError(f"input is a {type(x).__name__}; application {route.name!r} takes bytes, "
                                          f"sent as a base64 string")
            try:
                return base64.b64decode(x, validate=True)
            except (binascii.Error, ValueError):
                raise E.InvalidInputError("input is not valid base64") from None
        return x



def _json_text(output: str):
    """A str output holding JSON, parsed (the original Clipper nests such outputs as JSON); else the str."""
    try:
        return orjson.loads(output)
    except orjson.JSONDecodeError:
        return output


def metrics_json(processor) -> dict:
    """The query path's figures in the shape of the original Clipper's ``GET /metrics``
    (counters, ratio counters, meters, histograms), plus this frontend's per-application figures."""
    counters, ratios, histograms = [], [], []
    apps = {}
    for name, route in processor.routes.items():
        st = route.stats()
        apps[name] = st
        counters.append({f"app:{name}:num_predictions": {"count": st["requests"]}})
        counters.append({f"app:{name}:num_defaults": {"count": st["defaults"]}})
        counters.append({f"app:{name}:num_errors": {"count": st["errors"]}})
        ratios.append({f"app:{name}:default_prediction_ratio": {
            "ratio": st["defaults"] / st["requests"] if st["requests"] else 0.0}})
        histograms.append({f"app:{name}:prediction_latency": {
            "unit": "milliseconds", "p50": st["latency_p50_ms"], "p99": st["latency_p99_ms"]}})
    return {"counters": counters, "ratio_counters": ratios, "meters": [], "histograms": histograms,
            "applications": apps}


def _http(status: int, payload, keep_alive: bool, extra_head: str = "") -> bytes:
    body = _dumps(payload)
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra_head}"
            f"{'' if keep_alive else 'Connection: close' + chr(13) + chr(10)}\r\n")
    return head.encode("latin-1") + body


_AUTHORIZATION = b"authorization"
_BEARER = b"bearer"
# The longest Authorization value kept: "Bearer " and the longest key a client may present.
_MAX_AUTHORIZATION_BYTES = len("Bearer ") + MAX_API_KEY_CHARS


class KeyedRestConnection(RestConnection, HttpHeadersConnection):
    """A REST connection whose query routes need ``Authorization: Bearer <API key>``.

    A subclass, so that a frontend without API keys parses no header at all
    (httptools calls ``on_header`` only on a protocol that has it).
    """

    wanted_headers = {_AUTHORIZATION: "authorization"}

    def _authorize(self, app_name: str) -> None:
        header = self.headers.get("authorization")
        if header is None:
            self._challenge = 'WWW-Authenticate: Bearer realm="clipper"\r\n'
            raise E.AuthenticationError(f"the server requires an API key: send 'Authorization: Bearer <key>' "
                                        f"with a key granting application {clip(app_name)!r}")
        # RFC 6750: a request that carried a token that does not work is told invalid_token.
        self._challenge = 'WWW-Authenticate: Bearer realm="clipper", error="invalid_token"\r\n'
        if self.repeated_header is not None:
            raise E.AuthenticationError("the request carries several Authorization headers; send one")
        if len(header) > _MAX_AUTHORIZATION_BYTES:  # longer than any key could be
            header = b"?"
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() != _BEARER:
            raise E.AuthenticationError(f"the Authorization scheme is {scheme[:20].decode('latin-1')!r}; "
                                        f"expected 'Bearer <API key>'")
        key = self.server.api_keys.verify(token.strip().decode("latin-1"))
        if key is None:
            raise E.AuthenticationError("the bearer token is not a valid API key (unknown or revoked)")
        if app_name not in key.apps:
            raise E.PermissionDeniedError(f"the API key {key.id} does not grant application {clip(app_name)!r}")


class RestServer(HttpServer):
    """Listens for REST queries on the frontend's loop."""

    connection_class = RestConnection
    interface = "rest"

    def __init__(self, loop, processor, limits, not_ready, api_keys=None, partial_budget=None) -> None:
        """``api_keys``: the :class:`~clipper.security.ApiKeyRegistry` whose keys the query
        routes need; None: no key needed. ``partial_budget``: the frontend's
        :class:`~clipper.server._connection.ByteBudget` of partial bytes (its own when None)."""
        super().__init__(loop, limits, partial_budget=partial_budget)
        self.processor = processor
        self.api_keys = api_keys
        if api_keys is not None:
            self.connection_class = KeyedRestConnection
        self.max_body_bytes = limits.max_frame_bytes
        self.not_ready = not_ready  # () -> list of applications without a connected replica
