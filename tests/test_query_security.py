"""Query-port security on real frontends and real containers: TLS on the msgpack and REST ports
(certificates made here with the openssl CLI), per-application API keys on both, their admin API,
revocation on live connections, keys across a restart, and the CLI's side of it."""

from __future__ import annotations

import asyncio
import http.client as httpc
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import uvloop

from clipper import errors as E
from clipper.client import AsyncClient, Client
from clipper.config import FrontendConfig
from clipper.frontend import Frontend
from clipper.management.admin_client import AdminClient
from clipper.protocol import wire
from clipper.security import exposure_warning, is_loopback, server_tls_context

from test_cli import _cli, _start, _stop  # the CLI helpers: a real `clipper start` process

ROOT = Path(__file__).resolve().parent.parent
OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")
X = np.array([1, 2, 3, 4], np.float32)

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command line tool")


# ------------------------------------------------------------------ certificates
def _openssl(*args, cwd):
    r = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}"


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> dict:
    """A throwaway CA and a server certificate it signed for 127.0.0.1 and localhost (P-256 keys)."""
    d = tmp_path_factory.mktemp("certs")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=clipper test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                               "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                               "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    # An encrypted copy of the server key, for the error it must give.
    _openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key", cwd=d)
    return {"ca": str(d / "ca.pem"), "ca_key": str(d / "ca.key"), "cert": str(d / "server.pem"),
            "key": str(d / "server.key"), "encrypted_key": str(d / "encrypted.key"), "dir": d}


@pytest.fixture
def tls_fe(frontend_factory, certs):
    fe = frontend_factory(tls_cert_file=certs["cert"], tls_key_file=certs["key"])
    fe.deploy("sum", "row_sum")
    return fe


def admin(rf) -> AdminClient:
    return AdminClient("127.0.0.1", rf.fe.admin_port, timeout=60)


# ------------------------------------------------------------------ TLS: Python clients
def test_sync_client_over_tls_with_cafile(tls_fe, certs):
    with Client("127.0.0.1", tls_fe.port, cafile=certs["ca"]) as c:
        assert c.predict("sum", X).output == 10.0
        assert c.feedback("sum", X, 10.0) is not None
        assert c.ping() > 0
    # localhost matches the certificate's DNS name; tls=True with an explicit context works too.
    ctx = ssl.create_default_context(cafile=certs["ca"])
    with Client("localhost", tls_fe.port, tls=ctx) as c:
        assert c.predict("sum", X).output == 10.0


def test_sync_client_pipelines_large_batches_over_tls(frontend_factory, certs):
    # 600 distinct inputs of 48 KiB each way: many TLS records per frame, writes that would block
    # (WANT_WRITE) while replies wait to be read, and decrypted bytes left in the session.
    fe = frontend_factory(tls_cert_file=certs["cert"], tls_key_file=certs["key"])
    fe.deploy("rev", "reverse_bytes", dtype="bytes", shape=(), max_batch=64)
    rng = np.random.default_rng(1)
    xs = [rng.bytes(48 * 1024) for _ in range(600)]
    with Client("127.0.0.1", fe.port, cafile=certs["ca"], timeout=120) as c:
        for _ in range(2):
            out = c.predict_many("rev", xs)
            assert [type(o).__name__ for o in out if not hasattr(o, "output")] == []
            assert all(o.output == x[::-1] for o, x in zip(out, xs))
        assert c.predict("rev", b"abc").output == b"cba"  # the stream is still whole


def test_async_client_over_tls(frontend_factory, certs):
    fe = frontend_factory(tls_cert_file=certs["cert"], tls_key_file=certs["key"])
    fe.deploy("rev", "reverse_bytes", dtype="bytes", shape=(), max_batch=64)
    rng = np.random.default_rng(2)
    xs = [rng.bytes(32 * 1024) for _ in range(400)]

    async def run():
        async with await AsyncClient.connect("127.0.0.1", fe.port, cafile=certs["ca"], timeout=120) as c:
            assert (await c.predict("rev", b"xyz")).output == b"zyx"
            out = await c.predict_many("rev", xs)
            assert all(o.output == x[::-1] for o, x in zip(out, xs))
            single = await asyncio.gather(*(c.predict("rev", x) for x in xs[:50]))
            assert [p.output for p in single] == [x[::-1] for x in xs[:50]]

    asyncio.run(run())


def test_client_without_the_ca_is_refused_with_a_clear_error(tls_fe, certs):
    where = f"127.0.0.1:{tls_fe.port}"
    with pytest.raises(E.ConnectionClosedError, match=f"certificate of {where} is not trusted.*local issuer"):
        Client("127.0.0.1", tls_fe.port, tls=True)
    with pytest.raises(E.ConnectionClosedError, match="not valid for 'other.example'"):
        Client("127.0.0.1", tls_fe.port, cafile=certs["ca"], server_hostname="other.example")

    async def run():
        with pytest.raises(E.ConnectionClosedError, match=f"certificate of {where} is not trusted"):
            await AsyncClient.connect("127.0.0.1", tls_fe.port, tls=True)

    asyncio.run(run())
    with Client("127.0.0.1", tls_fe.port, cafile=certs["ca"]) as c:  # the server is unharmed
        assert c.predict("sum", X).output == 10.0


def test_plain_tcp_against_a_tls_port_fails_cleanly(tls_fe, certs):
    # The Python client, plain: a clear error with the hint.
    with pytest.raises(E.ClipperError, match="TLS port, pass tls=True"):
        Client("127.0.0.1", tls_fe.port, connect_timeout=10)

    async def run():
        with pytest.raises(E.ClipperError, match="TLS port, pass tls=True"):
            await AsyncClient.connect("127.0.0.1", tls_fe.port, connect_timeout=10)

    asyncio.run(run())
    # Raw msgpack frames on the TLS port: the server closes the connection, and nothing else happens.
    with socket.create_connection(("127.0.0.1", tls_fe.port), timeout=30) as s:
        s.sendall(wire.frame(wire.pack(wire.ping(1))) * 10)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        assert wire.frame(wire.pack(wire.pong(1))) not in got
    # A half-open handshake (nothing sent) does not stop others from being served meanwhile.
    with socket.create_connection(("127.0.0.1", tls_fe.port), timeout=30):
        with Client("127.0.0.1", tls_fe.port, cafile=certs["ca"]) as c:
            assert c.predict("sum", X).output == 10.0
    # (the fixture fails the test if the frontend's loop reported any error)


def test_tls_client_against_a_plain_port_fails_cleanly(frontend, certs):
    frontend.deploy("sum", "row_sum")
    with pytest.raises(E.ConnectionClosedError, match="TLS: the handshake with 127.0.0.1:.* failed"):
        Client("127.0.0.1", frontend.port, cafile=certs["ca"], connect_timeout=10)
    with Client("127.0.0.1", frontend.port) as c:
        assert c.predict("sum", X).output == 10.0


# ------------------------------------------------------------------ TLS: REST and curl
@pytest.mark.skipif(CURL is None, reason="needs curl")
def test_curl_against_rest_over_tls(tls_fe, certs):
    port = tls_fe.fe.rest_port
    body = json.dumps({"input": [1, 2, 3, 4.5]})
    for host in ("127.0.0.1", "localhost"):
        r = subprocess.run([CURL, "-sS", "--fail-with-body", "--cacert", certs["ca"], "-H",
                            "Content-Type: application/json", "-d", body, f"https://{host}:{port}/sum/predict"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["output"] == 10.5
    # Without the CA curl refuses the certificate (exit 60); over plain HTTP the TLS port gives no answer.
    r = subprocess.run([CURL, "-sS", "-d", body, f"https://127.0.0.1:{port}/sum/predict"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 60, (r.returncode, r.stderr)
    r = subprocess.run([CURL, "-sS", "-m", "20", "-d", body, f"http://127.0.0.1:{port}/sum/predict"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "10.5" not in r.stdout
    ctx = ssl.create_default_context(cafile=certs["ca"])
    conn = httpc.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)  # keep-alive over TLS
    for _ in range(3):
        conn.request("POST", "/sum/predict", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["output"] == 10.5
    conn.close()


# ------------------------------------------------------------------ TLS configuration
def test_tls_files_are_checked_at_start_and_named(certs, tmp_path):
    with pytest.raises(E.InvalidConfigError, match="tls_cert_file is set without tls_key_file"):
        FrontendConfig(tls_cert_file=certs["cert"])
    with pytest.raises(E.InvalidConfigError, match="tls_key_file is set without tls_cert_file"):
        FrontendConfig(tls_key_file=certs["key"])
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(E.InvalidConfigError, match=f"tls_cert_file '{missing}' does not exist"):
        server_tls_context(missing, certs["key"])
    with pytest.raises(E.InvalidConfigError, match=f"tls_key_file '{missing}' does not exist"):
        server_tls_context(certs["cert"], missing)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(E.InvalidConfigError, match=f"tls_cert_file '{junk}' holds no PEM certificate"):
        server_tls_context(junk, certs["key"])
    with pytest.raises(E.InvalidConfigError, match=f"tls_key_file '{junk}' holds no PEM private key"):
        server_tls_context(certs["cert"], junk)
    with pytest.raises(E.InvalidConfigError, match="does not hold the key of the certificate"):
        server_tls_context(certs["cert"], certs["ca_key"])
    with pytest.raises(E.InvalidConfigError, match="is encrypted"):
        server_tls_context(certs["cert"], certs["encrypted_key"])
    ctx = server_tls_context(certs["cert"], certs["key"])
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2

    # A frontend refuses to start with a bad file, before it binds anything.
    async def start(cfg):
        fe = Frontend(cfg)
        await fe.start()
        await fe.stop()

    cfg = FrontendConfig(query_port=0, rest_port=0, admin_port=None, metrics_port=None, rpc_port=0)
    cfg.tls_cert_file, cfg.tls_key_file = certs["cert"], missing
    with pytest.raises(E.InvalidConfigError, match="tls_key_file .* does not exist"):
        uvloop.run(start(cfg))
    cfg.tls_key_file = None  # set after construction: the start checks the pair again
    with pytest.raises(E.InvalidConfigError, match="tls_cert_file is set but tls_key_file is not"):
        uvloop.run(start(cfg))


def test_exposure_warning():
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host) and exposure_warning(FrontendConfig(host=host)) is None
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "example.com"):
        assert not is_loopback(host)
    w = exposure_warning(FrontendConfig(host="0.0.0.0"))
    assert "without TLS and without API keys" in w and "--tls-cert FILE --tls-key FILE" in w
    assert "--require-api-keys" in w
    w = exposure_warning(FrontendConfig(host="0.0.0.0", require_api_keys=True))
    assert "without TLS:" in w and "--require-api-keys" not in w
    w = exposure_warning(FrontendConfig(host="0.0.0.0", tls_cert_file="c.pem", tls_key_file="k.pem"))
    assert "without API keys:" in w and "--tls-cert" not in w
    assert exposure_warning(FrontendConfig(host="0.0.0.0", tls_cert_file="c.pem", tls_key_file="k.pem",
                                           require_api_keys=True)) is None
    assert exposure_warning(FrontendConfig(host="0.0.0.0", query_port=None, rest_port=None)) is None


# ------------------------------------------------------------------ API keys: admin API
@pytest.fixture
def keyed_fe(frontend_factory):
    fe = frontend_factory(require_api_keys=True)
    fe.deploy("sum", "row_sum")
    fe.deploy("other", "row_sum", model="other-model")
    return fe


def test_admin_routes_for_api_keys(keyed_fe):
    a = admin(keyed_fe)
    assert a.list_api_keys() == []
    made = a.create_api_key(["sum", "other", "sum"], name="team A")
    assert set(made) == {"id", "key", "apps", "name", "created"}
    assert made["key"].startswith("clk_") and len(made["key"]) >= 40 and made["id"].startswith("ak_")
    assert made["apps"] == ["other", "sum"] and made["name"] == "team A"
    second = a.create_api_key("sum")
    assert second["key"] != made["key"] and second["name"] == ""
    listed = a.list_api_keys()
    assert [k["id"] for k in listed] == sorted([made["id"], second["id"]], key=lambda i: (
        next(k["created"] for k in listed if k["id"] == i), i))
    assert all(set(k) == {"id", "name", "apps", "created"} for k in listed)  # never the secret
    assert made["key"] not in json.dumps(listed)
    with pytest.raises(E.UnknownApplicationError, match="'nope'"):
        a.create_api_key(["sum", "nope"])
    with pytest.raises(E.InvalidConfigError, match="at least one application"):
        a.create_api_key([])
    with pytest.raises(E.InvalidConfigError, match="not a non-empty string"):
        a._call("POST", "/api/v1/api-keys", {"apps": ["sum", 3]})
    with pytest.raises(E.InvalidConfigError, match="unknown key"):
        a._call("POST", "/api/v1/api-keys", {"apps": ["sum"], "expires": 3})
    with pytest.raises(E.InvalidConfigError, match="needs 'apps'"):
        a._call("POST", "/api/v1/api-keys", {})
    with pytest.raises(E.InvalidConfigError, match="name must be a string"):
        a.create_api_key(["sum"], name="x" * 1000)
    assert a.revoke_api_key(second["id"]) == {"revoked": second["id"], "name": ""}
    with pytest.raises(E.InvalidConfigError, match="no API key has id"):
        a.revoke_api_key(second["id"])
    assert [k["id"] for k in a.list_api_keys()] == [made["id"]]


# ------------------------------------------------------------------ API keys: REST
class Http:
    def __init__(self, port: int) -> None:
        self.conn = httpc.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(self, method: str, path: str, body=None, key: str | None = None, auth: str | None = None):
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        if auth is not None:
            headers["Authorization"] = auth
        self.conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        r = self.conn.getresponse()
        return r.status, json.loads(r.read()), r.headers


def test_rest_api_keys(keyed_fe):
    key = admin(keyed_fe).create_api_key(["sum"])["key"]
    h = Http(keyed_fe.fe.rest_port)  # one keep-alive connection through all of it
    body = {"input": [1, 2, 3, 4]}
    status, out, headers = h.request("POST", "/sum/predict", body)
    assert status == 401 and out["error"]["code"] == 208 and out["error"]["name"] == "UNAUTHENTICATED"
    assert headers["WWW-Authenticate"] == 'Bearer realm="clipper"'
    status, out, headers = h.request("POST", "/sum/predict", body, key="clk_wrong")
    assert status == 401 and out["error"]["code"] == 208 and "invalid_token" in headers["WWW-Authenticate"]
    status, out, _ = h.request("POST", "/sum/predict", body, auth=f"Basic {key}")
    assert status == 401 and "expected 'Bearer <API key>'" in out["error"]["message"]
    status, out, _ = h.request("POST", "/sum/predict", body, key="x" * 5000)  # longer than any key
    assert status == 401
    status, out, _ = h.request("POST", "/other/predict", body, key=key)
    assert status == 403 and out["error"]["code"] == 209 and out["error"]["name"] == "PERMISSION_DENIED"
    status, out, _ = h.request("POST", "/nope/predict", body, key=key)  # unknown apps look the same
    assert status == 403
    status, out, _ = h.request("POST", "/nope/predict", body)
    assert status == 401
    status, out, _ = h.request("POST", "/sum/predict", body, key=key)
    assert status == 200 and out["output"] == 10.0
    status, out, _ = h.request("POST", "/sum/predict", body, auth=f"bearer   {key}")  # scheme case-insensitive
    assert status == 200
    status, out, _ = h.request("POST", "/sum/predict", {"input_batch": [[1, 1, 1, 1], [2, 2, 2, 2]]}, key=key)
    assert status == 200 and [p["output"] for p in out["batch_predictions"]] == [4.0, 8.0]
    status, out, _ = h.request("POST", "/sum/update", {"input": [1, 2, 3, 4], "label": 10.0})
    assert status == 401
    status, out, _ = h.request("POST", "/other/update", {"input": [1, 2, 3, 4], "label": 10.0}, key=key)
    assert status == 403
    status, out, _ = h.request("POST", "/sum/update", {"input": [1, 2, 3, 4], "label": 10.0}, key=key)
    assert status == 200 and out["ok"] is True
    assert h.request("GET", "/healthz")[0] == 200
    assert h.request("GET", "/readyz")[:2] == (200, {"ready": True})


def test_rest_without_required_keys_ignores_authorization(frontend):
    frontend.deploy("sum", "row_sum")
    h = Http(frontend.fe.rest_port)
    assert h.request("POST", "/sum/predict", {"input": [1, 2, 3, 4]}, key="anything")[:1] == (200,)
    assert h.request("POST", "/sum/predict", {"input": [1, 2, 3, 4]})[:1] == (200,)


# ------------------------------------------------------------------ API keys: msgpack
def test_msgpack_api_keys_on_the_wire(keyed_fe, wire_conn):
    key = admin(keyed_fe).create_api_key(["sum"])["key"]
    c = wire_conn(keyed_fe.port)
    c.send(wire.predict(1, "sum", X))
    c.send(wire.feedback(2, "sum", X, 10.0))
    c.send(wire.ping(3))
    c.send(wire.hello(4))  # no key: negotiates, and says the connection is not authenticated
    e1, e2, pong, ok = c.recv(4)
    assert e1[:4] == [wire.ERROR, 1, 208, "UNAUTHENTICATED"] and "HELLO info api_key" in e1[4]
    assert e2[:3] == [wire.ERROR, 2, 208] and pong == [wire.PONG, 3]
    assert ok[0] == wire.HELLO_OK and ok[2]["authenticated"] is False
    c.send(wire.hello(5, api_key="clk_wrong"))
    c.send(wire.predict(6, "sum", X))
    bad, still = c.recv(2)
    assert bad[:3] == [wire.ERROR, 5, 208] and still[:3] == [wire.ERROR, 6, 208]
    # HELLO with the key, then queries pipelined right behind it: frames are taken in order.
    c.send(wire.hello(7, api_key=key))
    c.send(wire.predict(8, "sum", X))
    c.send(wire.predict(9, "other", X))
    c.send(wire.predict(10, "nope", X))
    c.send(wire.feedback(11, "other", X, 1.0))
    replies = {m[1]: m for m in c.recv(5)}
    assert replies[7][0] == wire.HELLO_OK and replies[7][2]["authenticated"] is True
    assert replies[8][0] == wire.RESULT and replies[8][3] == 10.0
    assert replies[9][:4] == [wire.ERROR, 9, 209, "PERMISSION_DENIED"] and "'other'" in replies[9][4]
    assert replies[10][:3] == [wire.ERROR, 10, 209]
    assert replies[11][:3] == [wire.ERROR, 11, 209]
    c.send(wire.feedback(12, "sum", X, 10.0))
    assert c.recv(1)[0][0] == wire.FEEDBACK_OK


def test_msgpack_wrong_keys_close_the_connection_at_the_bound(keyed_fe, wire_conn):
    c = wire_conn(keyed_fe.port)
    c.send(wire.hello(1, api_key="clk_a"))
    c.send(wire.hello(2, api_key=17))  # not a string: a failed attempt too
    assert [m[:3] for m in c.recv(2)] == [[wire.ERROR, 1, 208], [wire.ERROR, 2, 208]]
    # The third failure (max_auth_failures_per_connection = 3): its ERROR, then the close; what was
    # pipelined behind it is dropped.
    c.sock.sendall(b"".join(wire.frame(wire.pack(m)) for m in (wire.hello(3, api_key="clk_c"), wire.ping(4))))
    last = c.recv(1)[0]
    assert last[:3] == [wire.ERROR, 3, 208] and "connection is closed" in last[4]
    with pytest.raises(ConnectionError):
        c.recv(1)
    with Client("127.0.0.1", keyed_fe.port) as ok:  # others are unaffected
        assert ok.ping() > 0


def test_python_clients_send_the_api_key(keyed_fe):
    key = admin(keyed_fe).create_api_key(["sum"])["key"]
    with Client("127.0.0.1", keyed_fe.port, api_key=key) as c:
        assert c.server_info["authenticated"] is True
        assert c.predict("sum", X).output == 10.0
        with pytest.raises(E.PermissionDeniedError, match="does not grant application 'other'"):
            c.predict("other", X)
        out = c.predict_many("sum", [X] * 20 + [X * 2])
        assert [p.output for p in out] == [10.0] * 20 + [20.0]
    with pytest.raises(E.AuthenticationError, match="not a valid API key"):
        Client("127.0.0.1", keyed_fe.port, api_key="clk_wrong")
    with Client("127.0.0.1", keyed_fe.port) as c:
        assert c.server_info["authenticated"] is False
        with pytest.raises(E.AuthenticationError):
            c.predict("sum", X)
        assert c.ping() > 0

    async def run():
        async with await AsyncClient.connect("127.0.0.1", keyed_fe.port, api_key=key) as c:
            assert (await c.predict("sum", X)).output == 10.0
            with pytest.raises(E.PermissionDeniedError):
                await c.predict("other", X)
        with pytest.raises(E.AuthenticationError):
            await AsyncClient.connect("127.0.0.1", keyed_fe.port, api_key="clk_wrong")

    asyncio.run(run())


def test_hello_ok_says_nothing_of_keys_when_they_are_off(frontend):
    with Client("127.0.0.1", frontend.port, api_key="clk_ignored") as c:
        assert "authenticated" not in c.server_info and c.ping() > 0


def test_revocation_takes_effect_on_live_connections(keyed_fe):
    a = admin(keyed_fe)
    made = a.create_api_key(["sum"])
    keep = a.create_api_key(["sum"])
    h = Http(keyed_fe.fe.rest_port)
    with Client("127.0.0.1", keyed_fe.port, api_key=made["key"]) as c, \
            Client("127.0.0.1", keyed_fe.port, api_key=keep["key"]) as other:
        assert c.predict("sum", X).output == 10.0
        assert h.request("POST", "/sum/predict", {"input": [1, 2, 3, 4]}, key=made["key"])[0] == 200
        a.revoke_api_key(made["id"])
        with pytest.raises(E.AuthenticationError, match=f"{made['id']} of this connection was revoked"):
            c.predict("sum", X)
        with pytest.raises(E.AuthenticationError):
            c.feedback("sum", X, 10.0)
        assert h.request("POST", "/sum/predict", {"input": [1, 2, 3, 4]}, key=made["key"])[0] == 401
        assert other.predict("sum", X).output == 10.0  # another key is untouched
        assert c.ping() > 0  # the connection itself goes on


def test_api_keys_survive_a_restart(frontend_factory, tmp_path):
    state = str(tmp_path / "state.sqlite")
    first = frontend_factory(require_api_keys=True, state_path=state)
    first.deploy("sum", "row_sum")
    a = admin(first)
    kept = a.create_api_key(["sum"], name="kept")
    gone = a.create_api_key(["sum"], name="gone")
    a.revoke_api_key(gone["id"])
    first.close()
    raw = Path(state).read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("state.sqlite-*"))
    assert kept["key"].encode() not in raw  # only its digest is stored

    second = frontend_factory(require_api_keys=True, state_path=state)
    second.call(second.fe.wait_ready("sum-model", timeout_s=60))  # the registry came back with its model
    assert [(k["id"], k["name"], k["apps"]) for k in admin(second).list_api_keys()] == [
        (kept["id"], "kept", ["sum"])]
    with Client("127.0.0.1", second.port, api_key=kept["key"]) as c:
        assert c.predict("sum", X).output == 10.0
    with pytest.raises(E.AuthenticationError):
        Client("127.0.0.1", second.port, api_key=gone["key"])
    h = Http(second.fe.rest_port)
    assert h.request("POST", "/sum/predict", {"input": [1, 2, 3, 4]}, key=kept["key"])[0] == 200


def test_unregistered_applications_stay_named_by_their_keys(keyed_fe):
    # Documented choice: a key names applications; unregistering one leaves the name in the key
    # (queries get UNKNOWN_APPLICATION), and registering it again grants it again.
    a = admin(keyed_fe)
    made = a.create_api_key(["sum", "other"])
    a.unregister_application("other")
    assert a.list_api_keys()[0]["apps"] == ["other", "sum"]
    with Client("127.0.0.1", keyed_fe.port, api_key=made["key"]) as c:
        with pytest.raises(E.UnknownApplicationError):
            c.predict("other", X)
        a.register_application("other", "float32", [4], slo_ms=10_000)
        a.link_model_to_app("other", "other-model")
        assert c.predict("other", X).output == 10.0


def test_tls_and_api_keys_together(frontend_factory, certs):
    fe = frontend_factory(tls_cert_file=certs["cert"], tls_key_file=certs["key"], require_api_keys=True)
    fe.deploy("sum", "row_sum")
    key = admin(fe).create_api_key(["sum"])["key"]
    with Client("localhost", fe.port, cafile=certs["ca"], api_key=key) as c:
        assert c.predict("sum", X).output == 10.0
    ctx = ssl.create_default_context(cafile=certs["ca"])
    conn = httpc.HTTPSConnection("localhost", fe.fe.rest_port, context=ctx, timeout=30)
    conn.request("POST", "/sum/predict", body=json.dumps({"input": [1, 2, 3, 4]}),
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["output"] == 10.0


# ------------------------------------------------------------------ the CLI
def test_cli_api_keys_tls_and_the_exposure_warning(tmp_path, certs):
    env = dict(os.environ)
    env.pop("CLIPPER_API_KEY", None)
    runs = [tmp_path / name for name in ("secured", "open", "loopback")]  # one ready file each
    for d in runs:
        d.mkdir()
    proc, ports = _start(runs[0], env, "--host", "0.0.0.0", "--tls-cert", certs["cert"], "--tls-key", certs["key"],
                         "--require-api-keys")
    try:
        admin_port = ["--admin-port", str(ports["admin_port"])]
        r = _cli("register-app", "sum", "--input-dtype", "float32", "--input-shape", "4", *admin_port, env=env)
        assert r.returncode == 0, r.stderr
        r = _cli("deploy", "sum-model", "1", "model_zoo.py:row_sum", "--input-dtype", "float32", "--input-shape",
                 "4", "--workdir", "tests", *admin_port, env=env)
        assert r.returncode == 0, r.stderr
        assert _cli("link", "sum", "sum-model", *admin_port, env=env).returncode == 0
        r = _cli("api-key", "create", "--app", "sum", "--name", "cli", *admin_port, env=env)
        assert r.returncode == 0, r.stderr
        made = json.loads(r.stdout)
        assert made["apps"] == ["sum"] and "shown only this once" in r.stderr
        listed = json.loads(_cli("api-key", "list", *admin_port, env=env).stdout)
        assert [k["id"] for k in listed] == [made["id"]] and "key" not in listed[0]
        r = _cli("api-key", "create", "--app", "nope", *admin_port, env=env)
        assert r.returncode == 1 and "UNKNOWN_APPLICATION" in r.stderr
        query = ["predict", "sum", "[1, 2, 3, 4]", "--port", str(ports["query_port"]), "--cafile", certs["ca"]]
        r = _cli(*query, env=env)
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr
        r = _cli(*query, "--api-key", made["key"], env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["output"] == 10.0, r.stderr
        r = _cli(*query, env={**env, "CLIPPER_API_KEY": made["key"]})
        assert r.returncode == 0, r.stderr
        r = _cli("predict", "sum", "[1, 2, 3, 4]", "--port", str(ports["query_port"]), "--tls",
                 "--api-key", made["key"], env=env)
        assert r.returncode == 1 and "not trusted" in r.stderr  # the test CA is not the system's
        r = _cli("api-key", "revoke", made["id"], *admin_port, env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["revoked"] == made["id"]
        r = _cli(*query, "--api-key", made["key"], env=env)
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr
    finally:
        assert _stop(proc) == 0
    err = proc.stderr.read()
    assert "warning" not in err  # off loopback, but with TLS and API keys

    proc, _ = _start(runs[1], env, "--host", "0.0.0.0")
    assert _stop(proc) == 0
    err = proc.stderr.read()
    assert err.count("warning") == 1 and "without TLS and without API keys" in err

    proc, _ = _start(runs[2], env, "--tls-cert", certs["cert"], "--tls-key", certs["key"])  # loopback: quiet
    assert _stop(proc) == 0
    assert "warning" not in proc.stderr.read()


def test_cli_start_refuses_bad_tls_options(tmp_path, certs):
    base = [sys.executable, "-m", "clipper", "start", "--query-port", "0", "--admin-port", "0", "--rpc-port", "0",
            "--rest-port", "0", "--metrics-port", "0", "--state", str(tmp_path / "s.sqlite")]
    r = subprocess.run([*base, "--tls-cert", certs["cert"]], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and "tls_cert_file is set without tls_key_file" in r.stderr
    r = subprocess.run([*base, "--tls-cert", certs["cert"], "--tls-key", str(tmp_path / "missing.key")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and f"tls_key_file '{tmp_path / 'missing.key'}' does not exist" in r.stderr
    # The same from a config file's [frontend] table, relative to the file's folder.
    shutil.copy(certs["cert"], tmp_path / "c.pem")
    (tmp_path / "clipper.toml").write_text('[frontend]\ntls_cert_file = "c.pem"\ntls_key_file = "k.pem"\n')
    r = subprocess.run([*base, "--config", str(tmp_path / "clipper.toml")], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 1 and f"tls_key_file '{tmp_path / 'k.pem'}' does not exist" in r.stderr


def test_the_wire_builders_carry_the_new_fields():
    assert wire.hello(0, (1,), "c", api_key="clk_x") == [wire.HELLO, 0, {"versions": [1], "client": "c",
                                                                          "api_key": "clk_x"}]
    assert "api_key" not in wire.hello(0)[2]
    assert wire.hello_ok(0, 1, "s", {}, True)[2]["authenticated"] is True
    assert "authenticated" not in wire.hello_ok(0, 1, "s", {})[2]
    with pytest.raises(TypeError):
        Client("127.0.0.1", 1, api_key=b"bytes")
    with pytest.raises(ValueError, match="not both"):
        Client("127.0.0.1", 1, tls=ssl.create_default_context(), cafile="x.pem")


# ------------------------------------------------------------------ the TLS benchmark's tools
def test_loadgen_speaks_tls(tls_fe, certs):
    from bench.loadgen import LoadSpec, run_load

    r = run_load(LoadSpec(port=tls_fe.port, app="sum", shape=(4,), connections=2, concurrency=4, duration_s=0.5,
                          warmup_s=0.2, drain_s=5.0, tls_cafile=certs["ca"]))
    assert r["tls"] is True and r["completed"] > 0 and r["errors_total"] == 0 and r["unfinished"] == 0


def test_tls_bench_summary_pairs_each_repeat():
    from bench.tls import summarize

    def side(rps, p50, p99):
        return {"throughput_rps": rps, "latency_ms": {"p50": p50, "p99": p99}, "loadgen_cpu_cores": 0.2,
                "server_cpu_cores": 1.0}

    runs = [{"plain": {"msgpack": side(100, 1, 4), "rest": side(50, 2, 8)},
             "tls": {"msgpack": side(80, 2, 4), "rest": side(25, 2, 16)}},
            {"plain": {"msgpack": side(50, 1, 4), "rest": side(40, 2, 8)},   # a slow moment hits both sides
             "tls": {"msgpack": side(45, 1, 8), "rest": side(36, 4, 8)}}]
    s = summarize(runs)
    assert s["msgpack"]["tls_vs_plain"]["per_repeat"]["throughput_rps"] == [0.8, 0.9]
    assert s["msgpack"]["tls_vs_plain"]["paired"]["throughput_rps"] == pytest.approx(0.85)
    assert s["msgpack"]["plain"]["throughput_rps"] == 75 and s["msgpack"]["tls"]["throughput_rps"] == 62.5
    assert s["rest"]["tls_vs_plain"]["paired"]["p99_ms"] == pytest.approx(1.5)
    assert s["rest"]["tls_vs_plain"]["paired"]["loadgen_cpu_cores"] == 1.0
