"""REST (HTTP/JSON) against msgpack throughput, on one frontend, in the same run.

    scripts/bench-setup.sh     # wrk, from the system's packages
    python -m bench.rest --duration 8 --repeat 3 --out bench/results/rest.json

For each repeat one Clipper frontend serves a deployment file (default
``containers/examples/noop.toml``: 784 float32 inputs, the cache off, so
every query reaches the model). Then, on the same frontend:

1. msgpack: ``bench.loadgen`` closed loops (``--msgpack-level``);
2. REST: wrk (C, one thread) with ``--connections`` keep-alive connections
   POSTing ``{"input": [784 numbers]}`` to ``/<app>/predict``.

3. the REST floor: the same wrk run against ``bench.echo_server --http``
   (httptools parsing, orjson decoding each body, a constant answer; no
   model, no queue) started for the repeat and stopped after it.

Both drive about the same number of requests in flight. Reported: each
side's throughput and latency percentiles, their ratio, REST against its
floor, and the load generators' own CPU (wrk's from ``getrusage`` of the
child, the loadgen's from its workers) so a reader can tell the generator
was not the limit.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .loadgen import LoadSpec, format_summary, run_load
from .run import REPO, TargetError, clipper_server, echo_server, machine_info, parse_sweep

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[%s]]
"""


def parse_wrk(text: str) -> dict:
    """Requests/sec and the latency percentiles (ms) of ``wrk --latency`` output."""
    out: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["throughput_rps"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if m:
        out["requests"] = int(m.group(1))
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}
    lat = {}
    for q, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        lat[f"p{q}"] = round(float(v) * unit[u], 3)
    out["latency_ms"] = lat
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return out


def run_wrk(args, port: int, app: str, body: str, tmp: Path, scheme: str = "http", cpu_probe=None) -> dict:
    """One wrk run (after an unmeasured warmup run); ``scheme`` "https" for a TLS port (wrk does not
    verify certificates). ``cpu_probe`` (the server's cumulative CPU seconds) adds ``server_cpu_cores``."""
    script = tmp / "post.lua"
    script.write_text(LUA % body)
    argv = [args.wrk, "-t", str(args.wrk_threads), "-c", str(args.connections), "-d", f"{max(1, round(args.duration))}s",
            "--latency", "-s", str(script), f"{scheme}://127.0.0.1:{port}/{app}/predict"]
    if args.warmup > 0:
        subprocess.run([*argv[:5], "-d", f"{max(1, round(args.warmup))}s", *argv[7:]], capture_output=True, timeout=120)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = cpu_probe() if cpu_probe is not None else None
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + 120)
    wall = time.monotonic() - t0
    server_after = cpu_probe() if cpu_probe is not None else None
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise TargetError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    r = parse_wrk(proc.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    r["loadgen_cpu_cores"] = round(cpu / wall, 3)
    if server_before is not None and server_after is not None:
        r["server_cpu_cores"] = round((server_after - server_before) / wall, 3)
    r["raw"] = proc.stdout
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rest", description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=REPO / "containers" / "examples" / "noop.toml")
    ap.add_argument("--app", default="noop")
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32, help="wrk's keep-alive connections (= requests in flight)")
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--msgpack-level", type=parse_sweep, default=parse_sweep("4x8"),
                    help="loadgen CONNECTIONSxIN_FLIGHT (default 4x8: the same 32 in flight)")
    ap.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "rest.json")
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--clipper-cmd", default=f"{sys.executable} -m clipper")
    args = ap.parse_args(argv)
    if shutil.which(args.wrk) is None:
        print("bench.rest needs wrk: run scripts/bench-setup.sh (it installs it from the system's packages)",
              file=sys.stderr)
        return 2
    x = np.random.default_rng(0).random(784, dtype=np.float32)
    body = json.dumps({"input": [round(float(v), 6) for v in x]})
    (conns, depth), = args.msgpack_level
    report: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "machine": machine_info(), "body_bytes": len(body), "runs": []}
    report["config"]["msgpack_level"] = f"{conns}x{depth}"
    tmp = Path(tempfile.mkdtemp(prefix="clipper-rest-"))
    try:
        for rep in range(args.repeat):
            server = clipper_server(args.config, tmp, args.ready_timeout, args.clipper_cmd.split(), f"r{rep}")
            info = server.start()
            try:
                spec = LoadSpec(port=int(info["query_port"]), app=args.app, mode="closed", connections=conns,
                                concurrency=depth, duration_s=args.duration, warmup_s=args.warmup, drain_s=2.0)
                mp = run_load(spec, cpu_probe=server.cpu_seconds)
                print(f"[{rep + 1}/{args.repeat}] msgpack: {format_summary(mp)}", file=sys.stderr)
                rest = run_wrk(args, int(info["rest_port"]), args.app, body, tmp)
                print(f"[{rep + 1}/{args.repeat}] REST (wrk): {rest['throughput_rps']:,.0f} req/s "
                      f"p50 {rest['latency_ms'].get('p50')} p99 {rest['latency_ms'].get('p99')} ms; "
                      f"non-2xx {rest['non_2xx']}; wrk cpu {rest['loadgen_cpu_cores']} cores", file=sys.stderr)
            finally:
                server.stop()
            floor_server = echo_server(tmp, args.ready_timeout, f"r{rep}", http=True)
            floor_info = floor_server.start()
            try:
                floor = run_wrk(args, int(floor_info["query_port"]), args.app, body, tmp,
                                cpu_probe=floor_server.cpu_seconds)
                print(f"[{rep + 1}/{args.repeat}] REST floor (wrk): {floor['throughput_rps']:,.0f} req/s "
                      f"p50 {floor['latency_ms'].get('p50')} p99 {floor['latency_ms'].get('p99')} ms; "
                      f"non-2xx {floor['non_2xx']}", file=sys.stderr)
            finally:
                floor_server.stop()
            report["runs"].append({
                "rest_floor": {k: v for k, v in floor.items() if k != "raw"},
                "rest_vs_floor": round(rest["throughput_rps"] / floor["throughput_rps"], 4)
                if rest["throughput_rps"] and floor["throughput_rps"] else None,
                "msgpack": {"throughput_rps": mp["throughput_rps"], "latency_ms": mp["latency_ms"],
                            "errors": mp["errors_total"], "defaults": mp["defaults"],
                            "loadgen_cpu_cores": mp["loadgen_cpu_cores"], "server_cpu_cores": mp.get("server_cpu_cores")},
                "rest": {k: v for k, v in rest.items() if k != "raw"},
                "rest_vs_msgpack": round(rest["throughput_rps"] / mp["throughput_rps"], 4)
                if rest["throughput_rps"] and mp["throughput_rps"] else None,
            })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [r["rest_vs_msgpack"] for r in report["runs"] if r["rest_vs_msgpack"]]
    floor_ratios = [r["rest_vs_floor"] for r in report["runs"] if r["rest_vs_floor"]]
    report["summary"] = {
        "msgpack_rps_median": statistics.median(r["msgpack"]["throughput_rps"] for r in report["runs"]),
        "rest_rps_median": statistics.median(r["rest"]["throughput_rps"] for r in report["runs"]),
        "rest_vs_msgpack": {"median": statistics.median(ratios) if ratios else None, "per_repeat": ratios},
        "rest_floor_rps_median": statistics.median(r["rest_floor"]["throughput_rps"] or 0 for r in report["runs"]),
        "rest_vs_floor": {"median": statistics.median(floor_ratios) if floor_ratios else None,
                          "per_repeat": floor_ratios},
        "rest_p99_ms_median": statistics.median(r["rest"]["latency_ms"].get("p99", 0) for r in report["runs"]),
        "msgpack_p99_ms_median": statistics.median(r["msgpack"]["latency_ms"]["p99"] for r in report["runs"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    s = report["summary"]
    print(f"REST {s['rest_rps_median']:,.0f} req/s vs msgpack {s['msgpack_rps_median']:,.0f} req/s: "
          f"{s['rest_vs_msgpack']['median']:.3f}x (per repeat {s['rest_vs_msgpack']['per_repeat']}); "
          f"p99 {s['rest_p99_ms_median']} vs {s['msgpack_p99_ms_median']} ms; REST floor "
          f"{s['rest_floor_rps_median']:,.0f} req/s: REST {s['rest_vs_floor']['median'] or 0:.3f}x of it "
          f"(per repeat {s['rest_vs_floor']['per_repeat']})")
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
