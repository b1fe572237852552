"""The ``clipper`` command line: start a frontend, manage it, query it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .config import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_METRICS_PORT,
    DEFAULT_QUERY_PORT,
    DEFAULT_REST_PORT,
    DEFAULT_RPC_PORT,
    FrontendConfig,
    load_config_file,
)
from .cli_support import CliError, check_ports_free, explain, parse_json_arg, read_input_file
from .errors import ClipperError, InvalidConfigError


def _shape(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not a comma-separated list of integers") from None


def _start_config(args):
    """The frontend config ``clipper start`` runs with (config file, then the command line), and the file's spec."""
    spec = None
    if args.config:
        spec = load_config_file(args.config)
        cfg = spec["frontend"]
    else:
        cfg = FrontendConfig()
    for attr in ("host", "query_port", "rest_port", "admin_port", "metrics_port", "rpc_port", "state_path",
                 "rpc_host", "admin_host", "rpc_security", "local_rpc_transport"):
        val = getattr(args, attr)
        if val is not None:
            setattr(cfg, attr, val)
    # Query-port security: files named on the command line are relative to here, not to the config file.
    if args.tls_cert is not None:
        cfg.tls_cert_file = os.path.abspath(args.tls_cert)
    if args.tls_key is not None:
        cfg.tls_key_file = os.path.abspath(args.tls_key)
    if args.require_api_keys:
        cfg.require_api_keys = True
    if args.reuse_port:
        cfg.reuse_port = True
    if args.local_containers is not None:
        cfg.local_containers = args.local_containers
    if args.peer_rpc:
        cfg.peer_rpc_addresses = list(args.peer_rpc)
    if args.rpc_ipc_dir is not None:
        cfg.rpc_ipc_dir = args.rpc_ipc_dir
    if args.no_admin:
        cfg.admin_port = None
    cfg.check()  # the command line's values too
    return cfg, spec


async def _start(args) -> int:
    from .frontend import Frontend

    cfg, spec = _start_config(args)
    from .security import exposure_warning

    warning = exposure_warning(cfg)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    check_ports_free(cfg)  # before the state file is opened: a port in use fails in one line, touching nothing
    if cfg.state_path is None:  # durable by default: next to the config file (or here)
        cfg.state_path = "clipper-state.sqlite"
    fe = Frontend(cfg, base_dir=spec["base_dir"] if spec else Path.cwd())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await fe.start()
    try:
        if spec:
            if not args.worker_index:  # workers: the first applies the file, the others learn it from the store
                await fe.apply(spec)
            named = {str(m.get("name")) for m in spec["models"]}  # the file's models: not all a shared store holds
            member = cfg.local_containers == "member"  # (the first worker's containers serve it: wait for them)
            assert fe.manager is not None  # (started)
            for model in fe.registry.models.values():
                if model.name not in named:
                    continue
                mv = model.current
                if mv is not None and mv.replicas > 0 and (fe.manager.manages(mv) or (member and mv.entry)):
                    await fe.wait_ready(mv.name, mv.version)
        from .gctune import settle_heap

        settle_heap()  # everything is loaded: the collector need not look at it again
        ports = {"query_port": fe.query_port, "rest_port": fe.rest_port, "admin_port": fe.admin_port,
                 "metrics_port": fe.metrics_port, "rpc_port": fe.rpc_port,
                 "pid": os.getpid()}
        print(f"clipper ready: msgpack queries on {cfg.host}:{fe.query_port}, REST on {cfg.host}:{fe.rest_port}, "
              f"admin API on {cfg.admin_host}:{fe.admin_port}, metrics on {cfg.host}:{fe.metrics_port}, "
              f"containers on {cfg.rpc_host}:{fe.rpc_port}", flush=True)
        if args.ready_file:
            tmp = Path(args.ready_file + ".tmp")
            tmp.write_text(json.dumps(ports))
            tmp.replace(args.ready_file)
        await stop.wait()
        # SIGTERM: no new queries; those in flight are answered (up to drain_timeout_ms), then stop.
        await fe.drain()
    finally:
        await fe.stop()
    return 0


def _worker_argv(args):
    """How the supervisor of ``--workers`` starts worker ``index``: this command, with its ports and store."""
    def argv(index: int, ports: dict, state_url: str, ready_file: str, extra: list[str]) -> list[str]:
        out = [sys.executable, "-m", "clipper", "--log-level", args.log_level, "start", "--reuse-port",
               "--worker-index", str(index), "--state", state_url, "--ready-file", ready_file, *extra]
        if args.config:
            out += ["--config", os.path.abspath(args.config)]
        for attr in ("host", "rpc_host", "admin_host", "rpc_security", "local_rpc_transport"):
            val = getattr(args, attr)
            if val is not None:
                out += ["--" + attr.replace("_", "-"), val]
        for attr, val in ports.items():
            if val is not None:
                out += ["--" + attr.replace("_", "-"), str(val)]
        if args.tls_cert is not None:
            out += ["--tls-cert", os.path.abspath(args.tls_cert)]
        if args.tls_key is not None:
            out += ["--tls-key", os.path.abspath(args.tls_key)]
        if args.require_api_keys:
            out.append("--require-api-keys")
        return out

    return argv


async def _start_workers(args) -> int:
    from .store.redis import is_redis_url
    from .workers import run_workers

    cfg, spec = _start_config(args)
    from .security import exposure_warning

    warning = exposure_warning(cfg)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if cfg.state_path is not None and not is_redis_url(cfg.state_path):
        raise InvalidConfigError(
            f"--workers {args.workers} needs a state store every worker shares: --state redis://HOST:PORT/DB, or no "
            f"--state (a private redis-server is started); {cfg.state_path!r} is a SQLite file")
    base = spec["base_dir"] if spec else Path.cwd()
    return await run_workers(args.workers, cfg, _worker_argv(args), state_url=cfg.state_path,
                             data_dir=Path(base) / "clipper-redis", ready_file=args.ready_file,
                             containers=args.containers)


def cmd_start(args) -> int:
    import uvloop

    if args.workers != 1:
        return uvloop.run(_start_workers(args))
    return uvloop.run(_start(args))


def _admin(args):
    from .management.admin_client import AdminClient

    return AdminClient(args.host, args.admin_port, token_file=args.token_file,
                       tls=True if args.tls else None, cafile=args.cafile)


def cmd_container_credentials(args) -> int:
    from .security.container_keys import save_credentials

    doc = _admin(args).issue_container_credentials(args.name, args.version, frontend=args.frontend,
                                                   label=args.label)
    out = args.out or f"{args.name}{'' if args.version is None else '-' + args.version}.credentials"
    save_credentials(out, doc)
    print(json.dumps({"id": doc["id"], "model": doc["model"], "version": doc["version"], "file": os.path.abspath(out),
                      "frontend": doc["frontend"]}))
    print(f"start the container with: python -m clipper.container ENTRY --name {args.name} --version "
          f"{args.version or 'VERSION'} --credentials {out}", file=sys.stderr)
    return 0


def cmd_revoke_credentials(args) -> int:
    print(json.dumps(_admin(args).revoke_container_credentials(args.id)))
    return 0


def cmd_rotate_admin_token(args) -> int:
    admin = _admin(args)
    token = admin.rotate_admin_token()
    print(json.dumps({"rotated": True, **({"token": token} if args.show else {})}))
    return 0


def cmd_register_app(args) -> int:
    try:
        options = json.loads(args.policy_options)
    except json.JSONDecodeError as exc:
        raise ClipperError(f"--policy-options {args.policy_options!r} is not JSON: {exc}") from None
    out = _admin(args).register_application(args.name, args.input_dtype, args.input_shape, args.slo_ms,
                                            json.loads(args.default_output), args.on_deadline,
                                            cache=not args.no_cache, policy=args.policy, policy_options=options,
                                            output_kind=args.output_kind,
                                            confidence_threshold=args.confidence_threshold,
                                            on_low_confidence=args.on_low_confidence, on_overload=args.on_overload)
    print(json.dumps(out))
    return 0


_MODEL_FILE_KINDS = ("onnx", "sklearn", "xgboost", "lightgbm", "torch")


def _model_file_args(args) -> tuple[str, str] | None:
    """(kind, file) of ``--onnx FILE`` and its siblings, or None; checked against ENTRY."""
    given = [(k, getattr(args, k)) for k in _MODEL_FILE_KINDS if getattr(args, k, None)]
    if len(given) > 1 or (given and args.entry):
        raise InvalidConfigError("give one of ENTRY, --onnx, --sklearn, --xgboost, --lightgbm, --torch")
    if not given and not args.entry:
        raise InvalidConfigError("give ENTRY (module:function) or a model file: --onnx, --sklearn, --xgboost, "
                                 "--lightgbm or --torch FILE")
    return given[0] if given else None


def _model_file_options(args) -> dict:
    """``--option KEY=VALUE`` pairs (VALUE as JSON when it parses, else as text)."""
    out = {}
    for item in args.option or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidConfigError(f"--option {item!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_deploy(args) -> int:
    model_file = _model_file_args(args)
    if model_file is not None:
        out = _admin(args).deploy_model_file(
            model_file[0], args.name, args.version, model_file[1], output=args.output,
            options=_model_file_options(args), input_dtype=args.input_dtype, input_shape=args.input_shape or None,
            trusted_types=args.trust_type, trust_pickle=args.trust_pickle, replicas=args.replicas,
            max_batch=args.max_batch, batching=args.batching, batch_delay_ms=args.batch_delay_ms,
            latency_budget_ms=args.latency_budget_ms, workdir=os.path.abspath(args.workdir), wait=not args.no_wait)
        print(json.dumps(out))
        return 0
    if not args.input_dtype:
        raise InvalidConfigError("deploying ENTRY needs --input-dtype")
    out = _admin(args).deploy_model(args.name, args.version, args.input_dtype, args.input_shape, entry=args.entry,
                                    replicas=args.replicas, max_batch=args.max_batch, batching=args.batching,
                                    batch_delay_ms=args.batch_delay_ms, latency_budget_ms=args.latency_budget_ms,
                                    workdir=os.path.abspath(args.workdir), wait=not args.no_wait)
    print(json.dumps(out))
    return 0


def cmd_link(args) -> int:
    print(json.dumps(_admin(args).link_model_to_app(args.app, args.model, version=args.version)))
    return 0


def cmd_unlink(args) -> int:
    print(json.dumps(_admin(args).unlink_model_from_app(args.app, args.model, version=args.version)))
    return 0


def cmd_unregister_app(args) -> int:
    print(json.dumps(_admin(args).unregister_application(args.name)))
    return 0


def cmd_delete_model(args) -> int:
    print(json.dumps(_admin(args).delete_model(args.name, args.version)))
    return 0


def cmd_set_version(args) -> int:
    print(json.dumps(_admin(args).set_model_version(args.name, args.version)))
    return 0


def cmd_replicas(args) -> int:
    admin = _admin(args)
    if args.count is not None:
        print(json.dumps(admin.set_num_replicas(args.name, args.version, args.count)))
    else:
        print(json.dumps(admin.get_model_info(args.name, args.version)["replicas"], indent=2))
    return 0


def cmd_list(args) -> int:
    admin = _admin(args)
    if args.what == "apps":
        out = admin.get_all_apps()
    elif args.what == "models":
        out = admin.get_all_models()
    else:
        out = admin.list_container_credentials()
    print(json.dumps(out, indent=2))
    return 0


def cmd_predict(args) -> int:
    from .client import Client

    # a file, or JSON (a str input is quoted JSON too: an unquoted word is an error, never sent as a str)
    x = read_input_file(args.input[1:]) if args.input.startswith("@") else parse_json_arg(args.input, "input")
    label = None if args.label is None else parse_json_arg(args.label, "--label")
    with Client(args.host, args.port, timeout=args.timeout, tls=args.tls, cafile=args.cafile,
                api_key=args.api_key or None) as client:
        if args.label is not None:
            info = client.feedback(args.app, x, label, user=args.user)
            print(json.dumps({"feedback": "ok", **(info or {})}))
            return 0
        p = client.predict(args.app, x, user=args.user)
    out = p.output.tolist() if hasattr(p.output, "tolist") else p.output
    if isinstance(out, bytes):
        out = out.decode("utf-8", "replace")
    print(json.dumps({"query_id": p.query_id, "output": out, "default": p.is_default,
                      **({"default_explanation": p.explanation} if p.explanation else {}),
                      "confidence": p.confidence, "models": list(p.models),
                      **({"missing": list(p.missing)} if p.missing else {})}))
    return 0


def cmd_api_key_create(args) -> int:
    out = _admin(args).create_api_key(args.app, name=args.name)
    print(json.dumps(out))
    print("clipper: the key is shown only this once; the frontend keeps its hash", file=sys.stderr)
    return 0


def cmd_api_key_list(args) -> int:
    print(json.dumps(_admin(args).list_api_keys(), indent=2))
    return 0


def cmd_api_key_revoke(args) -> int:
    print(json.dumps(_admin(args).revoke_api_key(args.id)))
    return 0


def cmd_status(args) -> int:
    admin = _admin(args)
    if args.json:
        print(json.dumps(admin.status(), indent=2))
        return 0
    if not args.watch:
        _print_status(admin.status(), None, 0.0)
        return 0
    import time

    prev, prev_t = None, 0.0
    try:
        while True:
            st = admin.status()
            now = time.monotonic()
            sys.stdout.write("\x1b[H\x1b[2J")  # home, clear: a live table
            _print_status(st, prev, now - prev_t if prev else 0.0)
            sys.stdout.flush()
            prev, prev_t = st, now
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _rate(st, prev, dt, app, field) -> str:
    if prev is None or dt <= 0:
        return "-"
    a = st["traffic"]["applications"].get(app, {}).get(field, 0)
    b = prev["traffic"]["applications"].get(app, {}).get(field, 0)
    return f"{(a - b) / dt:,.0f}"


def _print_status(st: dict, prev: dict | None, dt: float) -> int:
    traffic = st["traffic"]
    print(f"clipper {st['version']}  ports: {st['ports']}  client connections: {st['connections']} msgpack, "
          f"{st.get('rest_connections', 0)} REST")
    print(f"{'application':20s} {'input':16s} {'slo_ms':>7s} {'policy':>7s} {'req/s':>8s} {'requests':>9s} "
          f"{'answered':>9s} {'defaults':>9s} {'errors':>7s} {'p99 ms':>7s}  models")
    for name, a in st["applications"].items():
        t = traffic["applications"].get(name, {})
        p99 = t.get("latency_p99_ms")
        print(f"{name:20s} {a['input_dtype'] + str(a['input_shape']):16s} {a['slo_ms']:7g} {a.get('policy', '-'):>7s} "
              f"{_rate(st, prev, dt, name, 'requests'):>8s} {t.get('requests', 0):9d} {t.get('answered', 0):9d} "
              f"{t.get('defaults', 0):9d} {t.get('errors', 0):7d} {'-' if p99 is None else format(p99, '.2f'):>7s}  "
              f"{','.join(a['linked_models']) or '-'}")
    print(f"{'model queue':20s} {'queued':>7s} {'replicas':>8s} {'batching':>8s} {'sizes':>10s} {'batches':>9s} "
          f"{'mean batch':>10s} {'wait ms':>8s} {'last batch ms':>13s} {'expired':>8s}")
    for key, q in traffic["models"].items():
        sizes = ",".join(str(n) for n in q["batch_sizes"]) or "-"
        print(f"{key:20s} {q['queue_length']:7d} {q['replicas']:8d} {q['batching']:>8s} {sizes:>10s} "
              f"{q['batches_sent']:9d} {q['mean_batch_size']:10.2f} {q['mean_queue_wait_ms']:8.3f} "
              f"{q['last_batch_latency_ms']:13.3f} {q['expired_in_queue']:8d}")
    c = traffic.get("cache")
    if c:
        print(f"cache: {c['entries']} entries, {c['used_bytes']} of {c['budget_bytes']} bytes, "
              f"hit ratio {c['hit_ratio']:.3f} ({c['hits']} hits, {c['misses']} misses, {c['joins']} joins, "
              f"{c['evictions']} evictions)")
    print(f"{'replica':8s} {'model':20s} {'pid':>8s} {'busy':>5s} {'max_batch':>9s} {'batches':>9s} "
          f"{'load ms':>9s} {'rss MiB':>8s}")
    for r in st["replicas"]:
        load, rss = r.get("load_ms"), r.get("rss_bytes")  # the container's claims at its handshake
        print(f"#{r['replica_id']:<7d} {r['model']:20s} {r['pid'] or 0:8d} {str(r['busy']):>5s} "
              f"{r['max_batch'] or 0:9d} {r['batches_done']:9d} {'-' if load is None else format(load, '.1f'):>9s} "
              f"{'-' if rss is None else format(rss / 2**20, '.1f'):>8s}")
    return 0


def _model_file_opts(sp) -> None:
    """``--onnx FILE`` and its siblings (clipper.deployers), shared by deploy and test-model."""
    for kind, what in (("onnx", "an ONNX model (onnxruntime)"),
                       ("sklearn", "a scikit-learn model (.skops, or a trusted .joblib/.pkl)"),
                       ("xgboost", "an XGBoost booster (.json/.ubj)"), ("lightgbm", "a LightGBM booster (.txt)"),
                       ("torch", "a PyTorch model (.pt2 or TorchScript)")):
        sp.add_argument(f"--{kind}", metavar="FILE", default=None, help=f"{what}; pip install 'clipper-serving[{kind}]'")
    sp.add_argument("--output", choices=("label", "probabilities", "vector", "number"), default=None,
                    help="a model file's output kind (default: what the model is, e.g. label for a classifier)")
    sp.add_argument("--option", action="append", default=None, metavar="KEY=VALUE",
                    help="a deployer option, e.g. intra_op_num_threads=2 (repeatable)")
    sp.add_argument("--trust-type", action="append", default=None, metavar="TYPE",
                    help="a type a .skops file may build beyond skops' defaults (review it first; repeatable)")
    sp.add_argument("--trust-pickle", action="store_true",
                    help="load a .joblib/.pkl scikit-learn file: a pickle runs any code it holds (only your own)")


def cmd_test_model(args) -> int:
    from .container.check import main_test_model

    return main_test_model(args, _model_file_args(args), _model_file_options(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipper", description="Clipper prediction serving")
    p.add_argument("--log-level", default=os.environ.get("CLIPPER_LOG_LEVEL", "WARNING"))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("start", help="run a frontend in the foreground")
    s.add_argument("--config", help="TOML deployment file (frontend, applications, models, links)")
    s.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    s.add_argument("--query-port", type=int, default=None, help=f"msgpack query port (default {DEFAULT_QUERY_PORT})")
    s.add_argument("--rest-port", type=int, default=None, help=f"REST (HTTP/JSON) query port (default {DEFAULT_REST_PORT})")
    s.add_argument("--admin-port", type=int, default=None, help=f"admin API port (default {DEFAULT_ADMIN_PORT})")
    s.add_argument("--metrics-port", type=int, default=None,
                   help=f"Prometheus metrics port (default {DEFAULT_METRICS_PORT})")
    s.add_argument("--rpc-port", type=int, default=None, help=f"container RPC port (default {DEFAULT_RPC_PORT})")
    s.add_argument("--rpc-host", default=None, help="address the container RPC listens on (default 127.0.0.1)")
    s.add_argument("--admin-host", default=None,
                   help="address the admin API listens on (default 127.0.0.1; off loopback it needs TLS)")
    s.add_argument("--rpc-security", choices=("curve", "none"), default=None,
                   help="container RPC security (default curve; none only on loopback, for benchmarks)")
    s.add_argument("--local-rpc-transport", choices=("ipc", "tcp"), default=None,
                   help="how the local manager's containers connect: ipc (a private Unix socket, default) or "
                        "tcp (CURVE, like remote containers)")
    s.add_argument("--ready-file", help="write the bound ports as JSON here once serving")
    s.add_argument("--state", dest="state_path", default=None,
                   help="state store (registry, policy states, keys): a SQLite file relative to the config file's "
                        "folder (default: clipper-state.sqlite there), ':memory:' (keeps nothing), or a Redis "
                        "server, redis://HOST:PORT/DB or unix:///PATH/redis.sock (pip install "
                        "'clipper-serving[redis]')")
    s.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="TLS on the query ports (msgpack and REST): PEM certificate chain (with --tls-key)")
    s.add_argument("--tls-key", default=None, metavar="FILE", help="the PEM private key of --tls-cert")
    s.add_argument("--require-api-keys", action="store_true",
                   help="queries and feedback need a per-application API key (see `clipper api-key`)")
    s.add_argument("--workers", type=int, default=1,
                   help="run this many frontend processes sharing the query, REST and admin ports (SO_REUSEPORT) "
                        "and one state store (--state redis://..., else a private redis-server); their model containers "
                        "as --containers says (default 1: this process is the frontend)")
    s.add_argument("--reuse-port", action="store_true",
                   help="listen on the query, REST and admin ports with SO_REUSEPORT (frontends of one system on "
                        "one machine; --workers sets it for its workers)")
    s.add_argument("--containers", choices=("shared", "own"), default="shared",
                   help="with --workers: shared (default): the first worker runs the model containers and each "
                        "serves every worker; own: every worker runs its own (measured in bench/README.md)")
    s.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    s.add_argument("--local-containers", choices=("own", "leader", "member"), default=None, help=argparse.SUPPRESS)
    s.add_argument("--peer-rpc", action="append", default=None, help=argparse.SUPPRESS)
    s.add_argument("--rpc-ipc-dir", default=None, help=argparse.SUPPRESS)
    s.add_argument("--no-admin", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_start)

    def admin_opts(sp):
        sp.add_argument("--host", default="127.0.0.1")
        sp.add_argument("--admin-port", type=int, default=DEFAULT_ADMIN_PORT)
        sp.add_argument("--token-file", default=None,
                        help="file holding the admin token (default: $CLIPPER_ADMIN_TOKEN, "
                             "$CLIPPER_ADMIN_TOKEN_FILE, else what a frontend on this machine published)")
        sp.add_argument("--tls", action="store_true",
                        help="speak HTTPS to the admin API (the default off loopback, and when the local frontend "
                             "says so)")
        sp.add_argument("--cafile", default=None, help="CA (or self-signed certificate) that signed the admin "
                                                      "API's certificate")

    s = sub.add_parser("register-app", help="register an application")
    s.add_argument("name")
    s.add_argument("--input-dtype", required=True)
    s.add_argument("--input-shape", type=_shape, default=[])
    s.add_argument("--slo-ms", type=float, default=100.0)
    s.add_argument("--default-output", default="null", help="JSON value answered at the deadline")
    s.add_argument("--on-deadline", choices=("default", "error"), default="default")
    s.add_argument("--no-cache", action="store_true", help="never cache this application's predictions")
    s.add_argument("--policy", default="single", help="selection policy: single, exp3, exp4, ucb1 or module:Class")
    s.add_argument("--policy-options", default="{}", help='JSON object of policy options, e.g. \'{"eta": 0.1}\'')
    s.add_argument("--output-kind", default="auto", choices=("auto", "label", "number", "vector", "probabilities"))
    s.add_argument("--confidence-threshold", type=float, default=0.0)
    s.add_argument("--on-low-confidence", choices=("flag", "default"), default="flag")
    s.add_argument("--on-overload", choices=("default", "error"), default=None,
                   help="a query admission control refuses: the default output at once, or OVERLOADED "
                        "(default: as --on-deadline)")
    admin_opts(s)
    s.set_defaults(func=cmd_register_app)

    s = sub.add_parser("deploy", help="deploy a model version from module:function, or a saved model file")
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("entry", nargs="?", default=None, help="module:function, module:Class or path/file.py:function")
    _model_file_opts(s)
    s.add_argument("--input-dtype", default=None, help="the input dtype (a model file's is read from it)")
    s.add_argument("--input-shape", type=_shape, default=[])
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--max-batch", type=int, default=256, help="the largest batch a replica takes")
    s.add_argument("--batching", choices=("aimd", "quantile", "fixed"), default="aimd",
                   help="how each replica's batch size is tuned (fixed: always --max-batch)")
    s.add_argument("--batch-delay-ms", type=float, default=0.0, help="delayed batching timeout (0: off)")
    s.add_argument("--latency-budget-ms", type=float, default=None,
                   help="batch latency budget (default: a fraction of the linked applications' SLO)")
    s.add_argument("--workdir", default=".", help="where the container runs (default: here)")
    s.add_argument("--no-wait", action="store_true", help="return before the containers connect")
    admin_opts(s)
    s.set_defaults(func=cmd_deploy)

    s = sub.add_parser("test-model", help="run a model in this process through a container's batch path, timed")
    s.add_argument("entry", nargs="?", default=None, help="module:function, module:Class or path/file.py:function")
    _model_file_opts(s)
    s.add_argument("--input", required=True, help="a JSON file (one input, or {\"inputs\": [...]}) or a .npy file")
    s.add_argument("--input-dtype", default=None, help="the input dtype (default: the model file's, else float64)")
    s.add_argument("--input-shape", type=_shape, default=None)
    s.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes to time (default 1,8,32)")
    s.add_argument("--seconds", type=float, default=0.5, help="time spent on each batch size (default 0.5)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_test_model)

    s = sub.add_parser("link", help="link a model to an application")
    s.add_argument("app")
    s.add_argument("model")
    s.add_argument("--version", default=None, help="stay on this version (default: follow the current one)")
    admin_opts(s)
    s.set_defaults(func=cmd_link)

    s = sub.add_parser("unlink", help="unlink a model from an application")
    s.add_argument("app")
    s.add_argument("model")
    s.add_argument("--version", default=None, help="the pinned version's link")
    admin_opts(s)
    s.set_defaults(func=cmd_unlink)

    s = sub.add_parser("unregister-app", help="remove an application (its endpoint, links, policy states)")
    s.add_argument("name")
    admin_opts(s)
    s.set_defaults(func=cmd_unregister_app)

    s = sub.add_parser("delete-model", help="delete a model version, or a whole model")
    s.add_argument("name")
    s.add_argument("version", nargs="?", default=None)
    admin_opts(s)
    s.set_defaults(func=cmd_delete_model)

    s = sub.add_parser("set-version", help="make a version the model's current one (roll back or forward)")
    s.add_argument("name")
    s.add_argument("version")
    admin_opts(s)
    s.set_defaults(func=cmd_set_version)

    s = sub.add_parser("replicas", help="show a model version's replicas, or set how many run")
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("count", nargs="?", type=int, default=None)
    admin_opts(s)
    s.set_defaults(func=cmd_replicas)

    s = sub.add_parser("container-credentials",
                       help="issue credentials for a container started by hand (written to a 0600 file)")
    s.add_argument("name", help="the model the container may serve")
    s.add_argument("version", nargs="?", default=None, help="only this version (default: any version)")
    s.add_argument("-o", "--out", default=None, help="where to write them (default NAME[-VERSION].credentials)")
    s.add_argument("--frontend", default=None,
                   help="the RPC address the container dials, e.g. tcp://frontend.example:7000")
    s.add_argument("--label", default="", help="a note kept with them (who, where)")
    admin_opts(s)
    s.set_defaults(func=cmd_container_credentials)

    s = sub.add_parser("revoke-credentials", help="revoke container credentials: their containers are dropped")
    s.add_argument("id")
    admin_opts(s)
    s.set_defaults(func=cmd_revoke_credentials)

    s = sub.add_parser("rotate-admin-token", help="replace the admin API's token (the old one stops working)")
    s.add_argument("--show", action="store_true", help="print the new token (for remote operators)")
    admin_opts(s)
    s.set_defaults(func=cmd_rotate_admin_token)

    s = sub.add_parser("list", help="list applications, models or container credentials")
    s.add_argument("what", choices=("apps", "models", "credentials"))
    admin_opts(s)
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("predict", help="send one query over the msgpack protocol")
    s.add_argument("app")
    s.add_argument("input", help="JSON input, or @file.npy / @file.json")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=DEFAULT_QUERY_PORT)
    s.add_argument("--timeout", type=float, default=10.0)
    s.add_argument("--user", default=None, help="the user (policy state) the query belongs to")
    s.add_argument("--label", default=None, help="send feedback with this JSON label instead of a query")
    s.add_argument("--tls", action="store_true", help="connect with TLS, verifying the server's certificate")
    s.add_argument("--cafile", default=None, help="PEM file of the CA to trust instead of the system's (implies --tls)")
    s.add_argument("--api-key", default=os.environ.get("CLIPPER_API_KEY"),
                   help="API key sent in HELLO (default: $CLIPPER_API_KEY)")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("api-key", help="make, list and revoke the query ports' per-application API keys")
    keys = s.add_subparsers(dest="api_key_command", required=True)
    k = keys.add_parser("create", help="make a key granting queries and feedback for the --app applications")
    k.add_argument("--app", action="append", required=True, help="an application the key grants (repeatable)")
    k.add_argument("--name", default=None, help="a note saying whose key it is")
    admin_opts(k)
    k.set_defaults(func=cmd_api_key_create)
    k = keys.add_parser("list", help="list the keys (never their secrets)")
    admin_opts(k)
    k.set_defaults(func=cmd_api_key_list)
    k = keys.add_parser("revoke", help="revoke a key at once, also on open connections")
    k.add_argument("id", help="the key's id (ak_...), from `clipper api-key list`")
    admin_opts(k)
    k.set_defaults(func=cmd_api_key_revoke)

    s = sub.add_parser("status", help="show applications, models, replicas and queue figures")
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", action="store_true", help="a live table, redrawn every --interval seconds")
    s.add_argument("--interval", type=float, default=1.0)
    admin_opts(s)
    s.set_defaults(func=cmd_status)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ClipperError as exc:
        print(f"clipper: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `clipper status | head`: the reader has gone, nothing is wrong
        sys.stderr.close()
        return 0
    except (CliError, OSError) as exc:  # a refused connection, a missing file, a port in use: one line
        print(f"clipper: error: {explain(args, exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
