"""The benchmark runner: Clipper against the echo floor, in the same run.

    python -m bench.run --scenario noop|linear|floor|all --duration 10 \\
        --out bench/results/NAME.json [--repeat K]

For each scenario it starts the echo floor (``bench.echo_server``), measures
it, stops it, then starts Clipper with the scenario's deployment file
(``python -m clipper start ...``), measures it and stops it. Each target gets

- ``single``: one connection, one request in flight (latency without load);
- ``sweep``: pipelined closed loops at a few levels (``--sweep``); the level
  with the best throughput is ``best``;
- ``open``: an open loop at ``--open-fraction`` of that best throughput.

Beside the echo floor it measures the container hop's own floor
(``bench.zmq_floor``: a bare ZeroMQ round trip between two Python
processes); a query at one in flight pays both round trips.

The JSON report holds the configuration, the machine, every measurement and,
per scenario, Clipper's figures as ratios of the floor's. ``--repeat K``
runs everything K times and the summary gives medians. Every subprocess is
stopped on exit, whatever happens (its whole process group).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .loadgen import LoadgenError, LoadSpec, format_summary, run_load
from . import zmq_floor

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = {
    # name: (deployment file, application)
    "noop": (REPO / "containers" / "examples" / "noop.toml", "noop"),
    "linear": (REPO / "containers" / "examples" / "linear.toml", "linear"),
}
DEFAULT_SWEEP = "2x8,4x32,4x128"  # connections x in-flight per connection


class TargetError(RuntimeError):
    """A server could not be started or measured."""


# -------------------------------------------------------------- the machine
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for mod in ("uvloop", "msgpack", "numpy", "zmq"):
        try:
            m = __import__(mod)
            v = getattr(m, "__version__", None) or getattr(m, "version", None)
            versions[mod] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except ImportError:
            versions[mod] = None
    try:
        from clipper._native import IMPLEMENTATION
    except ImportError:
        IMPLEMENTATION = None
    dirty = _git("status", "--porcelain")
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": versions,
        "clipper_native": IMPLEMENTATION,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ------------------------------------------------------------ process CPU
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, utime + stime seconds) for every process we can read."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = raw[raw.rfind(b")") + 2 :].split()
        table[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return table


def tree_cpu_seconds(root: int) -> float | None:
    """User + system CPU seconds of ``root`` and all its live descendants."""
    if not os.path.isdir("/proc"):
        return None
    table = _proc_table()
    if root not in table:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += table[pid][1]
        stack.extend(children.get(pid, ()))
    return total


# -------------------------------------------------------------- the servers
class Server:
    """A server subprocess in its own process group, started and always stopped."""

    def __init__(self, name: str, argv: list[str], ready_file: Path, log_path: Path, ready_timeout_s: float):
        self.name = name
        self.argv = argv
        self.ready_file = ready_file
        self.log_path = log_path
        self._log = None
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self) -> dict:
        self.ready_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: we stop the whole tree
            )
        except OSError as exc:
            raise TargetError(f"cannot start {self.name} ({' '.join(self.argv)}): {exc}") from None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TargetError(
                    f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                with open(self.ready_file) as fh:
                    self.info = json.load(fh)
                if "query_port" in self.info:
                    return self.info
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise TargetError(
            f"{self.name} did not write its ready file {self.ready_file} within {self.ready_timeout_s} s; "
            f"log tail:\n{self.log_tail()}"
        )

    def cpu_seconds(self) -> float | None:
        return tree_cpu_seconds(self.proc.pid) if self.proc is not None else None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            if self._log is not None:
                self._log.close()
            return None
        try:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            # Whatever it left behind in its group goes too.
            _signal_group(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(timeout=5)
        finally:
            self._log.close()
            self.proc = None
        return proc.returncode


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def echo_server(tmp: Path, timeout_s: float, tag: str, http: bool = False) -> Server:
    """The bare echo floor (``bench.echo_server``): msgpack, or ``http`` the REST one."""
    ready = tmp / f"floor{'-http' if http else ''}.ready.json"
    argv = [sys.executable, "-m", "bench.echo_server", "--port", "0", "--ready-file", str(ready)]
    if http:
        argv.append("--http")
    return Server("floor", argv, ready, tmp / f"{tag}-floor.log", timeout_s)


def clipper_server(config: Path, tmp: Path, timeout_s: float, clipper_cmd: list[str], tag: str) -> Server:
    ready = tmp / "clipper.ready.json"
    argv = [
        *clipper_cmd,
        "start",
        "--config",
        str(config),
        "--query-port",
        "0",
        "--admin-port",
        "0",
        "--rpc-port",
        "0",
        "--rest-port",
        "0",
        "--metrics-port",
        "0",
        "--ready-file",
        str(ready),
        "--state",  # every run starts from fresh policy states
        str(tmp / f"{tag}-state.sqlite"),
    ]
    return Server("clipper", argv, ready, tmp / f"{tag}-clipper.log", timeout_s)


def config_variant(src: Path, tmp: Path, max_batch: int | None, replicas: int | None) -> Path:
    """A copy of ``src`` with every model's max_batch / replicas replaced.

    Relative ``entry`` paths become absolute when they name a file that
    exists, so the copy works from the temporary directory.
    """
    if max_batch is None and replicas is None:
        return src
    text = src.read_text()
    if max_batch is not None:
        text = re.sub(r"(?m)^(\s*max_batch\s*=\s*)\d+", rf"\g<1>{max_batch}", text)
    if replicas is not None:
        text = re.sub(r"(?m)^(\s*replicas\s*=\s*)\d+", rf"\g<1>{replicas}", text)

    def absolute(m: re.Match) -> str:
        entry = m.group(2)
        file_part, sep, attr = entry.partition(":")
        for base in (src.parent, src.parent.parent, REPO / "containers", REPO):
            cand = base / file_part
            if not Path(file_part).is_absolute() and cand.is_file():
                return f'{m.group(1)}"{cand.resolve()}{sep}{attr}"'
        return m.group(0)

    text = re.sub(r'(?m)^(\s*entry\s*=\s*)"([^"]+)"', absolute, text)
    dst = tmp / f"{src.stem}.variant.toml"
    dst.write_text(text)
    return dst


# ------------------------------------------------------------ measurements
def parse_sweep(text: str) -> list[tuple[int, int]]:
    levels = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part)
        if not m:
            raise argparse.ArgumentTypeError(
                f"sweep level {part!r}; expected CONNECTIONSxINFLIGHT, e.g. 4x64"
            )
        levels.append((int(m.group(1)), int(m.group(2))))
    return levels


def measure_target(server: Server, app: str, args, log) -> dict:
    """Start ``server``, run single / sweep / open against it, stop it."""
    out: dict = {"server": server.name, "argv": server.argv}
    t0 = time.monotonic()
    try:
        info = server.start()
        out["ready_s"] = round(time.monotonic() - t0, 3)
        out["ready_info"] = info
        port = int(info["query_port"])
        if args.idle_s > 0:
            a = server.cpu_seconds()
            time.sleep(args.idle_s)
            b = server.cpu_seconds()
            if a is not None and b is not None:
                out["idle_cpu_cores"] = round((b - a) / args.idle_s, 4)
        common = dict(
            port=port,
            app=app,
            duration_s=args.duration,
            warmup_s=args.warmup,
            drain_s=args.drain,
            inputs=args.inputs,
            unique_inputs=args.unique_inputs,
            seed=args.seed,
            engine=args.engine,
        )

        def one(label: str, **kw) -> dict:
            r = run_load(LoadSpec(**common, **kw), cpu_probe=server.cpu_seconds)
            log(f"  {server.name} {label}: {format_summary(r)}")
            if server.proc is not None and server.proc.poll() is not None:
                raise TargetError(f"{server.name} exited during {label}; log tail:\n{server.log_tail()}")
            return r

        out["single"] = one("single", mode="closed", workers=1, connections=1, concurrency=1)
        out["sweep"] = []
        for conns, depth in args.sweep:
            out["sweep"].append(
                one(
                    f"closed {conns}x{depth}",
                    mode="closed",
                    workers=args.workers,
                    connections=conns,
                    concurrency=depth,
                )
            )
        # Best = most non-default answers per second (a default is a missed SLO).
        best_i = max(range(len(out["sweep"])), key=lambda i: out["sweep"][i]["goodput_rps"])
        out["best_index"] = best_i
        best = out["sweep"][best_i]
        if args.open_fraction > 0 and best["throughput_rps"] > 0:
            rate = round(best["throughput_rps"] * args.open_fraction, 1)
            out["open"] = one(
                f"open {args.open_fraction:.0%}",
                mode="open",
                workers=args.workers,
                connections=best["connections"],
                rate=rate,
                arrivals=args.arrivals,
                send_quantum_us=args.open_quantum_us,
            )
            out["open"]["fraction_of_best"] = args.open_fraction
    except (TargetError, LoadgenError) as exc:
        out["error"] = str(exc)
        log(f"  {server.name}: FAILED: {exc}")
    finally:
        out["exit_code"] = server.stop()
    return out


def ratios(floor: dict, clipper: dict) -> dict:
    def best(t):
        return t["sweep"][t["best_index"]] if "best_index" in t else None

    fb, cb = best(floor), best(clipper)
    r: dict = {}
    if fb and cb and fb["throughput_rps"]:
        r["throughput_ratio"] = round(cb["throughput_rps"] / fb["throughput_rps"], 4)
    fs, cs = floor.get("single"), clipper.get("single")
    if fs and cs and fs["latency_ms"]["p50"] and cs["latency_ms"]["p50"]:
        r["p50_at_1_ratio"] = round(cs["latency_ms"]["p50"] / fs["latency_ms"]["p50"], 3)
    return r


def key_figures(target: dict) -> dict:
    """The handful of numbers a scenario line reports for one target."""
    if "error" in target or "best_index" not in target:
        return {}
    best = target["sweep"][target["best_index"]]
    fig = {
        "throughput_rps": best["throughput_rps"],
        "best_level": f"{best['connections']}x{best['concurrency']}",
        "p50_ms": best["latency_ms"]["p50"],
        "p99_ms": best["latency_ms"]["p99"],
        "p50_at_1_ms": target["single"]["latency_ms"]["p50"],
        "p99_at_1_ms": target["single"]["latency_ms"]["p99"],
        "errors": sum(m["errors_total"] for m in [target["single"], *target["sweep"]])
        + (target["open"]["errors_total"] if "open" in target else 0),
        "defaults": best["defaults"],
    }
    if "open" in target:
        o = target["open"]
        fig.update(
            open_rate_rps=o["rate_rps"],
            open_p50_ms=o["latency_ms"]["p50"],
            open_p99_ms=o["latency_ms"]["p99"],
            open_behind=o["behind"],
        )
    if "idle_cpu_cores" in target:
        fig["idle_cpu_cores"] = target["idle_cpu_cores"]
    return fig


def _median(values):
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return round(statistics.median(values), 4) if values else None


def summarize(runs: list[dict], scenarios: list[str]) -> dict:
    """Medians over the repeats, per scenario and target."""
    summary = {}
    for name in scenarios:
        per = [run["scenarios"].get(name, {}) for run in runs]
        entry: dict = {"repeats": len(per)}
        for target in ("floor", "clipper"):
            figs = [key_figures(p[target]) for p in per if target in p]
            figs = [f for f in figs if f]
            if not figs:
                continue
            keys = {k for f in figs for k in f}
            med = {k: _median([f.get(k) for f in figs]) for k in sorted(keys)}
            med = {k: v for k, v in med.items() if v is not None}
            med["best_levels"] = sorted({f["best_level"] for f in figs})
            if any("open_behind" in f for f in figs):
                med["open_behind_any"] = any(f.get("open_behind") for f in figs)
            med["measured"] = len(figs)
            entry[target] = med
        zmq_p50 = _median([p.get("zmq_floor", {}).get("p50_ms") for p in per])
        if zmq_p50 is not None:
            entry["zmq_rtt_p50_ms"] = zmq_p50
        for k in ("throughput_ratio", "p50_at_1_ratio"):
            v = _median([p.get("ratios", {}).get(k) for p in per])
            if v is not None:
                entry[k] = v
        errs = [p[t]["error"] for p in per for t in ("floor", "clipper") if t in p and "error" in p[t]]
        if errs:
            entry["failures"] = errs
        summary[name] = entry
    return summary


def summary_line(name: str, s: dict) -> str:
    f, c = s.get("floor"), s.get("clipper")
    if name == "floor":
        if not f:
            return f"{name}: floor failed: {s.get('failures')}"
        return (
            f"floor: {f['throughput_rps']:,.0f} req/s (at {','.join(f['best_levels'])}); "
            f"p99 {f['p99_ms']:.2f} ms; p50@1 {f['p50_at_1_ms']:.3f} ms"
        )
    if not c or not f:
        fails = "; ".join(x.splitlines()[0] for x in s.get("failures", [])) or "no measurement"
        return f"{name}: FAILED: {fails}"
    pct = f" = {s['throughput_ratio']:.0%} of" if "throughput_ratio" in s else " vs"
    line = (
        f"{name}: {c['throughput_rps']:,.0f} req/s{pct} floor {f['throughput_rps']:,.0f} req/s; "
        f"p99 {c['p99_ms']:.1f} ms; p50@1 {c['p50_at_1_ms']:.2f} ms (floor {f['p50_at_1_ms']:.2f} ms"
        + (f", ZeroMQ round trip {s['zmq_rtt_p50_ms']:.2f} ms)" if "zmq_rtt_p50_ms" in s else ")")
    )
    if "open_p99_ms" in c:
        line += f"; open@{c['open_rate_rps']:,.0f}/s p50 {c['open_p50_ms']:.2f} p99 {c['open_p99_ms']:.1f} ms"
        if c.get("open_behind_any"):
            line += " (generator behind!)"
    if c.get("errors"):
        line += f"; {c['errors']:.0f} errors"
    if c.get("defaults"):
        line += f"; {c['defaults']:.0f} defaults"
    if s.get("repeats", 1) > 1:
        line += f" [median of {s['repeats']}]"
    return line


# --------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description="Clipper against the echo floor.")
    ap.add_argument("--scenario", choices=("noop", "linear", "floor", "all"), default="all")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per measurement")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each measurement")
    ap.add_argument("--drain", type=float, default=2.0, help="seconds in-flight requests get after a window")
    ap.add_argument("--repeat", type=int, default=1, help="run everything K times; the summary has medians")
    ap.add_argument("--out", type=Path, help="JSON report (default bench/results/<scenario>-<time>.json)")
    ap.add_argument("--workers", type=int, default=1,
                    help="load generator processes for sweep and open loop "
                    "(each competes with the server for CPU)")
    ap.add_argument("--sweep", type=parse_sweep, default=parse_sweep(DEFAULT_SWEEP),
                    help=f"closed-loop levels, CONNECTIONSxINFLIGHT (default {DEFAULT_SWEEP})")
    ap.add_argument("--open-fraction", type=float, default=0.5,
                    help="open loop at this fraction of the best throughput; 0 skips it")
    ap.add_argument("--arrivals", choices=("uniform", "poisson"), default="poisson")
    ap.add_argument("--open-quantum-us", type=float, default=100.0,
                    help="open loop: the sender wakes at most this often "
                    "(saves generator CPU; the delay is measured)")
    ap.add_argument("--inputs", type=int, default=16, help="distinct inputs in the request pool")
    ap.add_argument("--unique-inputs", action="store_true", help="every request a new input (no cache hits)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", choices=("python", "c"), default="python",
                    help="the load generator's workers: python (uvloop) or c (bench/cload: a tenth of the CPU per "
                         "request, so more of the 2 cores is left to the server measured)")
    ap.add_argument("--max-batch", type=int, help="run Clipper with this max_batch for every model")
    ap.add_argument("--replicas", type=int, help="run Clipper with this many replicas of every model")
    ap.add_argument("--ready-timeout", type=float, default=90.0, help="seconds a server gets to become ready")
    ap.add_argument("--idle-s", type=float, default=1.0, help="seconds of idle server CPU measured first")
    ap.add_argument("--clipper-cmd", default=f"{sys.executable} -m clipper",
                    help="how to invoke Clipper's CLI ('start ...' is appended)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    scenarios = ["noop", "linear"] if args.scenario == "all" else [args.scenario]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_path = args.out or REPO / "bench" / "results" / f"{args.scenario}-{stamp}.json"

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    # SIGTERM unwinds like Ctrl-C, so every finally stops its subprocess.
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="clipper-bench-"))
    report = {
        "config": {
            **{k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()},
            "sweep": [f"{c}x{d}" for c, d in args.sweep],
            "scenarios": scenarios,
        },
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": [],
    }
    failed = False
    try:
        for rep in range(args.repeat):
            run = {"repeat": rep, "scenarios": {}}
            report["runs"].append(run)
            for name in scenarios:
                log(f"[{rep + 1}/{args.repeat}] {name}")
                res: dict = {}
                run["scenarios"][name] = res  # partial results survive an interrupt
                app = SCENARIOS[name][1] if name in SCENARIOS else "noop"
                tag = f"{name}-{rep}"
                res["floor"] = measure_target(echo_server(tmp, args.ready_timeout, tag), app, args, log)
                try:  # the container hop's floor, beside the echo floor's p50@1
                    res["zmq_floor"] = zmq_floor.measure(count=max(1000, int(args.duration * 2000)))
                    log(f"  zmq round trip: p50 {res['zmq_floor']['p50_ms']:.3f} ms, "
                        f"p99 {res['zmq_floor']['p99_ms']:.3f} ms")
                except RuntimeError as exc:
                    log(f"  zmq round trip: FAILED: {exc}")
                if name in SCENARIOS:
                    config = config_variant(SCENARIOS[name][0], tmp, args.max_batch, args.replicas)
                    res["config_file"] = str(SCENARIOS[name][0].relative_to(REPO))
                    if config != SCENARIOS[name][0]:
                        res["config_variant"] = config.read_text()
                    server = clipper_server(config, tmp, args.ready_timeout, args.clipper_cmd.split(), tag)
                    res["clipper"] = measure_target(server, app, args, log)
                    res["ratios"] = ratios(res["floor"], res["clipper"])
                failed |= any("error" in res[t] for t in ("floor", "clipper") if t in res)
    except KeyboardInterrupt:
        report["interrupted"] = True
        failed = True
        log("interrupted")
    finally:
        report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        report["summary"] = summarize(report["runs"], scenarios)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "w") as fh:
            json.dump(report, fh, indent=1)
        if failed:  # keep the servers' logs next to the report
            logs = out_path.with_suffix(".logs")
            shutil.rmtree(logs, ignore_errors=True)
            shutil.copytree(tmp, logs, ignore=shutil.ignore_patterns("*.json", "*.toml"))
            log(f"server logs kept in {logs}")
        shutil.rmtree(tmp, ignore_errors=True)
    for name in scenarios:
        print(summary_line(name, report["summary"][name]))
    print(f"report: {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
