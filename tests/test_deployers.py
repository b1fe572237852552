"""Deployers for saved model files (clipper.deployers), `clipper test-model`, and the load figures at handshake.

Every model is built here, on scikit-learn's bundled digits data: a logistic
regression saved with skops and converted to ONNX with skl2onnx, XGBoost and
LightGBM boosters in their native files, a small PyTorch network (exported
and scripted). Each is served end to end by a real frontend and its
deployer's container, and its answers must equal the framework's own
``predict`` on the same inputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from clipper import Client
from clipper.deployers import inspect_model_file, predictor_for
from clipper.errors import InvalidConfigError
from clipper.management.admin_client import AdminClient

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

N_QUERIES = 40
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def cli(capsys):
    """Run the `clipper` CLI in this process: (return code, stdout, stderr).

    (capsys, not redirect_stderr: the frontend's manager passes its containers' stderr through
    sys.stderr.buffer, which a StringIO lacks.)"""
    from clipper.cli import main

    def run(*argv) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    return X[:1000], y[:1000], X[1000:1000 + N_QUERIES]


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    """name -> (path, the framework's own model) for every kind installed here."""
    folder = tmp_path_factory.mktemp("models")
    X, y, _ = digits
    out = {}
    from sklearn.linear_model import LogisticRegression

    logreg = LogisticRegression(max_iter=300).fit(X, y)
    try:
        import skops.io as sio

        sio.dump(logreg, folder / "digits.skops")
        out["sklearn"] = (folder / "digits.skops", logreg)
    except ImportError:
        pass
    try:
        from skl2onnx import to_onnx

        onx = to_onnx(logreg, X[:1].astype(np.float32), options={id(logreg): {"zipmap": False}})
        (folder / "digits.onnx").write_bytes(onx.SerializeToString())
        out["onnx"] = (folder / "digits.onnx", logreg)
        onx = to_onnx(logreg, X[:1].astype(np.float32))  # with ZipMap: probabilities as a list of maps
        (folder / "digits-zipmap.onnx").write_bytes(onx.SerializeToString())
        out["onnx-zipmap"] = (folder / "digits-zipmap.onnx", logreg)
    except ImportError:
        pass
    try:
        import xgboost as xgb

        clf = xgb.XGBClassifier(n_estimators=8, max_depth=3, n_jobs=1).fit(X.astype(np.float32), y)
        clf.save_model(folder / "digits-xgb.json")
        out["xgboost"] = (folder / "digits-xgb.json", clf)
    except ImportError:
        pass
    try:
        import lightgbm as lgb

        clf = lgb.LGBMClassifier(n_estimators=8, num_leaves=8, n_jobs=1, verbose=-1).fit(X, y)
        clf.booster_.save_model(folder / "digits-lgb.txt")
        out["lightgbm"] = (folder / "digits-lgb.txt", clf)
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        return out
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)).eval()
    ep = torch.export.export(net, (torch.zeros(2, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, folder / "digits.pt2")
    torch.jit.script(net).save(str(folder / "digits.pt"))

    def run(x, net=net):
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    out["torch"] = (folder / "digits.pt2", run)
    out["torchscript"] = (folder / "digits.pt", run)
    return out


def _need(files, kind):
    if kind not in files:
        pytest.skip(f"the {kind} framework is not installed here")
    return files[kind]


def _expected(kind: str, model, X: np.ndarray, output: str) -> np.ndarray:
    """What the framework itself answers for ``X`` (in the dtype the deployment takes)."""
    if kind.startswith("torch"):
        return model(X)
    return model.predict_proba(X) if output == "probabilities" else model.predict(X)


def _serve(rf, app: str, deployer: dict, output_kind: str | None = None, *, policy: str = "single"):
    from clipper.management.registry import Application

    if app not in rf.fe.registry.applications:
        rf.call(rf.fe.register_application(Application(
            app, deployer["input_dtype"], deployer["input_shape"], slo_ms=20_000, policy=policy,
            output_kind=output_kind or deployer["output_kind"])))


# kind, output asked for (None: the deployer's default), what it must be
E2E = [("onnx", None, "label"), ("sklearn", "probabilities", "probabilities"), ("xgboost", None, "label"),
       ("lightgbm", "probabilities", "probabilities"), ("torch", None, "vector")]


@pytest.mark.parametrize("kind,output,kind_out", E2E, ids=[k for k, _, _ in E2E])
def test_serve_each_deployer_end_to_end(frontend_factory, files, digits, kind, output, kind_out):
    path, model = _need(files, kind)
    rf = frontend_factory()
    admin = AdminClient("127.0.0.1", rf.fe.admin_port, timeout=120)
    out = admin.deploy_model_file(kind, f"digits-{kind}", "1", str(path), output=output, max_batch=16)
    d = out["deployer"]
    assert d["output_kind"] == kind_out and d["input_shape"] == [64]
    assert out["env"]["CLIPPER_MODEL_FILE"] == str(path)
    app = f"app-{kind}"
    _serve(rf, app, d)
    admin.link_model_to_app(app, f"digits-{kind}")
    X = digits[2].astype(d["input_dtype"])
    with Client("127.0.0.1", rf.port, timeout=60) as client:
        preds = client.predict_many(app, X)
    assert not any(p.is_default for p in preds)
    got = [p.output for p in preds]
    want = _expected(kind, model, X, output)
    if kind_out == "label":
        assert got == [int(v) for v in want]
    else:
        assert np.allclose(np.array(got, dtype=np.float64), want, atol=1e-5), (got[:2], want[:2])
    replicas = admin.status()["replicas"]
    assert len(replicas) == 1 and replicas[0]["load_ms"] > 0 and replicas[0]["rss_bytes"] > 2**20


def test_cli_deploys_an_onnx_file_and_status_shows_load_figures(frontend_factory, files, digits, cli):
    path, model = _need(files, "onnx")
    rf = frontend_factory()
    port = str(rf.fe.admin_port)
    rc, out, err = cli("deploy", "digits-onnx", "1", "--onnx", str(path), "--output", "probabilities",
                        "--option", "intra_op_num_threads=1", "--max-batch", "8", "--admin-port", port)
    assert rc == 0, err
    d = json.loads(out)["deployer"]
    assert (d["input_dtype"], d["input_shape"], d["output_kind"]) == ("float32", [64], "probabilities")
    rc, out, err = cli("register-app", "digits", "--input-dtype", "float32", "--input-shape", "64",
                        "--output-kind", "probabilities", "--admin-port", port)
    assert rc == 0, err
    assert cli("link", "digits", "digits-onnx", "--admin-port", port)[0] == 0
    X = digits[2][:5].astype(np.float32)
    with Client("127.0.0.1", rf.port, timeout=60) as client:
        got = [p.output for p in client.predict_many("digits", X)]
    assert np.allclose(np.array(got), model.predict_proba(X), atol=1e-5)
    rc, out, err = cli("status", "--admin-port", port)
    assert rc == 0, err
    head, row = [line for line in out.splitlines() if "digits-onnx:1" in line or "rss MiB" in line][-2:]
    assert "load ms" in head and "rss MiB" in head
    load_ms, rss_mib = (float(v) for v in row.split()[-2:])
    assert 0 < load_ms < 60_000 and 1 < rss_mib < 4096
    # a deploy without an entry or a file says what it needs
    rc, out, err = cli("deploy", "x", "1", "--admin-port", port)
    assert rc == 1 and "--onnx" in err


def test_deployers_combine_as_probabilities(frontend_factory, files, digits):
    """ONNX and XGBoost answer probability rows: an Exp4 ensemble averages them, agreement is its confidence."""
    onnx_path, logreg = _need(files, "onnx")
    xgb_path, xgb_clf = _need(files, "xgboost")
    rf = frontend_factory()
    admin = AdminClient("127.0.0.1", rf.fe.admin_port, timeout=120)
    for name, kind, path in (("m-onnx", "onnx", onnx_path), ("m-xgb", "xgboost", xgb_path)):
        out = admin.deploy_model_file(kind, name, "1", str(path), output="probabilities", wait=False)
        _serve(rf, "ensemble", out["deployer"], policy="exp4")
        admin.link_model_to_app("ensemble", name)
    for name in ("m-onnx", "m-xgb"):
        rf.call(rf.fe.wait_ready(name, "1", timeout_s=60))
    X = digits[2][:10].astype(np.float32)
    with Client("127.0.0.1", rf.port, timeout=60) as client:
        preds = client.predict_many("ensemble", X)
    want = (logreg.predict_proba(X) + xgb_clf.predict_proba(X)) / 2
    got = np.array([p.output for p in preds], dtype=np.float64)
    assert np.allclose(got, want, atol=1e-5)
    agree = logreg.predict(X) == xgb_clf.predict(X)
    assert all(p.confidence == 1.0 if a else p.confidence <= 0.5 for p, a in zip(preds, agree))
    assert all(sorted(p.models) == ["m-onnx:1", "m-xgb:1"] for p in preds)


# ------------------------------------------------------------ in process
@pytest.mark.parametrize("kind,output", [("onnx-zipmap", "probabilities"), ("onnx", "label"),
                                         ("sklearn", "label"), ("xgboost", "probabilities"),
                                         ("lightgbm", "label"), ("torchscript", "label")])
def test_predictor_equals_the_framework(files, digits, kind, output):
    path, model = _need(files, kind)
    base = kind.split("-")[0].replace("torchscript", "torch")
    shape = (64,) if kind == "torchscript" else None
    d = inspect_model_file(base, path, output=output, input_shape=shape)
    X = digits[2].astype(d.input_dtype)
    got = predictor_for(d).predict(X)
    if kind == "torchscript":
        assert np.array_equal(got, model(X).argmax(axis=1))
    elif output == "label":
        assert np.array_equal(got, _expected(kind, model, X, output))
    else:
        assert np.allclose(got, _expected(kind, model, X, output), atol=1e-5)


def test_torchscript_needs_its_input_shape(files):
    path, _ = _need(files, "torchscript")
    with pytest.raises(InvalidConfigError, match="does not record its input shape"):
        inspect_model_file("torch", path)
    with pytest.raises(InvalidConfigError, match=r"cannot take a batch of float32\[63\].*shapes cannot be multiplied"):
        inspect_model_file("torch", path, input_shape=(63,))  # the probe batch fails the deploy, not a query


def test_a_missing_framework_names_its_extra(monkeypatch, files, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not really onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(InvalidConfigError, match=r"pip install 'clipper-serving\[onnx\]'"):
        inspect_model_file("onnx", path)
    from clipper.deployers.onnx_model import OnnxModel

    with pytest.raises(InvalidConfigError, match=r"clipper-serving\[onnx\]"):
        OnnxModel(str(path)).load()  # what the container's load says (and its deploy fails with)
    for module, kind, name in (("xgboost", "xgboost", "m.json"), ("lightgbm", "lightgbm", "m.txt"),
                               ("skops.io", "sklearn", "m.skops"), ("torch", "torch", "m.pt2")):
        (tmp_path / name).write_bytes(b"x")
        monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(InvalidConfigError, match=rf"clipper-serving\[{kind}\]"):
            inspect_model_file(kind, tmp_path / name)
    with pytest.raises(InvalidConfigError, match="is not one of"):
        inspect_model_file("tensorflow", path)


def test_pickles_need_the_trust_flag_and_skops_types_are_trusted_by_name(tmp_path, digits):
    pytest.importorskip("skops")
    import joblib
    import skops.io as sio
    from sklearn.ensemble import RandomForestClassifier

    X, y, Xq = digits
    forest = RandomForestClassifier(n_estimators=3, max_depth=4, random_state=0).fit(X, y)
    joblib.dump(forest, tmp_path / "forest.joblib")
    with pytest.raises(InvalidConfigError, match="runs whatever code it holds.*--trust-pickle"):
        inspect_model_file("sklearn", tmp_path / "forest.joblib")
    d = inspect_model_file("sklearn", tmp_path / "forest.joblib", trust_pickle=True)
    assert d.env["CLIPPER_MODEL_TRUST_PICKLE"] == "1"
    assert np.array_equal(predictor_for(d).predict(Xq), forest.predict(Xq))

    sio.dump(forest, tmp_path / "forest.skops")
    with pytest.raises(InvalidConfigError, match=r"sklearn\.tree\._tree\.Tree.*--trust-type"):
        inspect_model_file("sklearn", tmp_path / "forest.skops")
    with pytest.raises(InvalidConfigError, match="--trust-pickle apply to scikit-learn"):
        inspect_model_file("onnx", tmp_path / "forest.skops", trust_pickle=True)
    d = inspect_model_file("sklearn", tmp_path / "forest.skops", trusted_types=["sklearn.tree._tree.Tree"])
    assert json.loads(d.env["CLIPPER_MODEL_TRUSTED_TYPES"]) == ["sklearn.tree._tree.Tree"]
    assert "CLIPPER_MODEL_TRUST_PICKLE" not in d.env
    assert np.array_equal(predictor_for(d).predict(Xq), forest.predict(Xq))
    # the container loads with exactly the listed types: a file holding more is refused there too
    from clipper.deployers.sklearn_model import SklearnModel

    with pytest.raises(InvalidConfigError, match="does not trust"):
        SklearnModel(str(tmp_path / "forest.skops"), trusted_types=[]).load()


def _onnx_file(path, in_shape, out_shape, *, in_type=None, n_inputs=1):
    """A one-node ONNX model (ReduceSum over the last axis, or Identity), with the given input/output shapes."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    in_type = in_type or TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(f"x{i}", in_type, in_shape) for i in range(n_inputs)]
    output = helper.make_tensor_value_info("y", in_type, out_shape)
    if len(out_shape) == len(in_shape):
        node = helper.make_node("Identity", ["x0"], ["y"])
        inits = []
    else:
        node = helper.make_node("ReduceSum", ["x0", "axes"], ["y"], keepdims=0)
        inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [len(in_shape) - 1])]
    graph = helper.make_graph([node], "g", inputs, [output], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def test_onnx_input_dtype_shape_and_batch_dimension_are_read_from_the_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto

    # a double input [batch, 3, 4] summed over its last axis: float64 [3, 4] in, a vector of 3 out
    d = inspect_model_file("onnx", _onnx_file(tmp_path / "a.onnx", ["batch", 3, 4], ["batch", 3],
                                              in_type=TensorProto.DOUBLE))
    assert (d.input_dtype, d.input_shape, d.output_kind) == ("float64", (3, 4), "vector")
    x = np.arange(2 * 12, dtype=np.float64).reshape(2, 3, 4)
    assert np.array_equal(predictor_for(d).predict(x), x.sum(axis=2))
    # one value per input: a number
    d = inspect_model_file("onnx", _onnx_file(tmp_path / "b.onnx", [None, 5], [None]))
    assert (d.input_dtype, d.input_shape, d.output_kind) == ("float32", (5,), "number")
    # a fixed batch of 1 runs once per query
    d = inspect_model_file("onnx", _onnx_file(tmp_path / "c.onnx", [1, 5], [1]))
    assert d.input_shape == (5,) and "one run per query" in d.notes[0]
    x = np.ones((3, 5), dtype=np.float32)
    assert np.array_equal(predictor_for(d).predict(x), [5.0, 5.0, 5.0])
    # integer inputs keep their dtype; the identity is a vector
    d = inspect_model_file("onnx", _onnx_file(tmp_path / "i.onnx", ["n", 7], ["n", 7], in_type=TensorProto.INT64))
    assert (d.input_dtype, d.input_shape, d.output_kind) == ("int64", (7,), "vector")
    # one string per query: Clipper's str inputs, string labels out
    d = inspect_model_file("onnx", _onnx_file(tmp_path / "s.onnx", ["n"], ["n"], in_type=TensorProto.STRING))
    assert (d.input_dtype, d.input_shape, d.output_kind) == ("str", (), "label")
    assert predictor_for(d).predict(["cat", "dog"]) == ["cat", "dog"]
    with pytest.raises(InvalidConfigError, match="fixed first dimension 4"):
        inspect_model_file("onnx", _onnx_file(tmp_path / "d.onnx", [4, 5], [4]))
    free = _onnx_file(tmp_path / "e.onnx", ["n", "m"], ["n"])
    with pytest.raises(InvalidConfigError, match="free dimensions.*--input-shape"):
        inspect_model_file("onnx", free)
    assert inspect_model_file("onnx", free, input_shape=(9,)).input_shape == (9,)
    with pytest.raises(InvalidConfigError, match="takes float32"):
        inspect_model_file("onnx", free, input_shape=(9,), input_dtype="float64")
    with pytest.raises(InvalidConfigError, match="2 inputs"):
        inspect_model_file("onnx", _onnx_file(tmp_path / "f.onnx", ["n", 5], ["n", 5], n_inputs=2))
    with pytest.raises(InvalidConfigError, match="no label output"):
        inspect_model_file("onnx", _onnx_file(tmp_path / "g.onnx", ["n", 5], ["n"]), output="label")
    with pytest.raises(InvalidConfigError, match="unknown onnx option"):
        inspect_model_file("onnx", _onnx_file(tmp_path / "h.onnx", ["n", 5], ["n"]), options={"threads": 2})


def test_onnx_sessions_are_configured_for_latency(tmp_path):
    pytest.importorskip("onnxruntime")
    from clipper.deployers.onnx_model import make_session

    path = _onnx_file(tmp_path / "a.onnx", ["n", 5], ["n"])
    so = make_session(path).get_session_options()
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (1, 1)
    assert so.execution_mode.name == "ORT_SEQUENTIAL" and so.graph_optimization_level.name == "ORT_ENABLE_ALL"
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    so = make_session(path, {"intra_op_num_threads": 2, "graph_optimization_level": "basic"}).get_session_options()
    assert so.intra_op_num_threads == 2 and so.graph_optimization_level.name == "ORT_ENABLE_BASIC"
    with pytest.raises(InvalidConfigError, match="is not valid"):
        make_session(path, {"intra_op_num_threads": -1})


# ------------------------------------------------------------ test-model
def test_test_model_times_a_model_file_and_an_entry(files, tmp_path, cli):
    path, _ = _need(files, "onnx")
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps([0.5] * 64))
    rc, out, err = cli("test-model", "--onnx", str(path), "--input", str(sample), "--batch-sizes", "1,4,16",
                        "--seconds", "0.02")
    assert rc == 0, err
    lines = out.splitlines()
    assert "input float32[64]" in lines[0] and "resident memory" in lines[0]
    assert lines[1].startswith("outputs: label")
    table = [line.split() for line in lines[3:]]
    assert [int(r[0]) for r in table] == [1, 4, 16] and all(int(r[1]) >= 5 for r in table)
    assert all(float(r[2]) > 0 and float(r[3]) >= float(r[2]) for r in table)
    many = tmp_path / "many.json"
    many.write_text(json.dumps({"inputs": [[0.0] * 4, [1.0] * 4, [2.0] * 4]}))
    rc, out, err = cli("test-model", f"{TESTS}/model_zoo.py:row_sum", "--input", str(many), "--input-dtype",
                        "float32", "--batch-sizes", "3", "--seconds", "0.01", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["output_kind"] == "number" and report["first_output"] == 0.0 and report["input"] == "float32[4]"
    assert report["sizes"][0]["batch_size"] == 3 and report["load_ms"] >= 0


@pytest.mark.parametrize("fn,message", [
    ("wrong_count", "at batch size 1: predict returned 2 outputs for a batch of 1 inputs"),
    ("raise_on_negative", "at batch size 1: predict raised ValueError: negative pixel -1.0"),
])
def test_test_model_fails_clearly(tmp_path, fn, message, cli):
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps([-1.0, 0.0, 0.0, 0.0]))
    rc, _, err = cli("test-model", f"{TESTS}/model_zoo.py:{fn}", "--input", str(sample), "--input-dtype",
                        "float32", "--seconds", "0.01")
    assert rc == 1 and message in err and "FAILED" in err


def test_test_model_refuses_inputs_of_the_wrong_shape(files, tmp_path, cli):
    path, _ = _need(files, "onnx")
    sample = tmp_path / "sample.json"
    sample.write_text(json.dumps([0.5] * 63))
    rc, _, err = cli("test-model", "--onnx", str(path), "--input", str(sample))
    assert rc == 1 and "shape [63]; the model takes float32[64]" in err


# ------------------------------------------------------------ handshake
def test_hello_load_figures_are_bounded():
    from clipper.rpc import messages as m
    from clipper.rpc.server import HelloError, parse_hello

    base = {"model": "m", "version": "1"}
    info = parse_hello([m.C_HELLO, m.RPC_VERSION, {**base, "load_ms": 12.5, "rss_bytes": 50 << 20}])
    assert (info["load_ms"], info["rss_bytes"]) == (12.5, 50 << 20)
    info = parse_hello([m.C_HELLO, m.RPC_VERSION, base])  # both optional (another SDK)
    assert (info["load_ms"], info["rss_bytes"]) == (None, None)
    for bad in ({"load_ms": -1}, {"load_ms": float("nan")}, {"load_ms": float("inf")}, {"load_ms": 1e15},
                {"load_ms": "3"}, {"load_ms": True}, {"rss_bytes": -1}, {"rss_bytes": 2**60},
                {"rss_bytes": 1.5}, {"rss_bytes": [1]}):
        with pytest.raises(HelloError, match="load_ms|rss_bytes"):
            parse_hello([m.C_HELLO, m.RPC_VERSION, {**base, **bad}])


# ------------------------------------------------------------ bench
def test_bench_deployers_overhead_runs(tmp_path):
    """bench/deployers.py's in-process part, briefly (its served part is the frontend's, measured for real)."""
    pytest.importorskip("skl2onnx")
    from bench.deployers import main

    out = tmp_path / "deployers.json"
    assert main(["--skip-served", "--kinds", "onnx", "--overhead-s", "0.002", "--batch-sizes", "1,4", "--quiet",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"sklearn", "onnx"} <= set(report["overhead"])
    for kind, r in report["overhead"].items():
        assert [row["batch_size"] for row in r["sizes"]] == [1, 4], kind
        assert all(row["framework_us"] > 0 and row["deployer_us"] > 0 for row in r["sizes"]), kind
