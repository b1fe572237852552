"""Per-user policy states under load: the Redis store against SQLite, in one run.

An Exp4 application over two no-op models, driven by the asyncio client with
a query and a feedback per step, each for one of ``--users`` users picked at
random, ``--concurrency`` steps in flight. The frontend keeps at most
``--in-memory`` states in memory per application, so with many users most
steps read the user's state from the store (off the event loop) and every
feedback writes one (merged, on Redis). The same workload runs against

* ``sqlite``: the embedded default (a file in a temporary folder);
* ``redis``: a redis-server this script starts on a private Unix socket.

Reported per store (medians of ``--repeat``): steps per second, predict and
feedback latency percentiles, the frontend's state-store counters (reads,
writes, misses), and the CPU of the frontend tree and of redis-server per step.

    python -m bench.state_store --users 20000 --in-memory 1000 --duration 10 --repeat 3 \\
        --out bench/results/state-store.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .run import REPO, Server, TargetError, machine_info, tree_cpu_seconds

DEPLOYMENT = """
[frontend]
state_flush_ms = 100

[limits]
max_user_states_in_memory = {in_memory}
max_user_states = {max_states}

[[applications]]
name = "pick"
input_dtype = "float32"
input_shape = [16]
slo_ms = 200
cache = false
policy = "exp4"
output_kind = "number"
default_output = 0.0

[[models]]
name = "a"
version = "1"
input_dtype = "float32"
input_shape = [16]
entry = "{noop}:predict"
replicas = 1
max_batch = 64

[[models]]
name = "b"
version = "1"
input_dtype = "float32"
input_shape = [16]
entry = "{noop}:predict"
replicas = 1
max_batch = 64

[[links]]
app = "pick"
model = "a"

[[links]]
app = "pick"
model = "b"
"""


class Redis:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sock = folder / "redis.sock"
        self.proc = None

    def start(self) -> str:
        exe = shutil.which("redis-server")
        if exe is None:
            raise TargetError("redis-server is not installed (scripts/test.sh installs it)")
        self.proc = subprocess.Popen([exe, "--port", "0", "--unixsocket", str(self.sock), "--unixsocketperm", "700",
                                      "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        import redis

        while time.monotonic() < deadline:
            try:
                if self.sock.exists() and redis.Redis(unix_socket_path=str(self.sock)).ping():
                    return f"unix://{self.sock}"
            except redis.RedisError:
                pass
            time.sleep(0.02)
        raise TargetError("redis-server did not answer")

    def cpu_seconds(self) -> float | None:
        return tree_cpu_seconds(self.proc.pid) if self.proc is not None else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


async def drive(port: int, users: int, concurrency: int, warmup_s: float, duration_s: float, seed: int) -> dict:
    from clipper.client import AsyncClient

    rng = random.Random(seed)
    x = np.ones(16, np.float32)
    lat_p, lat_f = [], []
    steps = errors = 0
    t_end_warm = time.monotonic() + warmup_s
    t_end = t_end_warm + duration_s
    clients = [await AsyncClient.connect("127.0.0.1", port, timeout=30) for _ in range(min(concurrency, 8))]

    async def one(i: int) -> None:
        nonlocal steps, errors
        c = clients[i % len(clients)]
        while True:
            now = time.monotonic()
            if now >= t_end:
                return
            user = f"u{rng.randrange(users)}"
            try:
                t0 = time.perf_counter()
                await c.predict("pick", x, user=user)
                t1 = time.perf_counter()
                await c.feedback("pick", x, 1.0, user=user)
                t2 = time.perf_counter()
            except Exception:
                if now >= t_end_warm:
                    errors += 1
                continue
            if now >= t_end_warm:
                steps += 1
                lat_p.append(t1 - t0)
                lat_f.append(t2 - t1)

    await asyncio.gather(*(one(i) for i in range(concurrency)))
    for c in clients:
        await c.close()

    def pct(v, q):
        return round(float(np.percentile(v, q)) * 1000, 3) if v else None

    return {"steps": steps, "errors": errors, "steps_per_s": round(steps / duration_s, 1),
            "predict_ms": {"p50": pct(lat_p, 50), "p99": pct(lat_p, 99)},
            "feedback_ms": {"p50": pct(lat_f, 50), "p99": pct(lat_f, 99)}}


def measure(kind: str, tmp: Path, args, log) -> dict:
    folder = tmp / kind
    folder.mkdir()
    toml = folder / "deploy.toml"
    toml.write_text(DEPLOYMENT.format(in_memory=args.in_memory, max_states=max(args.users * 2, 1000),
                                      noop=REPO / "containers" / "examples" / "noop.py"))
    redis = Redis(folder) if kind == "redis" else None
    state = redis.start() if redis else str(folder / "state.sqlite")
    ready = folder / "ready.json"
    argv = [sys.executable, "-m", "clipper", "start", "--config", str(toml), "--query-port", "0", "--rest-port", "0",
            "--admin-port", "0", "--metrics-port", "0", "--rpc-port", "0", "--ready-file", str(ready),
            "--state", state]
    server = Server(kind, argv, ready, folder / "clipper.log", args.ready_timeout)
    out: dict = {"store": kind}
    try:
        info = server.start()
        a0 = server.cpu_seconds()
        r0 = redis.cpu_seconds() if redis else 0.0
        t0 = time.monotonic()
        out.update(asyncio.run(drive(info["query_port"], args.users, args.concurrency, args.warmup, args.duration,
                                     args.seed)))
        wall = time.monotonic() - t0
        a1 = server.cpu_seconds()
        r1 = redis.cpu_seconds() if redis else 0.0
        total_steps = out["steps"] * (args.warmup + args.duration) / args.duration
        out["frontend_cpu_cores"] = round((a1 - a0) / wall, 3)
        out["redis_cpu_cores"] = round((r1 - r0) / wall, 3)
        if out["steps"]:
            out["frontend_cpu_us_per_step"] = round((a1 - a0) * 1e6 / total_steps, 1)
            out["redis_cpu_us_per_step"] = round((r1 - r0) * 1e6 / total_steps, 1)
        from clipper.management.admin_client import AdminClient

        admin = AdminClient("127.0.0.1", info["admin_port"], timeout=30,
                            token_file=str(folder / "clipper-secrets" / "admin-token"))
        out["states"] = admin.status()["traffic"].get("states")
        log(f"  {kind}: {out['steps_per_s']:,.0f} steps/s; predict p50 {out['predict_ms']['p50']} p99 "
            f"{out['predict_ms']['p99']} ms; feedback p50 {out['feedback_ms']['p50']} p99 {out['feedback_ms']['p99']} "
            f"ms; frontend {out['frontend_cpu_cores']} cores, redis {out['redis_cpu_cores']} cores; "
            f"{out['errors']} errors")
    except TargetError as exc:
        out["error"] = str(exc)
    finally:
        server.stop()
        if redis:
            redis.stop()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.state_store", description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--in-memory", type=int, default=1_000, help="max_user_states_in_memory")
    ap.add_argument("--concurrency", type=int, default=32, help="steps in flight")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    def log(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    report = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="clipper-bench-state-") as td:
        for rep in range(args.repeat):
            log(f"[{rep + 1}/{args.repeat}]")
            tmp = Path(td) / f"r{rep}"
            tmp.mkdir()
            report["runs"].append({kind: measure(kind, tmp, args, log) for kind in ("sqlite", "redis")})

    def med(kind, *path):
        vals = []
        for r in report["runs"]:
            v = r[kind]
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                vals.append(v)
        return round(statistics.median(vals), 3) if vals else None

    def ratio(key, *path):
        vals = []
        for r in report["runs"]:
            a, b = r["redis"], r["sqlite"]
            for p in path:
                a = a.get(p) if isinstance(a, dict) else None
                b = b.get(p) if isinstance(b, dict) else None
            if a and b:
                vals.append(a / b)
        return round(statistics.median(vals), 3) if vals else None

    summary = {kind: {"steps_per_s": med(kind, "steps_per_s"), "predict_p50_ms": med(kind, "predict_ms", "p50"),
                      "predict_p99_ms": med(kind, "predict_ms", "p99"), "feedback_p50_ms": med(kind, "feedback_ms", "p50"),
                      "feedback_p99_ms": med(kind, "feedback_ms", "p99"),
                      "frontend_cpu_us_per_step": med(kind, "frontend_cpu_us_per_step"),
                      "redis_cpu_us_per_step": med(kind, "redis_cpu_us_per_step")} for kind in ("sqlite", "redis")}
    summary["redis/sqlite"] = {"steps_per_s": ratio("x", "steps_per_s"), "predict_p99": ratio("x", "predict_ms", "p99"),
                               "feedback_p99": ratio("x", "feedback_ms", "p99"),
                               "frontend_cpu_per_step": ratio("x", "frontend_cpu_us_per_step")}
    report["summary"] = summary
    out = args.out or REPO / "bench" / "results" / f"state-store-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
