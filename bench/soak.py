"""Soak: mixed load with faults for a long time; the frontend's memory must stay flat.

    python -m bench.soak --duration 1800 --out bench/results/soak.json

One frontend (``python -m clipper start``) serves three applications:

``noop``        the no-op model, the cache off (every query a miss: unique inputs)
``noop-cached`` the same model, the cache on, 16 distinct inputs (nearly all hits)
``linear``      a numpy linear model (784 -> 10), two replicas, unique inputs

under open loops (Poisson) on the msgpack port for each application
(``--rate`` for ``noop``, half of it for each of the others) and a REST client
(one keep-alive connection, ``--rest-rate`` POSTs a second, alternating between
``noop-cached`` and ``linear``). Meanwhile a fault thread SIGKILLs one model
container every ``--kill-every`` seconds (round robin over all of them; the
frontend restarts it) and SIGSTOPs one for ``--stop-s`` seconds every
``--stop-every`` seconds.

The frontend's RSS (``VmRSS`` of the ``clipper start`` process) is sampled
every ``--rss-interval`` seconds; the report gives its least-squares slope in
MB per minute over the last two thirds of the run (the first third is warm-up:
caches, arenas and batch sizes settle) and the answered / unanswered counts of
every client: a request is unanswered when its connection closed under it or
no reply came within the drain time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .harness import NOOP_TOML, RssSampler, container_pids, signal_pid, slope_mb_per_min, write_deployment
from .loadgen import LoadgenError, LoadSpec, format_summary, run_load
from .run import REPO, TargetError, clipper_server, machine_info

EXAMPLES = REPO / "containers" / "examples"
APPS = [
    {"name": "noop-cached", "input_dtype": "float32", "input_shape": [784], "slo_ms": 20, "cache": True,
     "default_output": -1.0},
    {"name": "linear", "input_dtype": "float32", "input_shape": [784], "slo_ms": 20, "cache": False,
     "default_output": []},
]
MODELS = [{"name": "linear", "version": "1", "input_dtype": "float32", "input_shape": [784],
           "entry": f"{EXAMPLES / 'linear.py'}:Linear", "replicas": 2, "max_batch": 64}]
LINKS = [{"app": "noop-cached", "model": "noop"}, {"app": "linear", "model": "linear"}]


class Faults(threading.Thread):
    """SIGKILL a container every ``kill_every`` s and SIGSTOP one for ``stop_s`` every ``stop_every`` s."""

    def __init__(self, frontend_pid: int, kill_every: float, stop_every: float, stop_s: float, until: float):
        super().__init__(name="faults", daemon=True)
        self.pid = frontend_pid
        self.kill_every, self.stop_every, self.stop_s = kill_every, stop_every, stop_s
        self.until = until
        self.events: list[dict] = []
        self.halt = threading.Event()
        self._stopped: list[int] = []
        self._k = 0

    def _pick(self) -> int | None:
        pids = [p for p in container_pids(self.pid) if p not in self._stopped]
        if not pids:
            return None
        self._k += 1
        return pids[self._k % len(pids)]

    def run(self) -> None:
        t0 = time.monotonic()
        next_kill = t0 + self.kill_every if self.kill_every > 0 else float("inf")
        next_stop = t0 + self.stop_every if self.stop_every > 0 else float("inf")
        cont_at: list[tuple[float, int]] = []
        while not self.halt.is_set():
            now = time.monotonic()
            if now >= self.until:
                break
            for when, pid in list(cont_at):
                if now >= when:
                    signal_pid(pid, signal.SIGCONT)
                    self._stopped.remove(pid)
                    cont_at.remove((when, pid))
                    self.events.append({"t_s": round(now - t0, 2), "what": "SIGCONT", "pid": pid})
            if now >= next_kill:
                pid = self._pick()
                if pid is not None and signal_pid(pid, signal.SIGKILL):
                    self.events.append({"t_s": round(now - t0, 2), "what": "SIGKILL", "pid": pid})
                next_kill += self.kill_every
            if now >= next_stop:
                pid = self._pick()
                if pid is not None and signal_pid(pid, signal.SIGSTOP):
                    self._stopped.append(pid)
                    cont_at.append((now + self.stop_s, pid))
                    self.events.append({"t_s": round(now - t0, 2), "what": "SIGSTOP", "pid": pid})
                next_stop += self.stop_every
            self.halt.wait(0.05)
        for _, pid in cont_at:  # never leave a container stopped
            signal_pid(pid, signal.SIGCONT)
            self.events.append({"t_s": round(time.monotonic() - t0, 2), "what": "SIGCONT", "pid": pid})


class RestClient(threading.Thread):
    """One keep-alive connection POSTing at ``rate`` per second (paced, not pipelined) until ``until``."""

    def __init__(self, port: int, apps: list[str], rate: float, until: float, timeout_s: float = 5.0):
        super().__init__(name="rest-client", daemon=True)
        self.port, self.apps, self.rate, self.until, self.timeout_s = port, apps, rate, until, timeout_s
        rng = np.random.default_rng(1)
        self.bodies = [json.dumps({"input": [round(float(v), 4) for v in rng.standard_normal(784)]})
                       for _ in range(16)]
        self.status: dict[str, int] = {}
        self.defaults = 0
        self.failed: dict[str, int] = {}
        self.latencies_ms: list[float] = []
        self.sent = 0

    def run(self) -> None:
        conn = None
        gap = 1.0 / self.rate
        t_next = time.monotonic()
        i = 0
        while time.monotonic() < self.until:
            delay = t_next - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t_next += gap
            app = self.apps[i % len(self.apps)]
            body = self.bodies[i % len(self.bodies)]
            i += 1
            t0 = time.monotonic()
            self.sent += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
                conn.request("POST", f"/{app}/predict", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                self.status[str(resp.status)] = self.status.get(str(resp.status), 0) + 1
                self.latencies_ms.append((time.monotonic() - t0) * 1000)
                if resp.status == 200 and b'"default":true' in data.replace(b" ", b""):
                    self.defaults += 1
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                k = type(exc).__name__
                self.failed[k] = self.failed.get(k, 0) + 1
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def report(self) -> dict:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else None
        return {
            "sent": self.sent, "status": self.status, "defaults": self.defaults, "failed": self.failed,
            "answered": sum(self.status.values()), "unanswered": sum(self.failed.values()),
            "latency_ms": None if lat is None else {"p50": round(float(np.percentile(lat, 50)), 3),
                                                    "p99": round(float(np.percentile(lat, 99)), 3),
                                                    "max": round(float(lat.max()), 3)},
        }


def _slim(r: dict) -> dict:
    keep = ("app", "rate_rps", "offered_rps", "sent", "throughput_rps", "goodput_rps", "defaults", "window_errors",
            "errors", "unfinished", "latency_ms", "deadline_ms", "late_replies", "answered_by_deadline", "behind",
            "skipped", "loadgen_cpu_cores", "server_cpu_cores", "warnings")
    return {k: r[k] for k in keep if k in r}


def run(args, log) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="clipper-soak-"))
    cfg = write_deployment(args.config, tmp / "soak.toml", extra_apps=APPS, extra_models=MODELS, extra_links=LINKS)
    report: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "machine": machine_info(), "note": args.note, "deployment": cfg.read_text(),
                    "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    server = clipper_server(cfg, tmp, args.ready_timeout, args.clipper_cmd.split(), "soak")
    results: dict = {}
    try:
        info = server.start()
        pid = server.proc.pid
        report["ready_info"] = info
        report["containers_at_start"] = len(container_pids(pid))
        warmup, drain = 2.0, 3.0
        t_begin = time.monotonic()
        until = t_begin + warmup + args.duration + 0.5  # the loadgen's workers start ~0.5 s after the call
        rss = RssSampler(pid, args.rss_interval).start()
        faults = Faults(pid, args.kill_every, args.stop_every, args.stop_s, until)
        rest = RestClient(int(info["rest_port"]), ["noop-cached", "linear"], args.rest_rate, until)
        loads = {
            "noop": {"rate": args.rate, "unique_inputs": True},
            "noop-cached": {"rate": args.rate / 2, "unique_inputs": False, "inputs": 16},
            "linear": {"rate": args.rate / 2, "unique_inputs": True},
        }

        def one(app: str, kw: dict) -> None:
            spec = LoadSpec(port=int(info["query_port"]), app=app, mode="open", arrivals="poisson", connections=2,
                            duration_s=args.duration, warmup_s=warmup, drain_s=drain, send_quantum_us=200,
                            deadline_ms=20 + args.deadline_margin_ms, seed=list(loads).index(app), **kw)
            try:
                results[app] = run_load(spec, cpu_probe=server.cpu_seconds if app == "noop" else None)
            except LoadgenError as exc:
                results[app] = {"error": str(exc)}

        threads = [threading.Thread(target=one, args=(a, kw), daemon=True) for a, kw in loads.items()]
        for t in threads:
            t.start()
        faults.start()
        rest.start()
        for t in threads:
            t.join(args.duration + 120)
        faults.halt.set()
        faults.join(10)
        rest.join(30)
        time.sleep(min(2.0, args.rss_interval))
        rss.sample()
        rss.stop()
        report["elapsed_s"] = round(time.monotonic() - t_begin, 1)
        report["faults"] = {"events": faults.events,
                            "kills": sum(1 for e in faults.events if e["what"] == "SIGKILL"),
                            "stops": sum(1 for e in faults.events if e["what"] == "SIGSTOP")}
        report["containers_at_end"] = len(container_pids(pid))
        report["frontend_alive_at_end"] = server.proc.poll() is None
        report["rss"] = {"series": rss.series, **rss.summary(),
                         "slope_mb_per_min_last_two_thirds": slope_mb_per_min(rss.series, 1 / 3)}
        report["msgpack"] = {}
        for app, r in results.items():
            if "error" in r:
                report["msgpack"][app] = r
                continue
            log(f"  msgpack {app}: {format_summary(r)}")
            s = _slim(r)
            s["unanswered"] = r["errors"].get("lost_in_flight", 0) + r["unfinished"]
            s["answered"] = r["latency_ms"]["count"] + sum(r.get("window_errors", {}).values())
            report["msgpack"][app] = s
        report["rest"] = rest.report()
        log(f"  REST: {report['rest']}")
    finally:
        report["exit_code"] = server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    m = report.get("msgpack", {})
    report["summary"] = {
        "duration_s": args.duration,
        "rss_first_mb": report.get("rss", {}).get("first_mb"),
        "rss_peak_mb": report.get("rss", {}).get("peak_mb"),
        "rss_last_mb": report.get("rss", {}).get("last_mb"),
        "rss_slope_mb_per_min": report.get("rss", {}).get("slope_mb_per_min_last_two_thirds"),
        "msgpack_answered": sum(v.get("answered", 0) for v in m.values()),
        "msgpack_unanswered": sum(v.get("unanswered", 0) for v in m.values()),
        "msgpack_late": sum(v.get("late_replies", 0) for v in m.values()),
        "msgpack_errors_in_window": {k: sum(v.get("window_errors", {}).get(k, 0) for v in m.values())
                                     for k in sorted({k for v in m.values() for k in v.get("window_errors", {})})},
        "rest_answered": report.get("rest", {}).get("answered"),
        "rest_unanswered": report.get("rest", {}).get("unanswered"),
        "kills": report.get("faults", {}).get("kills"),
        "stops": report.get("faults", {}).get("stops"),
        "frontend_alive_at_end": report.get("frontend_alive_at_end"),
    }
    return report


def summary_line(s: dict) -> str:
    slope = s["rss_slope_mb_per_min"]
    return (f"soak {s['duration_s']:g} s: RSS {s['rss_first_mb']} -> {s['rss_last_mb']} MB (peak {s['rss_peak_mb']}), "
            f"slope {'-' if slope is None else f'{slope:+.3f}'} MB/min over the last two thirds; msgpack answered "
            f"{s['msgpack_answered']:,} (unanswered {s['msgpack_unanswered']}, late {s['msgpack_late']}), "
            f"errors {s['msgpack_errors_in_window']}; REST answered {s['rest_answered']} (unanswered "
            f"{s['rest_unanswered']}); faults: {s['kills']} SIGKILL, {s['stops']} SIGSTOP"
            + ("" if s["frontend_alive_at_end"] else "; FRONTEND DIED"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=1800.0, help="measured seconds (default 1800)")
    ap.add_argument("--config", type=Path, default=NOOP_TOML, help="base deployment (the noop app and model)")
    ap.add_argument("--rate", type=float, default=2000.0, help="msgpack req/s to noop (half of it to each other app)")
    ap.add_argument("--rest-rate", type=float, default=100.0, help="REST POSTs per second")
    ap.add_argument("--kill-every", type=float, default=60.0, help="SIGKILL a container this often (s; 0: never)")
    ap.add_argument("--stop-every", type=float, default=90.0, help="SIGSTOP a container this often (s; 0: never)")
    ap.add_argument("--stop-s", type=float, default=3.0, help="how long a SIGSTOPped container stays stopped")
    ap.add_argument("--rss-interval", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--deadline-margin-ms", type=float, default=30.0,
                    help="a msgpack reply is late past SLO + this (counted, not fatal)")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak.json")
    ap.add_argument("--ready-timeout", type=float, default=90.0)
    ap.add_argument("--clipper-cmd", default=f"{sys.executable} -m clipper")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.rate <= 0 or args.rest_rate <= 0 or args.rss_interval <= 0:
        ap.error("--duration, --rate, --rest-rate and --rss-interval must be > 0")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        report = run(args, log)
    except (TargetError, LoadgenError) as exc:
        print(f"soak: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(summary_line(report["summary"]))
    print(f"report: {args.out}")
    ok = report["summary"]["frontend_alive_at_end"] and all("error" not in v for v in report["msgpack"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
