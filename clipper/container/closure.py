"""Python closures as model entries: serialized with cloudpickle, with the versions that made them.

A closure file is one msgpack map: ``{"format": "clipper-closure/1",
"python": "3.11.7", "cloudpickle": "3.1.1", "sha256": hex, "pickle": bytes}``.
cloudpickle's output is only meant to be read by the same Python (minor
version) and cloudpickle (major.minor), so a container checks both *before*
it unpickles, and fails its start with a message naming the mismatch rather
than crashing (or hanging) somewhere inside ``pickle``.
"""

from __future__ import annotations

import hashlib
import platform
from typing import Any, Callable

import msgpack

from ..errors import InvalidConfigError

__all__ = ["FORMAT", "dump_closure", "closure_info", "load_closure", "version_problem"]

FORMAT = "clipper-closure/1"
MAX_CLOSURE_BYTES = 256 * 1024 * 1024


def dump_closure(fn: Callable[[Any], Any]) -> bytes:
    """Serialize ``predict(batch)`` (a function, closure, or object with ``predict``) for deployment."""
    import cloudpickle

    if not callable(fn) and not callable(getattr(fn, "predict", None)):
        raise TypeError(f"{fn!r} is neither callable nor has a predict method")
    payload = cloudpickle.dumps(fn)
    return msgpack.packb({"format": FORMAT, "python": platform.python_version(),
                          "cloudpickle": cloudpickle.__version__, "sha256": hashlib.sha256(payload).hexdigest(),
                          "pickle": payload}, use_bin_type=True)


def _parse(blob: bytes) -> dict:
    if len(blob) > MAX_CLOSURE_BYTES:
        raise InvalidConfigError(f"the closure is {len(blob)} bytes; at most {MAX_CLOSURE_BYTES} are accepted")
    try:
        doc = msgpack.unpackb(blob, raw=False)
    except Exception as exc:
        raise InvalidConfigError(f"the closure is not a {FORMAT} file: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("pickle"), bytes):
        raise InvalidConfigError(f"the closure is not a {FORMAT} file")
    for k in ("python", "cloudpickle", "sha256"):
        if not isinstance(doc.get(k), str):
            raise InvalidConfigError(f"the closure file lacks its {k!r} field")
    if hashlib.sha256(doc["pickle"]).hexdigest() != doc["sha256"]:
        raise InvalidConfigError("the closure's pickle does not match its sha256: the file is damaged")
    return doc


def closure_info(blob: bytes) -> dict:
    """``{"python", "cloudpickle", "sha256", "bytes"}`` of a closure file (checked)."""
    doc = _parse(blob)
    return {"python": doc["python"], "cloudpickle": doc["cloudpickle"], "sha256": doc["sha256"],
            "bytes": len(doc["pickle"])}


def version_problem(python: str, cloudpickle_version: str) -> str | None:
    """Why this process cannot load a closure made by those versions, or None."""
    import cloudpickle

    here_py = platform.python_version()
    problems = []
    if python.split(".")[:2] != here_py.split(".")[:2]:
        problems.append(f"Python {python} (this container runs Python {here_py})")
    if cloudpickle_version.split(".")[:2] != cloudpickle.__version__.split(".")[:2]:
        problems.append(f"cloudpickle {cloudpickle_version} (this container has cloudpickle {cloudpickle.__version__})")
    if problems:
        return ("the closure was serialized with " + " and ".join(problems)
                + "; deploy it from a matching environment, or run the container with matching versions")
    return None


def load_closure(path: str) -> Callable[[Any], Any]:
    """Read a closure file, check its versions, and unpickle it.

    Raises ``LoadError`` (from the container runtime) with the reason.
    """
    import pickle

    from .runtime import LoadError

    try:
        with open(path, "rb") as fh:
            blob = fh.read(MAX_CLOSURE_BYTES + 1)
    except OSError as exc:
        raise LoadError(f"cannot read the closure file {path!r}: {exc}") from None
    try:
        doc = _parse(blob)
    except InvalidConfigError as exc:
        raise LoadError(exc.message) from None
    problem = version_problem(doc["python"], doc["cloudpickle"])
    if problem:
        raise LoadError(problem)
    try:
        import cloudpickle  # noqa: F401  (the pickle refers to cloudpickle's helpers)

        return pickle.loads(doc["pickle"])
    except Exception as exc:
        raise LoadError(f"unpickling the closure failed: {type(exc).__name__}: {exc}") from None
