"""Frontend configuration: ports and every limit, each explicit and documented."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidConfigError
from .protocol.wire import DecodeLimits

# Default ports follow the original Clipper where one exists.
DEFAULT_REST_PORT = 1337
DEFAULT_ADMIN_PORT = 1338
DEFAULT_QUERY_PORT = 1339  # the msgpack port (the original had none)
DEFAULT_RPC_PORT = 7000
DEFAULT_METRICS_PORT = 1390


@dataclass
class Limits:
    """Limits on what one client or container may make the frontend hold.

    Every value is a hard bound: past it the request gets a typed error and
    the server goes on.
    """

    max_frame_bytes: int = 16 * 1024 * 1024  # one msgpack frame, prefix excluded
    max_input_bytes: int = 4 * 1024 * 1024  # one query input (array data, bytes or str)
    max_str_len: int = 1024 * 1024  # one msgpack string
    max_array_len: int = 1024 * 1024  # one msgpack array (also list inputs)
    max_map_len: int = 4096  # one msgpack map
    max_connections: int = 4096  # open client connections on the query port
    max_pending_per_connection: int = 65536  # requests of one connection awaiting answers
    max_write_buffer_bytes: int = 64 * 1024 * 1024  # unsent replies before reading pauses
    max_queue_length: int = 100_000  # queries waiting in one model's queue
    max_batch_retries: int = 1  # times a batch lost with its container is sent again
    cache_bytes: int = 32 * 1024 * 1024  # memory budget of the prediction cache (keys, outputs, overhead)
    max_user_id_len: int = 256  # characters of options.user (the user a policy state belongs to)
    max_user_states: int = 100_000  # policy states the store keeps per application (least recent go first)
    max_user_states_in_memory: int = 10_000  # policy states held in memory per application
    # One message from a model container (a batch's outputs); a larger one disconnects the container.
    max_rpc_message_bytes: int = 256 * 1024 * 1024
    # ---- byte budgets and time limits (issue 10: overload and abusive clients)
    max_inflight_input_bytes: int = 256 * 1024 * 1024  # inputs of every query not yet answered, frontend-wide
    max_queue_bytes: int = 64 * 1024 * 1024  # inputs waiting in one model's queue
    max_partial_frame_bytes: int = 128 * 1024 * 1024  # bytes of unfinished frames/requests held, frontend-wide
    max_unread_reply_bytes: int = 16 * 1024 * 1024  # a connection whose unsent replies pass this is closed
    write_stall_timeout_ms: int = 30_000  # a connection paused because it does not read is closed after this
    header_timeout_ms: int = 10_000  # a request's head (HTTP) or a frame (msgpack) must arrive within this
    idle_timeout_ms: int = 300_000  # a connection with nothing in flight and nothing sent for this long is closed
    max_header_bytes: int = 16 * 1024  # HTTP request line and headers
    max_batch_items: int = 1024  # REST input_batch items
    max_admin_connections: int = 64
    max_metrics_connections: int = 64
    max_pipelined_requests: int = 1024  # HTTP requests of one connection awaiting answers; then reading pauses
    metrics_cache_ms: int = 500  # a /metrics rendering is served again for this long (0: render every scrape)
    # msgpack objects one frame may decode into (elements, keys and values): a Python object is 56+ bytes,
    # so this bounds what a frame of nested empty arrays makes (65 times its size without it).
    max_decoded_objects: int = 2 * 1024 * 1024
    # A msgpack connection that sends this many HELLOs with a wrong api_key is closed (keys are 256-bit
    # random, so guessing is hopeless; the bound keeps a misbehaving client from spinning on the port).
    max_auth_failures_per_connection: int = 3
    tls_handshake_timeout_ms: int = 10_000  # a TLS client that has not finished its handshake by then is dropped

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            lo = 0 if f.name in ("max_batch_retries", "metrics_cache_ms") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise InvalidConfigError(f"limit {f.name} = {value!r} is not an integer >= {lo}")

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_frame_bytes=self.max_frame_bytes,
            max_str_len=self.max_str_len,
            max_bin_len=self.max_frame_bytes,
            max_array_len=self.max_array_len,
            max_map_len=self.max_map_len,
            max_ext_len=self.max_frame_bytes,
            max_objects=self.max_decoded_objects,
        )


@dataclass
class FrontendConfig:
    """Where the frontend listens and how it treats its containers.

    A port of 0 binds a free port (the tests use that); ``None`` disables the
    listener.
    """

    host: str = "127.0.0.1"  # where the query (msgpack, REST) and metrics ports listen
    admin_host: str = "127.0.0.1"  # the management API: loopback unless asked otherwise
    query_port: int | None = DEFAULT_QUERY_PORT
    rest_port: int | None = DEFAULT_REST_PORT  # HTTP/JSON queries
    admin_port: int | None = DEFAULT_ADMIN_PORT
    metrics_port: int | None = DEFAULT_METRICS_PORT  # Prometheus text format
    rpc_host: str = "127.0.0.1"
    rpc_port: int = DEFAULT_RPC_PORT
    heartbeat_interval_ms: int = 1000  # frontend <-> container heartbeats
    heartbeat_timeout_ms: int = 5000  # a container silent this long is dead
    batch_timeout_ms: int = 30_000  # a batch held longer marks its container hung
    # Batches a replica may hold at once: with 2, a second whole batch is sent while the first is out, so
    # the container starts it the moment it answers (no round trip idle between batches): for containers
    # on other hosts (a network round trip per batch) or machines with cores to spare. 1 (the default):
    # one at a time; on a 2-core machine the second batch gained no goodput (bench/README.md).
    batches_in_flight: int = 1
    container_start_timeout_ms: int = 60_000
    restart_backoff_ms: tuple[int, int] = (100, 5000)  # first and longest restart delay
    # A model's batch latency budget, when its deployment gives none: this
    # fraction of the smallest SLO among the applications it serves. A query
    # may wait for the batch in flight and then ride the next one, so half the
    # SLO keeps the worst case within it.
    batch_budget_fraction: float = 0.5
    # The state store (policy states): a SQLite file, relative to the frontend's
    # base folder, or None / ":memory:" for one that does not outlive the process.
    # `clipper start` defaults it to clipper-state.sqlite next to its config file.
    state_path: str | None = None
    state_flush_ms: int = 100  # changed policy states are written at most this long after the change
    # A request whose user's policy state is not in memory waits at most this long for the store's read
    # (done off the event loop); then it goes on with a fresh state (a feedback: STATE_UNAVAILABLE).
    state_load_timeout_ms: int = 1000
    feedback_timeout_ms: int = 1000  # feedback waits this long (at least the SLO) for the predictions it needs
    # A query still unanswered at SLO minus this margin (at most a tenth of the SLO) is answered
    # then from what has arrived, so timer ticks and a busy loop do not push the answer past the SLO.
    deadline_margin_ms: float = 2.0
    # ... plus what the frontend measures: answers made at the deadline that leave late (a loaded
    # machine) move the planned answer earlier, to at most a quarter of the SLO before it.
    adaptive_deadline_margin: bool = True
    # SIGTERM: stop accepting, answer what is in flight for up to this long, then SHUTTING_DOWN for the rest.
    drain_timeout_ms: int = 10_000
    # Admission control: a query whose model queue cannot serve it within its SLO is refused at arrival
    # (OVERLOADED, or the default output: the application's on_overload). False admits everything.
    admission_control: bool = True
    # ... and one that would wait behind more than this many batch latencies of queued work: a queue a
    # couple of batches deep per replica keeps every replica busy; a deeper one only adds latency and
    # admits queries that end as default outputs at their deadline (work spent on nothing).
    admission_wait_batches: float = 2.0
    # ... while the queue is overloaded: not empty for this long, or refusing within this time. A burst
    # that fits the SLO and drains sooner (a client pipelining a thousand queries at an idle model) is
    # judged by the SLO alone.
    admission_standing_ms: float = 1000.0
    # A query refused at arrival by an application whose refusals are its default output (on_overload =
    # "default") gets that answer this fraction of its SLO after it arrived (msgpack port), not at once:
    # still within the SLO, and a client that sends its next request when it has an answer (a closed
    # loop) then cannot come back thousands of times a second to be refused again, taking the CPU the
    # admitted queries need. 0 (the default) answers at once: holding costs an open loop (clients that
    # send on their own schedule) some goodput. OVERLOADED errors always go at once.
    default_refusal_hold: float = 0.0

    # ---- the trust boundary (docs/security.md)
    # Container RPC: "curve" (ZeroMQ CURVE: encrypted, every container authenticates with a key
    # issued for its model) or "none" (loopback benchmarking only; refused off loopback).
    rpc_security: str = "curve"
    # How the local manager's children connect: "ipc" (a Unix socket in a private folder, PLAIN
    # credentials: the kernel keeps it private, nothing is encrypted per message) or "tcp" (CURVE).
    local_rpc_transport: str = "ipc"
    # The admin API's bearer token: this file (0600), created at the first start; default
    # admin-token in the state folder. Binding the admin API off loopback needs TLS.
    admin_token_file: str | None = None
    admin_tls_cert_file: str | None = None  # PEM certificate chain for the admin port
    admin_tls_key_file: str | None = None
    admin_allowed_hosts: list = field(default_factory=list)  # Host header names accepted besides the bound ones
    # TLS on the query ports (msgpack and REST): PEM certificate chain and key files.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # Per-application API keys on the query ports (REST Authorization: Bearer, msgpack HELLO api_key).
    require_api_keys: bool = False
    # SO_REUSEPORT on the query, REST and admin ports: several frontend processes of one system (sharing a
    # state store) listen on the same ports and the kernel spreads connections among them. Set by
    # `clipper start --workers N` for its workers.
    reuse_port: bool = False
    # Which model containers the local manager runs, for frontends of one `--workers` group:
    # "own" (each frontend runs its own; the default), "leader" (this one runs them and they also serve
    # the frontends at peer_rpc_addresses), "member" (runs none: the leader's containers serve it). In a
    # group, the leader's container credentials go to the shared store so the members accept them.
    local_containers: str = "own"
    peer_rpc_addresses: list = field(default_factory=list)
    # The private folder (0700, this user's) of the local containers' Unix socket; default a new one.
    rpc_ipc_dir: str | None = None

    # ---- who starts model containers: "local" (child processes of this frontend) or "kubernetes" (a
    # Deployment per model version; pip install 'clipper-serving[kubernetes]'; docs/deploy.md)
    container_manager: str = "local"
    kubernetes_namespace: str | None = None  # default: the frontend pod's own namespace, else "default"
    kubernetes_image: str | None = None  # the image model containers run: the Clipper SDK and the models' code
    kubernetes_rpc_address: str | None = None  # where containers dial this frontend; default: its pod's address

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise InvalidConfigError for the first setting out of its type or bounds (run at construction;
        again by whoever changes settings afterwards, as ``clipper start`` does with its command line)."""
        frac = self.batch_budget_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
            raise InvalidConfigError(f"batch_budget_fraction {frac!r} is not a number in (0, 1]")
        if self.state_path is not None and (not isinstance(self.state_path, str) or not self.state_path):
            raise InvalidConfigError(f"state_path {self.state_path!r} is not a file path (or \":memory:\")")
        if self.local_containers not in ("own", "leader", "member"):
            raise InvalidConfigError(f"local_containers {self.local_containers!r} is not 'own', 'leader' or 'member'")
        peers = self.peer_rpc_addresses
        if (not isinstance(peers, (list, tuple)) or len(peers) > 256
                or not all(isinstance(a, str) and a.startswith(("tcp://", "ipc://")) and len(a) < 1024 for a in peers)):
            raise InvalidConfigError("peer_rpc_addresses is not a list of tcp:// or ipc:// addresses")
        b = self.batches_in_flight
        if isinstance(b, bool) or b not in (1, 2):
            raise InvalidConfigError(f"batches_in_flight {b!r} is not 1 or 2")
        w = self.admission_wait_batches
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.5 <= w <= 1000:
            raise InvalidConfigError(f"admission_wait_batches {w!r} is not a number in [0.5, 1000]")
        h = self.default_refusal_hold
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 <= h <= 0.9:
            raise InvalidConfigError(f"default_refusal_hold {h!r} is not a fraction of the SLO in [0, 0.9]")
        a = self.admission_standing_ms
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 60_000:
            raise InvalidConfigError(f"admission_standing_ms {a!r} is not a number in [0, 60000]")
        m = self.deadline_margin_ms
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 1000:
            raise InvalidConfigError(f"deadline_margin_ms {m!r} is not a number in [0, 1000]")
        for name in ("state_flush_ms", "feedback_timeout_ms", "state_load_timeout_ms", "heartbeat_interval_ms",
                     "heartbeat_timeout_ms", "batch_timeout_ms", "container_start_timeout_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 3_600_000:
                raise InvalidConfigError(f"{name} = {v!r} is not an integer in [1, 3600000]")
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms:
            raise InvalidConfigError(
                f"heartbeat_timeout_ms = {self.heartbeat_timeout_ms} is not longer than heartbeat_interval_ms = "
                f"{self.heartbeat_interval_ms}: every container would be dropped between two beats")
        d = self.drain_timeout_ms
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 3_600_000:
            raise InvalidConfigError(f"drain_timeout_ms = {d!r} is not an integer in [0, 3600000]")
        r = self.restart_backoff_ms
        if (not isinstance(r, (tuple, list)) or len(r) != 2
                or not all(not isinstance(x, bool) and isinstance(x, int) for x in r)
                or not 1 <= r[0] <= r[1] <= 3_600_000):
            raise InvalidConfigError(f"restart_backoff_ms = {r!r} is not [first, longest]: integers with "
                                     f"1 <= first <= longest <= 3600000")
        for name in ("query_port", "rest_port", "admin_port", "metrics_port", "rpc_port"):
            v = getattr(self, name)
            if v is None and name != "rpc_port":
                continue  # that listener is off
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
                raise InvalidConfigError(f"{name} = {v!r} is not a port number in [0, 65535] (0: any free port)")
        for name in ("host", "admin_host", "rpc_host"):
            v = getattr(self, name)
            if not isinstance(v, str) or not 0 < len(v) <= 253:
                raise InvalidConfigError(f"{name} = {v!r} is not a host name or address")
        for name in ("adaptive_deadline_margin", "admission_control", "reuse_port"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidConfigError(f"{name} = {getattr(self, name)!r} is not true or false")
        for name in ("tls_cert_file", "tls_key_file"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidConfigError(f"{name} {v!r} is not a file path")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            given, missing = (("tls_cert_file", "tls_key_file") if self.tls_key_file is None
                              else ("tls_key_file", "tls_cert_file"))
            raise InvalidConfigError(f"{given} is set without {missing}: TLS on the query ports needs both")
        if not isinstance(self.require_api_keys, bool):
            raise InvalidConfigError(f"require_api_keys {self.require_api_keys!r} is not true or false")
        if self.container_manager != "local" or self.kubernetes_image or self.kubernetes_namespace \
                or self.kubernetes_rpc_address:
            from .management.kubernetes_manager import check_config

            check_config(self)  # the values only; the cluster is reached at start

    limits: Limits = field(default_factory=Limits)

    def check_security(self) -> None:
        """Refuse settings that would open a port without its credential (called at start)."""
        from .security.net import is_loopback_host

        if self.rpc_security not in ("curve", "none"):
            raise InvalidConfigError(f"rpc_security {self.rpc_security!r} is not one of 'curve', 'none'")
        if self.local_rpc_transport not in ("ipc", "tcp"):
            raise InvalidConfigError(f"local_rpc_transport {self.local_rpc_transport!r} is not 'ipc' or 'tcp'")
        if self.rpc_security == "none" and not is_loopback_host(self.rpc_host):
            raise InvalidConfigError(
                f"rpc_security = \"none\" lets any process that reaches the container RPC serve models; it is "
                f"allowed on loopback only, and rpc_host is {self.rpc_host!r}")
        if bool(self.admin_tls_cert_file) != bool(self.admin_tls_key_file):
            raise InvalidConfigError("admin TLS needs both admin_tls_cert_file and admin_tls_key_file")
        if (self.admin_port is not None and not is_loopback_host(self.admin_host)
                and not self.admin_tls_cert_file):
            raise InvalidConfigError(
                f"the admin API can run code on this machine; bound to {self.admin_host!r} (off loopback) it "
                f"needs TLS: set admin_tls_cert_file and admin_tls_key_file (or keep admin_host on loopback)")
        hosts = self.admin_allowed_hosts
        if not isinstance(hosts, list) or not all(isinstance(h, str) and 0 < len(h) <= 253 for h in hosts):
            raise InvalidConfigError(f"admin_allowed_hosts {hosts!r} is not a list of host names")

    @property
    def rpc_address(self) -> str:
        return f"tcp://{self.rpc_host}:{self.rpc_port}"


def _build(cls, data: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise InvalidConfigError(f"unknown key(s) {sorted(unknown)} in {where}; known: {sorted(names)}")
    return cls(**data)


def load_config_file(path: str | Path) -> dict:
    """Read a TOML deployment file: ``[frontend]``, ``[limits]``,
    ``[[applications]]``, ``[[models]]`` and ``[[links]]`` tables.

    Returns ``{"frontend": FrontendConfig, "applications": [...], "models":
    [...], "links": [...], "base_dir": Path}``; the lists hold plain dicts for
    the registry to validate.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
    fe = dict(data.get("frontend", {}))
    limits = _build(Limits, dict(data.get("limits", {})), "[limits]")
    if "restart_backoff_ms" in fe:
        fe["restart_backoff_ms"] = tuple(fe["restart_backoff_ms"])
    cfg = _build(FrontendConfig, fe, "[frontend]")
    cfg.limits = limits
    unknown = set(data) - {"frontend", "limits", "applications", "models", "links"}
    if unknown:
        raise InvalidConfigError(f"unknown table(s) {sorted(unknown)} in {str(path)!r}")
    return {
        "frontend": cfg,
        "applications": list(data.get("applications", [])),
        "models": list(data.get("models", [])),
        "links": list(data.get("links", [])),
        "base_dir": path.resolve().parent,
    }
