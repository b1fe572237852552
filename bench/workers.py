"""One frontend process against several (``clipper start --workers N``), in one run.

Variants, each a fresh ``clipper start`` of the scenario's deployment file:

* ``w1``: one frontend process (the default: SQLite state, local containers on the private Unix socket);
* ``wN``: ``--workers N`` (a private redis-server shared by the workers; the first worker runs the model's
  replicas and each container serves every worker: ``--containers shared``, the default);
* ``wN-own`` (with ``--design``): ``--containers own``, every worker runs the replicas for itself;
* ``wN-sharedN`` (with ``--design``): shared containers, N replicas (as many containers as ``wN-own``, each
  serving every worker).

For each: the single-request latency, a closed-loop sweep (best level's throughput and p99) and the CPU
of everything serving (the supervisor, workers, containers, Redis)
per query, beside the load generator's own CPU. The echo floor is measured in the same run.

    python -m bench.workers --scenario noop --workers 2 --duration 5 --repeat 3 --design \\
        --out bench/results/workers-noop.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .loadgen import LoadgenError
from .run import (
    DEFAULT_SWEEP,
    REPO,
    SCENARIOS,
    Server,
    TargetError,
    _median,
    config_variant,
    echo_server,
    machine_info,
    measure_target,
    parse_sweep,
)


def clipper_argv(config: Path, tmp: Path, tag: str, workers: int, extra: list[str]) -> tuple[list[str], Path]:
    ready = tmp / f"{tag}.ready.json"
    argv = [sys.executable, "-m", "clipper", "start", "--config", str(config), "--query-port", "0",
            "--admin-port", "0", "--rpc-port", "0", "--rest-port", "0", "--metrics-port", "0",
            "--ready-file", str(ready), *extra]
    if workers > 1:
        argv += ["--workers", str(workers)]  # a private Redis, its data in the config's (temporary) folder
    else:
        argv += ["--state", str(tmp / f"{tag}-state.sqlite")]
    return argv, ready


def figures(target: dict) -> dict:
    if "error" in target or "best_index" not in target:
        return {"error": target.get("error", "no measurement")}
    best = target["sweep"][target["best_index"]]
    thr = best["throughput_rps"]
    fig = {"throughput_rps": thr, "p99_ms": best["latency_ms"]["p99"], "p50_ms": best["latency_ms"]["p50"],
           "best_level": f"{best['connections']}x{best['concurrency']}",
           "p50_at_1_ms": target["single"]["latency_ms"]["p50"],
           "server_cpu_cores": best.get("server_cpu_cores"), "loadgen_cpu_cores": best.get("loadgen_cpu_cores"),
           "defaults": best.get("defaults"), "idle_cpu_cores": target.get("idle_cpu_cores")}
    if fig["server_cpu_cores"] and thr:
        fig["server_cpu_us_per_query"] = round(fig["server_cpu_cores"] * 1e6 / thr, 2)
    if best.get("loadgen_cpu_cores") and thr:
        fig["loadgen_cpu_us_per_query"] = round(best["loadgen_cpu_cores"] * 1e6 / thr, 2)
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="noop")
    ap.add_argument("--workers", type=int, default=2, help="frontend processes of the multi-worker variants")
    ap.add_argument("--design", action="store_true", help="also compare own containers against one shared")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--drain", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--sweep", type=parse_sweep, default=parse_sweep(DEFAULT_SWEEP))
    ap.add_argument("--loadgen-workers", type=int, default=1, help="load generator processes")
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--idle-s", type=float, default=1.0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    # what measure_target reads
    args.unique_inputs, args.seed, args.open_fraction, args.arrivals, args.open_quantum_us = False, 0, 0, "poisson", 100
    args.engine = "python"
    load_workers = args.loadgen_workers
    args.workers_n, args.workers = args.workers, load_workers

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    n = args.workers_n
    src, app = SCENARIOS[args.scenario]
    variants = [("w1", 1, [], 1), (f"w{n}", n, ["--containers", "shared"], 1)]
    if args.design:  # own: a container per worker; shared with as many replicas, each serving every worker
        variants += [(f"w{n}-own", n, ["--containers", "own"], 1), (f"w{n}-shared{n}", n, ["--containers", "shared"], n)]
    out_path = args.out or REPO / "bench" / "results" / f"workers-{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = {"scenario": args.scenario, "workers": n, "machine": machine_info(), "args": {
        k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in vars(args).items()},
        "runs": []}
    with tempfile.TemporaryDirectory(prefix="clipper-bench-workers-") as td:
        tmp = Path(td)
        for rep in range(args.repeat):
            run = {"floor": None, "variants": {}}
            report["runs"].append(run)
            log(f"[{rep + 1}/{args.repeat}] floor")
            run["floor"] = measure_target(echo_server(tmp, args.ready_timeout, f"r{rep}"), app, args, log)
            for name, workers, extra, replicas in variants:
                log(f"[{rep + 1}/{args.repeat}] {name}")
                vdir = tmp / f"{name}-{rep}"
                vdir.mkdir()
                config = config_variant(src, vdir, None, replicas)  # a copy in vdir: the private Redis's data go there
                cargv, ready = clipper_argv(config, vdir, name, workers, extra if workers > 1 else [])
                server = Server(name, cargv, ready, vdir / "clipper.log", args.ready_timeout)
                try:
                    run["variants"][name] = measure_target(server, app, args, log)
                except (TargetError, LoadgenError) as exc:
                    run["variants"][name] = {"error": str(exc)}
    # summary: medians of the figures and of the ratios inside each run
    summary = {}
    names = [v[0] for v in variants]
    for name in ["floor", *names]:
        figs = [figures(r["floor"] if name == "floor" else r["variants"].get(name, {})) for r in report["runs"]]
        good = [f for f in figs if "error" not in f]
        summary[name] = {k: _median([f.get(k) for f in good]) for k in (
            "throughput_rps", "p99_ms", "p50_ms", "p50_at_1_ms", "server_cpu_cores", "server_cpu_us_per_query",
            "loadgen_cpu_cores", "loadgen_cpu_us_per_query", "idle_cpu_cores")}
        summary[name]["measured"] = len(good)
        if len(good) < len(figs):
            summary[name]["errors"] = [f["error"] for f in figs if "error" in f]

    def ratio(a: str, b: str, key: str):
        vals = []
        for r in report["runs"]:
            fa = figures(r["floor"] if a == "floor" else r["variants"].get(a, {}))
            fb = figures(r["floor"] if b == "floor" else r["variants"].get(b, {}))
            if fa.get(key) and fb.get(key):
                vals.append(fa[key] / fb[key])
        return _median(vals)

    ratios = {f"{v}/floor throughput": ratio(v, "floor", "throughput_rps") for v in names}
    ratios[f"w{n}/w1 throughput"] = ratio(f"w{n}", "w1", "throughput_rps")
    ratios[f"w{n}/w1 p99"] = ratio(f"w{n}", "w1", "p99_ms")
    ratios[f"w{n}/w1 cpu per query"] = ratio(f"w{n}", "w1", "server_cpu_us_per_query")
    if args.design:
        ratios["shared/own throughput"] = ratio(f"w{n}", f"w{n}-own", "throughput_rps")
        ratios["shared/own p99"] = ratio(f"w{n}", f"w{n}-own", "p99_ms")
        ratios["shared/own cpu per query"] = ratio(f"w{n}", f"w{n}-own", "server_cpu_us_per_query")
        ratios[f"shared{n}/own throughput"] = ratio(f"w{n}-shared{n}", f"w{n}-own", "throughput_rps")
        ratios[f"shared{n}/own p99"] = ratio(f"w{n}-shared{n}", f"w{n}-own", "p99_ms")
        ratios[f"shared{n}/own cpu per query"] = ratio(f"w{n}-shared{n}", f"w{n}-own", "server_cpu_us_per_query")
    report["summary"], report["ratios"] = summary, ratios
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    for name in ["floor", *names]:
        s = summary[name]
        if not s.get("measured"):
            print(f"{name}: FAILED {s.get('errors')}")
            continue
        print(f"{name}: {s['throughput_rps']:,.0f} req/s p99 {s['p99_ms']:.2f} ms p50@1 {s['p50_at_1_ms']:.3f} ms "
              f"server {s['server_cpu_cores'] or 0:.2f} cores = {s['server_cpu_us_per_query'] or 0:.1f} us/query, "
              f"loadgen {s['loadgen_cpu_us_per_query'] or 0:.1f} us/query [median of {s['measured']}]")
    for k, v in ratios.items():
        print(f"{k}: {v}")
    print(f"report: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
