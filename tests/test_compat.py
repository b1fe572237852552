"""``clipper_admin``, the original Clipper's admin package, as its users call it.

The script below is written the way an original-Clipper user writes one (its
examples and integration tests): it runs in its own process, starts a real
frontend process through ``DockerContainerManager``, deploys closures, and
queries over REST with ``requests``. Only the ports differ (0: free ones).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ORIGINAL_USER_SCRIPT = r'''
import json
import sys

import numpy as np
import requests

from clipper_admin import ClipperConnection, DockerContainerManager
from clipper_admin.deployers import python as python_deployer
from clipper_admin.exceptions import ClipperException

out = {}
clipper_conn = ClipperConnection(DockerContainerManager(clipper_query_port=0, clipper_management_port=0,
                                                        clipper_rpc_port=0, msgpack_port=0, metrics_port=0))
clipper_conn.start_clipper()
try:
    clipper_conn.register_application(name="hello-world", input_type="doubles", default_output="-1.0",
                                      slo_micros=10000000)

    def feature_sum(xs):
        return [str(sum(x)) for x in xs]

    python_deployer.deploy_python_closure(clipper_conn, name="sum-model", version=1, input_type="doubles",
                                          func=feature_sum)
    clipper_conn.link_model_to_app(app_name="hello-world", model_name="sum-model")
    addr = clipper_conn.get_query_addr()
    headers = {"Content-type": "application/json"}

    r = requests.post("http://%s/hello-world/predict" % addr, headers=headers,
                      data=json.dumps({"input": list(np.random.random(10))}))
    out["one"] = r.json()
    out["short"] = requests.post("http://%s/hello-world/predict" % addr, headers=headers,
                                 data=json.dumps({"input": [1.0, 2.5]})).json()
    out["batch"] = requests.post("http://%s/hello-world/predict" % addr, headers=headers,
                                 data=json.dumps({"input_batch": [[1.0], [2.0, 3.0, 4.0]]})).json()
    bad = requests.post("http://%s/hello-world/predict" % addr, headers=headers, data=json.dumps({"input": "x"}))
    out["bad"] = [bad.status_code, bad.json()]

    # a second version, set as current, scaled, rolled back
    python_deployer.deploy_python_closure(clipper_conn, name="sum-model", version="2", input_type="doubles",
                                          func=lambda xs: [json.dumps({"sum": float(sum(x)) * 2}) for x in xs])
    clipper_conn.set_model_version(name="sum-model", version="2")
    out["v2"] = requests.post("http://%s/hello-world/predict" % addr, headers=headers,
                              data=json.dumps({"input": [1.0, 2.0]})).json()
    out["pinned_v1"] = requests.post("http://%s/hello-world/predict" % addr, headers=headers,
                                     data=json.dumps({"input": [1.0, 2.0], "version": "1"})).json()
    clipper_conn.set_num_replicas(name="sum-model", num_replicas=2, version="1")
    out["replicas"] = [clipper_conn.get_num_replicas("sum-model", "1"), clipper_conn.get_num_replicas("sum-model")]
    clipper_conn.set_model_version("sum-model", "1")

    python_deployer.create_endpoint(clipper_conn, "echo-strings", "strings",
                                    lambda xs: [s.upper() for s in xs], default_output="none")
    out["strings"] = requests.post("http://%s/echo-strings/predict" % addr, headers=headers,
                                   data=json.dumps({"input": "abc"})).json()

    out["apps"] = sorted(clipper_conn.get_all_apps())
    out["models"] = sorted(clipper_conn.get_all_models())
    out["app_info"] = clipper_conn.get_app_info("hello-world")
    out["model_info"] = clipper_conn.get_model_info("sum-model", 1)
    out["linked"] = clipper_conn.get_linked_models(app_name="hello-world")
    out["unknown"] = [clipper_conn.get_app_info("nope"), clipper_conn.get_model_info("nope", "1"),
                      clipper_conn.get_model_info("sum-model", "9")]
    out["current"] = clipper_conn.get_current_model_version("sum-model")
    out["metrics_keys"] = sorted(clipper_conn.inspect_instance())
    try:
        clipper_conn.register_application(name="hello-world", input_type="doubles", default_output="-1.0",
                                          slo_micros=100000)
        out["duplicate"] = None
    except ClipperException as e:
        out["duplicate"] = str(e)
    try:
        clipper_conn.register_application(name="bad-type", input_type="tensors", default_output="-1.0",
                                          slo_micros=100000)
    except ClipperException as e:
        out["bad_type"] = str(e)

    clipper_conn.unlink_model_from_app(app_name="hello-world", model_name="sum-model")
    out["after_unlink"] = requests.post("http://%s/hello-world/predict" % addr, headers=headers,
                                        data=json.dumps({"input": [1.0]})).json()
    clipper_conn.stop_models(["sum-model"])
    out["replicas_after_stop"] = clipper_conn.get_num_replicas("sum-model", "1")
    clipper_conn.delete_application("hello-world")
    out["apps_after_delete"] = clipper_conn.get_all_apps()
finally:
    clipper_conn.stop_all()
json.dump(out, sys.stdout)
'''


@pytest.mark.slow
def test_an_original_users_script_runs_unchanged(tmp_path):
    """Catches: any of the original's calls missing or with another signature (the script raises), the
    original's input types refused, slo_micros read as milliseconds, a closure getting no list of inputs,
    a JSON-text output or default not nested as the original does, get_all_apps / get_all_models returning
    dicts instead of names and "name:version" strings, unknown names raising instead of None, errors not
    ClipperException, or stop_all leaving the frontend running."""
    script = tmp_path / "original_user.py"
    script.write_text(ORIGINAL_USER_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["one"]["default"] is False and isinstance(out["one"]["output"], float)
    assert out["short"] == {"query_id": out["short"]["query_id"], "output": 3.5, "default": False,
                            "confidence": 1.0, "models": ["sum-model:1"]}
    assert [p["output"] for p in out["batch"]["batch_predictions"]] == [1.0, 9.0]
    status, bad = out["bad"]
    assert status == 400 and bad["error"] == "INVALID_INPUT" and "cause" in bad
    assert out["v2"]["output"] == {"sum": 6.0}
    assert out["pinned_v1"]["output"] == 3.0
    assert out["replicas"] == [2, 1]
    assert out["strings"]["output"] == "ABC"
    assert out["apps"] == ["echo-strings", "hello-world"]
    assert out["models"] == ["echo-strings:1", "sum-model:1", "sum-model:2"]
    assert out["app_info"] == {"name": "hello-world", "input_type": "doubles", "default_output": "-1.0",
                               "latency_slo_micros": 10000000, "linked_models": ["sum-model"]}
    info = out["model_info"]
    assert (info["model_name"], info["model_version"], info["input_type"]) == ("sum-model", "1", "doubles")
    assert info["is_current_version"] is True  # rolled back to 1
    assert out["linked"] == ["sum-model"]
    assert out["unknown"] == [None, None, None]
    assert out["current"] == "1"
    assert {"counters", "histograms", "meters", "ratio_counters"} <= set(out["metrics_keys"])
    assert out["duplicate"] and "hello-world" in out["duplicate"]
    assert "tensors" in out["bad_type"]
    assert out["after_unlink"]["default"] is True and out["after_unlink"]["output"] == -1.0
    assert out["replicas_after_stop"] == 0
    assert out["apps_after_delete"] == ["echo-strings"]


def test_keywords_and_errors_without_a_frontend():
    """Catches: a call before start_clipper/connect doing anything but UnconnectedException, an unknown
    input type accepted, a Kubernetes manager that pretends to work, or connect() to nothing not raising
    ClipperException."""
    from clipper_admin import (
        ClipperConnection,
        ClipperException,
        KubernetesContainerManager,
        LocalContainerManager,
        UnconnectedException,
    )
    from clipper_admin.clipper_admin import input_type_spec

    conn = ClipperConnection(LocalContainerManager(clipper_management_port=1))
    with pytest.raises(UnconnectedException):
        conn.get_all_apps()
    with pytest.raises(UnconnectedException):
        conn.get_query_addr()
    with pytest.raises(ClipperException, match="cannot reach"):
        conn.connect()
    assert input_type_spec("ints") == ("int32", [-1]) == input_type_spec("integers")
    assert input_type_spec("strings") == ("str", [])
    with pytest.raises(ClipperException):
        input_type_spec("tensor")
    with pytest.raises(ClipperException, match="Kubernetes"):
        KubernetesContainerManager()


def test_the_package_is_shipped():
    """Catches: clipper_admin (or its deployers) left out of the distribution's packages."""
    import tomllib

    from setuptools import find_packages

    root = Path(__file__).resolve().parent.parent
    include = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(where=str(root), include=include))
    assert {"clipper", "clipper_admin", "clipper_admin.deployers"} <= found


@pytest.mark.slow
def test_connect_reaches_a_running_frontend_and_its_stop_all_leaves_it_running():
    """Catches: connect() failing against a frontend another program started (no token found), or
    stop_all() on such a connection signalling a process it did not start."""
    from clipper_admin import ClipperConnection, ClipperException, LocalContainerManager

    owner = ClipperConnection(LocalContainerManager(0, 0, 0, msgpack_port=0, metrics_port=0))
    owner.start_clipper()
    try:
        owner.register_application("app", "floats", "0", 100000)
        rest, admin = owner.cm.ports["rest_port"], owner.cm.ports["admin_port"]
        other = ClipperConnection(LocalContainerManager(rest, admin, 7000))
        other.connect()
        assert other.get_all_apps() == ["app"]
        assert other.get_app_info("app")["input_type"] == "floats"
        owner.register_application("app2", "floats", "0", 100000)
        with pytest.raises(ClipperException, match="nope-model"):
            other.get_num_replicas("nope-model", "1")
        other.stop_all()
        assert owner.cm.proc.poll() is None and owner.get_all_apps() == ["app", "app2"]
    finally:
        owner.stop_all()
    assert owner.cm.proc is None
