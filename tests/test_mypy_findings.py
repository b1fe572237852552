"""Bugs the type checker found (issue 12: ruff and mypy in CI), each held by a test."""

import pytest

from clipper.container.runtime import LoadError, _import_entry
from clipper.security.container_keys import STORE_NAMESPACE, ContainerKeyring
from clipper.store.sqlite import SQLiteStore


def test_a_workers_leader_without_rpc_security_issues_its_childrens_credentials():
    # rpc_security = "none" in a --workers group: the leader's local manager issues "none" grants (no key,
    # no password). Storing one for the members dereferenced its missing password (AttributeError, and no
    # container started); the members believe the id anyway, so it is not stored.
    keyring = ContainerKeyring.open("none", None)
    keyring.share_local(lambda: None, leader=True)
    store = SQLiteStore(":memory:")
    keyring.attach_store(store)
    grant, secret = keyring.issue("m", "1", origin="manager", mechanism="none")
    assert secret == {"mechanism": "none"} and keyring.get(grant.id) is grant
    assert store.keys(STORE_NAMESPACE) == []
    keyring.revoke(grant.id)
    assert keyring.get(grant.id) is None


def test_an_entry_file_that_is_not_python_source_is_a_load_error(tmp_path):
    # spec_from_file_location gives None for a file without the .py suffix: that was an AttributeError.
    path = tmp_path / "model.txt"
    path.write_text("def predict(xs):\n    return xs\n")
    with pytest.raises(LoadError, match="not a Python source file"):
        _import_entry(f"{path}:predict")
