"""A Python client for the management HTTP API (the CLI uses it too)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any, Callable, Iterable, Sequence

from urllib.parse import quote

from ..errors import ConnectionClosedError, error_for_code

__all__ = ["AdminClient", "ClipperConnection"]


def _seg(part: str) -> str:
    return quote(str(part), safe="")


class AdminClient:
    """Talks to a frontend's admin port (default ``127.0.0.1:1338``).

    The method names follow the original Clipper's ``ClipperConnection``
    (``register_application``, ``deploy_model``, ``link_model_to_app``,
    ``set_model_version``, ``set_num_replicas``, ``get_linked_models``, ...).
    Errors raise the :mod:`clipper.errors` class of the code the API sent.

    Credentials: the admin API asks for a bearer token. On the frontend's
    machine the client finds it by itself (the frontend publishes where its
    token file is); elsewhere pass ``token`` or ``token_file``, or set
    ``CLIPPER_ADMIN_TOKEN`` / ``CLIPPER_ADMIN_TOKEN_FILE``. ``tls`` (default:
    what the local frontend published on loopback, always elsewhere) speaks
    HTTPS, verifying the server against the system's CAs plus ``cafile``; the
    token never travels in clear text off loopback.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1338, timeout: float = 120.0, *,
                 token: str | None = None, token_file: str | None = None, tls: bool | None = None,
                 cafile: str | None = None) -> None:
        from ..security.admin_token import discover, resolve_client_token
        from ..security.net import is_loopback_host

        self.host, self.port = host, int(port)
        self.timeout = timeout
        # What a frontend of this machine published is used only for that frontend: a token never
        # goes to another host that happens to listen on the same port number.
        published = discover(self.port)
        local = is_loopback_host(host) or (published is not None and published.get("host") == host)
        self._token, self._token_source, info = resolve_client_token(self.port, token, token_file, local=local)
        published_cert = info.get("tls_cert_file") if info else None
        if tls is None:  # off loopback the API speaks TLS (the frontend refuses to run it otherwise)
            tls = bool(published_cert) or not is_loopback_host(host)
        if not tls and not is_loopback_host(host):
            from ..errors import InvalidConfigError

            raise InvalidConfigError(f"refusing to send the admin token to {host} without TLS: the token can run "
                                     "code on that machine (use tls=True)")
        self._ssl = None
        if tls:
            from ..security.tls import client_context

            self._ssl = client_context(cafile or published_cert)
        netloc = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.base = f"{'https' if tls else 'http'}://{netloc}:{self.port}"

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())["error"]
            except Exception:
                raise ConnectionClosedError(f"admin API answered HTTP {exc.code} without a JSON error") from None
            message = err["message"]
            if exc.code == 401:
                message += f" (this client took its token from {self._token_source})"
            raise error_for_code(int(err["code"]), message) from None
        except urllib.error.URLError as exc:
            raise ConnectionClosedError(f"cannot reach the admin API at {self.base}: {exc.reason}") from None

    def health(self) -> dict:
        return self._call("GET", "/health")

    def status(self) -> dict:
        return self._call("GET", "/api/v1/status")

    def register_application(self, name: str, input_dtype: str, input_shape: Sequence[int] = (), slo_ms: float = 100.0,
                             default_output: Any = None, on_deadline: str = "default", cache: bool = True, *,
                             policy: str = "single", policy_options: dict | None = None, output_kind: str = "auto",
                             loss: str | None = None, confidence_threshold: float = 0.0,
                             on_low_confidence: str = "flag", on_overload: str | None = None,
                             rest_format: str = "clipper") -> dict:
        """Register an application; ``policy`` and what follows configure its model selection
        (see :class:`clipper.Application`); ``rest_format="original"`` answers its REST queries in the
        original Clipper's format (docs/rest.md)."""
        return self._call("POST", "/api/v1/applications", {
            "name": name, "input_dtype": input_dtype, "input_shape": list(input_shape), "slo_ms": slo_ms,
            "default_output": default_output, "on_deadline": on_deadline, "cache": cache, "policy": policy,
            "policy_options": policy_options or {}, "output_kind": output_kind, "loss": loss,
            "confidence_threshold": confidence_threshold, "on_low_confidence": on_low_confidence,
            "on_overload": on_overload, "rest_format": rest_format})

    def deploy_model(self, name: str, version: str, input_dtype: str, input_shape: Sequence[int] = (), *, entry: str | None = None,
                     command: list[str] | None = None, replicas: int = 1, max_batch: int = 256,
                     batching: str = "aimd", batch_delay_ms: float = 0.0, latency_budget_ms: float | None = None,
                     workdir: str | None = None, env: dict | None = None, wait: bool = True) -> dict:
        return self._call("POST", "/api/v1/models", {
            "name": name, "version": str(version), "input_dtype": input_dtype, "input_shape": list(input_shape),
            "entry": entry, "command": command, "replicas": replicas, "max_batch": max_batch,
            "batching": batching, "batch_delay_ms": batch_delay_ms, "latency_budget_ms": latency_budget_ms,
            "workdir": workdir, "env": env or {}, "wait": wait})

    def deploy_model_file(self, kind: str, name: str, version: str, path: str | os.PathLike[str], *, output: str | None = None,
                          options: dict | None = None, input_dtype: str | None = None, input_shape: Sequence[int] | None = None,
                          trusted_types: Iterable[str] | None = None, trust_pickle: bool = False, **kw: Any) -> dict:
        """Deploy a saved model file: ``kind`` is onnx, sklearn, xgboost, lightgbm or torch.

        The file is inspected here (its framework must be installed here: ``pip
        install 'clipper-serving[onnx]'``...) for its input dtype and shape and
        what it answers; its containers run the kind's predictor with the file's
        absolute path, which must be readable where the frontend runs them.
        ``output`` picks the output kind (label, probabilities, vector, number),
        ``options`` the kind's options; other keywords are :meth:`deploy_model`'s.
        The reply adds ``deployer``: what was inferred, with the ``output_kind``
        to register the application with. See :mod:`clipper.deployers`.
        """
        from ..deployers import inspect_model_file

        d = inspect_model_file(kind, path, input_dtype=input_dtype, input_shape=input_shape, output=output,
                               options=options, trusted_types=trusted_types, trust_pickle=trust_pickle)
        env = {**(kw.pop("env", None) or {}), **d.env}
        out = self.deploy_model(name, version, d.input_dtype, d.input_shape, entry=d.entry, env=env, **kw)
        return {**out, "deployer": d.to_dict()}

    def link_model_to_app(self, app: str, model: str, version: str | None = None) -> dict:
        """Link ``model`` (its current version, or ``version`` when given) to ``app``."""
        body = {"app": app, "model": model}
        if version is not None:
            body["version"] = str(version)
        return self._call("POST", "/api/v1/links", body)

    def unlink_model_from_app(self, app: str, model: str, version: str | None = None) -> dict:
        """Remove the link of ``model`` (or of its pinned ``version``) from ``app``."""
        body = {"app": app, "model": model}
        if version is not None:
            body["version"] = str(version)
        return self._call("DELETE", "/api/v1/links", body)

    def unregister_application(self, name: str) -> dict:
        """Remove an application: its endpoint, its links and its policy states."""
        return self._call("DELETE", f"/api/v1/applications/{_seg(name)}")

    def get_all_apps(self) -> list[dict]:
        return self._call("GET", "/api/v1/applications")

    def get_app_info(self, name: str) -> dict:
        return self._call("GET", f"/api/v1/applications/{_seg(name)}")

    def get_all_models(self) -> dict:
        return self._call("GET", "/api/v1/models")

    def get_model_info(self, name: str, version: str | None = None) -> dict:
        """A model (its versions and current version), or one version with its replicas and processes."""
        path = f"/api/v1/models/{_seg(name)}" + ("" if version is None else f"/{_seg(str(version))}")
        return self._call("GET", path)

    def delete_model(self, name: str, version: str | None = None) -> dict:
        """Delete one version, or the whole model (and its links) without ``version``."""
        path = f"/api/v1/models/{_seg(name)}" + ("" if version is None else f"/{_seg(str(version))}")
        return self._call("DELETE", path)

    def delete_model_version(self, name: str, version: str) -> dict:
        return self.delete_model(name, version)

    def set_model_version(self, name: str, version: str) -> dict:
        """Make ``version`` the model's current version (roll back or forward)."""
        return self._call("POST", f"/api/v1/models/{_seg(name)}/current", {"version": str(version)})

    def deploy_python_closure(self, name: str, version: str, func: Callable[[Any], Any], input_dtype: str, input_shape: Sequence[int] = (), *,
                              replicas: int = 1, max_batch: int = 256, batching: str = "aimd",
                              batch_delay_ms: float = 0.0, latency_budget_ms: float | None = None,
                              env: dict | None = None, wait: bool = True) -> dict:
        """Deploy ``func`` (a function or closure taking a batch, or an object with ``predict``).

        It is serialized here with cloudpickle, with this Python's and
        cloudpickle's versions; a container whose versions differ refuses it at
        start and the deploy fails with a message naming the mismatch.
        """
        import base64

        from ..container.closure import dump_closure

        blob = dump_closure(func)
        return self._call("POST", "/api/v1/models", {
            "name": name, "version": str(version), "input_dtype": input_dtype, "input_shape": list(input_shape),
            "closure": base64.b64encode(blob).decode("ascii"), "replicas": replicas, "max_batch": max_batch,
            "batching": batching, "batch_delay_ms": batch_delay_ms, "latency_budget_ms": latency_budget_ms,
            "env": env or {}, "wait": wait})

    def get_replicas(self) -> dict:
        """Connected replicas (``replicas``) and the container processes the manager runs (``processes``)."""
        return self._call("GET", "/api/v1/replicas")

    def get_num_replicas(self, name: str, version: str) -> int:
        return len(self.get_model_info(name, version)["replicas"])

    def set_num_replicas(self, name: str, version: str, replicas: int) -> dict:
        return self._call("POST", f"/api/v1/models/{_seg(name)}/{_seg(version)}/replicas", {"replicas": replicas})

    def issue_container_credentials(self, model: str, version: str | None = None, *, frontend: str | None = None,
                                    label: str = "") -> dict:
        """Credentials for a container started by hand to serve ``model`` (one ``version``, if given).

        The returned document holds the secret key: save it with
        :func:`clipper.security.container_keys.save_credentials` (0600) and
        start the container with ``--credentials FILE``. ``frontend`` is the
        RPC address the container dials (default: the frontend's own view).
        """
        body = {"model": model, "label": label}
        if version is not None:
            body["version"] = str(version)
        if frontend is not None:
            body["frontend"] = frontend
        return self._call("POST", "/api/v1/container-credentials", body)

    def list_container_credentials(self) -> list[dict]:
        return self._call("GET", "/api/v1/container-credentials")

    def revoke_container_credentials(self, credential_id: str) -> dict:
        """Revoke credentials: containers holding them are dropped and told to exit."""
        return self._call("DELETE", f"/api/v1/container-credentials/{_seg(credential_id)}")

    def rotate_admin_token(self) -> str:
        """Replace the admin token (the frontend writes the new one to its token file); returns it.

        This client goes on with the new token."""
        token = self._call("POST", "/api/v1/admin-token/rotate", {})["token"]
        self._token, self._token_source = token, "the rotation it made"
        return token

    def get_linked_models(self, app: str) -> list[str]:
        return self.status()["applications"][app]["linked_models"]

    def create_api_key(self, apps: str | Iterable[str], name: str | None = None) -> dict:
        """Make an API key granting queries and feedback for the applications ``apps`` (registered names).

        Returns ``{id, key, apps, name, created}``; ``key`` is the secret, shown
        only this once (the frontend keeps its hash). Clients send it in HELLO
        (``Client(..., api_key=key)``) or as ``Authorization: Bearer <key>``.
        """
        body: dict = {"apps": [apps] if isinstance(apps, str) else list(apps)}
        if name is not None:
            body["name"] = name
        return self._call("POST", "/api/v1/api-keys", body)

    def list_api_keys(self) -> list[dict]:
        """Every API key as ``{id, name, apps, created}`` (never the secret)."""
        return self._call("GET", "/api/v1/api-keys")

    def revoke_api_key(self, key_id: str) -> dict:
        """Revoke a key at once, also on connections that authenticated with it."""
        return self._call("DELETE", f"/api/v1/api-keys/{_seg(key_id)}")


ClipperConnection = AdminClient  # the original Clipper's name for it
