"""What TLS costs on the query ports: msgpack and REST, plain against TLS, in one run.

    scripts/bench-setup.sh     # wrk, from the system's packages
    python -m bench.tls --duration 6 --repeat 3 --out bench/results/tls-r3.json

A throwaway CA and a server certificate for 127.0.0.1 (ECDSA P-256) are made
with the openssl command line in a temporary folder. Two Clipper frontends
serve the same deployment file (default ``containers/examples/noop.toml``:
the no-op model, 784 float32 inputs, the cache off) for the whole run: one
plain, one with ``--tls-cert/--tls-key``; the one not measured idles (about
0.01 core). Each repeat measures, back to back so that the two sides of a
pair see the same machine (the order alternates between repeats):

1. msgpack, plain then TLS: ``bench.loadgen`` closed loops
   (``--msgpack-level``), with TLS the certificate verified against the CA;
2. REST, plain then TLS: wrk with ``--connections`` keep-alive connections,
   ``https://`` on the TLS frontend.

Connections are made before the measured window, so the figures are the
steady-state cost of TLS (encryption and record framing), not handshakes.
Reported per side: throughput, latency percentiles, the load generator's CPU
and the server's. The summary has, per port, the medians over the repeats of
each side, and the TLS / plain ratios: ``paired`` (the median of the
per-repeat ratios, robust to drift on a shared machine: the headline) and
``of_medians``. Both frontends are stopped whatever happens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .loadgen import LoadSpec, format_summary, run_load
from .rest import run_wrk
from .run import REPO, clipper_server, machine_info, parse_sweep

VARIANTS = ("plain", "tls")


def make_certs(folder: Path, openssl: str = "openssl") -> dict:
    """A CA and a server certificate it signed for 127.0.0.1 and localhost, in ``folder``."""
    def run(*argv):
        r = subprocess.run([openssl, *argv], cwd=folder, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(argv)} failed: {r.stderr}")

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=clipper bench CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (folder / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                                    "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "ext.cnf")
    return {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a, b):
    return round(a / b, 4) if a is not None and b else None


def start_frontend(args, variant: str, certs: dict, tmp: Path):
    server = clipper_server(args.config, tmp, args.ready_timeout, args.clipper_cmd.split(), variant)
    server.ready_file = tmp / f"{variant}.ready.json"  # two frontends at once: one ready file each
    server.argv[server.argv.index("--ready-file") + 1] = str(server.ready_file)
    if variant == "tls":
        server.argv += ["--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"])]
    return server


def negotiated(certs: dict, port: int) -> dict:
    """The TLS version and cipher a client of this Python (and OpenSSL) gets from the frontend."""
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        return {"version": s.version(), "cipher": s.cipher()[0]}


def measure_msgpack(args, variant: str, rep: int, server, info: dict, certs: dict, conns: int, depth: int) -> dict:
    tls = variant == "tls"
    spec = LoadSpec(port=int(info["query_port"]), app=args.app, mode="closed", connections=conns,
                    concurrency=depth, duration_s=args.duration, warmup_s=args.warmup, drain_s=2.0,
                    tls=tls, tls_cafile=str(certs["ca"]) if tls else None)
    mp = run_load(spec, cpu_probe=server.cpu_seconds)
    print(f"[{rep + 1}/{args.repeat}] {variant} msgpack: {format_summary(mp)}", file=sys.stderr)
    return {"throughput_rps": mp["throughput_rps"], "latency_ms": mp["latency_ms"], "errors": mp["errors_total"],
            "defaults": mp["defaults"], "loadgen_cpu_cores": mp["loadgen_cpu_cores"],
            "server_cpu_cores": mp.get("server_cpu_cores"), "warnings": mp["warnings"]}


def measure_rest(args, variant: str, rep: int, server, info: dict, body: str, tmp: Path) -> dict:
    rest = run_wrk(args, int(info["rest_port"]), args.app, body, tmp, scheme="https" if variant == "tls" else "http",
                   cpu_probe=server.cpu_seconds)
    print(f"[{rep + 1}/{args.repeat}] {variant} REST (wrk): {rest['throughput_rps']:,.0f} req/s "
          f"p50 {rest['latency_ms'].get('p50')} p99 {rest['latency_ms'].get('p99')} ms; "
          f"non-2xx {rest['non_2xx']}; wrk cpu {rest['loadgen_cpu_cores']} cores", file=sys.stderr)
    return {k: v for k, v in rest.items() if k != "raw"}


def summarize(runs: list[dict]) -> dict:
    """Medians over the repeats per variant and port, and TLS / plain ratios of those medians."""
    out: dict = {}
    for port in ("msgpack", "rest"):
        med = {}
        for variant in VARIANTS:
            rs = [r[variant][port] for r in runs]
            med[variant] = {
                "throughput_rps": _median(r["throughput_rps"] for r in rs),
                "p50_ms": _median(r["latency_ms"].get("p50") for r in rs),
                "p99_ms": _median(r["latency_ms"].get("p99") for r in rs),
                "loadgen_cpu_cores": _median(r["loadgen_cpu_cores"] for r in rs),
                "server_cpu_cores": _median(r.get("server_cpu_cores") for r in rs),
            }
        p, t = med["plain"], med["tls"]

        def figure(r: dict, key: str):
            return r["latency_ms"].get(key[:-3]) if key.endswith("_ms") else r.get(key)

        per_repeat = {k: [_ratio(figure(r["tls"][port], k), figure(r["plain"][port], k)) for r in runs] for k in p}
        out[port] = {
            **med,
            "tls_vs_plain": {
                "paired": {k: _median(v) for k, v in per_repeat.items()},
                "of_medians": {k: _ratio(t[k], p[k]) for k in p},
                "per_repeat": per_repeat,
            },
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=REPO / "containers" / "examples" / "noop.toml")
    ap.add_argument("--app", default="noop")
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32, help="wrk's keep-alive connections (= requests in flight)")
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--msgpack-level", type=parse_sweep, default=parse_sweep("4x8"),
                    help="loadgen CONNECTIONSxIN_FLIGHT (default 4x8: the same 32 in flight)")
    ap.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    ap.add_argument("--openssl", default=shutil.which("openssl") or "openssl")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tls.json")
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--clipper-cmd", default=f"{sys.executable} -m clipper")
    args = ap.parse_args(argv)
    for tool, hint in ((args.wrk, "run scripts/bench-setup.sh (it installs wrk)"), (args.openssl, "install openssl")):
        if shutil.which(tool) is None:
            print(f"bench.tls needs {tool}: {hint}", file=sys.stderr)
            return 2
    x = np.random.default_rng(0).random(784, dtype=np.float32)
    body = json.dumps({"input": [round(float(v), 6) for v in x]})
    (conns, depth), = args.msgpack_level
    report: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "machine": machine_info(), "body_bytes": len(body),
                    "certificate": "ECDSA P-256 from a CA made for the run", "openssl": ssl.OPENSSL_VERSION,
                    "runs": []}
    report["config"]["msgpack_level"] = f"{conns}x{depth}"
    tmp = Path(tempfile.mkdtemp(prefix="clipper-tls-"))
    servers: dict = {}
    try:
        certs = make_certs(tmp, args.openssl)
        infos = {}
        for variant in VARIANTS:
            servers[variant] = start_frontend(args, variant, certs, tmp)
            infos[variant] = servers[variant].start()
        report["negotiated"] = negotiated(certs, int(infos["tls"]["query_port"]))
        for rep in range(args.repeat):
            order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
            run: dict = {"order": list(order), **{v: {} for v in VARIANTS}}
            for variant in order:
                run[variant]["msgpack"] = measure_msgpack(args, variant, rep, servers[variant], infos[variant], certs,
                                                          conns, depth)
            for variant in order:
                run[variant]["rest"] = measure_rest(args, variant, rep, servers[variant], infos[variant], body, tmp)
            report["runs"].append(run)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report["summary"] = s = summarize(report["runs"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"negotiated: {report['negotiated']}")
    for port in ("msgpack", "rest"):
        p, t, r = s[port]["plain"], s[port]["tls"], s[port]["tls_vs_plain"]["paired"]
        print(f"{port}: plain {p['throughput_rps']:,.0f} req/s p50 {p['p50_ms']} p99 {p['p99_ms']} ms, loadgen "
              f"{p['loadgen_cpu_cores']} cores | TLS {t['throughput_rps']:,.0f} req/s p50 {t['p50_ms']} p99 "
              f"{t['p99_ms']} ms, loadgen {t['loadgen_cpu_cores']} cores | TLS/plain (paired): throughput "
              f"{r['throughput_rps']}x, p50 {r['p50_ms']}x, p99 {r['p99_ms']}x, loadgen cpu "
              f"{r['loadgen_cpu_cores']}x, server cpu {r['server_cpu_cores']}x "
              f"(throughput per repeat {s[port]['tls_vs_plain']['per_repeat']['throughput_rps']})")
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
