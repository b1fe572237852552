"""The management HTTP API (JSON), on the admin port (default 1338, loopback).

Whoever reaches this API can run code on the machine (a deployment names a
command; a policy names a module), so every request proves itself
(docs/security.md):

* ``Authorization: Bearer <token>``: the token in the frontend's token file
  (0600; see :mod:`clipper.security.admin_token`), else 401.
* ``Content-Type: application/json`` on every request that is not a GET, else
  415: no browser "simple request" (a form, ``text/plain``) gets through.
* a ``Host`` header naming the address the request reached (or a name in
  ``admin_allowed_hosts``), else 421: a page whose name was rebound to this
  machine's address (DNS rebinding) is refused.
* no CORS headers, ever: browsers keep other sites' pages from reading answers.
* bound off loopback, TLS (Python's ``ssl`` on the asyncio server) as well.

``GET /health`` needs no token (a liveness probe); it checks ``Host`` too.

A change (any method but GET) is taken only while the state store answers
(with Redis: a PING first, bounded in time): else 503 ``STATE_UNAVAILABLE``,
and the frontend goes on serving queries from what it knows.

Routes::

    GET    /health                                   {"status": "ok"}
    GET    /api/v1/status                            everything the frontend knows
    GET    /api/v1/replicas                          connected replicas and container processes
    GET    /api/v1/applications                      registered applications
    POST   /api/v1/applications                      register {name, input_dtype, input_shape, slo_ms, ...}
    GET    /api/v1/applications/<name>               one application
    DELETE /api/v1/applications/<name>               unregister it (its endpoint, links, policy states)
    GET    /api/v1/models                            deployed models and versions
    POST   /api/v1/models                            deploy {name, version, input_dtype, input_shape,
                                                     entry | command | closure (base64), replicas, ..., wait}
    GET    /api/v1/models/<name>[/<version>]         one model, or one version with its replicas
    DELETE /api/v1/models/<name>[/<version>]         delete it: containers, queue, cache entries, links
    POST   /api/v1/models/<name>/current             {version}: roll back or forward
    POST   /api/v1/models/<name>/<version>/replicas  {replicas}
    POST   /api/v1/links                             link {app, model, version?}
    DELETE /api/v1/links                             unlink {app, model, version?}
    POST   /api/v1/container-credentials             {model, version?, frontend?, label?} -> credentials (secret
                                                     key included, shown this once)
    GET    /api/v1/container-credentials             issued credentials (no secrets)
    DELETE /api/v1/container-credentials/<id>        revoke: its replicas are dropped and told to exit
    POST   /api/v1/admin-token/rotate                a new token (written to the token file); the old one stops

Bodies are strict JSON objects: one that does not parse, is not UTF-8, nests
too deeply, holds NaN, an infinity or an integer past Python's digit limit is
400 ``INVALID_CONFIG``. Errors come back as ``{"error": {"code", "name",
"message"}}`` with the same codes as the msgpack protocol. HTTP parsing is httptools', on the frontend's one
HTTP layer (:mod:`clipper.server.http`): bounded heads (431), timeouts, flow
control, and at most ``max_admin_connections`` connections.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import sys
from typing import TYPE_CHECKING

import httptools

from ..errors import (
    AuthenticationError,
    ClipperError,
    InternalError,
    InvalidConfigError,
    MisdirectedRequestError,
    RequestError,
    StateUnavailableError,
    UnknownApplicationError,
    UnknownModelError,
    UnsupportedMediaTypeError,
)
from ..server.http import REASONS as _REASONS
from ..server.http import HttpHeadersConnection, HttpReply, HttpServer, clip, error_body
from . import api_key_routes
from .registry import Application, ModelVersion

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger("clipper.admin")

MAX_BODY_BYTES = 1024 * 1024
_WANTED = {b"host": "host", b"content-type": "content-type", b"authorization": "authorization"}


def _status_for(exc: ClipperError) -> int:
    status = getattr(exc, "http_status", None)  # a connection-level limit of the HTTP layer (431, 414)
    if status is not None:
        return status
    if isinstance(exc, (UnknownApplicationError, UnknownModelError)):
        return 404
    if isinstance(exc, AuthenticationError):
        return 401
    if isinstance(exc, UnsupportedMediaTypeError):
        return 415
    if isinstance(exc, MisdirectedRequestError):
        return 421
    if isinstance(exc, RequestError):
        return 400
    if isinstance(exc, StateUnavailableError):
        return 503
    return 500


def split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header -> (lower-case host without brackets, port or None); None if malformed."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            return None
        host, rest = v[1:end], v[end + 1:]
    else:
        host, sep, port = v.partition(":")
        rest = ":" + port if sep else ""
    if not host:
        return None
    if not rest:
        return host, None
    if rest[0] != ":" or not rest[1:].isascii() or not rest[1:].isdigit() or len(rest) > 6:
        return None
    return host, int(rest[1:])


class _AdminConnection(HttpHeadersConnection):
    """One admin connection: a router on the shared HTTP layer.

    The layer bounds the head (431) before httptools can grow an unfinished
    header line, answers pipelined requests in order and parses nothing after
    a closing reply. Here: a request is refused (``AdminServer.refusal``) as
    soon as its headers are complete, and a refused request's body is not kept.
    """

    wanted_headers = _WANTED

    def __init__(self, server: "AdminServer") -> None:
        super().__init__(server)
        self.hosts: frozenset = frozenset()
        self._refusal: ClipperError | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if not self.closed:
            self.hosts = self.server.hosts_for(transport.get_extra_info("sockname"))

    def status_for(self, exc: ClipperError) -> int:
        return _status_for(exc)

    def refusal(self, exc: ClipperError, status: int = 503) -> bytes:
        headers = {"Retry-After": "1"} if status == 503 else None
        return self._response(status, _err(exc), True, headers)

    # httptools callbacks (besides the layer's)
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._refusal = None

    def on_headers_complete(self) -> None:
        self._head_done()
        if self.repeated_header is not None:  # two Host or Authorization headers: ambiguous, refuse
            self._refusal = RequestError(f"the {self.repeated_header} header appears more than once")
            return
        headers = {k: v.decode("latin-1") for k, v in self.headers.items()}
        self._refusal = self.server.refusal(self.parser.get_method(), self.url, headers, self.hosts)

    def on_body(self, body: bytes) -> None:
        if self._refusal is not None:
            return  # a refused request's body is not kept
        super().on_body(body)

    def on_request(self, body: list, keep: bool) -> None:
        method = self.parser.get_method().decode()
        head_only = method == "HEAD"
        if self._refusal is not None:
            exc = self._refusal
            status = _status_for(exc)
            headers = {"WWW-Authenticate": 'Bearer realm="clipper-admin"'} if status == 401 else None
            return self._reply(status, _err(exc), close=not keep or status == 421, headers=headers,
                               head_only=head_only)
        try:
            path = httptools.parse_url(self.url).path.decode("utf-8", "replace")
        except httptools.HttpParserInvalidURLError:
            return self._reply(400, _err(RequestError(f"the request target {clip(self.url)!r} is not a valid URL")),
                               close=not keep, head_only=head_only)
        if self.body_too_large:
            return self._reply(413, {"error": {"code": 105, "name": "LIMIT_EXCEEDED",
                                               "message": f"body exceeds {MAX_BODY_BYTES} bytes"}}, close=True)
        data = b"".join(body) if method not in ("GET", "HEAD") else b""
        slot = self.new_reply(HttpReply(close=not keep))
        self.server.loop.create_task(self._handle(slot, "GET" if head_only else method, path, data, head_only))

    async def _handle(self, slot: HttpReply, method: str, path: str, body: bytes, head_only: bool) -> None:
        try:
            data = parse_body(body)
            status, payload = await self.server.route(method, path, data)
        except ClipperError as exc:
            status, payload = _status_for(exc), _err(exc)
        except Exception as exc:
            log.exception("admin request failed")
            status, payload = 500, _err(InternalError(f"{type(exc).__name__}: {clip(str(exc), 200)}"))
        self._fill(slot, status, payload, head_only=head_only)

    # replies, in request order (the layer writes them)
    def _reply(self, status: int, payload, close: bool = False, headers: dict | None = None,
               head_only: bool = False) -> None:
        self._fill(self.new_reply(HttpReply(close=close)), status, payload, headers, head_only)

    def _fill(self, slot: HttpReply, status: int, payload, headers: dict | None = None,
              head_only: bool = False) -> None:
        if self.closed:
            return
        body = json.dumps(payload, default=_json_default).encode()
        slot.data = self._response(status, body, slot.close, headers, head_only)
        self.reply_ready(slot)

    @staticmethod
    def _response(status: int, body, close: bool, headers: dict | None = None, head_only: bool = False) -> bytes:
        if not isinstance(body, bytes):
            body = json.dumps(body, default=_json_default).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n{extra}"
                f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n")
        return head.encode() + (b"" if head_only else body)


def parse_body(body: bytes):
    """A request's body as JSON (``{}`` when empty); InvalidConfigError (400) for a body not taken.

    Only strict JSON: NaN and the infinities (``Infinity``, ``1e999``) are refused, as every answer of
    this API must stay strict JSON and an application's default output is answered back as given.
    """
    if not body:
        return {}
    try:
        return json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except ClipperError:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidConfigError(f"body is not JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidConfigError(f"body is not JSON: not UTF-8 at byte {exc.start} ({exc.reason})") from None
    except RecursionError:
        raise InvalidConfigError("body nests arrays or objects too deeply") from None
    except ValueError:  # what is left: an integer past Python's conversion limit
        raise InvalidConfigError(
            f"body holds an integer of more than {sys.get_int_max_str_digits()} digits") from None


def _refuse_constant(name: str):
    raise InvalidConfigError(f"body holds {name}; the admin API takes finite numbers only (strict JSON)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidConfigError(f"body holds {clip(text, 40)}, past the largest float; the admin API takes "
                                 "finite numbers only (strict JSON)")
    return value


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (bytes, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _err(exc: ClipperError) -> dict:
    return error_body(exc)  # the message cut at a bound: no error echoes unbounded client data


class AdminServer(HttpServer):
    """The admin port: at most ``max_admin_connections`` connections, bodies up to MAX_BODY_BYTES."""

    connection_class = _AdminConnection
    interface = "admin"
    max_connections_name = "max_admin_connections"
    max_body_bytes = MAX_BODY_BYTES

    def __init__(self, frontend) -> None:
        from ..security.admin_token import AdminToken

        cfg = frontend.config
        super().__init__(asyncio.get_running_loop(), cfg.limits, max_connections=cfg.limits.max_admin_connections,
                         partial_budget=getattr(frontend, "partial_budget", None))
        self.frontend = frontend
        self.port: int | None = None
        self.tls = False
        self.token = AdminToken(cfg.admin_token_file or frontend.secrets_dir() / "admin-token")
        self._published: Path | None = None

    async def start(self, host: str, port: int) -> int:  # type: ignore[override]  # (TLS from the admin config)
        cfg = self.frontend.config
        ssl_ctx = cert = None
        if cfg.admin_tls_cert_file:
            from pathlib import Path

            from ..security.query_tls import server_tls_context

            base = self.frontend.base_dir  # relative paths: from the frontend's base folder, as the query ports'
            cert = base / Path(cfg.admin_tls_cert_file).expanduser()
            key = base / Path(cfg.admin_tls_key_file).expanduser()
            ssl_ctx = server_tls_context(cert, key, ("admin_tls_cert_file", "admin_tls_key_file"))
            self.tls = True
        self.port = await super().start(host, port, ssl=ssl_ctx)
        from ..security.admin_token import publish

        self._published = publish(host, self.port, self.token.path, str(cert) if cert else None)
        return self.port

    async def close(self) -> None:
        from ..security.admin_token import unpublish

        unpublish(self._published)
        self._published = None
        await super().close()

    # ------------------------------------------------------------ who may ask
    def hosts_for(self, sockname) -> frozenset:
        """The ``Host`` names accepted on a connection that reached ``sockname``."""
        names = {h.lower() for h in self.frontend.config.admin_allowed_hosts}
        bound = (self.frontend.config.admin_host or "").lower()
        if bound and bound not in ("0.0.0.0", "::", "*"):
            names.add(bound.strip("[]"))
        if sockname:
            try:
                addr = ipaddress.ip_address(sockname[0].split("%", 1)[0])
            except ValueError:
                addr = None
            if addr is not None:
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                    addr = addr.ipv4_mapped
                names.add(str(addr))
                if addr.is_loopback:
                    names.update(("localhost", "127.0.0.1", "::1"))
        return frozenset(names)

    def refusal(self, method: bytes, url: bytes, headers: dict, hosts: frozenset) -> ClipperError | None:
        """Why a request must be refused before it is read further (None: it may go on)."""
        host = headers.get("host")
        parsed = split_host(host) if host is not None else None
        default_port = 443 if self.tls else 80
        if parsed is None or parsed[0] not in hosts or (parsed[1] or default_port) != self.port:
            return MisdirectedRequestError(
                f"Host {host[:200] if host else host!r} does not name this admin API: it must be the address the "
                "request reached, with its port (or a name listed in the frontend's admin_allowed_hosts)")
        if url.split(b"?", 1)[0] in (b"/health", b"/health/"):
            return None
        if method == b"OPTIONS":  # a CORS preflight: never granted (and no CORS headers, ever)
            return UnsupportedMediaTypeError("the admin API answers no cross-origin preflight")
        if method not in (b"GET", b"HEAD"):
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                return UnsupportedMediaTypeError(
                    f"Content-Type {headers.get('content-type')!r} is refused; the admin API takes "
                    "application/json only")
        auth = headers.get("authorization", "")
        scheme, _, presented = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not self.token.check(presented.strip().encode("latin-1")):
            return AuthenticationError(
                "the admin API needs `Authorization: Bearer <token>`"
                + (" and this token is not it" if auth else "")
                + "; the token is in the frontend's secrets folder (clipper-secrets/admin-token), where clients "
                "on its machine find it by themselves; elsewhere set CLIPPER_ADMIN_TOKEN or --token-file")
        return None

    async def route(self, method: str, path: str, data) -> tuple[int, object]:
        fe = self.frontend
        parts = [p for p in path.split("/") if p]
        if parts == ["health"]:
            return 200, {"status": "ok"}
        if parts[:2] != ["api", "v1"]:
            return 404, _err(RequestError(f"no route {method} {clip(path)}"))
        rest = parts[2:]
        if method != "GET" and not (method == "DELETE" and rest[:1] in (["container-credentials"], ["api-keys"])):
            # A change must reach the state store (the other frontends read it there). A revocation is
            # taken even then: it acts here at once, and its write waits for the store.
            await fe.check_store()
        out = await self._route(fe, method, path, parts, rest, data)
        if method != "GET" and out[0] < 300:
            fe.announce()  # (keys and credentials; the registry's changes announce themselves too)
        return out

    async def _route(self, fe, method: str, path: str, parts: list, rest: list, data) -> tuple[int, object]:
        if not isinstance(data, dict):
            raise InvalidConfigError("the request body must be a JSON object")
        key = (method, len(rest), rest[0] if rest else None)
        if rest[:1] == ["api-keys"]:  # the query ports' API keys: clipper/management/api_key_routes.py
            return await api_key_routes.route(fe, method, rest, data)
        if rest == ["status"] and method == "GET":
            return 200, fe.status()
        if rest == ["replicas"] and method == "GET":
            return 200, {"replicas": fe.rpc.stats(), "processes": fe.manager.stats()}
        # -- credentials
        if rest == ["admin-token", "rotate"] and method == "POST":
            return 200, {"token": self.token.rotate(), "token_file": str(self.token.path)}
        if rest[:1] == ["container-credentials"]:
            return self._credentials(method, rest, data)
        # -- applications
        if rest == ["applications"]:
            if method == "GET":
                return 200, [self._app(n) for n in fe.registry.applications]
            if method == "POST":
                app = await fe.register_application(_make(Application, data, "application"))
                return 201, app.to_dict()
        if key in (("GET", 2, "applications"), ("DELETE", 2, "applications")):
            if method == "GET":
                fe.registry.get_application(rest[1])
                return 200, self._app(rest[1])
            app = await fe.unregister_application(rest[1])
            return 200, {"removed": app.name}
        # -- models
        if rest == ["models"]:
            if method == "GET":
                return 200, fe.status()["models"]
            if method == "POST":
                return 201, await self._deploy(dict(data))
        if rest[:1] == ["models"] and len(rest) in (2, 3):
            name = rest[1]
            if len(rest) == 3 and rest[2] == "current" and method == "POST":
                version = data.get("version")
                if not isinstance(version, (str, int)) or isinstance(version, bool):
                    raise InvalidConfigError(f"version {version!r} is not a model version")
                mv = await fe.set_model_version(name, str(version))
                return 200, {"model": name, "current_version": mv.version}
            if method == "GET":
                model = fe.registry.get_model(name)
                if len(rest) == 2:
                    return 200, fe.status()["models"][model.name]
                mv = fe.registry.get_model_version(name, rest[2])
                return 200, {**mv.to_dict(), "current": model.current_version == mv.version,
                             "replicas": [r for r in fe.rpc.stats() if r["model"] == mv.key],
                             "processes": fe.manager.stats().get(mv.key, [])}
            if method == "DELETE":
                removed = await fe.delete_model(name, rest[2] if len(rest) == 3 else None)
                return 200, {"removed": removed}
        if len(rest) == 4 and rest[0] == "models" and rest[3] == "replicas" and method == "POST":
            n = data.get("replicas")
            await fe.set_replicas(rest[1], rest[2], n)
            return 200, {"model": f"{rest[1]}:{rest[2]}", "replicas": n}
        # -- links
        if rest == ["links"] and method in ("POST", "DELETE"):
            if "app" not in data or "model" not in data:
                raise InvalidConfigError("a link needs 'app' and 'model'")
            app, model, version = data["app"], data["model"], data.get("version")
            if not isinstance(app, str):
                raise InvalidConfigError(f"link app {app!r} is not an application name")
            if not isinstance(model, str):
                raise InvalidConfigError(f"link model {model!r} is not a model name")
            if version is not None and not isinstance(version, str):
                raise InvalidConfigError(f"link version {version!r} is not a string")
            if method == "POST":
                link = await fe.link(app, model, version)
                return 201, {"app": app, "link": link, "linked_models": fe.registry.linked_models(app)}
            await fe.unlink(app, model if version is None else f"{model}:{version}")
            return 200, {"app": app, "linked_models": fe.registry.linked_models(app)}
        return 404, _err(RequestError(f"no route {method} {clip(path)}"))

    def _credentials(self, method: str, rest: list, data: dict) -> tuple[int, object]:
        fe = self.frontend
        if len(rest) == 1 and method == "GET":
            return 200, fe.keyring.operator_grants()
        if len(rest) == 1 and method == "POST":
            unknown = set(data) - {"model", "version", "frontend", "label"}
            if unknown:
                raise InvalidConfigError(f"unknown key(s) {sorted(unknown)}; known: frontend, label, model, version")
            model, version = data.get("model"), data.get("version")
            if not isinstance(model, str):
                raise InvalidConfigError(f"model {model!r} is not a model name")
            if version is not None and (not isinstance(version, (str, int)) or isinstance(version, bool)):
                raise InvalidConfigError(f"version {version!r} is not a model version")
            doc = fe.issue_container_credentials(model, None if version is None else str(version),
                                                 frontend=data.get("frontend"), label=data.get("label", ""))
            return 201, doc
        if len(rest) == 2 and method == "DELETE":
            return 200, {"revoked": fe.revoke_container_credentials(rest[1])}
        return 404, _err(RequestError(f"no route {method} /api/v1/{clip('/'.join(rest))}"))

    def _app(self, name: str) -> dict:
        fe = self.frontend
        return {**fe.registry.applications[name].to_dict(), "linked_models": fe.registry.linked_models(name)}

    async def _deploy(self, data: dict) -> dict:
        """POST /api/v1/models: from an entry, a command, or a closure (base64 of a closure file)."""
        fe = self.frontend
        wait = data.pop("wait", False)
        if not isinstance(wait, bool):
            raise InvalidConfigError(f"wait {wait!r} is not true or false")
        closure = data.pop("closure", None)
        if closure is not None:
            import base64
            import binascii

            if not isinstance(closure, str):
                raise InvalidConfigError("closure must be the base64 text of a closure file")
            try:
                blob = base64.b64decode(closure, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidConfigError("closure is not valid base64") from None
            for k in ("entry", "command", "closure"):
                if data.get(k) is not None:
                    raise InvalidConfigError(f"a closure deployment takes no {k!r}")
            data.pop("entry", None)
            data.pop("command", None)
            try:
                name, version = data.pop("name"), data.pop("version")
                dtype = data.pop("input_dtype")
            except KeyError as exc:
                raise InvalidConfigError(f"a deployment needs {exc.args[0]!r}") from None
            shape = data.pop("input_shape", ())
            known = {f for f in ModelVersion.__dataclass_fields__} - {"name", "version", "input_dtype",
                                                                       "input_shape", "entry", "command", "closure"}
            unknown = set(data) - known
            if unknown:
                raise InvalidConfigError(f"unknown key(s) {sorted(unknown)} for model; known: {sorted(known)}")
            mv = await fe.deploy_closure(name, version, blob, dtype, shape, wait=wait, **data)
            return mv.to_dict()
        mv = await fe.deploy_model(_make(ModelVersion, data, "model"), wait=wait)
        return mv.to_dict()


def _make(cls, data, what):
    from ..frontend import _make as make

    return make(cls, data, what)
