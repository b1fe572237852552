"""``ClipperConnection``: the original ``clipper_admin`` API, over this Clipper's own admin client.

Signatures, keyword names, return values and ``None`` for unknown names are
the original's; every failure raises :class:`ClipperException`. The work is
done by :class:`clipper.management.admin_client.AdminClient` (which keeps its
own API). Deliberate differences are listed in docs/compat.md.
"""

from __future__ import annotations

import functools
import json
import logging
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any, Callable, Concatenate, Iterable, ParamSpec, TypeVar, cast

from clipper import errors as E

from .container_manager import ContainerManager
from .exceptions import ClipperException, UnconnectedException

if TYPE_CHECKING:
    from clipper.management.admin_client import AdminClient

__all__ = ["ClipperConnection", "INPUT_TYPES", "input_type_spec"]

log = logging.getLogger("clipper_admin")

_P = ParamSpec("_P")
_R = TypeVar("_R")

# The original's input types: each a vector of any length (-1: a free dimension), or a str / bytes input.
INPUT_TYPES = {
    "integers": ("int32", [-1]),
    "ints": ("int32", [-1]),
    "floats": ("float32", [-1]),
    "doubles": ("float64", [-1]),
    "bytes": ("bytes", []),
    "strings": ("str", []),
}
_TYPE_NAMES = {"int32": "integers", "float32": "floats", "float64": "doubles", "bytes": "bytes", "str": "strings"}


def input_type_spec(input_type: str) -> tuple[str, list[int]]:
    """The original's ``input_type`` -> (this Clipper's dtype, shape)."""
    try:
        return INPUT_TYPES[input_type]
    except (KeyError, TypeError):
        raise ClipperException(f"Invalid input type {input_type!r}: expected one of {sorted(INPUT_TYPES)}") from None


def _type_name(dtype: str) -> str:
    return _TYPE_NAMES.get(dtype, dtype)


def _clipper_errors(fn: Callable[Concatenate[ClipperConnection, _P], _R]) -> Callable[Concatenate[ClipperConnection, _P], _R]:
    """Clipper's own errors leave as ClipperException (the original's), keeping their code."""
    @functools.wraps(fn)
    def call(self: ClipperConnection, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(self, *args, **kwargs)
        except E.ClipperError as exc:
            raise ClipperException(exc.message, code=exc.code) from exc
    return call


class ClipperConnection:
    """A connection to a Clipper frontend, through a container manager.

    ``start_clipper()`` starts a frontend (the manager's processes);
    ``connect()`` reaches one already running. Either is needed before any
    other call (else :class:`UnconnectedException`).
    """

    def __init__(self, container_manager: ContainerManager) -> None:
        self.connected = False
        self.cm = container_manager
        self._admin: AdminClient | None = None
        self._labels: dict = {}  # (model, version) -> the labels given at deploy (kept here, not by the frontend)

    # -------------------------------------------------------------- connection
    @_clipper_errors
    def start_clipper(self, query_frontend_image: str | None = None, mgmt_frontend_image: str | None = None, frontend_exporter_image: str | None = None,
                      cache_size: int | None = None, qf_http_thread_pool_size: int | None = None, qf_http_timeout_request: int | None = None,
                      qf_http_timeout_content: int | None = None, num_frontend_replicas: int = 1) -> None:
        """Start a frontend. The image and thread-pool arguments are the original's and mean nothing here."""
        if num_frontend_replicas != 1:
            raise ClipperException("num_frontend_replicas: a LocalContainerManager runs one frontend process")
        self.cm.start_clipper(cache_size)
        self._connect_admin()
        log.info("Clipper is running")

    @_clipper_errors
    def connect(self) -> None:
        self.cm.connect()
        self._connect_admin()
        assert self._admin is not None
        self._admin.health()
        log.info("Successfully connected to Clipper cluster at %s", self.cm.get_query_addr())

    def _connect_admin(self) -> None:
        from clipper.management.admin_client import AdminClient

        host, port = self.cm.get_admin_addr()
        self._admin = AdminClient("127.0.0.1" if host == "localhost" else host, port,
                                  token_file=self.cm.admin_token_file())
        self.connected = True

    @property
    def admin(self) -> AdminClient:
        """This Clipper's own :class:`AdminClient` behind the connection (its full API)."""
        if not self.connected:
            raise UnconnectedException()
        return cast("AdminClient", self._admin)  # set while connected

    # -------------------------------------------------------------- applications
    @_clipper_errors
    def register_application(self, name: str, input_type: str, default_output: str, slo_micros: int) -> None:
        dtype, shape = input_type_spec(input_type)
        self.admin.register_application(name, dtype, shape, slo_ms=slo_micros / 1000.0,
                                        default_output=default_output, rest_format="original")
        log.info("Application %s was successfully registered", name)

    @_clipper_errors
    def delete_application(self, name: str) -> None:
        self.admin.unregister_application(name)
        log.info("Application %s was successfully deleted", name)

    @_clipper_errors
    def link_model_to_app(self, app_name: str, model_name: str) -> None:
        self.admin.link_model_to_app(app_name, model_name)
        log.info("Model %s is now linked to application %s", model_name, app_name)

    @_clipper_errors
    def unlink_model_from_app(self, app_name: str, model_name: str) -> None:
        self.admin.unlink_model_from_app(app_name, model_name)
        log.info("Model %s is now removed to application %s", model_name, app_name)

    @_clipper_errors
    def get_all_apps(self, verbose: bool = False) -> list:
        apps = self.admin.get_all_apps()
        return [self._app_info(a) for a in apps] if verbose else [a["name"] for a in apps]

    @_clipper_errors
    def get_app_info(self, name: str) -> dict | None:
        try:
            return self._app_info(self.admin.get_app_info(name))
        except E.UnknownApplicationError:
            return None

    @staticmethod
    def _app_info(a: dict) -> dict:
        return {"name": a["name"], "input_type": _type_name(a["input_dtype"]), "default_output": a["default_output"],
                "latency_slo_micros": int(round(a["slo_ms"] * 1000)),
                "linked_models": [m.split(":", 1)[0] for m in a.get("linked_models", [])]}

    @_clipper_errors
    def get_linked_models(self, app_name: str) -> list[str] | None:
        info = self.get_app_info(app_name)
        return None if info is None else info["linked_models"]

    # -------------------------------------------------------------- models
    @_clipper_errors
    def deploy_model(self, name: str, version: str | int, input_type: str, image: str, labels: list[str] | None = None, num_replicas: int = 1,
                     batch_size: int = -1) -> None:
        """Deploy ``image`` -- here a container entry, ``module:function`` or ``path/file.py:function``
        (Docker images need a Docker engine, which this Clipper does not use)."""
        dtype, shape = input_type_spec(input_type)
        entry = str(image)
        module, sep, func = entry.rpartition(":")
        if not sep or not func.isidentifier() or ("/" in module and not module.endswith(".py")):
            raise ClipperException(f"image {entry!r} looks like a Docker image; this Clipper runs models as local "
                                   "processes: pass image='module:function' (or 'path/file.py:function'), or deploy "
                                   "a function with clipper_admin.deployers.python.deploy_python_closure")
        self.admin.deploy_model(name, str(version), dtype, shape, entry=entry, replicas=num_replicas,
                                **cast("dict[str, Any]", {"max_batch": batch_size} if batch_size and batch_size > 0 else {}))
        self._labels[(name, str(version))] = list(labels or [])
        log.info("Successfully registered model %s:%s", name, version)

    @_clipper_errors
    def register_model(self, name: str, version: str | int, input_type: str, image: str | None = None, labels: list[str] | None = None, batch_size: int = -1) -> None:
        raise ClipperException("register_model registers a model whose containers are started elsewhere: here, "
                               "use deploy_model with num_replicas=0 and start containers with "
                               "`python -m clipper.container` and credentials (clipper container-credentials)")

    @_clipper_errors
    def build_and_deploy_model(self, *args: object, **kwargs: object) -> None:
        raise ClipperException("build_and_deploy_model builds a Docker image; this Clipper uses no Docker engine: "
                               "deploy a function with deploy_python_closure, or a module:function with deploy_model")

    build_model = build_and_deploy_model

    @_clipper_errors
    def get_all_models(self, verbose: bool = False) -> list:
        models = self.admin.get_all_models()
        if not verbose:
            return [f"{n}:{v}" for n, m in models.items() for v in m["versions"]]
        return [self._model_info(n, v, mv, m["current_version"]) for n, m in models.items()
                for v, mv in m["versions"].items()]

    @_clipper_errors
    def get_model_info(self, name: str, version: str | int) -> dict | None:
        try:
            m = self.admin.get_model_info(name)
        except (E.UnknownModelError, E.UnknownApplicationError):
            return None
        mv = m["versions"].get(str(version))
        return None if mv is None else self._model_info(name, str(version), mv, m["current_version"])

    def _model_info(self, name: str, version: str, mv: dict, current: str | None) -> dict:
        return {"model_name": name, "model_version": version, "input_type": _type_name(mv["input_dtype"]),
                "labels": self._labels.get((name, version), []), "container_name": mv.get("entry"),
                "model_data_path": None, "batch_size": mv.get("max_batch", -1),
                "is_current_version": version == current}

    @_clipper_errors
    def get_current_model_version(self, name: str) -> str:
        try:
            current = self.admin.get_model_info(name)["current_version"]
        except E.UnknownModelError:
            current = None
        if current is None:
            raise ClipperException(f"No versions of model {name} registered with Clipper")
        return current

    @_clipper_errors
    def set_model_version(self, name: str, version: str | int, num_replicas: int | None = None) -> None:
        self.admin.set_model_version(name, str(version))
        if num_replicas is not None:
            self.set_num_replicas(name, num_replicas, version)

    @_clipper_errors
    def get_num_replicas(self, name: str, version: str | int | None = None) -> int:
        """How many replicas the version (default: the current one) is deployed with."""
        version = self.get_current_model_version(name) if version is None else str(version)
        mv = self.admin.get_model_info(name)["versions"].get(version)
        if mv is None:
            raise ClipperException(f"model {name} has no version {version}")
        return int(mv["replicas"])

    @_clipper_errors
    def set_num_replicas(self, name: str, num_replicas: int, version: str | int | None = None) -> None:
        version = self.get_current_model_version(name) if version is None else str(version)
        self.admin.set_num_replicas(name, version, int(num_replicas))

    @_clipper_errors
    def get_all_model_replicas(self, verbose: bool = False) -> list:
        replicas = self.admin.get_replicas()["replicas"]
        if verbose:
            return [{"model_name": r["model"].split(":", 1)[0], "model_version": r["model"].split(":", 1)[1],
                     "model_replica_id": r["replica_id"]} for r in replicas]
        return [f"{r['model']}:{r['replica_id']}" for r in replicas]

    # -------------------------------------------------------------- stopping
    @_clipper_errors
    def stop_models(self, model_names: str | Iterable[str]) -> None:
        """Stop every version's containers of each named model (the models stay registered)."""
        names = [model_names] if isinstance(model_names, str) else list(model_names)
        models = self.admin.get_all_models()
        for name in names:
            for version in models.get(name, {}).get("versions", {}):
                self.admin.set_num_replicas(name, version, 0)
        log.info("Stopped all containers for these models and versions: %s", names)

    @_clipper_errors
    def stop_versioned_models(self, model_versions_dict: dict) -> None:
        for name, versions in model_versions_dict.items():
            for version in versions:
                self.admin.set_num_replicas(name, str(version), 0)

    @_clipper_errors
    def stop_inactive_model_versions(self, model_names: str | Iterable[str]) -> None:
        models = self.admin.get_all_models()
        for name in ([model_names] if isinstance(model_names, str) else model_names):
            m = models.get(name, {})
            for version in m.get("versions", {}):
                if version != m.get("current_version"):
                    self.admin.set_num_replicas(name, version, 0)

    @_clipper_errors
    def stop_all_model_containers(self) -> None:
        for name, m in self.admin.get_all_models().items():
            for version in m["versions"]:
                self.admin.set_num_replicas(name, version, 0)

    @_clipper_errors
    def stop_all(self, graceful: bool = True) -> None:
        """Stop the frontend the manager started, and with it every model container. On a connection to a
        frontend another process started, only its model containers are stopped (the frontend is not
        this program's to stop)."""
        if not self.cm.stop_all(graceful) and self.connected:
            self.stop_all_model_containers()
        self.connected = False
        self._admin = None
        log.info("Stopped all Clipper cluster and all model containers")

    # -------------------------------------------------------------- inspection
    def get_query_addr(self) -> str:
        if not self.connected:
            raise UnconnectedException()
        return self.cm.get_query_addr()

    def get_metric_addr(self) -> str:
        if not self.connected:
            raise UnconnectedException()
        return self.cm.get_metric_addr()

    def inspect_instance(self) -> dict:
        """The query frontend's metrics, as JSON (``GET /metrics`` on the query port)."""
        url = f"http://{self.get_query_addr()}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise ClipperException(f"Received error status code: {exc.code} and message: "
                                   f"{exc.read().decode('utf-8', 'replace')}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ClipperException(f"cannot reach the query frontend at {url}: {exc}") from None

    def get_clipper_logs(self, logging_dir: str = "clipper_logs/") -> list[str]:
        """Copy the frontend's log into ``logging_dir``; the paths written."""
        if not self.connected:
            raise UnconnectedException()
        return self.cm.get_logs(logging_dir)

    def test_predict_function(self, query: dict, func: Callable[[list[Any]], _R], input_type: str) -> _R:
        """Run ``func`` on ``query`` (a REST body, ``input`` or ``input_batch``) here, as a container would."""
        import numpy as np

        dtype, _ = input_type_spec(input_type)
        items = query["input_batch"] if "input_batch" in query else [query["input"]]
        if dtype not in ("str", "bytes"):
            items = [np.array(x, dtype=dtype) for x in items]
        return func(items)
