"""The admin API's credentials, tried as a web page and a stranger would: raw HTTP on a real frontend."""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from clipper import errors as E
from clipper.management.admin_client import AdminClient
from conftest import make_cert

TESTS = Path(__file__).resolve().parent


def raw(port: int, method: str, path: str, headers: dict, body: bytes = b"", tls_ctx=None) -> tuple[int, dict, dict]:
    """One HTTP/1.1 request with exactly these headers; returns (status, headers, JSON body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    if tls_ctx is not None:
        sock = tls_ctx.wrap_socket(sock, server_hostname="localhost")
    with sock:
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        sock.sendall(head.encode("latin-1") + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return status, hdrs, json.loads(payload) if payload else {}


def token_of(frontend) -> str:
    return frontend.fe.admin.token.path.read_text().strip()


def deploy_body(marker: Path) -> bytes:
    """A deployment whose command would leave ``marker`` behind: proof that it ran."""
    return json.dumps({"name": "evil", "version": "1", "input_dtype": "float32", "input_shape": [4],
                       "command": [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]}).encode()


def models(frontend) -> set:
    return set(frontend.call(lambda: set(frontend.fe.registry.models)))


def test_the_browser_attack_of_the_issue_is_refused_and_changes_nothing(frontend, tmp_path):
    port = frontend.fe.admin_port
    marker = tmp_path / "ran"
    here = f"127.0.0.1:{port}"
    attempts = [
        # a page on the machine: a "simple request" (text/plain, no credential), its own Origin
        ({"Host": here, "Origin": "http://evil.example", "Content-Type": "text/plain"}, 415, "UNSUPPORTED_MEDIA_TYPE"),
        ({"Host": here, "Content-Type": "application/x-www-form-urlencoded"}, 415, "UNSUPPORTED_MEDIA_TYPE"),
        # DNS rebinding: the page's own name, resolved to this machine
        ({"Host": f"evil.example:{port}", "Origin": "http://evil.example:1338", "Content-Type": "application/json",
          "Authorization": f"Bearer {token_of(frontend)}"}, 421, "MISDIRECTED_REQUEST"),
        ({"Content-Type": "application/json", "Authorization": f"Bearer {token_of(frontend)}"}, 421,
         "MISDIRECTED_REQUEST"),  # no Host at all
        ({"Host": f"127.0.0.1:{port + 1}", "Content-Type": "application/json",
          "Authorization": f"Bearer {token_of(frontend)}"}, 421, "MISDIRECTED_REQUEST"),  # another port
        # JSON, right Host, but no or a wrong token
        ({"Host": here, "Content-Type": "application/json"}, 401, "UNAUTHENTICATED"),
        ({"Host": here, "Content-Type": "application/json", "Authorization": "Bearer " + "x" * 43}, 401,
         "UNAUTHENTICATED"),
        ({"Host": here, "Content-Type": "application/json", "Authorization": f"Basic {token_of(frontend)}"}, 401,
         "UNAUTHENTICATED"),
    ]
    for headers, status, name in attempts:
        got, hdrs, body = raw(port, "POST", "/api/v1/models", headers, deploy_body(marker))
        assert (got, body["error"]["name"]) == (status, name), (headers, got, body)
        assert not any(k.startswith("access-control-") for k in hdrs), hdrs
        if status == 401:
            assert hdrs["www-authenticate"].startswith("Bearer")
    assert "evil" not in models(frontend) and not marker.exists()
    # The same request with the credential and the right headers is what deploys (the control).
    got, _, body = raw(port, "POST", "/api/v1/models", {"Host": f"localhost:{port}", "Content-Type":
                                                        "application/json; charset=utf-8",
                                                        "Authorization": f"Bearer {token_of(frontend)}"},
                       deploy_body(marker))
    assert got == 201, body
    assert "evil" in models(frontend)
    frontend.call(frontend.fe.delete_model("evil"))


def test_reads_need_the_token_too_and_no_cors_preflight_passes(frontend):
    port = frontend.fe.admin_port
    here = {"Host": f"127.0.0.1:{port}"}
    assert raw(port, "GET", "/api/v1/status", here)[0] == 401
    assert raw(port, "GET", "/health", here)[:1] == (200,)  # liveness needs no token
    assert raw(port, "GET", "/health", {"Host": "evil.example"})[0] == 421
    status, hdrs, _ = raw(port, "OPTIONS", "/api/v1/models", {
        **here, "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert status in (401, 415) and not any(k.startswith("access-control-") for k in hdrs)
    ok = raw(port, "GET", "/api/v1/status", {**here, "Authorization": f"Bearer {token_of(frontend)}"})
    assert ok[0] == 200 and not any(k.startswith("access-control-") for k in ok[1])


def test_an_unfinished_header_line_is_cut_off_at_the_limit(frontend):
    # httptools keeps growing a header line until it ends: the connection must be cut before that costs anything
    port = frontend.fe.admin_port
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    with sock:
        sock.sendall(f"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Pad: ".encode())
        sent, reply = 0, b""
        try:
            while sent < 64 * 1024 * 1024 and not reply:
                sock.sendall(b"a" * 65536)
                sent += 65536
                # A moment for the server to answer: the frontend's loop shares this process's GIL, and
                # without it this thread can push megabytes into kernel buffers before the loop runs at all.
                if select.select([sock], [], [], 0.5)[0]:
                    reply = sock.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(30)
        try:
            reply = reply or sock.recv(65536)
        except ConnectionResetError:
            pass
    # Answered (and cut off) long before the 64 MiB this client would send: an unbounded header line
    # used to be buffered for as long as it kept coming, with no answer at all. (What the client sent
    # before it read the answer is mostly the kernel's socket buffers, not the frontend's memory.)
    assert b" 431 " in reply.split(b"\r\n")[0] and sent < 64 * 1024 * 1024, (sent, reply[:200])
    # and the frontend answers as before
    assert AdminClient("127.0.0.1", port).get_all_apps() == []


def test_oversized_or_repeated_headers_are_refused(frontend):
    port = frontend.fe.admin_port
    here = {"Host": f"127.0.0.1:{port}", "Authorization": f"Bearer {token_of(frontend)}"}
    assert raw(port, "GET", "/api/v1/status", {**here, "X-Pad": "a" * 20_000})[0] == 431
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    with sock:
        sock.sendall(f"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: evil.example\r\n"
                     f"Authorization: Bearer {token_of(frontend)}\r\nConnection: close\r\n\r\n".encode())
        assert b" 400 " in sock.recv(65536).split(b"\r\n")[0]


def test_the_token_file_is_private_and_local_clients_need_no_step(frontend):
    path = frontend.fe.admin.token.path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert AdminClient("127.0.0.1", frontend.fe.admin_port).status()["version"]  # found by itself


def test_rotation_replaces_the_token_at_once(frontend):
    port = frontend.fe.admin_port
    old = token_of(frontend)
    a = AdminClient("127.0.0.1", port)
    new = a.rotate_admin_token()
    assert new != old and token_of(frontend) == new
    assert a.get_all_apps() == []  # the rotating client goes on with the new token
    with pytest.raises(E.AuthenticationError, match="took its token from the token given"):
        AdminClient("127.0.0.1", port, token=old).get_all_apps()
    assert AdminClient("127.0.0.1", port).get_all_apps() == []  # a fresh local client reads the new file
    # the CLI finds it too, and rotates without printing the secret unless asked
    out = subprocess.run([sys.executable, "-m", "clipper.cli", "rotate-admin-token", "--admin-port", str(port)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout) == {"rotated": True}
    assert token_of(frontend) not in out.stdout and token_of(frontend) != new


def test_an_operator_sets_the_token_by_writing_the_file(frontend):
    from clipper.security.files import write_private

    path = frontend.fe.admin.token.path
    write_private(path, b"operator-chosen-token-0123456789\n")
    port = frontend.fe.admin_port
    assert AdminClient("127.0.0.1", port, token="operator-chosen-token-0123456789").get_all_apps() == []
    # rewritten in place (same inode, same size, maybe the same mtime tick): still noticed
    with open(path, "r+b") as fh:
        fh.write(b"operator-chosen-token-9876543210\n")
    assert AdminClient("127.0.0.1", port, token="operator-chosen-token-9876543210").get_all_apps() == []
    # a file that is not a token, or that others can read, leaves the last good one in force
    write_private(path, b"short\n")
    assert AdminClient("127.0.0.1", port, token="operator-chosen-token-9876543210").get_all_apps() == []
    write_private(path, b"operator-chosen-token-readable-by-all\n")
    os.chmod(path, 0o644)
    assert AdminClient("127.0.0.1", port, token="operator-chosen-token-9876543210").get_all_apps() == []
    with pytest.raises(E.AuthenticationError):
        AdminClient("127.0.0.1", port, token="operator-chosen-token-readable-by-all").get_all_apps()
    os.chmod(path, 0o600)
    assert AdminClient("127.0.0.1", port, token="operator-chosen-token-readable-by-all").get_all_apps() == []


def test_a_remote_operator_passes_the_token_by_environment_or_file(frontend, tmp_path, monkeypatch):
    port = frontend.fe.admin_port
    monkeypatch.setenv("CLIPPER_ADMIN_TOKEN", "wrong-token-0123456789abcdef")
    with pytest.raises(E.AuthenticationError, match=r"\$CLIPPER_ADMIN_TOKEN"):
        AdminClient("127.0.0.1", port).get_all_apps()
    monkeypatch.setenv("CLIPPER_ADMIN_TOKEN", token_of(frontend))
    assert AdminClient("127.0.0.1", port).get_all_apps() == []
    monkeypatch.delenv("CLIPPER_ADMIN_TOKEN")
    f = tmp_path / "tok"
    f.write_text(token_of(frontend) + "\n")
    monkeypatch.setenv("CLIPPER_ADMIN_TOKEN_FILE", str(f))
    assert AdminClient("127.0.0.1", port).get_all_apps() == []


def test_admin_off_loopback_needs_tls(frontend_factory):
    with pytest.raises(E.InvalidConfigError, match="needs TLS"):
        frontend_factory(admin_host="0.0.0.0")


def test_admin_over_tls(frontend_factory, tmp_path, monkeypatch):
    cert, key = make_cert(tmp_path)
    fe = frontend_factory(admin_host="0.0.0.0", admin_tls_cert_file=cert, admin_tls_key_file=key)
    port = fe.fe.admin_port
    # a local client learns from what the frontend published that it speaks TLS, and with which certificate
    assert AdminClient("127.0.0.1", port).status()["ports"]["admin"] == port
    # a remote operator names the CA and the token
    a = AdminClient("127.0.0.1", port, tls=True, cafile=cert, token=token_of(fe))
    assert a.get_all_apps() == []
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    monkeypatch.setenv("CLIPPER_RUNTIME_DIR", str(elsewhere))  # a client that knows nothing of this frontend
    with pytest.raises(E.ConnectionClosedError, match="CERTIFICATE_VERIFY_FAILED"):
        AdminClient("127.0.0.1", port, tls=True, token=token_of(fe)).get_all_apps()  # not its CA
    with pytest.raises(E.AuthenticationError, match="took its token from nowhere"):
        AdminClient("127.0.0.1", port, tls=True, cafile=cert).get_all_apps()
    ctx = ssl.create_default_context(cafile=cert)
    assert raw(port, "GET", "/api/v1/status", {"Host": f"localhost:{port}",
                                               "Authorization": f"Bearer {token_of(fe)}"}, tls_ctx=ctx)[0] == 200
    curl = subprocess.run(["curl", "-s", "--cacert", cert, "-H", f"Authorization: Bearer {token_of(fe)}",
                           f"https://localhost:{port}/api/v1/applications"], capture_output=True, text=True,
                          timeout=60)
    assert curl.returncode == 0 and json.loads(curl.stdout) == []
    # plain HTTP to the TLS port gets no answer of the API
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        assert b"version" not in s.recv(65536)


def test_the_cli_issues_lists_and_revokes_container_credentials(frontend, tmp_path):
    frontend.deploy("sum", "row_sum")
    port = str(frontend.fe.admin_port)

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "clipper.cli", *args, "--admin-port", port], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    issued = json.loads(cli("container-credentials", "sum-model", "1", "--label", "box 7").splitlines()[0])
    f = tmp_path / "sum-model-1.credentials"
    assert issued["file"] == str(f) and stat.S_IMODE(f.stat().st_mode) == 0o600
    doc = json.loads(f.read_text())
    assert doc["model"] == "sum-model" and doc["version"] == "1" and len(doc["secret_key"]) == 40
    listed = json.loads(cli("list", "credentials"))
    assert [(c["id"], c["label"]) for c in listed] == [(doc["id"], "box 7")] and "secret_key" not in listed[0]
    assert json.loads(cli("revoke-credentials", doc["id"]))["revoked"]["id"] == doc["id"]
    assert json.loads(cli("list", "credentials")) == []
    bad = subprocess.run([sys.executable, "-m", "clipper.cli", "container-credentials", "nope", "--admin-port", port],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "nope" in bad.stderr


def test_the_token_never_travels_in_clear_off_loopback_or_to_a_stale_port(frontend, tmp_path, monkeypatch):
    with pytest.raises(E.InvalidConfigError, match="without TLS"):
        AdminClient("10.0.0.1", 1338, tls=False, token="x" * 43)
    assert AdminClient("10.0.0.1", 1338, token="x" * 43).base.startswith("https://")
    # a discovery file left by a frontend that died: its port may be someone else's now
    from clipper.security.admin_token import discover, runtime_dir

    port = frontend.fe.admin_port
    assert discover(port)["pid"] == os.getpid()  # the live one is found
    fake_port = port + 1 if port < 65535 else port - 1
    stale = runtime_dir() / f"admin-{fake_port}.json"
    stale.write_text(json.dumps({"pid": os.getpid(), "host": "127.0.0.1", "port": fake_port,
                                 "token_file": str(frontend.fe.admin.token.path), "tls_cert_file": None}))
    try:
        assert discover(fake_port) is None  # no socket of that process listens there
    finally:
        stale.unlink()
