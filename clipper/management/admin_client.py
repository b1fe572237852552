"""A Python client for the management HTTP API (the CLI uses it too)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from ..errors import ConnectionClosedError, error_for_code

__all__ = ["AdminClient"]


class AdminClient:
    """Talks to a frontend's admin port (default ``127.0.0.1:1338``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1338, timeout: float = 120.0) -> None:
        self.base = f"http://{host}:{port}"
        self.timeout = timeout

    def _call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())["error"]
            except Exception:
                raise ConnectionClosedError(f"admin API answered HTTP {exc.code} without a JSON error") from None
            raise error_for_code(int(err["code"]), err["message"]) from None
        except urllib.error.URLError as exc:
            raise ConnectionClosedError(f"cannot reach the admin API at {self.base}: {exc.reason}") from None

    def health(self) -> dict:
        return self._call("GET", "/health")

    def status(self) -> dict:
        return self._call("GET", "/api/v1/status")

    def register_application(self, name: str, input_dtype: str, input_shape=(), slo_ms: float = 100.0,
                             default_output=None, on_deadline: str = "default", cache: bool = True, *,
                             policy: str = "single", policy_options: dict | None = None, output_kind: str = "auto",
                             loss: str | None = None, confidence_threshold: float = 0.0,
                             on_low_confidence: str = "flag") -> dict:
        """Register an application; ``policy`` and what follows configure its model selection
        (see :class:`clipper.Application`)."""
        return self._call("POST", "/api/v1/applications", {
            "name": name, "input_dtype": input_dtype, "input_shape": list(input_shape), "slo_ms": slo_ms,
            "default_output": default_output, "on_deadline": on_deadline, "cache": cache, "policy": policy,
            "policy_options": policy_options or {}, "output_kind": output_kind, "loss": loss,
            "confidence_threshold": confidence_threshold, "on_low_confidence": on_low_confidence})

    def deploy_model(self, name: str, version: str, input_dtype: str, input_shape=(), *, entry: str | None = None,
                     command: list[str] | None = None, replicas: int = 1, max_batch: int = 256,
                     batching: str = "aimd", batch_delay_ms: float = 0.0, latency_budget_ms: float | None = None,
                     workdir: str | None = None, env: dict | None = None, wait: bool = True) -> dict:
        return self._call("POST", "/api/v1/models", {
            "name": name, "version": str(version), "input_dtype": input_dtype, "input_shape": list(input_shape),
            "entry": entry, "command": command, "replicas": replicas, "max_batch": max_batch,
            "batching": batching, "batch_delay_ms": batch_delay_ms, "latency_budget_ms": latency_budget_ms,
            "workdir": workdir, "env": env or {}, "wait": wait})

    def link_model_to_app(self, app: str, model: str, version: str | None = None) -> dict:
        """Link ``model`` (its current version, or ``version`` when given) to ``app``."""
        body = {"app": app, "model": model}
        if version is not None:
            body["version"] = str(version)
        return self._call("POST", "/api/v1/links", body)

    def set_num_replicas(self, name: str, version: str, replicas: int) -> dict:
        return self._call("POST", f"/api/v1/models/{name}/{version}/replicas", {"replicas": replicas})

    def get_linked_models(self, app: str) -> list[str]:
        return self.status()["applications"][app]["linked_models"]
