"""Bad input to the admin API, sent as raw JSON bytes to a real frontend: each is refused with a typed
400-class error (never a 500, never stored) and the valid values next to it are still taken.

Held here: a model version's ``workdir``, ``entry``, ``command`` and ``env`` (what starts its containers),
its ``version`` (a string or an integer, never ``null`` or ``true`` turned into text), an application's
``description``, JSON the parser cannot or must not take (nesting, huge integers, NaN and infinities,
bytes that are not UTF-8), and the names of the links route.
"""

from __future__ import annotations

import base64
import http.client
import json
import sys

import pytest

from clipper import errors as E
from clipper.management.registry import ModelVersion

MODEL = {"name": "vm", "version": "1", "input_dtype": "float32", "input_shape": [4], "replicas": 0}
APP = {"name": "va", "input_dtype": "float32", "input_shape": [4], "slo_ms": 1000}


def call(frontend, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    """One admin request with the frontend's token; ``body`` as given when bytes. Returns (status, JSON)."""
    token = frontend.fe.admin.token.path.read_text().strip()
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn = http.client.HTTPConnection("127.0.0.1", frontend.fe.admin_port, timeout=60)
    try:
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def refused(frontend, method: str, path: str, body, match: str, code: int = E.InvalidConfigError.code) -> None:
    status, out = call(frontend, method, path, body)
    assert status == 400, (status, out)
    assert out["error"]["code"] == code, out
    assert match in out["error"]["message"], out


def models(frontend) -> dict:
    return frontend.call(lambda: {n: sorted(m.versions) for n, m in frontend.fe.registry.models.items()})


# ---------------------------------------------------------------- what starts a container
@pytest.mark.parametrize("extra, match", [
    ({"workdir": 5}, "workdir"),
    ({"workdir": ["/tmp"]}, "workdir"),
    ({"workdir": "/tmp/a\0b"}, "workdir"),
    ({"workdir": "/" + "d" * 4096}, "workdir"),
    ({"entry": "model_zoo.py:row\0sum"}, "entry"),
    ({"command": [sys.executable, "-c", "print(1)\0"]}, "command"),
    ({"env": {"A\0B": "1"}}, "env"),
    ({"env": {"A": "1\0"}}, "env"),
    ({"env": {"A=B": "1"}}, "env"),
    ({"env": {"": "1"}}, "env"),
])
def test_what_starts_a_container_is_checked_at_deploy(frontend, extra, match):
    refused(frontend, "POST", "/api/v1/models", {**MODEL, **extra}, match)
    assert models(frontend) == {}


def test_every_valid_container_setting_is_still_taken(frontend, tmp_path):
    for i, extra in enumerate([
        {"workdir": str(tmp_path)}, {"workdir": ""}, {"workdir": None}, {"workdir": "/" + "d" * 4095},
        {"entry": "model_zoo.py:row_sum", "env": {"A": "", "B_2": "x=y", "C": "ünï"}},
        {"command": [sys.executable, "-c", "pass"], "env": {}},
    ]):
        status, out = call(frontend, "POST", "/api/v1/models", {**MODEL, "version": str(i + 1), **extra})
        assert status == 201, (extra, out)
        assert all(out[k] == v for k, v in extra.items()), out


def test_a_workdir_that_is_not_a_string_is_refused_by_the_model_version_itself():
    with pytest.raises(E.InvalidConfigError, match="workdir 5 for model m:1 is not a string"):
        ModelVersion("m", "1", "float32", (4,), workdir=5)  # type: ignore[arg-type]


# ---------------------------------------------------------------- versions
@pytest.mark.parametrize("version", [None, True, False, 1.5, [1], {"v": 1}])
def test_a_version_is_a_string_or_an_integer_never_text_made_of_another_type(frontend, version):
    refused(frontend, "POST", "/api/v1/models", {**MODEL, "version": version}, "version")
    assert models(frontend) == {}


@pytest.mark.parametrize("version", [None, True])
def test_a_closure_deployment_checks_its_version_too(frontend, version):
    from clipper.container.closure import dump_closure

    blob = base64.b64encode(dump_closure(lambda batch: batch)).decode()
    body = {**MODEL, "version": version, "closure": blob}
    refused(frontend, "POST", "/api/v1/models", body, "version")
    refused(frontend, "POST", "/api/v1/models", {**body, "version": "1", "name": None}, "model name")
    assert models(frontend) == {}


def test_string_and_integer_versions_are_still_taken(frontend):
    for version, stored in (("1", "1"), (2, "2"), ("v3.0-rc", "v3.0-rc")):
        status, out = call(frontend, "POST", "/api/v1/models", {**MODEL, "version": version})
        assert status == 201 and out["version"] == stored, out
    assert models(frontend) == {"vm": ["1", "2", "v3.0-rc"]}


# ---------------------------------------------------------------- JSON the admin API does not take
def test_a_body_nested_too_deeply_is_a_bad_body_not_an_internal_error(frontend):
    depth = 200_000
    body = b'{"name": "va", "default_output": ' + b"[" * depth + b"]" * depth + b"}"
    refused(frontend, "POST", "/api/v1/applications", body, "nests")
    assert frontend.call(lambda: list(frontend.fe.registry.applications)) == []


def test_an_integer_of_thousands_of_digits_is_a_bad_body(frontend):
    body = json.dumps(APP).encode()[:-1] + b', "default_output": ' + b"9" * 5000 + b"}"
    refused(frontend, "POST", "/api/v1/applications", body, "digits")
    assert frontend.call(lambda: list(frontend.fe.registry.applications)) == []


def test_a_body_that_is_not_utf8_is_a_bad_body(frontend):
    refused(frontend, "POST", "/api/v1/applications", b'{"name": "\xff"}', "UTF-8")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"[1.0, NaN]"])
def test_nan_and_infinities_are_refused_so_every_answer_stays_strict_json(frontend, literal):
    body = json.dumps(APP).encode()[:-1] + b', "default_output": ' + literal + b"}"
    refused(frontend, "POST", "/api/v1/applications", body, "finite")
    assert frontend.call(lambda: list(frontend.fe.registry.applications)) == []
    # what is taken comes back as strict JSON
    status, _ = call(frontend, "POST", "/api/v1/applications", {**APP, "default_output": [1.5, -2e300]})
    assert status == 201
    conn = http.client.HTTPConnection("127.0.0.1", frontend.fe.admin_port, timeout=60)
    token = frontend.fe.admin.token.path.read_text().strip()
    conn.request("GET", "/api/v1/applications/va", headers={"Authorization": f"Bearer {token}"})
    raw = conn.getresponse().read()
    conn.close()

    def strict(name):
        raise AssertionError(f"the answer holds {name}: {raw!r}")

    assert json.loads(raw, parse_constant=strict)["default_output"] == [1.5, -2e300]


# ---------------------------------------------------------------- descriptions
@pytest.mark.parametrize("description", [{"a": 1}, 5, ["x"], "d" * 4097])
def test_a_description_is_a_bounded_string(frontend, description):
    refused(frontend, "POST", "/api/v1/applications", {**APP, "description": description}, "description")
    assert frontend.call(lambda: list(frontend.fe.registry.applications)) == []


def test_a_description_of_up_to_4096_characters_is_taken(frontend):
    status, out = call(frontend, "POST", "/api/v1/applications", {**APP, "description": "d" * 4096})
    assert status == 201 and out["description"] == "d" * 4096, out


# ---------------------------------------------------------------- links
@pytest.mark.parametrize("method", ["POST", "DELETE"])
@pytest.mark.parametrize("body, match", [
    ({"app": ["va"], "model": "vm"}, "app"),
    ({"app": {"a": 1}, "model": "vm"}, "app"),
    ({"app": "va", "model": ["vm"]}, "model"),
    ({"app": "va", "model": None}, "model"),
    ({"app": "va", "model": "vm", "version": ["1"]}, "version"),
])
def test_the_names_of_a_link_are_strings(frontend, method, body, match):
    assert call(frontend, "POST", "/api/v1/applications", APP)[0] == 201
    assert call(frontend, "POST", "/api/v1/models", MODEL)[0] == 201
    refused(frontend, method, "/api/v1/links", body, match)
    assert frontend.call(lambda: frontend.fe.registry.links) == {"va": []}
