"""Goodput against offered load: admission control on and off, in the same run.

    python -m bench.overload --duration 4 --out bench/results/overload.json

Two frontends (``python -m clipper start``) serve ``containers/examples/noop.toml``
(the cache off, SLO 20 ms) for the whole run, one with ``[frontend]
admission_control = true`` and one with ``false``; the application refuses
at arrival (``on_overload = "error"``, the typed ``OVERLOADED`` error, 309)
unless ``--on-overload default`` asks for the default output instead. An idle
frontend and its container use no CPU, so the one waiting does not disturb the
one measured.

1. **Capacity**: closed loops at ``--capacity-levels`` on each frontend; the
   highest goodput (answers from the model, not defaults) over both is the
   capacity every offered load is a multiple of.
2. **Open loop** at each multiple of ``--loads`` (default 0.5x to 4x): Poisson
   arrivals, latency from the *scheduled* send (a stalled server cannot hide
   its queue behind a slow generator), the two settings back to back, their
   order alternating between levels.

Per level and setting the report gives the offered rate (target and actually
sent), goodput (req/s and as a fraction of capacity), defaults, OVERLOADED
refusals, other errors by code, p50/p99 of the model's answers, p50/p99 of the
refusals (time from the scheduled send to the OVERLOADED error: admission
control should refuse within a millisecond of arrival), the generator's own
CPU and the server's (frontend and container). On 2 cores the generator
competes with the server at 3x and 4x: ``loadgen_cpu_cores`` and ``behind``
say when the offered rate is the generator's limit rather than the target.

A PNG (``--plot``) shows goodput and p99 against offered load for both settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .harness import NOOP_TOML, rss_mb, write_deployment
from .hotpath import load_pyplot
from .loadgen import OVERLOADED_CODE, LoadgenError, LoadSpec, format_summary, run_load
from .run import REPO, Server, TargetError, clipper_server, machine_info, parse_sweep

# admission_control = true / false; "pipelined" and "serial": admission on with two batches in flight per
# replica ([frontend] batches_in_flight = 2) and with one, to measure the second batch against one in one run;
# "held": admission on, default answers to refusals held until half the SLO ([frontend]
# default_refusal_hold = 0.5; with --on-overload default)
SETTINGS = ("on", "off", "pipelined", "serial", "held")
_IN_FLIGHT = {"pipelined": 2, "serial": 1}
_HOLD = {"held": 0.5}
DEFAULT_LOADS = "0.5,1,1.5,2,3,4"
DEFAULT_CAPACITY_LEVELS = "4x16,4x32,4x64"


def parse_loads(text: str) -> list[float]:
    try:
        loads = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"loads {text!r}: expected comma-separated multiples, e.g. 0.5,1,2") from None
    if not loads or any(v <= 0 for v in loads):
        raise argparse.ArgumentTypeError(f"loads {text!r}: every multiple must be > 0")
    return loads


def _slim(r: dict) -> dict:
    """The fields of a load report this bench keeps (the full one is large)."""
    keep = ("mode", "rate_rps", "offered_rps", "scheduled", "sent", "skipped", "behind", "behind_reason", "window_s",
            "throughput_rps", "goodput_rps", "defaults", "overloaded", "window_errors", "errors", "errors_total",
            "unfinished", "latency_ms", "goodput_latency_ms", "default_latency_ms", "error_latency_ms",
            "error_latency_from_send_ms", "send_lag_ms", "loadgen_cpu_cores", "loadgen_cpu_per_worker", "server_cpu_cores", "connections",
            "concurrency", "in_flight", "warnings")
    return {k: r[k] for k in keep if k in r}


def level_figures(r: dict, capacity: float, slo_ms: float) -> dict:
    """The figures one open-loop level is judged by."""
    w = r["window_s"]
    refused = r.get("overloaded", 0)
    other = {k: v for k, v in r.get("window_errors", {}).items() if not k.startswith(f"{OVERLOADED_CODE} ")}
    ref_lat = next((v for k, v in r.get("error_latency_ms", {}).items() if k.startswith(f"{OVERLOADED_CODE} ")), None)
    ref_sent = next((v for k, v in r.get("error_latency_from_send_ms", {}).items()
                     if k.startswith(f"{OVERLOADED_CODE} ")), None)
    good = r["goodput_latency_ms"]
    # Goodput over the requests sent in the window (their answers may come during the drain): the
    # loadgen's goodput_rps mixes results received in the window with defaults of requests sent in it.
    goodput = good["count"] / w
    return {
        "target_rps": r.get("rate_rps"),
        "offered_rps": r.get("offered_rps"),
        "offered_x": round(r["offered_rps"] / capacity, 3) if capacity and r.get("offered_rps") else None,
        "goodput_rps": round(goodput, 1),
        "goodput_fraction": round(goodput / capacity, 4) if capacity else None,
        "goodput_of_offered": round(good["count"] / r["sent"], 4) if r.get("sent") else None,
        "defaults": r["defaults"],
        "defaults_rps": round(r["defaults"] / w, 1),
        "overloaded": refused,
        "overloaded_rps": round(refused / w, 1),
        "other_errors": other,
        "unfinished": r["unfinished"],
        "lost_in_flight": r["errors"].get("lost_in_flight", 0),
        "goodput_p50_ms": good["p50"],
        "goodput_p99_ms": good["p99"],
        "goodput_p99_within_slo": good["p99"] is not None and good["p99"] <= slo_ms,
        "refusal_p50_ms": ref_lat["p50"] if ref_lat else None,
        "refusal_p99_ms": ref_lat["p99"] if ref_lat else None,
        # from the generator's actual send (its own lateness left out): the server's and the kernel's part
        "refusal_from_send_p50_ms": ref_sent["p50"] if ref_sent else None,
        "refusal_from_send_p99_ms": ref_sent["p99"] if ref_sent else None,
        "default_p99_ms": r["default_latency_ms"]["p99"],
        "send_lag_p50_ms": r["send_lag_ms"]["p50"],
        "send_lag_p99_ms": r["send_lag_ms"]["p99"],
        "behind": r.get("behind"),
        "loadgen_cpu_cores": r["loadgen_cpu_cores"],
        "server_cpu_cores": r.get("server_cpu_cores"),
    }


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def level_line(setting: str, f: dict) -> str:
    other = sum(f["other_errors"].values())
    return (f"  admission {setting:>3} @{f['offered_x'] or 0:.2f}x ({f['offered_rps'] or 0:,.0f}/s offered of "
            f"{f['target_rps']:,.0f}): goodput {f['goodput_rps']:,.0f}/s = {f['goodput_fraction']:.0%} of capacity; "
            f"p50/p99 {_fmt(f['goodput_p50_ms'])}/{_fmt(f['goodput_p99_ms'])} ms; defaults {f['defaults_rps']:,.0f}/s; "
            f"refused {f['overloaded_rps']:,.0f}/s (p99 {_fmt(f['refusal_p99_ms'], '.3f')} ms, "
            f"{_fmt(f.get('refusal_from_send_p99_ms'), '.3f')} from the send); other errors {other}; "
            f"cpu loadgen {f['loadgen_cpu_cores']:.2f} server {_fmt(f['server_cpu_cores'])}"
            + (" [generator behind]" if f["behind"] else ""))


def wait_quiet(server: Server, seconds: float = 10.0, idle_cores: float = 0.15) -> float:
    """Wait until the server's CPU falls under ``idle_cores`` (its backlog is gone); returns the wait."""
    t0 = time.monotonic()
    prev = server.cpu_seconds()
    while time.monotonic() - t0 < seconds:
        time.sleep(0.25)
        cur = server.cpu_seconds()
        if prev is not None and cur is not None and (cur - prev) / 0.25 < idle_cores:
            break
        prev = cur
    return round(time.monotonic() - t0, 2)


def run(args, log) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="clipper-overload-"))
    report: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": args.note,
        "settings": {},
    }
    report["config"]["capacity_levels"] = [f"{c}x{d}" for c, d in args.capacity_levels]
    servers: dict[str, Server] = {}
    try:
        for s in args.settings:
            cfg = write_deployment(args.config, tmp / f"{s}.toml", frontend={"admission_control": s != "off",
                                                                      **({"batches_in_flight": _IN_FLIGHT[s]}
                                                                         if s in _IN_FLIGHT else {}),
                                                                      **({"default_refusal_hold": _HOLD[s]}
                                                                         if s in _HOLD else {})},
                                   application={"on_overload": args.on_overload})
            srv = clipper_server(cfg, tmp, args.ready_timeout, args.clipper_cmd.split(), f"admission-{s}")
            srv.start()
            servers[s] = srv
            report["settings"][s] = {"deployment": cfg.read_text(), "ready_info": srv.info, "capacity": [],
                                     "levels": []}
        slo_ms = float(args.slo_ms)
        report["slo_ms"] = slo_ms

        def load(s: str, label: str, **kw) -> dict:
            srv = servers[s]
            spec = LoadSpec(port=int(srv.info["query_port"]), app=args.app, duration_s=args.duration,
                            warmup_s=args.warmup, drain_s=args.drain, seed=args.seed,
                            **({"engine": args.engine} if args.engine != "python" else {}),
                            **({"nice": args.loadgen_nice} if args.loadgen_nice else {}), **kw)
            r = run_load(spec, cpu_probe=srv.cpu_seconds)
            log(f"  admission {s} {label}: {format_summary(r)}")
            if srv.proc is not None and srv.proc.poll() is not None:
                raise TargetError(f"the admission-{s} frontend exited; log tail:\n{srv.log_tail()}")
            return r

        # 1. capacity: the best goodput of closed loops, over both frontends
        for c, d in args.capacity_levels:
            for s in args.settings:
                r = load(s, f"closed {c}x{d}", mode="closed", connections=c, concurrency=d)
                report["settings"][s]["capacity"].append(_slim(r))
                wait_quiet(servers[s])
        best = {s: max(report["settings"][s]["capacity"], key=lambda r: r["goodput_rps"]) for s in args.settings}
        capacity = max(b["goodput_rps"] for b in best.values())
        report["capacity_rps"] = capacity
        report["capacity_by_setting"] = {s: {"goodput_rps": b["goodput_rps"],
                                             "level": f"{b['connections']}x{b['concurrency']}",
                                             "p99_ms": b["latency_ms"]["p99"]} for s, b in best.items()}
        log(f"capacity: {capacity:,.0f} req/s (" + ", ".join(
            f"admission {s}: {b['goodput_rps']:,.0f} at {b['connections']}x{b['concurrency']}"
            for s, b in best.items()) + ")")
        if capacity <= 0:
            raise TargetError("no goodput in the closed loops: cannot size the open loops")

        # 2. open loops at multiples of capacity, the settings back to back
        for i, x in enumerate(args.loads):
            order = list(args.settings) if i % 2 == 0 else list(reversed(args.settings))
            for s in order:
                rss0 = rss_mb(servers[s].proc.pid)
                r = load(s, f"open {x:g}x", mode="open", connections=args.connections, workers=args.workers,
                         rate=round(capacity * x, 1), arrivals="poisson", send_quantum_us=args.send_quantum_us)
                fig = level_figures(r, capacity, slo_ms)
                fig["load_x"] = x
                fig["rss_before_mb"] = rss0
                fig["rss_after_mb"] = rss_mb(servers[s].proc.pid)
                fig["quiet_wait_s"] = wait_quiet(servers[s])
                report["settings"][s]["levels"].append({"figures": fig, "load": _slim(r)})
                log(level_line(s, fig))
    finally:
        for s, srv in servers.items():
            code = srv.stop()
            report["settings"].setdefault(s, {})["exit_code"] = code
        shutil.rmtree(tmp, ignore_errors=True)
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["summary"] = summarize(report)
    return report


def summarize(report: dict) -> dict:
    out: dict = {"capacity_rps": report.get("capacity_rps"), "slo_ms": report["config"]["slo_ms"]}
    for s, d in report["settings"].items():
        out[s] = [{k: lv["figures"][k] for k in (
            "load_x", "offered_x", "offered_rps", "goodput_rps", "goodput_fraction", "defaults_rps", "overloaded_rps",
            "other_errors", "goodput_p50_ms", "goodput_p99_ms", "refusal_p99_ms", "refusal_from_send_p99_ms",
            "loadgen_cpu_cores", "server_cpu_cores", "behind")} for lv in d.get("levels", [])]
    on = report["settings"].get("on", {}).get("levels", [])
    out["admission_control_observed"] = any(lv["figures"]["overloaded"] for lv in on) or any(
        lv["figures"]["defaults"] and lv["figures"]["default_p99_ms"] is not None
        and lv["figures"]["default_p99_ms"] < 1.0 for lv in on)
    # The bar: goodput >= 90% of capacity at 2x and >= 80% at 4x, admitted p99 within the SLO,
    # refusals within 1 ms.
    bars = {2.0: 0.9, 4.0: 0.8}
    checks = {}
    for lv in on:
        f = lv["figures"]
        if f["load_x"] in bars:
            checks[f"{f['load_x']:g}x"] = {
                "goodput_fraction": f["goodput_fraction"], "needed": bars[f["load_x"]],
                "refusal_p99_ms": f["refusal_p99_ms"], "refusal_from_send_p99_ms": f["refusal_from_send_p99_ms"],
                "met": (f["goodput_fraction"] or 0) >= bars[f["load_x"]] and bool(f["goodput_p99_within_slo"])
                and (f["refusal_p99_ms"] is None or f["refusal_p99_ms"] <= 1.0)}
    out["issue_10_bars_admission_on"] = checks
    return out


# -------------------------------------------------------------------- plot
def make_plot(report: dict, path: Path) -> str | None:
    """Goodput and p99 against the offered load (the target multiple of capacity on the x axis; what the
    generator actually sent is drawn too: when the server stops answering it cannot keep its timetable)."""
    plt = load_pyplot()
    if plt is None:
        return None
    import textwrap

    cap = report.get("capacity_rps")
    slo = report["config"]["slo_ms"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 6.8))
    xmax = 1.0
    for k, (s, d) in enumerate(report["settings"].items()):
        lv = [x["figures"] for x in d.get("levels", [])]
        if not lv:
            continue
        c = colors[k % len(colors)]
        xs = [f["load_x"] for f in lv]
        xmax = max(xmax, *xs)
        label = f"admission control {s}"
        ax1.plot(xs, [f["goodput_fraction"] for f in lv], "o-", color=c, lw=2, label=f"{label}: goodput")
        ax1.plot(xs, [f["overloaded_rps"] / cap for f in lv], "x--", color=c, alpha=0.8, lw=1,
                 label=f"{label}: refused (OVERLOADED)")
        ax1.plot(xs, [f["defaults_rps"] / cap for f in lv], "s:", color=c, alpha=0.7, lw=1, ms=4,
                 label=f"{label}: default outputs")
        ax1.plot(xs, [f["offered_x"] or 0 for f in lv], "^-", color=c, alpha=0.35, lw=1, ms=4,
                 label=f"{label}: actually sent")
        behind = [(x, f["goodput_fraction"]) for x, f in zip(xs, lv) if f["behind"]]
        if behind:
            ax1.plot(*zip(*behind), "o", mfc="white", mec=c, ms=9, mew=1.5, ls="none",
                     label=f"{label}: generator behind its timetable")
        good = [(x, f["goodput_p99_ms"]) for x, f in zip(xs, lv) if f["goodput_p99_ms"] is not None]
        if good:
            ax2.plot(*zip(*good), "o-", color=c, lw=2, label=f"{label}: p99 of the model's answers")
        allr = [(x, x2["load"]["latency_ms"]["p99"]) for x, x2 in zip(xs, d["levels"])
                if x2["load"]["latency_ms"]["p99"] is not None]
        if allr:
            ax2.plot(*zip(*allr), "s:", color=c, alpha=0.7, ms=4, label=f"{label}: p99 of every result (defaults too)")
        ref = [(x, f["refusal_p99_ms"]) for x, f in zip(xs, lv) if f["refusal_p99_ms"] is not None]
        if ref:
            ax2.plot(*zip(*ref), "x--", color=c, alpha=0.8, label=f"{label}: p99 of refusals")
    xs = [0, 1, xmax]
    ax1.plot(xs, [min(x, 1.0) for x in xs], color="0.6", lw=1, ls="-.", label="ideal goodput: min(offered, capacity)")
    for bar in (0.9, 0.8):
        ax1.axhline(bar, color="green", lw=0.8, ls=":", alpha=0.6)
    ax1.set_xlabel(f"offered load, multiple of closed-loop capacity ({cap:,.0f} req/s)")
    ax1.set_ylabel("per second, as a fraction of capacity")
    ax1.set_title("goodput (answers from the model) against offered load", fontsize=10)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=6.5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    ax2.set_yscale("log")
    ax2.axhline(slo, color="red", lw=1, ls="--", label=f"SLO {slo:g} ms")
    ax2.axhline(1.0, color="green", lw=0.8, ls=":", label="1 ms (the refusal target)")
    ax2.set_xlabel("offered load, multiple of capacity")
    ax2.set_ylabel("latency from the scheduled send (ms), log")
    ax2.set_title("p99 latency against offered load", fontsize=10)
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=6.5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.suptitle(f"Clipper, no-op model, open loop (Poisson), {report['config']['duration']:g} s per level",
                 fontsize=10)
    note = report.get("note") or ""
    if note:
        fig.text(0.01, 0.01, "\n".join(textwrap.wrap(note, 190)), fontsize=7, alpha=0.8, va="bottom")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=NOOP_TOML, help="deployment file (default: the no-op model)")
    ap.add_argument("--app", default="noop")
    ap.add_argument("--slo-ms", type=float, default=None,
                    help="the application's SLO for the report and plot (default: read from the deployment)")
    ap.add_argument("--settings", default="on,off", help="frontends to run, comma-separated: on (admission control), off (none), pipelined / "
                         "serial (admission on, batches_in_flight = 2 / 1), held (admission on, "
                         "default_refusal_hold = 0.5)")
    ap.add_argument("--on-overload", choices=("error", "default"), default="error",
                    help="what the application answers a refused query (default: the OVERLOADED error)")
    ap.add_argument("--loads", type=parse_loads, default=parse_loads(DEFAULT_LOADS),
                    help=f"open-loop rates as multiples of capacity (default {DEFAULT_LOADS})")
    ap.add_argument("--capacity-levels", type=parse_sweep, default=parse_sweep(DEFAULT_CAPACITY_LEVELS),
                    help=f"closed loops CONNECTIONSxIN_FLIGHT for capacity (default {DEFAULT_CAPACITY_LEVELS})")
    ap.add_argument("--duration", type=float, default=4.0, help="measured seconds per level")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--drain", type=float, default=3.0, help="seconds in-flight requests get after a window")
    ap.add_argument("--connections", type=int, default=4, help="open loop connections")
    ap.add_argument("--workers", type=int, default=1, help="open loop generator processes (each takes CPU)")
    ap.add_argument("--send-quantum-us", type=float, default=100.0)
    ap.add_argument("--engine", choices=("python", "c"), default="python",
                    help="the load generator's workers: Python (uvloop) or the C engine (bench/cload), which "
                         "offers 2x-4x of capacity on 2 cores without starving the server it measures")
    ap.add_argument("--loadgen-nice", type=int, default=0, choices=range(0, 20), metavar="0..19",
                    help="run the load generator at this niceness, so the frontend and its containers get the "
                         "CPU first on a small machine (a generator that then falls behind says so)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="a sentence stored in the report (e.g. which code it ran on)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "overload.json")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    ap.add_argument("--ready-timeout", type=float, default=90.0)
    ap.add_argument("--clipper-cmd", default=f"{sys.executable} -m clipper")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not args.settings or any(s not in SETTINGS for s in args.settings):
        ap.error("--settings takes a comma-separated list of on, off, pipelined, serial")

    if args.slo_ms is None:
        import tomllib

        apps = tomllib.loads(args.config.read_text()).get("applications", [])
        args.slo_ms = next((float(a["slo_ms"]) for a in apps if a.get("name") == args.app and "slo_ms" in a), 100.0)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        report = run(args, log)
    except (TargetError, LoadgenError) as exc:
        print(f"overload: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("overload: interrupted", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    plot = make_plot(report, args.plot or args.out.with_suffix(".png"))
    s = report["summary"]
    print(f"capacity {s['capacity_rps']:,.0f} req/s (closed loop, best goodput)")
    for setting in args.settings:
        parts = []
        for f in s.get(setting, []):
            parts.append(f"{f['load_x']:g}x: {f['goodput_fraction']:.0%}"
                         + (f" (p99 {f['goodput_p99_ms']:.1f} ms)" if f["goodput_p99_ms"] is not None else "")
                         + (f", refused {f['overloaded_rps']:,.0f}/s p99 {f['refusal_p99_ms']:.2f} ms"
                            if f["refusal_p99_ms"] is not None else "")
                         + ("*" if f["behind"] else ""))
        print(f"admission {setting}: goodput/capacity " + "; ".join(parts))
    print("(* the generator fell behind its timetable at that level)"
          if any(f["behind"] for st in args.settings for f in s.get(st, [])) else "", end="")
    print(f"\nreport: {args.out}" + (f"; plot: {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
