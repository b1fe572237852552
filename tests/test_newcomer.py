"""The rough edges a newcomer met (issue 12): one-line CLI errors, `clipper start` on ports in use, invalid
JSON on the command line, quick start re-runs, refused queries counted, normal actions logged at INFO."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipper import Client
from clipper import errors as E

ROOT = Path(__file__).resolve().parent.parent


def _cli(*argv, cwd=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "clipper", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _one_line_error(proc, *words):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("clipper: error: ") and "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_predict_with_no_server_running_is_one_line():
    """Catches: a ConnectionRefusedError traceback from `clipper predict` when no frontend listens."""
    port = _free_port()
    _one_line_error(_cli("predict", "digits", "[1, 2]", "--port", str(port)), str(port), "clipper start")


def test_a_missing_file_and_invalid_json_are_one_line_errors(tmp_path):
    """Catches: a FileNotFoundError traceback for a missing @file, a JSONDecodeError traceback for a file
    that is not JSON, or an input that is not JSON sent silently as a string."""
    _one_line_error(_cli("predict", "digits", "@" + str(tmp_path / "nope.json")), "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2,")
    _one_line_error(_cli("predict", "digits", f"@{bad}"), "bad.json", "JSON")
    # nothing listens on the port: had the input been sent as a string, this would be a connection error
    line = _one_line_error(_cli("predict", "digits", "notjson", "--port", str(_free_port())), "notjson")
    assert "JSON" in line and "connect" not in line


def test_start_on_a_port_in_use_fails_in_one_line_before_touching_the_state_file(tmp_path):
    """Catches: an OSError traceback from `clipper start` on a port in use, or a state file (or secrets
    folder) created before the ports were checked."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _cli("start", "--rest-port", str(port), "--query-port", "0", "--admin-port", "0", "--metrics-port",
                    "0", "--rpc-port", "0", cwd=tmp_path)
    _one_line_error(proc, str(port), "--rest-port")
    assert sorted(os.listdir(tmp_path)) == []


def test_a_query_refused_for_its_dtype_is_counted_in_an_outcome(frontend):
    """Catches: a query refused for a wrong dtype (or shape) counted as a request but in no outcome
    (requests != answered + defaults + errors)."""
    frontend.deploy("sum", "row_sum")
    with Client("127.0.0.1", frontend.port) as c:
        assert c.predict("sum", np.ones(4, dtype=np.float32)).output == 4.0
        for bad in (np.ones(4, dtype=np.float64), ["a", "b", "c", "d"], np.ones(5, dtype=np.float32),
                    [1.0, 2.0], "text"):
            with pytest.raises(E.InvalidInputError):
                c.predict("sum", bad)
    import http.client
    import json

    h = http.client.HTTPConnection("127.0.0.1", frontend.fe.rest_port, timeout=30)
    for body in ({"input": ["a", "b", "c", "d"]}, {"input": "x"}, {"input": [1, 2]}):
        h.request("POST", "/sum/predict", body=json.dumps(body))
        r = h.getresponse()
        assert r.status == 400, r.read()
        r.read()
    h.close()
    st = frontend.stats()["applications"]["sum"]
    assert st["requests"] == 9
    assert st["answered"] + st["defaults"] + st["errors"] == st["requests"], st
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{frontend.fe.metrics_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    requests = float(re.search(r'^clipper_app_requests_total\{app="sum"\} (\S+)$', text, re.M).group(1))
    outcomes = [float(v) for v in re.findall(r'^clipper_app_answers_total\{app="sum",outcome="\w+"\} (\S+)$',
                                             text, re.M)]
    assert requests == 9 and sum(outcomes) == requests, text


def test_delete_rescale_and_stop_are_logged_at_info(frontend, caplog):
    """Catches: a WARNING for what an operator did on purpose (a replica removed by a rescale or a delete,
    containers stopped by a shutdown)."""
    frontend.deploy("sum", "row_sum", replicas=2)
    with caplog.at_level(logging.INFO, logger="clipper"):
        frontend.call(frontend.fe.set_replicas("sum-model", "1", 1))
        frontend.wait_until(lambda st: st["models"]["sum-model:1"]["replicas"] == 1, what="one replica left")
        frontend.call(frontend.fe.delete_model("sum-model"))
        frontend.call(frontend.fe.unregister_application("sum"))
        frontend.deploy("again", "row_sum")
        frontend.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("clipper")]
    assert not warnings, [r.getMessage() for r in warnings]
    assert any(r.levelno == logging.INFO for r in caplog.records)


def test_ctrl_c_on_clipper_start_logs_no_warning(tmp_path):
    """Catches: WARNING lines (replicas 'shut down', containers exiting) printed when an operator stops
    `clipper start` with Ctrl-C, which is a normal stop."""
    import json
    import signal
    import time

    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "clipper", "start", "--config",
                             str(ROOT / "containers" / "examples" / "noop.toml"), "--query-port", "0",
                             "--admin-port", "0", "--rpc-port", "0", "--rest-port", "0", "--metrics-port", "0",
                             "--ready-file", str(ready), "--state", str(tmp_path / "state.sqlite")],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "clipper start did not become ready"
        time.sleep(0.05)
    json.loads(ready.read_text())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "WARNING" not in err and "Traceback" not in err, err


def _fake_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of what scripts/setup.sh reads, with a .venv whose python logs pip calls (and runs nothing
    else but the real interpreter on this checkout)."""
    import shutil

    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "clipper" / "_native", repo / "clipper" / "_native",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    log = tmp_path / "pip.log"
    (repo / ".venv" / "bin").mkdir(parents=True)
    fake = repo / ".venv" / "bin" / "python"
    fake.write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "pip $*" >> {log}; exit 0; fi
PYTHONPATH={ROOT} exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    return repo, log


def test_setup_skips_pip_when_nothing_it_builds_changed(tmp_path):
    """Catches: every quick-start run reinstalling the package (pip run although nothing changed), or a
    changed Cython source / build file / extras not reinstalled."""
    repo, log = _fake_checkout(tmp_path)

    def run(*extra, **env):
        proc = subprocess.run(["bash", "scripts/setup.sh", *extra], cwd=repo, capture_output=True, text=True,
                              timeout=120, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr
        calls = log.read_text().count("install --quiet -e") if log.exists() else 0  # the package's install
        log.unlink(missing_ok=True)
        return calls, proc.stdout

    assert run()[0] == 1  # the first time: installed
    calls, out = run()
    assert calls == 0 and "up to date" in out  # nothing changed: no pip
    pyx = next((repo / "clipper" / "_native").glob("_*.pyx"))
    pyx.write_text(pyx.read_text() + "\n# changed\n")
    assert run()[0] == 1  # a Cython source changed: rebuilt
    assert run()[0] == 0
    assert run("test")[0] == 1  # other extras
    assert run(CLIPPER_SETUP_FORCE="1")[0] == 1


def test_the_not_valid_msgpack_error_says_what_is_wrong(frontend, wire_conn):
    """Catches: a MALFORMED_FRAME for a body msgpack rejects without a message (0xc1) whose text ends in
    an empty detail ('...: FormatError: ')."""
    from clipper._native import framing

    c = wire_conn(frontend.port)
    c.send_raw(framing.pack_frame(b"\xc1\x00"))
    (reply,) = c.recv(1)
    message = reply[-1]
    assert reply[2] == E.MalformedFrameError.code, reply
    assert "not valid msgpack" in message and "c1 00" in message and not message.rstrip().endswith(":"), message


def test_describe_on_the_msgpack_port(frontend, wire_conn):
    """Catches: no way on the query port to learn an application's input dtype and shape (DESCRIBE
    unknown, or its answer without them), or DESCRIBE of an unknown application not UNKNOWN_APPLICATION."""
    from clipper.protocol import wire

    frontend.deploy("sum", "row_sum", dtype="float32", shape=(4,), slo_ms=250.0)
    c = wire_conn(frontend.port)
    c.send(wire.describe(3, "sum"))
    c.send(wire.describe(4, "nope"))
    c.send([wire.DESCRIBE, 5])
    got = {m[1]: m for m in c.recv(3)}
    kind, _, info = got[3]
    assert kind == wire.DESCRIPTION
    assert (info["input_dtype"], info["wire_dtype"], info["input_shape"]) == ("float32", "<f4", [4])
    assert info["slo_ms"] == 250.0 and info["output_kind"] == "auto" and info["linked_models"] == ["sum-model"]
    assert got[4][0] == wire.ERROR and got[4][2] == E.UnknownApplicationError.code
    assert got[5][0] == wire.ERROR and got[5][2] == E.MalformedFrameError.code


def test_the_client_describes_an_application(frontend):
    """Catches: Client.describe missing or not returning the application's dtype and shape."""
    frontend.deploy("vsum", "vec_sum", dtype="float64", shape=(-1,))
    with Client("127.0.0.1", frontend.port) as c:
        info = c.describe("vsum")
        assert info["input_dtype"] == "float64" and info["input_shape"] == [-1]
        with pytest.raises(E.UnknownApplicationError):
            c.describe("nope")


def test_a_query_refused_for_a_full_queue_is_counted_in_an_outcome(frontend_factory, tmp_path):
    """Catches: QUEUE_FULL counted as a request but in no outcome (requests != answered + defaults +
    errors). The model holds its batch at a gate (model_zoo.gated) until two refusals are counted."""
    fe = frontend_factory(max_queue_length=1, admission_control=False)
    fe.deploy("slow", "gated", cache=False, env={"CLIPPER_TEST_MARK_DIR": str(tmp_path)})
    xs = [np.array([0.5 + i, 1, 0, 0], dtype=np.float32) for i in range(4)]
    import threading

    out = []

    def one(x):  # one connection each, all at once: one runs, one waits, the others find the queue full
        with Client("127.0.0.1", fe.port) as c:
            try:
                out.append(c.predict("slow", x))
            except E.ClipperError as exc:
                out.append(exc)

    threads = [threading.Thread(target=one, args=(x,)) for x in xs]
    for t in threads:
        t.start()
    try:  # one in the replica (or none yet) and one queued: at least two find the queue full
        fe.wait_until(lambda st: st["applications"]["slow"]["errors"] >= 2, what="two refusals")
    finally:
        (tmp_path / "gate-1").touch()
    for t in threads:
        t.join(30)
    assert sum(isinstance(o, E.QueueFullError) for o in out) >= 2 and len(out) == 4, out
    st = fe.wait_until(lambda st: st["applications"]["slow"]["requests"] == 4
                       and sum(st["applications"]["slow"][k] for k in ("answered", "defaults", "errors")) == 4,
                       what="every query in one outcome")
    assert st["applications"]["slow"]["errors"] >= 1
