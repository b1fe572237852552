"""The management HTTP API (JSON), on the admin port (default 1338, loopback).

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

Errors come back as ``{"error": {"code", "name", "message"}}`` with the same
codes as the msgpack protocol. HTTP parsing is httptools'.
"""

from __future__ import annotations

import asyncio
import json
import logging

import httptools

from ..errors import (
    ClipperError,
    InternalError,
    InvalidConfigError,
    RequestError,
    UnknownApplicationError,
    UnknownModelError,
)
from . import api_key_routes
from .registry import Application, ModelVersion

log = logging.getLogger("clipper.admin")

MAX_BODY_BYTES = 1024 * 1024
_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 500: "Internal Server Error"}


def _status_for(exc: ClipperError) -> int:
    if isinstance(exc, (UnknownApplicationError, UnknownModelError)):
        return 404
    if isinstance(exc, RequestError):
        return 400
    return 500


class _HttpConnection(asyncio.Protocol):
    def __init__(self, server: "AdminServer") -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self._url = b""
        self._body = []
        self._size = 0
        self._too_large = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reply(400, {"error": {"code": 100, "name": "PROTOCOL_ERROR", "message": "upgrade not supported"}},
                        close=True)
        except httptools.HttpParserError as exc:
            self._reply(400, {"error": {"code": 101, "name": "MALFORMED_FRAME", "message": f"bad HTTP: {exc}"}},
                        close=True)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []
        self._size = 0
        self._too_large = False

    def on_url(self, url: bytes) -> None:
        if len(self._url) + len(url) > 8192:  # a bounded request target: httptools stops, 400, close
            raise ValueError("the request target exceeds 8192 bytes")
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_BODY_BYTES:
            self._too_large = True
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        path = httptools.parse_url(self._url).path.decode()
        keep = self.parser.should_keep_alive()
        if self._too_large:
            return self._reply(413, {"error": {"code": 105, "name": "LIMIT_EXCEEDED",
                                               "message": f"body exceeds {MAX_BODY_BYTES} bytes"}}, close=True)
        body = b"".join(self._body)
        self.server.loop.create_task(self._handle(method, path, body, keep))

    async def _handle(self, method: str, path: str, body: bytes, keep: bool) -> None:
        try:
            data = json.loads(body) if body else {}
            status, payload = await self.server.route(method, path, data)
        except json.JSONDecodeError as exc:
            status, payload = 400, _err(InvalidConfigError(f"body is not JSON: {exc}"))
        except ClipperError as exc:
            status, payload = _status_for(exc), _err(exc)
        except Exception as exc:
            log.exception("admin request failed")
            status, payload = 500, _err(InternalError(f"{type(exc).__name__}: {exc}"))
        self._reply(status, payload, close=not keep)

    def _reply(self, status: int, payload, close: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        body = json.dumps(payload, default=_json_default).encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n")
        self.transport.write(head.encode() + body)
        if close:
            self.transport.close()


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
    return {"error": {"code": exc.code, "name": exc.name, "message": exc.message}}


class AdminServer:
    def __init__(self, frontend) -> None:
        self.frontend = frontend
        self.loop = asyncio.get_running_loop()
        self._server = None

    async def start(self, host: str, port: int) -> int:
        self._server = await self.loop.create_server(lambda: _HttpConnection(self), host, port)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def route(self, method: str, path: str, data) -> tuple[int, object]:
        fe = self.frontend
        parts = [p for p in path.split("/") if p]
        if parts == ["health"]:
            return 200, {"status": "ok"}
        if parts[:2] != ["api", "v1"]:
            return 404, _err(RequestError(f"no route {method} {path}"))
        rest = parts[2:]
        if not isinstance(data, dict):
            raise InvalidConfigError("the request body must be a JSON object")
        key = (method, len(rest), rest[0] if rest else None)
        if rest[:1] == ["api-keys"]:  # the query ports' API keys: clipper/management/api_key_routes.py
            return await api_key_routes.route(fe, method, rest, data)
        if rest == ["status"] and method == "GET":
            return 200, fe.status()
        if rest == ["replicas"] and method == "GET":
            return 200, {"replicas": fe.rpc.stats(), "processes": fe.manager.stats()}
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
            try:
                app, model = data["app"], data["model"]
            except KeyError:
                raise InvalidConfigError("a link needs 'app' and 'model'") from None
            version = data.get("version")
            if version is not None and not isinstance(version, str):
                raise InvalidConfigError(f"link version {version!r} is not a string")
            if method == "POST":
                link = await fe.link(app, model, version)
                return 201, {"app": app, "link": link, "linked_models": fe.registry.linked_models(app)}
            await fe.unlink(app, model if version is None else f"{model}:{version}")
            return 200, {"app": app, "linked_models": fe.registry.linked_models(app)}
        return 404, _err(RequestError(f"no route {method} {path}"))

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
            mv = await fe.deploy_closure(str(name), str(version), blob, dtype, shape, wait=wait, **data)
            return mv.to_dict()
        mv = await fe.deploy_model(_make(ModelVersion, data, "model"), wait=wait)
        return mv.to_dict()


def _make(cls, data, what):
    from ..frontend import _make as make

    return make(cls, data, what)
