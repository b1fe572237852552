"""Management through its three faces (HTTP API with the admin client, the CLI, the Frontend itself),
on real frontends and real containers: deploy, roll back under load, delete, restart."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from clipper import errors as E
from clipper.client import Client
from clipper.management.admin_client import AdminClient, ClipperConnection

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def admin(frontend) -> AdminClient:
    return AdminClient("127.0.0.1", frontend.fe.admin_port, timeout=60)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout=15.0):
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {[p for p in pids if alive(p)]} still run")
        time.sleep(0.05)


def test_admin_client_covers_every_operation(frontend):
    a = admin(frontend)
    assert ClipperConnection is AdminClient
    a.register_application("sum", "float32", [4], slo_ms=5000, policy="exp4", output_kind="number")
    assert a.get_app_info("sum")["policy"] == "exp4"
    with pytest.raises(E.InvalidConfigError, match="already registered"):
        a.register_application("sum", "float32", [4])
    with pytest.raises(E.InvalidConfigError, match="slo_ms"):
        a.register_application("other", "float32", [4], slo_ms=-1)
    a.deploy_model("summer", "1", "float32", [4], entry="model_zoo.py:row_sum", workdir=str(TESTS), wait=True)
    a.deploy_model("summer", "2", "float32", [4], entry="model_zoo.py:Scaled", workdir=str(TESTS),
                   env={"CLIPPER_TEST_FACTOR": "10"}, wait=True)
    assert a.get_model_info("summer")["current_version"] == "2"
    assert a.link_model_to_app("sum", "summer")["linked_models"] == ["summer"]
    x = np.array([1, 2, 3, 4], np.float32)
    with Client("127.0.0.1", frontend.port) as c:
        assert c.predict("sum", x).output == 10.0  # v2: 10 * x[0]
        assert a.set_model_version("summer", "1") == {"model": "summer", "current_version": "1"}
        assert c.predict("sum", x).output == 10.0  # v1: the sum, 1 + 2 + 3 + 4
        x2 = np.array([2, 2, 2, 2], np.float32)
        assert c.predict("sum", x2).output == 8.0
        a.set_model_version("summer", "2")
        assert c.predict("sum", x2).output == 20.0
    info = a.get_model_info("summer", "2")
    assert info["current"] is True and len(info["replicas"]) == 1 and a.get_num_replicas("summer", "2") == 1
    a.set_num_replicas("summer", "2", 2)
    frontend.call(frontend.fe.wait_ready("summer", "2", replicas=2, timeout_s=60))
    assert a.get_num_replicas("summer", "2") == 2
    assert {r["model"] for r in a.get_replicas()["replicas"]} == {"summer:1", "summer:2"}
    assert a.unlink_model_from_app("sum", "summer")["linked_models"] == []
    assert a.link_model_to_app("sum", "summer", version="1")["link"] == "summer:1"
    with pytest.raises(E.UnknownModelError):
        a.get_model_info("nope")
    with pytest.raises(E.UnknownModelError, match="has no version '9'"):
        a.set_model_version("summer", "9")
    with pytest.raises(E.UnknownApplicationError):
        a.unregister_application("nope")
    assert [x["name"] for x in a.get_all_apps()] == ["sum"]
    assert set(a.get_all_models()) == {"summer"}
    assert a.delete_model("summer", "1") == {"removed": ["summer:1"]}
    assert a.get_linked_models("sum") == []  # the link pinned to the deleted version went with it
    with Client("127.0.0.1", frontend.port) as c:
        p = c.predict("sum", x)
        assert p.is_default and "no linked model" in p.explanation
    assert a.unregister_application("sum") == {"removed": "sum"}
    assert a.get_all_apps() == []


def test_delete_leaves_nothing_behind(frontend):
    frontend.deploy("gone", "row_sum", replicas=2)
    fe = frontend.fe
    pids = frontend.replica_pids("gone-model:1")
    assert len(pids) == 2 and all(alive(p) for p in pids)
    with Client("127.0.0.1", frontend.port) as c:
        c.predict("gone", np.ones(4, np.float32))
    assert frontend.stats()["cache"]["entries"] == 1
    a = admin(frontend)
    a.delete_model("gone-model")
    wait_gone(pids)
    st = frontend.stats()
    assert "gone-model:1" not in st["models"] and st["cache"]["entries"] == 0
    assert frontend.replica_pids("gone-model:1") == [] and frontend.call(lambda: fe.manager.stats()) == {}
    assert a.get_linked_models("gone") == []
    a.unregister_application("gone")
    with Client("127.0.0.1", frontend.port) as c:
        with pytest.raises(E.UnknownApplicationError):
            c.predict("gone", np.ones(4, np.float32))
    # the same names again: nothing of the old deployment answers
    frontend.deploy("gone", "Scaled", env={"CLIPPER_TEST_FACTOR": "7"})
    with Client("127.0.0.1", frontend.port) as c:
        assert c.predict("gone", np.ones(4, np.float32)).output == 7.0


def _wait_for_batch_holding(mark_dir: Path, x0: float, timeout: float = 60.0) -> None:
    """Wait until a ``model_zoo.gated`` container recorded a batch holding the input whose x[0] is ``x0``."""
    deadline = time.monotonic() + timeout
    while not any(repr(x0) in p.read_text().split(",") for p in mark_dir.glob("*.batch")):
        assert time.monotonic() < deadline, f"no batch holding {x0} within {timeout} s"
        time.sleep(0.01)


def test_rollback_under_load_loses_no_query(frontend_factory, tmp_path):
    """Switches versions six times under three pipelining clients. Version 1 is slow exactly at each switch
    away from it: a query held at a gate in its one replica, with load queries queued behind it (the
    queue length is checked after the switch, before the gate opens), so the switch meets queries still
    waiting for the old version. The load goes on after the last switch until the new current version
    has answered a few hundred more. Every query sent must come back answered by one version or the other,
    whole (no error at all: admission control is off, its refusals at a stalled queue are
    test_admission's; the SLO is a minute), and a load thread that dies fails the test.

    Mutations caught: the switch failing the old version's queue (``fail_all`` on it in
    ``set_model_version``): NO_MODEL_AVAILABLE errors; a switch that moves the old queue's waiting queries
    to the new version (none left queued for v1 after the switch); a load thread that raises after the last
    switch (the check of ``crashed``)."""
    frontend = frontend_factory(admission_control=False)
    a = admin(frontend)
    a.register_application("roll", "float32", [4], slo_ms=60_000, cache=False)
    a.deploy_model("m", "1", "float32", [4], entry="model_zoo.py:gated", workdir=str(TESTS),
                   env={"CLIPPER_TEST_MARK_DIR": str(tmp_path)}, wait=True)
    a.deploy_model("m", "2", "float32", [4], entry="model_zoo.py:Scaled", workdir=str(TESTS),
                   env={"CLIPPER_TEST_FACTOR": "2"}, wait=True)
    a.set_model_version("m", "1")
    a.link_model_to_app("roll", "m")
    stop = threading.Event()
    lock = threading.Lock()
    sent = [0]
    answers: list = []  # (x[0], output, models)
    errors: list = []
    crashed: list = []

    def load(seed: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            with Client("127.0.0.1", frontend.port, timeout=90) as c:
                while not stop.is_set():
                    xs = [np.array([v, 0, 0, 0], np.float32) for v in rng.integers(1, 1000, 32)]
                    with lock:
                        sent[0] += len(xs)
                    ps = c.predict_many("roll", xs)
                    with lock:
                        for x, p in zip(xs, ps):
                            if isinstance(p, Exception) or p.is_default:
                                errors.append(p)
                            else:
                                answers.append((float(x[0]), p.output, p.models))
        except BaseException as exc:  # surfaces in the main thread: a dead load thread fails the test
            crashed.append(exc)
            raise

    def progressed(n: int, deadline: float) -> None:
        while len(answers) < n:
            assert not crashed and all(t.is_alive() for t in threads), (crashed, errors[:3])
            assert time.monotonic() < deadline, f"{len(answers)} of {n} answers; errors {errors[:3]}"
            time.sleep(0.01)

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(3)]
    held: dict = {}
    holders = []
    queued_at_switch = []
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        current = "1"
        for i in range(6):
            progressed(len(answers) + 150, deadline)
            if current == "1":  # v1 slow now: one query held at gate i+1, load queries queued behind it
                gate = i + 1

                def hold(gate=gate) -> None:
                    with Client("127.0.0.1", frontend.port, timeout=90) as c:
                        held[gate] = c.predict("roll", np.array([5000.0 + gate, gate, 0, 0], np.float32))

                h = threading.Thread(target=hold, daemon=True)
                h.start()
                holders.append(h)
                _wait_for_batch_holding(tmp_path, 5000.0 + gate)
                frontend.wait_until(lambda s: s["models"]["m:1"]["queue_length"] >= 8, timeout=60,
                                    what="queries queued behind the held batch of v1")
                a.set_model_version("m", "2")
                # the switch left them where they were: still queued for v1, its replica still held
                queued_at_switch.append(frontend.stats()["models"]["m:1"]["queue_length"])
                (tmp_path / f"gate-{gate}").touch()
                current = "2"
            else:
                a.set_model_version("m", "1")
                current = "1"
        after = len(answers)
        progressed(after + 300, deadline)  # the load goes on after the last switch
    finally:
        stop.set()
        for t in threads:
            t.join(90)
        for h in holders:
            h.join(90)
    assert not crashed and not any(t.is_alive() for t in threads), crashed
    assert errors == []
    assert len(answers) == sent[0] >= 1200  # none lost
    assert all(n >= 8 for n in queued_at_switch) and len(queued_at_switch) == 3, queued_at_switch
    for x, out, models in answers:  # each answer whole from the version that names itself
        assert (out, models) in ((x, ("m:1",)), (2 * x, ("m:2",))), (x, out, models)
    assert sorted(held) == [1, 3, 5]
    for gate, p in held.items():  # the held queries: answered by v1, which held them across the switch
        assert p.models == ("m:1",) and p.output == 5000.0 + gate, p
    # after the last switch (to v1) the load went on and v1 served it
    assert any(models == ("m:1",) for _, _, models in answers[after:])


def test_closure_deploys_and_a_version_mismatch_fails_fast(frontend):
    a = admin(frontend)
    a.register_application("clo", "float32", [4], slo_ms=10_000)
    offset = 100.0

    def predict(batch):  # a closure over `offset`
        return batch.reshape(len(batch), -1).sum(axis=1) + offset

    out = a.deploy_python_closure("closure-model", "1", predict, "float32", [4])
    assert out["closure"]["python"].count(".") == 2 and out["closure"]["cloudpickle"]
    a.link_model_to_app("clo", "closure-model")
    with Client("127.0.0.1", frontend.port) as c:
        assert c.predict("clo", np.ones(4, np.float32)).output == 104.0
    # a closure made by another Python: the container refuses it and the deploy says why, at once
    from clipper.container.closure import dump_closure

    doc = msgpack.unpackb(dump_closure(predict), raw=False)
    doc["python"] = "3.6.15"
    blob = msgpack.packb(doc, use_bin_type=True)
    t0 = time.monotonic()
    with pytest.raises(E.NoModelAvailableError, match=r"serialized with Python 3\.6\.15 \(this container runs"):
        a._call("POST", "/api/v1/models", {"name": "old", "version": "1", "input_dtype": "float32",
                                           "input_shape": [4], "closure": base64.b64encode(blob).decode(),
                                           "wait": True})
    assert time.monotonic() - t0 < 30
    assert "old" not in a.get_all_models()  # the failed deployment left nothing
    with pytest.raises(E.InvalidConfigError, match="not a clipper-closure"):
        a._call("POST", "/api/v1/models", {"name": "junk", "version": "1", "input_dtype": "float32",
                                           "input_shape": [4], "closure": base64.b64encode(b"junk").decode()})


def test_registry_and_states_survive_a_restart(frontend_factory, tmp_path):
    path = str(tmp_path / "state.sqlite")
    first = frontend_factory(state_path=path)
    a = admin(first)
    a.register_application("keep", "float32", [4], slo_ms=5000, policy="exp4", output_kind="label")
    a.deploy_model("right", "1", "float32", [4], entry="model_zoo.py:first_as_label", workdir=str(TESTS), wait=True)
    a.deploy_model("wrong", "1", "float32", [4], entry="model_zoo.py:constant", workdir=str(TESTS), wait=True)
    a.link_model_to_app("keep", "right")
    a.link_model_to_app("keep", "wrong")
    with Client("127.0.0.1", first.port) as c:
        c.feedback("keep", np.array([3, 0, 0, 0], np.float32), 3)
    state = first.state("keep")
    first.close()
    second = frontend_factory(state_path=path)
    for m in ("right", "wrong"):
        second.call(second.fe.wait_ready(m, "1", timeout_s=60))
    b = admin(second)
    assert b.get_linked_models("keep") == ["right", "wrong"] and b.get_app_info("keep")["policy"] == "exp4"
    assert second.state("keep") == state
    with Client("127.0.0.1", second.port) as c:
        p = c.predict("keep", np.array([5, 0, 0, 0], np.float32))
    assert p.output == 5 and set(p.models) == {"right:1", "wrong:1"}


def _cli(port: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipper", *args, "--admin-port", str(port)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=dict(os.environ))


def test_cli_covers_the_operations(frontend):
    port = frontend.fe.admin_port
    r = _cli(port, "register-app", "cli", "--input-dtype", "float32", "--input-shape", "4", "--policy", "exp4",
             "--policy-options", '{"eta": 0.5}', "--output-kind", "number")
    assert r.returncode == 0, r.stderr
    for v in ("1", "2"):
        r = _cli(port, "deploy", "cm", v, "model_zoo.py:row_sum", "--input-dtype", "float32", "--input-shape", "4",
                 "--workdir", "tests")
        assert r.returncode == 0, r.stderr
    assert _cli(port, "link", "cli", "cm").returncode == 0
    assert _cli(port, "link", "cli", "cm", "--version", "1").returncode == 0
    apps = json.loads(_cli(port, "list", "apps").stdout)
    assert apps[0]["linked_models"] == ["cm", "cm:1"] and apps[0]["policy_options"] == {"eta": 0.5}
    assert json.loads(_cli(port, "set-version", "cm", "1").stdout)["current_version"] == "1"
    assert json.loads(_cli(port, "replicas", "cm", "2", "2").stdout)["replicas"] == 2
    frontend.call(frontend.fe.wait_ready("cm", "2", replicas=2, timeout_s=60))
    assert len(json.loads(_cli(port, "replicas", "cm", "2").stdout)) == 2
    assert json.loads(_cli(port, "unlink", "cli", "cm", "--version", "1").stdout)["linked_models"] == ["cm"]
    assert json.loads(_cli(port, "delete-model", "cm", "2").stdout)["removed"] == ["cm:2"]
    assert set(json.loads(_cli(port, "list", "models").stdout)["cm"]["versions"]) == {"1"}
    r = _cli(port, "status")
    assert r.returncode == 0 and "cli" in r.stdout and "exp4" in r.stdout
    r = _cli(port, "set-version", "cm", "7")
    assert r.returncode == 1 and "UNKNOWN_MODEL" in r.stderr
    assert json.loads(_cli(port, "unregister-app", "cli").stdout) == {"removed": "cli"}


def test_a_container_started_by_hand_reconnects_after_a_frontend_restart(frontend_factory, tmp_path):
    import socket

    from clipper.management.registry import Application, ModelVersion

    with socket.socket() as s:  # a port both frontends bind, one after the other
        s.bind(("127.0.0.1", 0))
        rpc_port = s.getsockname()[1]
    path = str(tmp_path / "state.sqlite")
    first = frontend_factory(state_path=path, rpc_port=rpc_port)
    first.call(first.fe.register_application(Application("byhand", "float32", [4], slo_ms=5000)))
    first.call(first.fe.deploy_model(ModelVersion("hand", "1", "float32", [4])))  # no entry: not managed
    first.call(first.fe.link("byhand", "hand"))
    # an operator's credentials, kept (public half) in the state store: the second frontend knows them too
    from clipper.security.container_keys import save_credentials

    creds = tmp_path / "hand.credentials"
    save_credentials(creds, admin(first).issue_container_credentials("hand", "1"))
    proc = subprocess.Popen([sys.executable, "-m", "clipper.container", "model_zoo.py:row_sum", "--name", "hand",
                             "--version", "1", "--frontend", f"tcp://127.0.0.1:{rpc_port}",
                             "--credentials", str(creds)], cwd=TESTS, stderr=subprocess.DEVNULL)
    try:
        first.call(first.fe.wait_ready("hand", "1", timeout_s=60))
        with Client("127.0.0.1", first.port) as c:
            assert c.predict("byhand", np.ones(4, np.float32)).output == 4.0
        first.close()
        second = frontend_factory(state_path=path, rpc_port=rpc_port)
        # the registry came back; the container notices the silence and says hello again by itself
        second.call(second.fe.wait_ready("hand", "1", timeout_s=60))
        with Client("127.0.0.1", second.port) as c:
            assert c.predict("byhand", np.full(4, 2, np.float32)).output == 8.0
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)


def test_status_table_shows_rates_between_two_snapshots(capsys):
    from clipper.cli import _print_status

    def snap(n):
        return {"version": "x", "ports": {}, "connections": 1, "rest_connections": 0,
                "applications": {"a": {"input_dtype": "float32", "input_shape": [4], "slo_ms": 20, "policy": "exp4",
                                       "linked_models": ["m"]}},
                "traffic": {"applications": {"a": {"requests": n, "answered": n, "defaults": 0, "errors": 0,
                                                   "latency_p99_ms": 2.5}},
                            "models": {}, "cache": None},
                "replicas": []}

    _print_status(snap(300), snap(100), 2.0)
    out = capsys.readouterr().out
    assert "exp4" in out and " 100 " in out and "2.50" in out


def test_a_failed_deploy_keeps_the_version_that_was_serving(frontend):
    a = admin(frontend)
    frontend.deploy("keepv1", "row_sum", model="kept")
    with pytest.raises(E.NoModelAvailableError, match="exited with code 3"):
        a.deploy_model("kept", "2", "float32", [4], entry="model_zoo.py:no_such_function", workdir=str(TESTS),
                       wait=True)
    info = a.get_model_info("kept")
    assert info["current_version"] == "1" and set(info["versions"]) == {"1"}
    with Client("127.0.0.1", frontend.port) as c:
        p = c.predict("keepv1", np.ones(4, np.float32))
    assert p.output == 4.0 and p.models == ("kept:1",)


def test_unregistering_answers_the_queries_still_waiting(frontend, tmp_path):
    # The model holds the query at a gate opened only after the answer, and the SLO is a minute away:
    # only the unregistering can have answered it (no clock is read).
    frontend.deploy("leaving", "gated", slo_ms=60_000, default_output=-1.0, cache=False,
                    env={"CLIPPER_TEST_MARK_DIR": str(tmp_path)})
    with Client("127.0.0.1", frontend.port, timeout=30) as c:
        c.predict("leaving", np.array([0.0, 0, 0, 0], np.float32))  # warm
        done = {}

        def ask():
            done["p"] = c.predict("leaving", np.array([5.0, 1, 0, 0], np.float32))  # held at gate 1

        t = threading.Thread(target=ask)
        t.start()
        frontend.wait_until(lambda s: s["models"]["leaving-model:1"]["queries_sent"] >= 2, what="the slow query sent")
        admin(frontend).unregister_application("leaving")
        t.join(15)
    (tmp_path / "gate-1").touch()
    assert not t.is_alive()
    p = done["p"]
    assert p.is_default and p.output == -1.0 and p.missing == ("leaving-model:1 (no answer in time)",), p


def test_answers_name_the_version_that_made_them_across_a_switch(frontend):
    a = admin(frontend)
    a.register_application("sw", "float32", [4], slo_ms=20_000, cache=False)
    a.deploy_model("swm", "1", "float32", [4], entry="model_zoo.py:sleep_by_input", workdir=str(TESTS), wait=True)
    a.deploy_model("swm", "2", "float32", [4], entry="model_zoo.py:row_sum", workdir=str(TESTS), wait=True,
                   )
    a.set_model_version("swm", "1")
    a.link_model_to_app("sw", "swm")
    with Client("127.0.0.1", frontend.port, timeout=30) as c:
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("p", c.predict("sw", np.array([1.0, 0, 0, 0], np.float32))))
        t.start()
        frontend.wait_until(lambda s: s["models"]["swm:1"]["queries_sent"] >= 1, what="the query sent to v1")
        a.set_model_version("swm", "2")
        t.join(30)
        later = c.predict("sw", np.array([1.0, 0, 0, 0], np.float32))
    assert out["p"].models == ("swm:1",) and out["p"].output == 1.0
    assert later.models == ("swm:2",) and later.output == 1.0


_NAME_FIRST = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


@given(st.one_of(st.text(max_size=140), st.text(_NAME_FIRST + "_.-\n", max_size=140)))
@example("demo\n")  # a trailing newline: the rule's `$` matched before it
@example("a" * 128 + "\n")
def test_a_name_is_accepted_exactly_when_it_follows_the_rule(value):
    from clipper.management.registry import Application, check_name

    rule = 1 <= len(value) <= 128 and value[0] in _NAME_FIRST and all(c in _NAME_FIRST + "_.-" for c in value)
    if rule:
        assert check_name("model name", value) == value
    else:
        with pytest.raises(E.InvalidConfigError, match="is not a valid name"):
            check_name("model name", value)
        with pytest.raises(E.InvalidConfigError, match="is not a valid name"):
            Application(value, "float32", (4,))


def test_closure_names_are_checked_before_any_file_is_written(frontend, tmp_path):
    a = admin(frontend)
    with pytest.raises(E.InvalidConfigError, match="is not a valid name"):
        a.deploy_python_closure("../escape", "1", lambda b: b, "float32", [4])
    assert not list(Path(frontend.fe._closure_dir()).parent.glob("escape*"))
    assert not list(Path(frontend.fe._closure_dir()).glob("*escape*"))


def test_restore_keeps_what_it_cannot_bring_back_and_no_current_stays_none(frontend_factory, tmp_path):
    mod = tmp_path / "gone_policy_mod.py"
    mod.write_text("from clipper.selection.policies import SingleModel\nclass P(SingleModel):\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    path = str(tmp_path / "state.sqlite")
    try:
        first = frontend_factory(state_path=path)
        a = admin(first)
        a.register_application("odd", "float32", [4], policy="gone_policy_mod:P")
        a.register_application("plain", "float32", [4])
        a.deploy_model("vv", "1", "float32", [4], entry="model_zoo.py:row_sum", workdir=str(TESTS), wait=True)
        a.deploy_model("vv", "2", "float32", [4], entry="model_zoo.py:row_sum", workdir=str(TESTS), wait=True)
        a.delete_model("vv", "2")  # the current one: vv has no current version now
        assert a.get_model_info("vv")["current_version"] is None
        first.close()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("gone_policy_mod", None)
    second = frontend_factory(state_path=path)  # the policy module is gone: start anyway
    b = admin(second)
    assert [x["name"] for x in b.get_all_apps()] == ["plain"]
    assert b.get_model_info("vv")["current_version"] is None
    # what could not come back stays in the store, entry by entry, for the next start
    assert second.call(lambda: second.fe.store.load("registry/app", "odd")) is not None
    second.close()
    sys.path.insert(0, str(tmp_path))
    try:
        third = frontend_factory(state_path=path)  # the module is back: so is the application
        assert sorted(x["name"] for x in admin(third).get_all_apps()) == ["odd", "plain"]
        third.close()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("gone_policy_mod", None)


def test_a_registry_saved_as_one_snapshot_comes_back_and_is_kept_entry_by_entry(frontend_factory, tmp_path):
    import json as _json

    from clipper.store.sqlite import SQLiteStore

    path = tmp_path / "old.sqlite"
    old = SQLiteStore(path)  # what an earlier version of Clipper wrote: the whole registry in one value
    old.save_many([("registry", "snapshot", _json.dumps({
        "applications": [{"name": "legacy", "input_dtype": "float32", "input_shape": [4], "slo_ms": 500.0}],
        "models": [{"name": "lm", "current_version": "1", "versions": [
            {"name": "lm", "version": "1", "input_dtype": "float32", "input_shape": [4]}]}],
        "links": {"legacy": ["lm"]}}).encode())])
    old.close()
    fe = frontend_factory(state_path=str(path))
    assert fe.call(lambda: fe.fe.registry.linked_models("legacy")) == ["lm"]
    fe.call(lambda: fe.fe.store.flush())
    keys = fe.call(lambda: (fe.fe.store.keys("registry"), fe.fe.store.keys("registry/app"),
                            fe.fe.store.keys("registry/version"), fe.fe.store.keys("registry/links")))
    assert keys == ([], ["legacy"], ["lm:1"], ["legacy"])
    fe.close()
    again = frontend_factory(state_path=str(path))
    assert again.call(lambda: again.fe.registry.linked_models("legacy")) == ["lm"]


def test_batch_settings_of_a_deployment_reach_its_queue_and_the_budget_is_half_the_smallest_slo(frontend):
    """What a deployment sets through the admin API arrives at its model queue: ``batch_delay_ms``, and
    ``latency_budget_ms`` when given. Without one, the batch latency budget is ``batch_budget_fraction``
    (0.5) of the smallest SLO among the applications the version serves, following links as they come and
    go (half the 100 ms default while it serves none). No container is needed: the versions have no entry.

    Mutations caught: ``batch_delay_ms`` dropped on the way from the registry to the ModelQueue (0.0);
    the budget from the largest SLO instead of the smallest (``max(count)``: 20 ms, not 5); the fraction
    ignored (the whole SLO); an explicit ``latency_budget_ms`` overridden by the derived one."""
    a = admin(frontend)
    a.register_application("quick", "float32", [4], slo_ms=10)
    a.register_application("relaxed", "float32", [4], slo_ms=40)
    a.deploy_model("shared", "1", "float32", [4], batch_delay_ms=3.5, wait=False)
    a.deploy_model("own", "1", "float32", [4], latency_budget_ms=7, wait=False)

    def queue(key: str) -> dict:
        return frontend.stats()["models"][key]

    assert queue("shared:1")["batch_delay_ms"] == 3.5 and queue("own:1")["batch_delay_ms"] == 0.0
    assert queue("shared:1")["latency_budget_ms"] == 50.0  # serving no application: half the default 100 ms
    a.link_model_to_app("relaxed", "shared")
    assert queue("shared:1")["latency_budget_ms"] == 20.0
    a.link_model_to_app("quick", "shared")
    assert queue("shared:1")["latency_budget_ms"] == 5.0  # half the smallest of 10 and 40
    a.unlink_model_from_app("quick", "shared")
    assert queue("shared:1")["latency_budget_ms"] == 20.0
    a.link_model_to_app("quick", "own")
    assert queue("own:1")["latency_budget_ms"] == 7.0  # given: kept, whatever the SLOs


@pytest.mark.parametrize("setting,value", [
    ("heartbeat_interval_ms", 0), ("heartbeat_timeout_ms", -5), ("heartbeat_timeout_ms", 1000),  # not past the beat
    ("batch_timeout_ms", "x"), ("container_start_timeout_ms", 0), ("drain_timeout_ms", -1),
    ("restart_backoff_ms", (5000, 100)), ("restart_backoff_ms", (0, 10)), ("restart_backoff_ms", [1, 2, 3]),
    ("query_port", -3), ("rest_port", 70_000), ("rpc_port", None), ("metrics_port", True), ("host", ""),
    ("admission_control", "yes"), ("reuse_port", 1),
])
def test_frontend_settings_out_of_bounds_are_typed_errors(setting, value):
    from clipper.config import FrontendConfig

    with pytest.raises(E.InvalidConfigError, match=setting):
        FrontendConfig(**{setting: value})


def test_start_checks_its_command_line_like_the_file(tmp_path, capsys):
    # a port from the command line goes through the same check: one typed line, nothing bound or written
    from clipper.cli import main

    rc = main(["start", "--query-port", "70000", "--state", str(tmp_path / "s.sqlite")])
    assert rc == 1 and "query_port = 70000 is not a port number" in capsys.readouterr().err
    assert not (tmp_path / "s.sqlite").exists()
