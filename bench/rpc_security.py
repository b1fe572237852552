"""What the container RPC's security costs: the same model, three RPC settings, in the same run.

    python -m bench.rpc_security --repeat 3 --out bench/results/rpc-security-r3.json

For each scenario (``noop``, ``linear``: 784 float32 inputs, the cache off,
so every query crosses the RPC) and each repeat, one frontend per setting
serves the deployment file, one after the other (the order rotates between
repeats so drift on a shared machine does not favour one setting):

``none``
    ``rpc_security = "none"``: TCP, no authentication, no encryption (what
    Clipper did before it had credentials; loopback only).
``curve``
    ``local_rpc_transport = "tcp"``: the local container authenticates and
    encrypts with CURVE, as a container on another host does.
``ipc`` (the default)
    the local container connects to a Unix socket in a private folder and
    proves a per-process PLAIN credential; nothing is encrypted per message.

Each setting gets one request in flight (latency) and closed loops at
``--levels`` (throughput: the level with the most answers within the SLO
counts). Reported per setting:
throughput, p50/p99, the server's CPU per request (frontend and container)
and the load generator's own CPU; and the ratios curve/none and ipc/none,
per repeat and their medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from .loadgen import LoadgenError, LoadSpec, format_summary, run_load
from .run import REPO, SCENARIOS, TargetError, clipper_server, machine_info, parse_sweep

SETTINGS = {
    "none": ["--rpc-security", "none"],
    "curve": ["--local-rpc-transport", "tcp"],
    "ipc": [],
}


def measure(args, scenario: str, setting: str, tmp: Path, tag: str) -> dict:
    config, app = SCENARIOS[scenario]
    server = clipper_server(config, tmp, args.ready_timeout, args.clipper_cmd.split(), tag)
    server.argv += SETTINGS[setting]
    out: dict = {"setting": setting}
    try:
        info = server.start()
        port = int(info["query_port"])
        common = dict(port=port, app=app, duration_s=args.duration, warmup_s=args.warmup, drain_s=2.0,
                      unique_inputs=False)

        def one(label, **kw):
            r = run_load(LoadSpec(**common, **kw), cpu_probe=server.cpu_seconds)
            print(f"  {scenario}/{setting} {label}: {format_summary(r)}", file=sys.stderr)
            return {"throughput_rps": r["throughput_rps"], "goodput_rps": r["goodput_rps"], "latency_ms": r["latency_ms"],
                    "errors": r["errors_total"], "defaults": r["defaults"],
                    "server_cpu_cores": r.get("server_cpu_cores"), "loadgen_cpu_cores": r["loadgen_cpu_cores"],
                    "level": f"{kw['connections']}x{kw['concurrency']}"}

        out["single"] = one("1 in flight", mode="closed", workers=1, connections=1, concurrency=1)
        out["levels"] = [one(f"closed {c}x{d}", mode="closed", workers=args.workers, connections=c, concurrency=d)
                         for c, d in args.levels]
        best = max(out["levels"], key=lambda r: r["goodput_rps"])  # a default output is a missed SLO
        out["best"] = best
        if best["server_cpu_cores"] and best["throughput_rps"]:
            out["server_cpu_us_per_request"] = round(best["server_cpu_cores"] / best["throughput_rps"] * 1e6, 2)
    except (TargetError, LoadgenError) as exc:
        out["error"] = str(exc)
        print(f"  {scenario}/{setting}: FAILED: {exc}", file=sys.stderr)
    finally:
        server.stop()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rpc_security", description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", choices=("noop", "linear", "all"), default="all")
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="load generator processes")
    ap.add_argument("--levels", type=parse_sweep, default=parse_sweep("4x32,4x128"),
                    help="closed-loop levels CONNECTIONSxIN_FLIGHT (the best counts)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "rpc-security.json")
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--clipper-cmd", default=f"{sys.executable} -m clipper")
    args = ap.parse_args(argv)
    scenarios = ["noop", "linear"] if args.scenario == "all" else [args.scenario]
    report: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "machine": machine_info(), "runs": []}
    report["config"]["levels"] = [f"{c}x{d}" for c, d in args.levels]
    tmp = Path(tempfile.mkdtemp(prefix="clipper-rpcsec-"))
    order = list(SETTINGS)
    try:
        for rep in range(args.repeat):
            run: dict = {}
            for scenario in scenarios:
                rot = order[rep % len(order):] + order[:rep % len(order)]
                print(f"[{rep + 1}/{args.repeat}] {scenario}: {' -> '.join(rot)}", file=sys.stderr)
                run[scenario] = {s: measure(args, scenario, s, tmp, f"r{rep}-{scenario}-{s}") for s in rot}
            report["runs"].append(run)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["summary"] = summarize(report["runs"], scenarios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for scenario, s in report["summary"].items():
        print(f"{scenario}: " + "; ".join(
            f"{k} {v['median']}x (per repeat {v['per_repeat']})" for k, v in s["ratios"].items()))
        for setting, f in s["settings"].items():
            print(f"  {setting}: {f}")
    print(f"report: {args.out}")
    return 0


def summarize(runs: list[dict], scenarios: list[str]) -> dict:
    out = {}
    for scenario in scenarios:
        per = [run[scenario] for run in runs if scenario in run]
        settings = {}
        for s in SETTINGS:
            ok = [p[s] for p in per if "best" in p.get(s, {})]
            if not ok:
                continue
            settings[s] = {
                "throughput_rps": statistics.median(r["best"]["throughput_rps"] for r in ok),
                "p50_ms": statistics.median(r["best"]["latency_ms"]["p50"] for r in ok),
                "p99_ms": statistics.median(r["best"]["latency_ms"]["p99"] for r in ok),
                "p50_at_1_ms": statistics.median(r["single"]["latency_ms"]["p50"] for r in ok),
                "server_cpu_us_per_request": statistics.median(
                    [r.get("server_cpu_us_per_request") or 0 for r in ok]),
                "loadgen_cpu_cores": statistics.median(r["best"]["loadgen_cpu_cores"] for r in ok),
            }
        ratios = {}
        for s in ("curve", "ipc"):
            pairs = [(p[s]["best"], p["none"]["best"], p[s]["single"], p["none"]["single"]) for p in per
                     if "best" in p.get(s, {}) and "best" in p.get("none", {})]
            if not pairs:
                continue
            thr = [round(a["throughput_rps"] / b["throughput_rps"], 3) for a, b, _, _ in pairs]
            lat = [round(c["latency_ms"]["p50"] / d["latency_ms"]["p50"], 3) for _, _, c, d in pairs]
            ratios[f"{s}/none throughput"] = {"median": statistics.median(thr), "per_repeat": thr}
            ratios[f"{s}/none p50 at 1 in flight"] = {"median": statistics.median(lat), "per_repeat": lat}
        out[scenario] = {"settings": settings, "ratios": ratios}
    return out


if __name__ == "__main__":
    sys.exit(main())
