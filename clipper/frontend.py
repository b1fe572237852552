"""The frontend: one process, one event loop, every part of the query path.

>>> async with Frontend(FrontendConfig(query_port=0, rpc_port=0, admin_port=0)) as fe:
...     await fe.register_application(Application("digits", "float64", [64], slo_ms=50))
...     await fe.deploy_model(ModelVersion("logreg", "1", "float64", [64], entry="model.py:Model"))
...     await fe.link("digits", "logreg")
...     await fe.wait_ready("logreg")
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import FrontendConfig
from .errors import ClipperError, InvalidConfigError, NoModelAvailableError, StateUnavailableError
from .management.local_manager import LocalProcessManager
from .management.registry import Application, ModelVersion, Registry
from .query.batching import ModelQueue
from .query.processor import AppRoute, QueryProcessor
from .rpc.server import ContainerServer
from .server._connection import ByteBudget
from .server.query_server import QueryServer

if TYPE_CHECKING:  # imported where they are made, at start
    from .management.admin_http import AdminServer
    from .management.kubernetes_manager import KubernetesManager
    from .management.registry import Model
    from .metrics import MetricsServer
    from .security import ApiKeyRegistry
    from .security.container_keys import ContainerGrant, ContainerKeyring
    from .server.rest import RestServer
    from .store.base import StateStore

log = logging.getLogger("clipper.frontend")

__all__ = ["Frontend"]

# True in the task applying what the shared store says (sync_registry): its changes are not written back.
# A context variable, not a flag: a management request running meanwhile in another task still writes its own.
_APPLYING = contextvars.ContextVar("clipper_applying_store", default=False)


class Frontend:
    """Clipper's frontend: query server, query processor, container RPC, manager."""

    def __init__(self, config: FrontendConfig | None = None, *, base_dir: str | Path | None = None) -> None:
        self.config = config or FrontendConfig()
        self.base_dir = Path(base_dir) if base_dir else Path.cwd()
        self.registry = Registry()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.processor: QueryProcessor | None = None
        self.rpc: ContainerServer | None = None
        self.manager: LocalProcessManager | KubernetesManager | None = None
        self.query_server: QueryServer | None = None
        self.rest: RestServer | None = None
        self.admin: AdminServer | None = None
        self.metrics: MetricsServer | None = None
        self.partial_budget: ByteBudget | None = None  # bytes of unfinished frames and request bodies, all ports
        self.query_port: int | None = None
        self.rest_port: int | None = None
        self.admin_port: int | None = None
        self.metrics_port: int | None = None
        self.rpc_port: int | None = None
        self._lock = asyncio.Lock()
        self._started = False
        self._failures: dict[str, asyncio.Future] = {}  # model key -> set when a container of it fails to start
        self._next_deployment_id = 1  # names each deployed model version in the prediction cache
        self.store: StateStore | None = None
        self._scratch: str | None = None  # a temporary folder (closures and secrets of a frontend without a state file)
        self._ipc_dir: str | None = None  # the private folder of the local containers' Unix socket
        self._rpc_public_host = "localhost"  # set at start when the RPC port listens on a wildcard address
        self.keyring: ContainerKeyring | None = None  # the container RPC's credentials, once started
        self.api_keys: ApiKeyRegistry | None = None  # the query ports' API keys, once started
        self._restoring = False
        self._origin = os.urandom(8).hex().encode()  # this frontend, in the shared store's change feed
        self._sync_task: asyncio.Task | None = None  # a catch-up with the shared store, running
        self._sync_again = False  # ... and another change was announced while it ran
        self.syncs = 0  # catch-ups done
        self._generation = 0  # local registry changes written so far
        self._served_by: dict[str, tuple] = {}  # application -> (the queue keys it sends queries to, its SLO)
        self._slos: dict[str, Counter] = {}  # queue key -> how many of the applications it serves have each SLO

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> "Frontend":
        """Open the state store, bind every port, start the containers the registry remembers.

        A start that fails half-way closes what it opened (threads, sockets,
        temporary folders holding secrets) before the error goes up.
        """
        try:
            return await self._start()
        except BaseException:
            await self._teardown()
            raise

    async def _start(self) -> "Frontend":
        cfg = self.config
        cfg.check_security()
        self.loop = asyncio.get_running_loop()
        from .security import ApiKeyRegistry, query_tls_context
        from .security.container_keys import ContainerKeyring
        from .store.redis import RedisStore, is_redis_url
        from .store.sqlite import SQLiteStore

        lim = cfg.limits
        tls = query_tls_context(cfg, self.base_dir)  # first: a bad certificate or key file stops the start here
        if is_redis_url(cfg.state_path):  # shared by every frontend pointed at the same server
            self.store = RedisStore(cfg.state_path)
        else:
            self.store = SQLiteStore(self._state_path(), background=True)  # writes off the event loop
        self.keyring = ContainerKeyring.open(cfg.rpc_security, self.secrets_dir())
        if cfg.local_containers != "own":  # a --workers group: the leader's children serve every member
            # (Published whatever context the manager's task was made in: a replica started because of a change
            # applied from the store still has new credentials the members must learn.)
            publish = getattr(self.store, "publish", None)
            if publish is None:
                raise InvalidConfigError(f"local_containers {cfg.local_containers!r} needs a shared state store "
                                         "(redis://...)")
            self.keyring.share_local(lambda: publish(self._CHANGES, self._origin),
                                     leader=cfg.local_containers == "leader")
        self.keyring.attach_store(self.store)
        self.api_keys = ApiKeyRegistry(self.store)  # managed always; checked on the query ports if required
        keys = self.api_keys if cfg.require_api_keys else None
        self.processor = QueryProcessor(self.loop, lim.max_input_bytes, lim.cache_bytes, store=self.store,
                                        state_flush_ms=cfg.state_flush_ms, feedback_timeout_ms=cfg.feedback_timeout_ms,
                                        state_load_timeout_ms=cfg.state_load_timeout_ms,
                                        max_user_id_len=lim.max_user_id_len, max_user_states=lim.max_user_states,
                                        max_user_states_in_memory=lim.max_user_states_in_memory,
                                        deadline_margin_ms=cfg.deadline_margin_ms,
                                        adaptive_margin=cfg.adaptive_deadline_margin,
                                        admission=cfg.admission_control,
                                        admission_wait_batches=cfg.admission_wait_batches,
                                        admission_standing_ms=cfg.admission_standing_ms,
                                        default_refusal_hold=cfg.default_refusal_hold,
                                        max_inflight_bytes=lim.max_inflight_input_bytes)
        ipc_dir: str | None = None
        if cfg.local_rpc_transport == "ipc" and cfg.rpc_security == "curve" and cfg.rpc_ipc_dir:
            from .security.files import private_dir

            ipc_dir = str(private_dir(cfg.rpc_ipc_dir))  # given (a --workers group): its owner removes it
        elif cfg.local_rpc_transport == "ipc" and cfg.rpc_security == "curve":
            import tempfile

            # A Unix socket path has a 107-byte limit: a short private folder (mkdtemp makes it 0700),
            # in /tmp when $TMPDIR is too long for one.
            short = len(tempfile.gettempdir()) > 60
            ipc_dir = self._ipc_dir = tempfile.mkdtemp(prefix="clipper-rpc-", dir="/tmp" if short else None)
        self.rpc = ContainerServer(self.loop, cfg.rpc_address, self._resolve_container,
                                   heartbeat_interval_ms=cfg.heartbeat_interval_ms,
                                   heartbeat_timeout_ms=cfg.heartbeat_timeout_ms,
                                   batch_timeout_ms=cfg.batch_timeout_ms, keyring=self.keyring, ipc_dir=ipc_dir,
                                   max_message_bytes=lim.max_rpc_message_bytes)
        self.rpc.start()
        self.rpc_port = self.rpc.port
        rpc_addr = f"tcp://{cfg.rpc_host}:{self.rpc_port}"
        if not cfg.rpc_host or cfg.rpc_host in ("0.0.0.0", "::", "*"):
            import socket

            # The name other hosts know this one by, for the credentials it issues (DNS: off the loop).
            self._rpc_public_host = await self.loop.run_in_executor(None, socket.getfqdn)
        local_addr, mechanism = self.rpc.local_endpoint
        if local_addr.startswith("tcp://"):
            local_addr = rpc_addr  # the bound name, not the address ZeroMQ resolved it to
        if cfg.container_manager == "kubernetes":  # a Deployment per model version (docs/deploy.md)
            from .management.kubernetes_manager import KubernetesManager

            self.manager = KubernetesManager.from_config(cfg, keyring=self.keyring, store=self.store)
        else:
            self.manager = LocalProcessManager(
                self.loop, local_addr, self._process_exited, keyring=self.keyring, mechanism=mechanism,
                base_dir=self.base_dir, backoff_ms=cfg.restart_backoff_ms,
                peers=cfg.peer_rpc_addresses if cfg.local_containers == "leader" else (),
                runs=cfg.local_containers != "member")
        self.manager.on_failure = self._container_failed
        self.rpc.on_hung = self._replica_hung
        self.partial_budget = ByteBudget(lim.max_partial_frame_bytes)
        self.query_server = QueryServer(self.loop, self.processor, cfg.limits, f"clipper/{__version__}", keys,
                                        partial_budget=self.partial_budget)
        self.query_server.reuse_port = bool(cfg.reuse_port)
        if cfg.query_port is not None:
            self.query_port = await self.query_server.start(cfg.host, cfg.query_port, ssl=tls)
        if cfg.rest_port is not None:
            from .server.rest import RestServer

            self.rest = RestServer(self.loop, self.processor, cfg.limits, self.not_ready, keys,
                                   partial_budget=self.partial_budget)
            self.rest.reuse_port = bool(cfg.reuse_port)
            self.rest_port = await self.rest.start(cfg.host, cfg.rest_port, ssl=tls)
        if cfg.metrics_port is not None:
            from .metrics import MetricsServer

            self.metrics = MetricsServer(self)
            self.metrics_port = await self.metrics.start(cfg.host, cfg.metrics_port)
        if cfg.admin_port is not None:
            from .management.admin_http import AdminServer

            self.admin = AdminServer(self)
            self.admin.reuse_port = bool(cfg.reuse_port)
            self.admin_port = await self.admin.start(cfg.admin_host, cfg.admin_port)
        self._started = True
        await self._restore_registry()
        subscribe = getattr(self.store, "subscribe", None)
        if subscribe is not None:  # other frontends on this store: their changes reach this one
            subscribe(self._CHANGES, self._on_change)
        log.info("clipper frontend: msgpack port %s, REST port %s, admin port %s, metrics port %s, container RPC %s",
                 self.query_port, self.rest_port, self.admin_port, self.metrics_port, rpc_addr)
        return self

    async def drain(self, timeout_s: float | None = None) -> int:
        """Stop taking queries and answer the ones in flight (SIGTERM).

        The query ports stop accepting connections; requests arriving on open
        connections get SHUTTING_DOWN; what waits is answered as usual for up
        to ``timeout_s`` (default ``drain_timeout_ms``), and whatever still
        waits then gets SHUTTING_DOWN. Containers keep running until
        :meth:`stop`. Returns how many requests the timeout cut short.
        """
        if self.processor is None:
            return 0
        if timeout_s is None:
            timeout_s = self.config.drain_timeout_ms / 1000
        for server in (self.query_server, self.rest):
            if server is not None:
                server.stop_accepting()
        cut = await self.processor.drain(timeout_s)
        for _ in range(2):  # the answers just made are written on the next turns of the loop
            await asyncio.sleep(0)
        if cut:
            log.warning("drain: %d requests were still waiting after %g s; they were answered SHUTTING_DOWN",
                        cut, timeout_s)
        return cut

    async def stop(self) -> None:
        """Answer what is in flight (SHUTTING_DOWN for what has not been answered: call :meth:`drain`
        first to give it time), stop the containers, close every port."""
        if not self._started:
            return
        await self.drain(0)
        self._started = False
        await self._teardown()

    async def _teardown(self) -> None:
        """Close whatever parts exist (all of them after a start, some after a failed one)."""
        self._started = False
        if self._sync_task is not None and not self._sync_task.done():
            self._sync_task.cancel()
            try:
                await self._sync_task
            except BaseException:
                pass
        if self.admin is not None:
            await self.admin.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self.rest is not None:
            await self.rest.close()
        if self.query_server is not None:
            await self.query_server.close()
        if self.manager is not None:
            await self.manager.close()
        if self.processor is not None:
            for route in self.processor.routes.values():
                route.close()
            for queue in self.processor.queues.values():
                queue.close()
        if self.rpc is not None:
            self.rpc.close()
        elif self.keyring is not None:
            self.keyring.stop()
        if self.processor is not None:
            self.processor.close()  # saves the policy states not yet written
        if self.store is not None:
            self.store.close()
        import shutil

        for folder in (self._ipc_dir, self._scratch):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        self._ipc_dir = self._scratch = None

    # ------------------------------------------------------------ the registry across restarts
    # One value per application, model version, model (its current version) and application's links:
    # a change writes only what it changed (O(1) per operation, whatever the registry's size), and the
    # store's writer thread commits it off the event loop.
    _NS_APP = "registry/app"
    _NS_VERSION = "registry/version"
    _NS_CURRENT = "registry/current"
    _NS_LINKS = "registry/links"
    _LEGACY_NS = "registry"  # one JSON snapshot of everything (before per-entry values)
    _NS_META = "registry/meta"  # ("registry", b"kept"): the store holds a registry, even an empty one

    def _persist(self, *, apps=(), links=(), versions=(), currents=(), drop_apps=(), drop_links=(),
                 drop_versions=(), drop_currents=()) -> None:
        """Write the registry entries a change touched (names: applications, models; ModelVersions)."""
        if self._restoring or self.store is None or _APPLYING.get():
            return
        import json

        self._generation += 1  # a catch-up reading the store meanwhile must read again

        reg = self.registry
        items = []
        for name in apps:
            items.append((self._NS_APP, name, json.dumps(reg.applications[name].to_dict()).encode()))
        for name in links:
            items.append((self._NS_LINKS, name, json.dumps(list(reg.links.get(name, ()))).encode()))
        for mv in versions:
            items.append((self._NS_VERSION, mv.key, json.dumps(mv.to_dict()).encode()))
        for name in currents:
            model = reg.models.get(name)
            items.append((self._NS_CURRENT, name,
                          json.dumps({"version": model.current_version if model else None}).encode()))
        # A mark that the store holds a registry (however empty): a store without it lost its data.
        items.append((self._NS_META, "registry", b"kept"))
        self.store.save_many(items)
        for ns, keys in ((self._NS_APP, drop_apps), (self._NS_LINKS, drop_links), (self._NS_VERSION, drop_versions),
                         (self._NS_CURRENT, drop_currents)):
            for key in keys:
                self.store.delete(ns, key)
        publish = getattr(self.store, "publish", None)
        if publish is not None:  # a shared store: the other frontends catch up (sync_registry)
            publish(self._CHANGES, self._origin)

    def _saved_registry(self) -> dict | None:
        """What the store holds, as ``{"applications", "models", "links"}`` (None: nothing)."""
        import json

        store = self.store
        assert store is not None
        everything = 10**9

        def values(ns):
            out = []
            for key in reversed(store.keys(ns, everything)):  # oldest first: the order they were made in
                raw = store.load(ns, key)
                try:
                    out.append((key, json.loads(raw)))  # type: ignore[arg-type]  # None (gone since): TypeError
                except (TypeError, ValueError):
                    log.error("ignoring the registry entry %s/%s of %s: not JSON", ns, key, store)
            return out

        apps = values(self._NS_APP)
        versions = values(self._NS_VERSION)
        if not apps and not versions:
            raw = store.load(self._LEGACY_NS, "snapshot")
            if raw is None:
                return None
            try:
                snap = json.loads(raw)
            except ValueError:
                log.error("the registry saved in %s is not JSON; starting empty", store)
                return None
            snap["legacy"] = True
            return snap
        currents = dict(values(self._NS_CURRENT))
        models: dict[str | None, dict] = {}  # (a version without a name is refused when it is restored)
        for _, v in versions:
            name = v.get("name") if isinstance(v, dict) else None
            models.setdefault(name, {"name": name, "versions": [],
                                     "current_version": (currents.get(name) or {}).get("version")})
            models[name]["versions"].append(v)
        return {"applications": [a for _, a in apps], "models": list(models.values()),
                "links": {app: names for app, names in values(self._NS_LINKS)}}

    async def _restore_registry(self) -> None:
        """Bring back what the state store remembers: applications, model versions, links.

        An entry that cannot come back (say, a policy module that is gone) is
        logged and left in the store, to be tried again at the next start.
        """
        snap = self._saved_registry()
        if snap is None:
            return
        self._restoring = True
        failed = 0
        try:
            for a in snap.get("applications", []):
                failed += not await self._restore_step(
                    f"application {a.get('name')!r}",
                    lambda a=a: self.register_application(_make(Application, a, "application")))
            for m in snap.get("models", []):
                for v in m.get("versions", []):
                    failed += not await self._restore_step(
                        f"model {m.get('name')}:{v.get('version')}",
                        lambda v=v: self.deploy_model(_make(ModelVersion, v, "model"), make_current=False))
                model = self.registry.models.get(m.get("name"))
                current = m.get("current_version")
                if model is not None:  # as saved: None stays None
                    model.current_version = current if current in model.versions else None
            for app, names in snap.get("links", {}).items():
                for link in names if isinstance(names, list) else ():
                    failed += not await self._restore_step(f"link {app} -> {link}", lambda a=app, n=link: self.link(a, n))
            self._reroute()
        finally:
            self._restoring = False
        if failed:
            log.error("%d registry entries could not be restored; they stay in %s for the next start", failed,
                      self.store)
        if snap.get("legacy"):  # written again entry by entry; the old snapshot goes once that is done
            reg = self.registry
            self._persist(apps=list(reg.applications), links=list(reg.links),
                          versions=[mv for m in reg.models.values() for mv in m.versions.values()],
                          currents=list(reg.models))
            if not failed:
                assert self.store is not None
                self.store.delete(self._LEGACY_NS, "snapshot")
        log.info("restored %d applications and %d models from %s", len(self.registry.applications),
                 len(self.registry.models), self.store)

    # ------------------------------------------------------------ several frontends, one shared store
    _CHANGES = "registry-changes"

    def _on_change(self, data) -> None:
        """(The store's thread.) Another frontend changed the registry, or the feed was (re)connected."""
        if data is not None and data == self._origin:
            return  # this frontend's own change
        assert self.loop is not None  # (subscribed at start)
        try:
            self.loop.call_soon_threadsafe(self._schedule_sync)
        except RuntimeError:  # the loop is closed
            pass

    def _schedule_sync(self) -> None:
        if not self._started or self.processor is None or self.processor.draining:
            return
        if self._sync_task is not None and not self._sync_task.done():
            self._sync_again = True  # once this catch-up ends, one more (it may have read too early)
            return
        assert self.loop is not None
        self._sync_task = self.loop.create_task(self.sync_registry())

    async def sync_registry(self) -> None:
        """Catch up with what the shared store says the registry is (another frontend's changes):
        applications, model versions (this frontend runs their replicas itself), current versions and
        links added, changed or removed. The store is read off the event loop."""
        store, api_keys, keyring = self.store, self.api_keys, self.keyring
        assert self.loop is not None and store is not None and api_keys is not None and keyring is not None
        while True:
            self._sync_again = False
            generation = self._generation
            try:
                snap, kept = await self.loop.run_in_executor(
                    None, lambda: (self._saved_registry(), store.load(self._NS_META, "registry")))
            except ClipperError as exc:
                log.warning("cannot catch up with %s: %s", self.store, exc.message)
                return
            if self._generation != generation:
                continue  # this frontend changed something while the store was read: read again
            try:
                keys = await self.loop.run_in_executor(None, self._saved_keys)
            except ClipperError as exc:
                log.warning("cannot catch up with %s: %s", self.store, exc.message)
                return
            api_keys.sync_stored(keys["api_keys"])  # issued and revoked elsewhere
            keyring.sync_stored(keys["credentials"])
            if snap is None and kept is None:
                # The store holds no registry at all, not even the mark of one (a Redis that restarted without
                # its data, say): that is not "everything was deleted". What this frontend knows is written
                # again for the others.
                if self.registry.applications or self.registry.models:
                    log.warning("the state store %s holds no registry: writing this frontend's again", self.store)
                    self._persist_all()
                return
            snap = snap or {"applications": [], "models": [], "links": {}}  # (everything was removed)
            await self._apply_snapshot(snap, generation)
            self.syncs += 1
            if not self._sync_again and self._generation == generation:
                return

    def _saved_keys(self) -> dict:
        """(Off the loop.) The API keys and operator container credentials the store holds: id -> value."""
        from .security.api_keys import API_KEYS_NAMESPACE
        from .security.container_keys import STORE_NAMESPACE

        store = self.store
        assert store is not None
        out = {}
        for what, ns in (("api_keys", API_KEYS_NAMESPACE), ("credentials", STORE_NAMESPACE)):
            out[what] = {k: store.load(ns, k) for k in store.keys(ns, 1_000_000)}
        return out

    def announce(self) -> None:
        """Tell the other frontends on a shared store that something changed here (API keys and container
        credentials write the store themselves; registry changes announce in ``_persist``)."""
        publish = getattr(self.store, "publish", None)
        if publish is not None and not _APPLYING.get():
            publish(self._CHANGES, self._origin)

    def _persist_all(self) -> None:
        reg = self.registry
        self._persist(apps=list(reg.applications), links=list(reg.links),
                      versions=[mv for m in reg.models.values() for mv in m.versions.values()],
                      currents=list(reg.models))

    async def _apply_snapshot(self, snap: dict, generation: int) -> None:
        """Make the registry what ``snap`` says, step by step; stop as soon as this frontend changes
        something itself (its change is newer than the snapshot: the caller reads again)."""
        reg = self.registry
        assert self.manager is not None
        model: Model | None  # (each loop below binds it)
        token = _APPLYING.set(True)  # what is applied is what the store holds: nothing to write back

        async def step(what: str, make) -> bool:
            if self._generation != generation:  # a change of this frontend's own came in: it is newer
                return False
            return await self._restore_step(what, make)

        try:
            saved_apps: dict[Any, dict] = {a.get("name"): a for a in snap.get("applications", [])
                                           if isinstance(a, dict)}
            for name in list(reg.applications):
                saved = saved_apps.get(name)
                if saved is None or saved != _plain(reg.applications[name].to_dict()):  # gone, or registered anew
                    await step(f"removing application {name!r}", lambda n=name: self.unregister_application(n))
            for name, a in saved_apps.items():
                if name not in reg.applications:
                    await step(f"application {name!r}", lambda a=a: self.register_application(
                        _make(Application, a, "application")))
            saved_versions: dict[tuple[Any, str], dict] = {}
            for m in snap.get("models", []):
                for v in m.get("versions", []):
                    if isinstance(v, dict):
                        saved_versions[(v.get("name"), str(v.get("version")))] = v
            for model in list(reg.models.values()):
                for ver, mv in list(model.versions.items()):
                    saved = saved_versions.get((model.name, ver))
                    same = saved is not None and {k: v for k, v in saved.items() if k != "replicas"} == {
                        k: v for k, v in _plain(mv.to_dict()).items() if k != "replicas"}
                    if not same:  # gone, or deployed anew with another definition
                        await step(f"removing model {model.name}:{ver}",
                                   lambda n=model.name, v=ver: self.delete_model(n, v))
            for (name, ver), v in saved_versions.items():
                model = reg.models.get(name)
                mine = model.versions.get(ver) if model is not None else None
                if mine is None:
                    await step(f"model {name}:{ver}", lambda v=v: self.deploy_model(
                        _make(ModelVersion, v, "model"), make_current=False))
                elif isinstance(v.get("replicas"), int) and v["replicas"] != mine.replicas:
                    await step(f"replicas of {name}:{ver}",
                               lambda n=name, ver=ver, r=v["replicas"]: self.set_replicas(n, ver, r))
            for m in snap.get("models", []):
                model = reg.models.get(m.get("name"))
                current = m.get("current_version")
                if model is None or current not in model.versions or current == model.current_version:
                    continue
                mv = model.versions[current]
                if model.current_version is not None and mv.replicas > 0 and self.manager.manages(mv):
                    # Switch once this frontend's own replicas of it are up (as the deploy did where it was
                    # made); until then the version serving here goes on serving.
                    try:
                        await self.wait_ready(model.name, current,
                                              timeout_s=self.config.container_start_timeout_ms / 1000)
                    except ClipperError as exc:
                        log.error("not switching model %s to version %s here: %s", model.name, current, exc.message)
                        continue
                await step(f"current version of {model.name}",
                           lambda n=model.name, c=current: self.set_model_version(n, c))
            saved_links = snap.get("links", {})
            for app in list(reg.applications):
                want = [x for x in saved_links.get(app, []) if isinstance(x, str)]
                have = list(reg.links.get(app, ()))
                if want == have:
                    continue
                for link in [x for x in have if x not in want]:
                    await step(f"unlink {app} -> {link}", lambda a=app, n=link: self.unlink(a, n))
                for link in [x for x in want if x not in reg.links.get(app, ())]:
                    await step(f"link {app} -> {link}", lambda a=app, n=link: self.link(a, n))
            self._reroute()
        finally:
            _APPLYING.reset(token)

    async def _restore_step(self, what: str, make) -> bool:
        try:
            await make()
            return True
        except ClipperError as exc:  # one bad entry (say, a policy module that is gone) does not stop the rest
            log.error("cannot restore %s: %s", what, exc.message)
        except Exception as exc:
            log.exception("cannot restore %s: %s: %s", what, type(exc).__name__, exc)
        return False

    def _state_path(self) -> str:
        from .store.redis import is_redis_url

        path = self.config.state_path
        if path is None or path == ":memory:":
            return ":memory:"
        if is_redis_url(path):
            return path
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else self.base_dir / p)

    async def __aenter__(self) -> "Frontend":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # ------------------------------------------------------------ management
    async def register_application(self, app: Application) -> Application:
        """Register ``app``; queries to it are accepted from now on."""
        assert self.processor is not None
        async with self._lock:
            self.registry.add_application(app)
            route = self.processor.routes[app.name] = AppRoute(app, self.processor)
            self.processor.route_added(route)
            self._reroute([app.name])
            self._persist(apps=[app.name], links=[app.name])
            return app

    async def unregister_application(self, name: str) -> Application:
        """Remove an application: its endpoint, links and policy states.

        Queries of it still waiting are answered now (default output or error), not left behind.
        """
        assert self.processor is not None
        async with self._lock:
            app = self.registry.remove_application(name)
            route = self.processor.routes.pop(name, None)
            if route is not None:
                route.close(drain=True)
                self.processor.route_removed()
            self.processor.drop_states(name, in_store=not _APPLYING.get())
            self._reroute([name])
            self._persist(drop_apps=[name], drop_links=[name])
            return app

    async def deploy_model(self, mv: ModelVersion, *, make_current: bool = True, wait: bool = False,
                           timeout_s: float | None = None) -> ModelVersion:
        """Deploy a model version and start its containers (if it has an entry or command).

        With ``wait``, return once its replicas have connected; if its
        containers cannot start (the entry does not load, a closure's Python
        or cloudpickle version does not match), the deployment is removed
        again and the error names why.
        """
        assert self.manager is not None
        waits = wait and mv.replicas > 0 and self.manager.manages(mv)
        async with self._lock:
            known = self.registry.models.get(mv.name)
            # With wait, a new version of a model that is serving becomes current only once it is
            # ready: applications keep the old one meanwhile, and keep it if the new one fails.
            switch_later = waits and make_current and known is not None and known.current_version is not None
            self._add_version(mv, make_current and not switch_later)
            self._reroute(self._apps_linking(mv.name))
            self._persist(versions=[mv], currents=[mv.name])
            await self.manager.ensure(mv)
        if waits:
            try:
                await self.wait_ready(mv.name, mv.version, timeout_s=timeout_s)
            except NoModelAvailableError:
                await self.delete_model(mv.name, mv.version)
                raise
            if switch_later:
                await self.set_model_version(mv.name, mv.version)
        return mv

    def _add_version(self, mv: ModelVersion, make_current: bool) -> None:
        assert self.processor is not None and self.rpc is not None
        self.registry.add_model_version(mv, make_current=make_current)
        lim = self.config.limits
        deployment_id = self._next_deployment_id  # a fresh one: a redeployed version never meets old cache entries
        self._next_deployment_id += 1
        self.processor.queues[mv.key] = ModelQueue(
            mv.key, self.loop, self.rpc.send_batch, deployment_id=deployment_id,
            max_queue_length=lim.max_queue_length, max_queue_bytes=lim.max_queue_bytes,
            max_batch_retries=lim.max_batch_retries,
            max_batch=mv.max_batch, batching=mv.batching, batch_delay_ms=mv.batch_delay_ms,
            cache=self.processor.cache, batches_in_flight=self.config.batches_in_flight,
            on_answered=self._flush_answers)

    def _flush_answers(self) -> None:
        """Write the msgpack port's queued replies now (a batch's answers are all settled)."""
        if self.query_server is not None:
            self.query_server.flush_dirty()

    async def deploy_closure(self, name: str, version: str, blob: bytes, input_dtype: str, input_shape=(),
                             **kw) -> ModelVersion:
        """Deploy a Python closure serialized by :func:`clipper.container.closure.dump_closure`.

        The blob is checked and saved under the state folder; its containers
        run ``closure:<file>``. Other keywords are :class:`ModelVersion`'s.
        """
        from .container.closure import closure_info

        from .management.registry import check_name, check_version

        check_name("model name", name)  # before they name a file
        version = check_version(version)
        known = self.registry.models.get(name)
        if known is not None and version in known.versions:
            raise InvalidConfigError(f"model {name}:{version} is already deployed")
        info = closure_info(blob)  # raises InvalidConfigError for a blob that is not a closure
        wait = kw.pop("wait", True)
        folder = self._closure_dir()
        path = folder / f"{name}-{version}-{info['sha256'][:16]}.closure"
        path.write_bytes(blob)
        mv = ModelVersion(name, version, input_dtype, input_shape, entry=f"closure:{path}",
                          closure={**info, "path": str(path)}, **kw)
        return await self.deploy_model(mv, wait=bool(wait))

    def _local_dir(self) -> Path:
        """Where this frontend keeps its files: beside its state file; with a Redis state store, its base
        folder (the config file's); a temporary folder when its state is not kept."""
        from .store.redis import is_redis_url

        state = self._state_path()
        if is_redis_url(state):
            return Path(self.base_dir)
        return Path(state).parent if state != ":memory:" else Path(self._scratch_dir())

    def _closure_dir(self) -> Path:
        folder = self._local_dir() / "clipper-closures"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def secrets_dir(self) -> Path:
        """Where the frontend keeps its credentials: ``clipper-secrets/`` (0700) beside the state file,
        or in a temporary folder for a frontend whose state is not kept."""
        return self._local_dir() / "clipper-secrets"

    def _process_exited(self, grant: ContainerGrant, returncode) -> None:
        """The manager saw a child exit: its credentials go, and with them its replica."""
        if self.keyring is not None and self.keyring.get(grant.id) is grant:
            self.keyring.revoke(grant.id, f"exited (return code {returncode})")

    def _replica_hung(self, replica) -> None:
        """A replica held a batch too long and was dropped; stop its process if the manager started it."""
        grant = replica.grant
        if grant is not None and grant.origin == "manager" and self.manager is not None:
            self.manager.kill(grant)

    def _scratch_dir(self) -> str:
        if self._scratch is None:
            import tempfile

            self._scratch = tempfile.mkdtemp(prefix="clipper-")
        return self._scratch

    async def delete_model(self, name: str, version: str | None = None) -> list[str]:
        """Remove one version (or, without ``version``, the whole model and its links).

        Its containers stop, queries waiting for it fail with NO_MODEL_AVAILABLE,
        its cache entries go, and applications re-route at once. Returns the
        removed versions' keys.
        """
        assert self.keyring is not None
        async with self._lock:
            linking = self._apps_linking(name)
            before = {a: list(self.registry.links.get(a, ())) for a in linking}
            if version is None:
                model = self.registry.get_model(name)
                mvs = list(model.versions.values())
                self.registry.remove_model(name)
            else:
                mvs = [self.registry.remove_model_version(name, str(version))]
                if not self.registry.models[name].versions:  # its last version: the model goes too
                    self.registry.remove_model(name)
            self._reroute(linking)
            gone = name not in self.registry.models
            try:
                self._persist(links=[a for a in linking if self.registry.links.get(a) != before[a]],
                              currents=() if gone else [name], drop_versions=[mv.key for mv in mvs],
                              drop_currents=[name] if gone else ())
            finally:  # (the registry no longer has them: their containers and queue go, whatever the store says)
                for mv in mvs:
                    await self._retire(mv, f"model {mv.key} was deleted")
            # Credentials issued for what is gone go too (a redeploy under the name needs new ones).
            if version is None or name not in self.registry.models:
                self.keyring.revoke_model(name, None, f"model {name} was deleted")
            else:
                self.keyring.revoke_model(name, str(version), f"model {name}:{version} was deleted")
            return [mv.key for mv in mvs]

    async def _retire(self, mv: ModelVersion, reason: str) -> None:
        assert self.manager is not None and self.processor is not None and self.rpc is not None
        await self.manager.remove(mv.key)  # no restarts from now on
        queue = self.processor.queues.pop(mv.key, None)
        self.rpc.drop_model(mv.key, reason)
        if queue is not None:
            queue.fail_all(NoModelAvailableError(reason))
            queue.close()
            if self.processor.cache is not None:
                self.processor.cache.invalidate(queue.deployment_id)

    # ------------------------------------------------------------ container credentials
    def issue_container_credentials(self, model: str, version: str | None = None, *, frontend: str | None = None,
                                    label: str = "") -> dict:
        """Credentials for a container started by hand (anywhere) to serve ``model`` (``version``, if given).

        Returns the credentials document (the secret key is in it, and only
        there: the frontend keeps the public half). ``frontend`` is the RPC
        address the container should dial, written into the document.
        """
        assert self.keyring is not None
        m = self.registry.get_model(model)
        if version is not None:
            self.registry.get_model_version(model, str(version))
        if self.keyring.mode != "curve":
            raise InvalidConfigError("this frontend runs with rpc_security = \"none\": containers need no "
                                     "credentials (and get no protection)")
        if frontend is not None and (not isinstance(frontend, str) or not frontend.startswith("tcp://")
                                     or len(frontend) > 1024):
            raise InvalidConfigError(f"frontend {frontend!r} is not an address like tcp://HOST:{self.rpc_port}")
        from .security.container_keys import ContainerCredentials

        grant, secret = self.keyring.issue(m.name, None if version is None else str(version), label=label)
        return ContainerCredentials.document(grant, secret, self.keyring.public_key,
                                             frontend or self._public_rpc_address())

    def revoke_container_credentials(self, credential_id: str) -> dict:
        """Revoke operator-issued credentials: the replicas holding them are dropped and told to exit."""
        assert self.keyring is not None
        grant = self.keyring.get(credential_id)
        if grant is None or grant.origin != "operator":
            raise InvalidConfigError(f"no container credentials with id {credential_id!r} "
                                     f"(see GET /api/v1/container-credentials)")
        return self.keyring.revoke(credential_id).describe()

    def _public_rpc_address(self) -> str:
        host = self.config.rpc_host
        if not host or host in ("0.0.0.0", "::", "*"):  # a wildcard: the name others know this machine by
            host = self._rpc_public_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"tcp://{host}:{self.rpc_port}"

    async def set_model_version(self, name: str, version: str) -> ModelVersion:
        """Make ``version`` the current one (roll back or forward).

        Applications following the model send their next query to it; queries
        already queued for the previous version are still answered by it.
        """
        async with self._lock:
            mv = self.registry.set_current(name, str(version))
            self._reroute(self._apps_linking(name))
            self._persist(currents=[name])
            return mv

    async def link(self, app_name: str, model_name: str, version: str | None = None) -> str:
        """Link a model to an application; returns the link's name.

        Without ``version`` the model's current version answers (and follows
        rollbacks); with one, that version does. An application with several
        links asks its selection policy which of them answer each query.
        """
        async with self._lock:
            name = self.registry.link(app_name, model_name, version)
            self._reroute([app_name])
            self._persist(links=[app_name])
            return name

    async def unlink(self, app_name: str, link_name: str) -> None:
        async with self._lock:
            self.registry.unlink(app_name, link_name)
            self._reroute([app_name])
            self._persist(links=[app_name])

    async def set_replicas(self, model_name: str, version: str, replicas: int) -> None:
        assert self.manager is not None
        async with self._lock:
            mv = self.registry.get_model_version(model_name, version)
            probe = ModelVersion(mv.name, mv.version, mv.input_dtype, mv.input_shape, replicas=replicas)
            mv.replicas = probe.replicas
            self._persist(versions=[mv])
            await self.manager.ensure(mv)

    async def wait_ready(self, model_name: str, version: str | None = None, replicas: int | None = None,
                         timeout_s: float | None = None) -> None:
        """Wait until ``replicas`` (default: the deployed count, at least 1) containers are connected."""
        assert self.rpc is not None and self.loop is not None and self.manager is not None
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

    def _apps_linking(self, model_name: str) -> list[str]:
        """The applications with a link to ``model_name`` (any version)."""
        return [app for app, names in self.registry.links.items()
                if any(n.partition(":")[0] == model_name for n in names)]

    def _reroute(self, apps=None) -> None:
        """Point applications at the queues of their linked models' current versions, and give
        those queues their latency budgets.

        ``apps``: the applications a change touched (None: every one, at a
        restore). Only they are re-linked, and only the queues they served or
        serve now get a new budget, so a change costs what it touches, not
        what the registry holds.
        """
        assert self.processor is not None
        routes = self.processor.routes
        names = list(routes) if apps is None else list(apps)
        touched: set[str] = set()
        slos = self._slos  # queue key -> Counter of the SLOs of the applications it serves
        for name in names:
            old = self._served_by.pop(name, None)
            if old is not None:
                old_keys, old_slo = old
                for key in old_keys:
                    touched.add(key)
                    count = slos.get(key)
                    if count is not None:
                        count[old_slo] -= 1
                        if count[old_slo] <= 0:
                            del count[old_slo]
            route = routes.get(name)
            if route is None:  # unregistered
                continue
            links = []
            for link_name in self.registry.links.get(name, ()):
                mv = self.registry.resolve_link(link_name)
                links.append((link_name, self.processor.queues.get(mv.key) if mv is not None else None))
            route.set_links(links)
            served = [route.queue] if route.simple else [q for _, q in links]
            keys = {q.key for q in served if q is not None}
            slo = route.app.slo_ms
            self._served_by[name] = (keys, slo)
            for key in keys:
                touched.add(key)
                slos.setdefault(key, Counter())[slo] += 1
        if apps is None:
            touched.update(self.processor.queues)
        for key in touched:
            queue = self.processor.queues.get(key)
            if queue is None:
                slos.pop(key, None)
                continue
            model_name, _, version = key.partition(":")
            model = self.registry.models.get(model_name)
            mv = model.versions.get(version) if model is not None else None
            if mv is not None and mv.latency_budget_ms is not None:
                budget_ms = mv.latency_budget_ms
            else:  # unrouted queues keep the budget of the default SLO
                count = slos.get(key)
                budget_ms = self.config.batch_budget_fraction * (min(count) if count else 100.0)
            queue.set_budget(int(budget_ms * 1_000_000))

    def _resolve_container(self, model: str, version: str):
        try:
            mv = self.registry.get_model_version(model, version)
        except ClipperError as exc:
            raise ClipperError(f"model {model}:{version} is not deployed on this frontend ({exc.message})") from None
        assert self.processor is not None
        return self.processor.queues[mv.key], mv

    async def apply(self, spec: dict, base_dir: Path | None = None) -> None:
        """Apply a deployment spec (from :func:`clipper.config.load_config_file`)."""
        base = Path(base_dir or spec.get("base_dir") or self.base_dir)
        # What the state store brought back stays as it is (it may have been changed since through
        # the admin API); the file adds what is not there yet.
        for a in spec.get("applications", []):
            app = _make(Application, a, "application")
            if app.name not in self.registry.applications:
                await self.register_application(app)
        for mdict in spec.get("models", []):
            mdict = dict(mdict)
            mdict.setdefault("workdir", str(base))
            mv = _make(ModelVersion, mdict, "model")
            known = self.registry.models.get(mv.name)
            if known is None or mv.version not in known.versions:
                await self.deploy_model(mv)
        for link in spec.get("links", []):
            try:
                await self.link(link["app"], link["model"], link.get("version"))
            except (KeyError, TypeError):
                raise InvalidConfigError(f"a link must be {{app = ..., model = ..., version = ...?}}, got {link!r}") from None

    # ------------------------------------------------------------ status
    def not_ready(self) -> list[str]:
        """Applications that cannot answer from a model now: ``"app: why"`` each (empty: ready)."""
        if self.processor is not None and self.processor.draining:
            return ["the frontend is shutting down"]
        assert self.processor is not None  # (asked by the REST port, made after the processor)
        out = []
        for name, route in self.processor.routes.items():
            queues = [q for _, q in route.links if q is not None]
            if not queues:
                out.append(f"{name}: no linked model with a deployed version")
            elif not any(q.replicas for q in queues):
                out.append(f"{name}: no connected replica of {', '.join(q.key for q in queues)}")
        return out

    async def check_store(self) -> None:
        """Raise StateUnavailableError unless the state store answers now (a shared store: a PING off the
        loop, bounded in time; the embedded one always does). Management changes call it first: a frontend
        that lost Redis keeps serving queries but takes no change the other frontends could not see."""
        ping = getattr(self.store, "ping", None)
        if ping is None:
            return
        try:
            await asyncio.wrap_future(ping())
        except Exception as exc:
            raise StateUnavailableError(
                f"the state store {self.store!r} does not answer ({type(exc).__name__}: {exc}); management "
                "changes are refused until it does (queries are still served)") from None
        store: Any = self.store  # (one with ping(): Redis, which counts the bytes of writes not yet applied)
        waiting = store.pending_bytes
        if waiting > store.max_pending_bytes // 2:  # a change now might not be taken: refused before
            raise StateUnavailableError(                   # anything changes
                f"the state store {self.store!r} is behind ({waiting} bytes of writes wait for it); management "
                "changes are refused until it catches up (queries are still served)")

    def status(self) -> dict:
        assert self.rpc is not None and self.manager is not None and self.processor is not None
        return {
            "version": __version__,
            "ports": {"query": self.query_port, "rest": self.rest_port, "admin": self.admin_port,
                      "metrics": self.metrics_port, "rpc": self.rpc_port},
            "connections": len(self.query_server.connections) if self.query_server else 0,
            "rest_connections": len(self.rest.connections) if self.rest else 0,
            "applications": {n: {**a.to_dict(), "linked_models": self.registry.links.get(n, [])}
                             for n, a in self.registry.applications.items()},
            "models": {n: {"current_version": m.current_version,
                           "versions": {v: mv.to_dict() for v, mv in m.versions.items()}}
                       for n, m in self.registry.models.items()},
            "replicas": self.rpc.stats(),
            "security": self.rpc.security_stats(),
            "processes": self.manager.stats(),
            "traffic": self.processor.stats(),
        }


def _plain(d: dict) -> dict:
    """``d`` as the store keeps it (JSON: tuples become lists), to compare with what the store says."""
    import json

    return json.loads(json.dumps(d))


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
