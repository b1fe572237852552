"""Deployers for saved models, measured: served through Clipper, and the per-call cost of each predictor.

    python -m bench.deployers --duration 5 --out bench/results/deployers.json

served (one frontend, one run)
    The digits classifier (a scikit-learn logistic regression on the bundled
    digits, trained here) served two ways side by side by one ``clipper
    start`` frontend: converted to ONNX and deployed with the ONNX deployer
    (``deploy_model_file("onnx", ...)``), and as a plain Python function
    container calling scikit-learn's ``predict`` (the path a model author
    takes without deployers). Both take float32[64] and answer labels; the
    prediction cache is off and every input is unique. Per model: latency
    at one request in flight (p50, p99) and the closed-loop throughput and
    p99 at ``--sweep`` (connections x in flight per connection), measured
    one after the other with the same load generator; the ONNX/function
    ratios are from the same run.
overhead (in this process)
    For each deployer installed here and each batch size: the median time of
    the deployer's ``predict(batch)`` against the framework's own call on the
    same model and batch (``session.run``, ``estimator.predict``,
    ``booster.inplace_predict``, ``booster.predict``, ``module(tensor)``);
    the difference is what the deployer adds (output conversion, checks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .run import clipper_server, machine_info

FUNCTION_MODEL = '''"""The digits classifier through the Python-function path: predict(batch) over a skops file."""
import os

import numpy as np
import skops.io as sio

_model = sio.load(os.environ["DIGITS_SKOPS"], trusted=None)


def predict(batch):
    return _model.predict(batch).astype(np.int64)
'''


def log(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def build_models(folder: Path, kinds=("onnx", "xgboost", "lightgbm", "torch")) -> dict:
    """Digits models of every installed kind (sklearn and ``kinds``), trained here:
    kind -> (path, raw call(batch), deploy options)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    logreg = LogisticRegression(max_iter=1000).fit(X, y)
    out: dict = {}
    import skops.io as sio

    sio.dump(logreg, folder / "digits.skops")
    out["sklearn"] = (folder / "digits.skops", logreg.predict, {})
    try:
        if "onnx" not in kinds:
            raise ImportError
        import onnxruntime as ort
        from skl2onnx import to_onnx

        onx = to_onnx(logreg, X[:1], options={id(logreg): {"zipmap": False}})
        (folder / "digits.onnx").write_bytes(onx.SerializeToString())
        from clipper.deployers.onnx_model import make_session

        sess = make_session(str(folder / "digits.onnx"))  # the same session options as the deployer's
        name = sess.get_inputs()[0].name
        out["onnx"] = (folder / "digits.onnx", lambda b, s=sess, n=name: s.run(["label"], {n: b})[0], {})
        del ort
    except ImportError:
        pass
    try:
        if "xgboost" not in kinds:
            raise ImportError
        import xgboost as xgb

        clf = xgb.XGBClassifier(n_estimators=20, max_depth=4, n_jobs=1).fit(X, y)
        clf.save_model(folder / "digits-xgb.json")
        booster = clf.get_booster()
        booster.set_param({"nthread": 1})
        out["xgboost"] = (folder / "digits-xgb.json", booster.inplace_predict, {})
    except ImportError:
        pass
    try:
        if "lightgbm" not in kinds:
            raise ImportError
        import lightgbm as lgb

        clf = lgb.LGBMClassifier(n_estimators=20, num_leaves=15, n_jobs=1, verbose=-1).fit(X, y)
        clf.booster_.save_model(folder / "digits-lgb.txt")
        b = lgb.Booster(model_file=str(folder / "digits-lgb.txt"))
        out["lightgbm"] = (folder / "digits-lgb.txt", lambda x, b=b: b.predict(x, num_threads=1), {})
    except ImportError:
        pass
    try:
        if "torch" not in kinds:
            raise ImportError
        import torch

        torch.manual_seed(0)
        torch.set_num_threads(1)
        net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
        ep = torch.export.export(net, (torch.zeros(2, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(ep, folder / "digits.pt2")
        mod = torch.export.load(folder / "digits.pt2").module()

        def raw(x, mod=mod):
            with torch.inference_mode():
                return mod(torch.from_numpy(x)).numpy()

        out["torch"] = (folder / "digits.pt2", raw, {})
    except ImportError:
        pass
    return {"X": X, "y": y, "models": out}


def _median_us(fn, batch, seconds: float, min_calls: int = 20) -> float:
    fn(batch)  # warm-up
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < deadline:
        t0 = time.perf_counter_ns()
        fn(batch)
        times.append(time.perf_counter_ns() - t0)
    return float(np.median(times)) / 1000


def measure_overhead(args, built: dict) -> dict:
    """Per kind and batch size: the deployer's predict against the framework's own call (median us)."""
    import warnings

    from clipper.deployers import inspect_model_file, predictor_for

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    X = built["X"]
    out = {}
    for kind, (path, raw, _) in built["models"].items():
        d = inspect_model_file(kind, path, input_dtype="float32" if kind == "sklearn" else None)
        pred = predictor_for(d).predict
        rows = []
        for size in args.batch_sizes:
            batch = np.ascontiguousarray(X[np.arange(size) % len(X)], dtype=d.input_dtype)
            batch.setflags(write=False)  # as a container receives it: a read-only view of the frame
            # interleaved, twice each, so drift on a shared machine hits both
            r1, p1 = _median_us(raw, batch, args.overhead_s), _median_us(pred, batch, args.overhead_s)
            r2, p2 = _median_us(raw, batch, args.overhead_s), _median_us(pred, batch, args.overhead_s)
            r, p = min(r1, r2), min(p1, p2)
            rows.append({"batch_size": size, "framework_us": round(r, 2), "deployer_us": round(p, 2),
                         "overhead_us": round(p - r, 2), "ratio": round(p / r, 3) if r > 0 else None})
        out[kind] = {"output_kind": d.output_kind, "sizes": rows}
        log(args, f"overhead {kind}: " + "; ".join(
            f"b={row['batch_size']} {row['framework_us']:.1f} -> {row['deployer_us']:.1f} us "
            f"(+{row['overhead_us']:.1f})" for row in rows))
    return out


def measure_served(args, built: dict, tmp: Path) -> dict:
    """The ONNX deployer against the Python-function path, one frontend, the same load."""
    from bench.loadgen import LoadSpec, run_load
    from clipper.management.admin_client import AdminClient

    models = built["models"]
    if "onnx" not in models:
        raise SystemExit("bench.deployers: the served comparison needs onnxruntime and skl2onnx")
    config = tmp / "frontend.toml"
    config.write_text("[frontend]\nhost = \"127.0.0.1\"\n")
    fn_file = tmp / "digits_fn.py"
    fn_file.write_text(FUNCTION_MODEL)
    server = clipper_server(config, tmp, args.ready_timeout, [sys.executable, "-m", "clipper"], "deployers")
    results = {}
    try:
        info = server.start()
        admin = AdminClient("127.0.0.1", info["admin_port"], timeout=120)
        threads = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        onnx_out = admin.deploy_model_file("onnx", "digits-onnx", "1", str(models["onnx"][0]),
                                           max_batch=args.max_batch, env=threads)
        onnx_deploy_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        admin.deploy_model("digits-fn", "1", "float32", [64], entry=f"{fn_file}:predict", max_batch=args.max_batch,
                           env={**threads, "DIGITS_SKOPS": str(models["sklearn"][0])})
        fn_deploy_s = time.perf_counter() - t0
        for app, model in (("onnx", "digits-onnx"), ("fn", "digits-fn")):
            admin.register_application(app, "float32", [64], slo_ms=args.slo_ms, cache=False, output_kind="label")
            admin.link_model_to_app(app, model)
        replicas = {r["model"]: r for r in admin.status()["replicas"]}
        results["deploy"] = {
            "onnx": {"deploy_s": round(onnx_deploy_s, 2), "load_ms": replicas["digits-onnx:1"]["load_ms"],
                     "rss_mib": round(replicas["digits-onnx:1"]["rss_bytes"] / 2**20, 1),
                     "deployer": onnx_out["deployer"]},
            "fn": {"deploy_s": round(fn_deploy_s, 2), "load_ms": replicas["digits-fn:1"]["load_ms"],
                   "rss_mib": round(replicas["digits-fn:1"]["rss_bytes"] / 2**20, 1)}}
        conns, inflight = (int(v) for v in args.sweep.split("x"))
        base = dict(port=info["query_port"], dtype="float32", shape=(64,), unique_inputs=True,
                    duration_s=args.duration, warmup_s=args.warmup, engine=args.engine, workers=1)
        for rnd in range(args.repeat):
            for app in ("onnx", "fn") if rnd % 2 == 0 else ("fn", "onnx"):
                single = run_load(LoadSpec(app=app, connections=1, concurrency=1, **base))
                loaded = run_load(LoadSpec(app=app, connections=conns, concurrency=inflight, **base))
                r = results.setdefault(app, {"single": [], "loaded": []})
                r["single"].append({"p50_ms": single["latency_ms"]["p50"], "p99_ms": single["latency_ms"]["p99"],
                                    "rps": single["throughput_rps"]})
                r["loaded"].append({"rps": loaded["goodput_rps"], "p50_ms": loaded["latency_ms"]["p50"],
                                    "p99_ms": loaded["latency_ms"]["p99"], "errors": loaded.get("errors", 0)})
                log(args, f"{app} round {rnd}: 1 in flight p50 {single['latency_ms']['p50']:.3f} ms; "
                          f"{args.sweep}: {loaded['goodput_rps']:,.0f} req/s p99 {loaded['latency_ms']['p99']:.2f} ms")
        status = admin.status()
        results["batches"] = {k: {"mean_batch_size": q["mean_batch_size"], "batches": q["batches_sent"]}
                              for k, q in status["traffic"]["models"].items()}
    finally:
        server.stop()

    def med(app, part, key):
        return float(np.median([r[key] for r in results[app][part]]))

    results["summary"] = {
        "onnx_p50_at_1_ms": med("onnx", "single", "p50_ms"), "fn_p50_at_1_ms": med("fn", "single", "p50_ms"),
        "onnx_rps": med("onnx", "loaded", "rps"), "fn_rps": med("fn", "loaded", "rps"),
        "onnx_p99_loaded_ms": med("onnx", "loaded", "p99_ms"), "fn_p99_loaded_ms": med("fn", "loaded", "p99_ms"),
    }
    s = results["summary"]
    s["rps_ratio_onnx_over_fn"] = round(s["onnx_rps"] / s["fn_rps"], 3) if s["fn_rps"] else None
    s["p50_at_1_ratio_onnx_over_fn"] = round(s["onnx_p50_at_1_ms"] / s["fn_p50_at_1_ms"], 3)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.deployers", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per load measurement")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=2, help="rounds of (onnx, fn), alternating their order")
    p.add_argument("--sweep", default="4x32", help="closed-loop load: CONNECTIONSxIN_FLIGHT")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--slo-ms", type=float, default=100.0)
    p.add_argument("--engine", choices=("python", "c"), default="c")
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32, 128])
    p.add_argument("--overhead-s", type=float, default=0.3, help="seconds per in-process timing")
    p.add_argument("--skip-served", action="store_true")
    p.add_argument("--kinds", default="onnx,xgboost,lightgbm,torch",
                   help="deployers timed beside sklearn (those installed); the served part needs onnx")
    p.add_argument("--ready-timeout", type=float, default=90.0)
    p.add_argument("--out", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = {"bench": "deployers", "machine": machine_info(), "args": vars(args),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="clipper-bench-deployers-") as tmp:
        tmp = Path(tmp)
        built = build_models(tmp, tuple(args.kinds.split(",")))
        report["overhead"] = measure_overhead(args, built)
        if not args.skip_served:
            report["served"] = measure_served(args, built, tmp)
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    s = report.get("served", {}).get("summary")
    if s:
        print(f"served digits: ONNX deployer {s['onnx_rps']:,.0f} req/s vs Python function {s['fn_rps']:,.0f} req/s "
              f"(x{s['rps_ratio_onnx_over_fn']}); p50 at 1 in flight {s['onnx_p50_at_1_ms']:.3f} vs "
              f"{s['fn_p50_at_1_ms']:.3f} ms; p99 under load {s['onnx_p99_loaded_ms']:.2f} vs "
              f"{s['fn_p99_loaded_ms']:.2f} ms")
    for kind, r in report["overhead"].items():
        print(f"overhead {kind} ({r['output_kind']}): " + ", ".join(
            f"b{row['batch_size']} {row['framework_us']:.1f}->{row['deployer_us']:.1f} us" for row in r["sizes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
