"""Container managers under the original ``clipper_admin`` interface.

The original ran its frontends and every model in Docker (or Kubernetes). This
Clipper runs them as local processes: :class:`LocalContainerManager` starts a
real ``clipper start`` frontend process (which starts each model's container
processes itself), and :class:`DockerContainerManager` is that manager under
the original's name and keywords, so original scripts run unchanged, with no
Docker engine used. docs/compat.md lists every difference.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .exceptions import ClipperException

__all__ = ["ContainerManager", "LocalContainerManager", "DockerContainerManager", "KubernetesContainerManager",
           "CLIPPER_INTERNAL_QUERY_PORT", "CLIPPER_INTERNAL_MANAGEMENT_PORT", "CLIPPER_INTERNAL_RPC_PORT"]

log = logging.getLogger("clipper_admin")

# The original's default ports (this Clipper's as well).
CLIPPER_INTERNAL_QUERY_PORT = 1337
CLIPPER_INTERNAL_MANAGEMENT_PORT = 1338
CLIPPER_INTERNAL_RPC_PORT = 7000
DEFAULT_MSGPACK_PORT = 1339
DEFAULT_METRICS_PORT = 1390


class ContainerManager:
    """What :class:`~clipper_admin.ClipperConnection` asks of a manager."""

    host = "localhost"

    def start_clipper(self, cache_size: int | None = None) -> None:
        raise NotImplementedError

    def connect(self) -> None:
        raise NotImplementedError

    def stop_all(self, graceful: bool = True) -> bool:
        raise NotImplementedError

    def get_admin_addr(self) -> tuple[str, int]:
        raise NotImplementedError

    def get_query_addr(self) -> str:
        raise NotImplementedError

    def get_metric_addr(self) -> str:
        raise NotImplementedError

    def admin_token_file(self) -> str | None:
        return None

    def get_logs(self, logging_dir: str) -> list[str]:
        return []


class LocalContainerManager(ContainerManager):
    """Runs a Clipper frontend as a local process (``python -m clipper start``).

    Ports: the original's keywords; 0 binds a free port (the frontend reports
    which). ``state_path``: where the frontend keeps its registry (a SQLite
    file, or ``redis://...``); by default a fresh temporary folder per
    ``start_clipper()``, as the original started with an empty Redis.
    ``connect()`` instead talks to a frontend already running on these ports.
    """

    def __init__(self, clipper_query_port: int = CLIPPER_INTERNAL_QUERY_PORT,
                 clipper_management_port: int = CLIPPER_INTERNAL_MANAGEMENT_PORT,
                 clipper_rpc_port: int = CLIPPER_INTERNAL_RPC_PORT, *, host: str = "localhost",
                 msgpack_port: int = DEFAULT_MSGPACK_PORT, metrics_port: int = DEFAULT_METRICS_PORT,
                 state_path: str | None = None, start_timeout_s: float = 60.0) -> None:
        self.host = host
        self.ports = {"rest_port": int(clipper_query_port), "admin_port": int(clipper_management_port),
                      "rpc_port": int(clipper_rpc_port), "query_port": int(msgpack_port),
                      "metrics_port": int(metrics_port)}
        self.state_path = state_path
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.folder: Path | None = None  # the started frontend's folder: state, secrets, log
        self._own_folder = False

    # -------------------------------------------------------------- lifecycle
    def start_clipper(self, cache_size: int | None = None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise ClipperException(f"this manager already runs a Clipper frontend (pid {self.proc.pid}); "
                                   "call stop_all() first")
        self.folder = Path(tempfile.mkdtemp(prefix="clipper-admin-"))
        self._own_folder = True
        ready = self.folder / "ready.json"
        state = self.state_path or str(self.folder / "clipper-state.sqlite")
        argv = [sys.executable, "-m", "clipper", "--log-level", "INFO", "start", "--host", _bind(self.host),
                "--ready-file", str(ready), "--state", state]
        for name, port in self.ports.items():
            argv += [f"--{name.replace('_', '-')}", str(port)]
        if cache_size is not None:  # the original's prediction cache size, in bytes: a [limits] setting here
            conf = self.folder / "clipper.toml"
            conf.write_text(f"[frontend]\n\n[limits]\ncache_bytes = {int(cache_size)}\n")
            argv += ["--config", str(conf)]
        logfile = open(self.folder / "clipper.log", "wb")
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                                         cwd=str(self.folder), start_new_session=True)
        finally:
            logfile.close()
        deadline = time.monotonic() + self.start_timeout_s
        while not ready.exists():
            if self.proc.poll() is not None:
                tail = self._log_tail()
                self.proc = None
                raise ClipperException(f"the Clipper frontend exited at start: {tail}")
            if time.monotonic() > deadline:
                self.stop_all()
                raise ClipperException(f"the Clipper frontend did not start within {self.start_timeout_s:g} s")
            time.sleep(0.05)
        bound = json.loads(ready.read_text())
        for name in self.ports:
            self.ports[name] = int(bound[name])
        log.info("Clipper is running: REST queries on %s, admin on %s:%d (pid %d, log %s)", self.get_query_addr(),
                 self.host, self.ports["admin_port"], self.proc.pid, self.folder / "clipper.log")

    def connect(self) -> None:
        if 0 in (self.ports["admin_port"], self.ports["rest_port"]):
            raise ClipperException("connect() needs the frontend's ports: port 0 means 'any free port' only for "
                                   "start_clipper()")

    def stop_all(self, graceful: bool = True) -> bool:
        """Stop the frontend this manager started (its model containers stop with it). True if it did."""
        proc, self.proc = self.proc, None
        if proc is None:
            return False
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._own_folder and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        return True

    # -------------------------------------------------------------- addresses
    def get_admin_addr(self) -> tuple[str, int]:
        return self.host, self.ports["admin_port"]

    def get_query_addr(self) -> str:
        return f"{self.host}:{self.ports['rest_port']}"

    def get_metric_addr(self) -> str:
        return f"{self.host}:{self.ports['metrics_port']}"

    def get_msgpack_addr(self) -> tuple[str, int]:
        """This Clipper's binary query port (``clipper.Client(host, port)``), which the original lacks."""
        return self.host, self.ports["query_port"]

    def admin_token_file(self) -> str | None:
        if self.folder is not None and self.state_path is None:
            return str(self.folder / "clipper-secrets" / "admin-token")
        return None  # a frontend this manager did not start: the token is discovered (or from the environment)

    def get_logs(self, logging_dir: str) -> list[str]:
        if self.folder is None or not (self.folder / "clipper.log").exists():
            return []
        os.makedirs(logging_dir, exist_ok=True)
        out = os.path.join(logging_dir, f"clipper-frontend-{self.proc.pid if self.proc else 'stopped'}.log")
        shutil.copyfile(self.folder / "clipper.log", out)
        return [out]

    def _log_tail(self) -> str:
        assert self.folder is not None  # (asked while the frontend starts)
        try:
            lines = (self.folder / "clipper.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        errors = [ln for ln in lines if ln.startswith("clipper: error:")]
        return (errors or lines or ["(empty log)"])[-1]


def _bind(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else host


class DockerContainerManager(LocalContainerManager):
    """The original's ``DockerContainerManager``, with its keywords, running local processes.

    No Docker engine is used: the frontend and the model containers run as
    processes of this machine (docs/compat.md). ``redis_ip``/``redis_port``
    keep the registry on that Redis server, as the original did; the other
    Docker settings (network, cluster name, centralized log, Prometheus port)
    have no meaning here and are ignored.
    """

    _told = False

    def __init__(self, cluster_name: str = "default-cluster", docker_ip_address: str = "localhost",
                 use_centralized_log: bool = False, fluentd_port: int = 24224,
                 clipper_query_port: int = CLIPPER_INTERNAL_QUERY_PORT,
                 clipper_management_port: int = CLIPPER_INTERNAL_MANAGEMENT_PORT,
                 clipper_rpc_port: int = CLIPPER_INTERNAL_RPC_PORT, redis_ip: str | None = None,
                 redis_port: int = 6379, prometheus_port: int = 9090, docker_network: str = "clipper_network",
                 extra_container_kwargs: dict | None = None, **local: Any) -> None:
        state = local.pop("state_path", None)
        if redis_ip is not None and state is None:
            state = f"redis://{redis_ip}:{int(redis_port)}/0"
        super().__init__(clipper_query_port, clipper_management_port, clipper_rpc_port,
                         host=docker_ip_address, state_path=state, **local)
        self.cluster_name = cluster_name
        if not DockerContainerManager._told:
            DockerContainerManager._told = True
            log.info("DockerContainerManager: this Clipper runs its frontend and model containers as local "
                     "processes; no Docker engine is used (docs/compat.md)")


class KubernetesContainerManager(ContainerManager):
    """The original's Kubernetes manager: not mapped by this compatibility layer (docs/compat.md)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise ClipperException("KubernetesContainerManager is not mapped by clipper_admin: run the frontend with "
                               "container_manager = \"kubernetes\" (docs/deploy.md), or use LocalContainerManager "
                               "(or DockerContainerManager, which runs local processes)")
