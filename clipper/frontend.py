"""The frontend: one process, one event loop, every part of the query path.

>>> async with Frontend(FrontendConfig(query_port=0, rpc_port=0, admin_port=0)) as fe:
...     await fe.register_application(Application("digits", "float64", [64], slo_ms=50))
...     await fe.deploy_model(ModelVersion("logreg", "1", "float64", [64], entry="model.py:Model"))
...     await fe.link("digits", "logreg")
...     await fe.wait_ready("logreg")
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from . import __version__
from .config import FrontendConfig
from .errors import ClipperError, InvalidConfigError, NoModelAvailableError
from .management.local_manager import LocalProcessManager
from .management.registry import Application, ModelVersion, Registry
from .query.batching import ModelQueue
from .query.processor import AppRoute, QueryProcessor
from .rpc.server import ContainerServer
from .server.query_server import QueryServer

log = logging.getLogger("clipper.frontend")

__all__ = ["Frontend"]


class Frontend:
    """Clipper's frontend: query server, query processor, container RPC, manager."""

    def __init__(self, config: FrontendConfig | None = None, *, base_dir: str | Path | None = None) -> None:
        self.config = config or FrontendConfig()
        self.base_dir = Path(base_dir) if base_dir else Path.cwd()
        self.registry = Registry()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.processor: QueryProcessor | None = None
        self.rpc: ContainerServer | None = None
        self.manager: LocalProcessManager | None = None
        self.query_server: QueryServer | None = None
        self.admin = None
        self.query_port: int | None = None
        self.admin_port: int | None = None
        self.rpc_port: int | None = None
        self._lock = asyncio.Lock()
        self._started = False
        self._failures: dict[str, asyncio.Future] = {}  # model key -> set when a container of it fails to start
        self._next_deployment_id = 1  # names each deployed model version in the prediction cache
        self.store = None

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> "Frontend":
        cfg = self.config
        self.loop = asyncio.get_running_loop()
        from .store.sqlite import SQLiteStore

        lim = cfg.limits
        self.store = SQLiteStore(self._state_path())
        self.processor = QueryProcessor(self.loop, lim.max_input_bytes, lim.cache_bytes, store=self.store,
                                        state_flush_ms=cfg.state_flush_ms, feedback_timeout_ms=cfg.feedback_timeout_ms,
                                        max_user_id_len=lim.max_user_id_len, max_user_states=lim.max_user_states,
                                        max_user_states_in_memory=lim.max_user_states_in_memory)
        self.rpc = ContainerServer(self.loop, cfg.rpc_address, self._resolve_container,
                                   heartbeat_interval_ms=cfg.heartbeat_interval_ms,
                                   heartbeat_timeout_ms=cfg.heartbeat_timeout_ms,
                                   batch_timeout_ms=cfg.batch_timeout_ms)
        self.rpc.start()
        self.rpc_port = self.rpc.port
        rpc_addr = f"tcp://{cfg.rpc_host}:{self.rpc_port}"
        self.manager = LocalProcessManager(self.loop, rpc_addr, self.rpc.process_exited, base_dir=self.base_dir,
                                           backoff_ms=cfg.restart_backoff_ms)
        self.manager.on_failure = self._container_failed
        self.query_server = QueryServer(self.loop, self.processor, cfg.limits, f"clipper/{__version__}")
        if cfg.query_port is not None:
            self.query_port = await self.query_server.start(cfg.host, cfg.query_port)
        if cfg.admin_port is not None:
            from .management.admin_http import AdminServer

            self.admin = AdminServer(self)
            self.admin_port = await self.admin.start(cfg.host, cfg.admin_port)
        self._started = True
        log.info("clipper frontend: query port %s, admin port %s, container RPC %s",
                 self.query_port, self.admin_port, rpc_addr)
        return self

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self.admin is not None:
            await self.admin.close()
        if self.query_server is not None:
            await self.query_server.close()
        if self.manager is not None:
            await self.manager.close()
        for route in self.processor.routes.values():
            route.close()
        for queue in self.processor.queues.values():
            queue.close()
        if self.rpc is not None:
            self.rpc.close()
        self.processor.close()  # saves the policy states not yet written
        self.store.close()

    def _state_path(self) -> str:
        path = self.config.state_path
        if path is None or path == ":memory:":
            return ":memory:"
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else self.base_dir / p)

    async def __aenter__(self) -> "Frontend":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # ------------------------------------------------------------ management
    async def register_application(self, app: Application) -> Application:
        """Register ``app``; queries to it are accepted from now on."""
        async with self._lock:
            self.registry.add_application(app)
            self.processor.routes[app.name] = AppRoute(app, self.processor)
            return app

    async def deploy_model(self, mv: ModelVersion, *, make_current: bool = True, wait: bool = False,
                           timeout_s: float | None = None) -> ModelVersion:
        """Deploy a model version and start its containers (if it has an entry or command)."""
        async with self._lock:
            self.registry.add_model_version(mv, make_current=make_current)
            lim = self.config.limits
            deployment_id = self._next_deployment_id
            self._next_deployment_id += 1
            self.processor.queues[mv.key] = ModelQueue(
                mv.key, self.loop, self.rpc.send_batch, deployment_id=deployment_id,
                max_queue_length=lim.max_queue_length, max_batch_retries=lim.max_batch_retries,
                max_batch=mv.max_batch, batching=mv.batching, batch_delay_ms=mv.batch_delay_ms,
                cache=self.processor.cache)
            self._reroute()
            await self.manager.ensure(mv)
        if wait:
            await self.wait_ready(mv.name, mv.version, timeout_s=timeout_s)
        return mv

    async def link(self, app_name: str, model_name: str, version: str | None = None) -> str:
        """Link a model to an application; returns the link's name.

        Without ``version`` the model's current version answers (and follows
        rollbacks); with one, that version does. An application with several
        links asks its selection policy which of them answer each query.
        """
        async with self._lock:
            name = self.registry.link(app_name, model_name, version)
            self._reroute()
            return name

    async def unlink(self, app_name: str, link_name: str) -> None:
        async with self._lock:
            self.registry.unlink(app_name, link_name)
            self._reroute()

    async def set_replicas(self, model_name: str, version: str, replicas: int) -> None:
        async with self._lock:
            mv = self.registry.get_model_version(model_name, version)
            probe = ModelVersion(mv.name, mv.version, mv.input_dtype, mv.input_shape, replicas=replicas)
            mv.replicas = probe.replicas
            await self.manager.ensure(mv)

    async def wait_ready(self, model_name: str, version: str | None = None, replicas: int | None = None,
                         timeout_s: float | None = None) -> None:
        """Wait until ``replicas`` (default: the deployed count, at least 1) containers are connected."""
        model = self.registry.get_model(model_name)
        mv = model.versions[str(version)] if version is not None else model.current
        if mv is None:
            raise InvalidConfigError(f"model {model_name!r} has no current version")
        n = replicas if replicas is not None else max(1, mv.replicas)
        timeout = timeout_s if timeout_s is not None else self.config.container_start_timeout_ms / 1000
        ready = self.rpc.wait_for_replicas(mv.key, n)
        failed = self._failures[mv.key] = self.loop.create_future()
        try:
            done, _ = await asyncio.wait({ready, failed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            failed.cancel()
            self._failures.pop(mv.key, None)
        if ready in done:
            return
        if failed in done:
            rc, text = failed.result()
            raise NoModelAvailableError(f"a container of model {mv.key} exited with code {rc} before it was "
                                        f"ready: {text or '(no message)'}")
        raise NoModelAvailableError(
            f"model {mv.key}: {self.rpc.count(mv.key)} of {n} containers connected after {timeout:g} s; "
            f"processes: {self.manager.stats().get(mv.key)}")

    def _container_failed(self, key: str, rc: int, text: str) -> None:
        from .rpc.messages import EXIT_LOAD_FAILED, EXIT_REJECTED

        fut = self._failures.get(key)
        if fut is not None and not fut.done() and rc in (EXIT_LOAD_FAILED, EXIT_REJECTED):
            fut.set_result((rc, text))

    def _reroute(self) -> None:
        """Point each application at the queue of its linked model's current version,
        and give each queue its latency budget."""
        slo_by_queue: dict[str, float] = {}
        for name, route in self.processor.routes.items():
            links = []
            for link_name in self.registry.links.get(name, ()):
                mv = self.registry.resolve_link(link_name)
                links.append((link_name, self.processor.queues.get(mv.key) if mv is not None else None))
            route.set_links(links)
            served = [route.queue] if route.simple else [q for _, q in links]
            for queue in served:
                if queue is not None:
                    slo = route.app.slo_ms
                    slo_by_queue[queue.key] = min(slo, slo_by_queue.get(queue.key, slo))
        for model in self.registry.models.values():
            for mv in model.versions.values():
                queue = self.processor.queues.get(mv.key)
                if queue is None:
                    continue
                if mv.latency_budget_ms is not None:
                    budget_ms = mv.latency_budget_ms
                else:  # unrouted queues keep the budget of the default SLO
                    budget_ms = self.config.batch_budget_fraction * slo_by_queue.get(mv.key, 100.0)
                queue.set_budget(int(budget_ms * 1_000_000))

    def _resolve_container(self, model: str, version: str):
        try:
            mv = self.registry.get_model_version(model, version)
        except ClipperError as exc:
            raise ClipperError(f"model {model}:{version} is not deployed on this frontend ({exc.message})") from None
        return self.processor.queues[mv.key], mv

    async def apply(self, spec: dict, base_dir: Path | None = None) -> None:
        """Apply a deployment spec (from :func:`clipper.config.load_config_file`)."""
        base = Path(base_dir or spec.get("base_dir") or self.base_dir)
        for a in spec.get("applications", []):
            await self.register_application(_make(Application, a, "application"))
        for mdict in spec.get("models", []):
            mdict = dict(mdict)
            mdict.setdefault("workdir", str(base))
            await self.deploy_model(_make(ModelVersion, mdict, "model"))
        for link in spec.get("links", []):
            try:
                await self.link(link["app"], link["model"], link.get("version"))
            except (KeyError, TypeError):
                raise InvalidConfigError(f"a link must be {{app = ..., model = ..., version = ...?}}, got {link!r}") from None

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        return {
            "version": __version__,
            "ports": {"query": self.query_port, "admin": self.admin_port, "rpc": self.rpc_port},
            "connections": len(self.query_server.connections) if self.query_server else 0,
            "applications": {n: {**a.to_dict(), "linked_models": self.registry.links.get(n, [])}
                             for n, a in self.registry.applications.items()},
            "models": {n: {"current_version": m.current_version,
                           "versions": {v: mv.to_dict() for v, mv in m.versions.items()}}
                       for n, m in self.registry.models.items()},
            "replicas": self.rpc.stats(),
            "processes": self.manager.stats(),
            "traffic": self.processor.stats(),
        }


def _make(cls, data: dict, what: str):
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise InvalidConfigError(f"unknown key(s) {sorted(unknown)} for {what}; known: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise InvalidConfigError(f"{what} {data.get('name')!r}: {exc}") from None
