"""ZeroMQ message I/O for the per-batch path: :func:`events`, :func:`send_parts`, :func:`recv_parts`.

Every batch pays each of them at least once, and a lone client's query is a
batch of one. They call libzmq directly (``clipper._native._zmqio``), bound
here to the libzmq that pyzmq's extension module is linked with (its functions
looked up through that module): pyzmq's own ``Socket.get`` passes each option
through Python-level enum code, 18% of the frontend's instructions at one
query in flight (five calls a query, measured with callgrind). Where those
functions cannot be found that way (a pyzmq that hides a static libzmq, a
version other than pyzmq's), with ``CLIPPER_NO_EXTENSIONS=1``, or with
``CLIPPER_ZMQIO=pyzmq`` (the escape hatch should an unusual pyzmq build
disagree with the binding; ``native``, the default, and ``pyzmq`` are the only
values), the pure twin ``clipper._native.zmqio_py`` calls pyzmq instead;
:data:`IMPLEMENTATION` says which.

``recv_parts`` lets the caller choose per part whether it becomes ``bytes``
(a copy) or a message object (``_zmqio.Msg``, or pyzmq's ``Frame`` from the
twin): for a part that is large (a batch's inputs are numpy views of it) or
whose metadata such as ``User-Id`` is read.
"""

from __future__ import annotations

import ctypes
import logging
import os

import zmq

from .._native import NO_EXTENSIONS, load
from .._native import zmqio_py as _twin

__all__ = ["COPY_THRESHOLD", "IMPLEMENTATION", "NOBLOCK", "POLLIN", "SNDMORE", "events", "recv_parts",
           "send_parts"]

log = logging.getLogger("clipper.rpc")

POLLIN = int(zmq.POLLIN)
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
# Parts from this size on are sent without a copy: copying 256 KiB costs about what one wake of pyzmq's
# release thread does (pyzmq keeps the part alive until ZeroMQ has sent it, and drops it on that thread).
COPY_THRESHOLD = 256 * 1024


def libzmq_addresses(names) -> dict | None:
    """The addresses of libzmq's functions ``names`` as pyzmq's own extension module resolves them
    (looked up through that module, which searches the libzmq it was linked with); None when they
    cannot be found there, or that libzmq is not the version pyzmq reports."""
    try:
        from zmq.backend.cython import _zmq as extension

        lib = ctypes.CDLL(extension.__file__, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        lib.zmq_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
        if (major.value, minor.value, patch.value) != zmq.zmq_version_info():
            return None
        return {name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in names}
    except (ImportError, OSError, AttributeError, ValueError, TypeError):
        return None


def _choose():
    choice = os.environ.get("CLIPPER_ZMQIO", "") or "native"
    if choice not in ("native", "pyzmq"):
        raise ValueError(f"CLIPPER_ZMQIO is {choice[:40]!r}; it may be 'native' (the default) or 'pyzmq'")
    if NO_EXTENSIONS or choice == "pyzmq":
        return _twin, "python"
    try:
        native = load("zmqio")
    except ImportError as exc:  # a broken build of the native module: pyzmq still works
        log.warning("clipper._native._zmqio cannot be imported (%s): ZeroMQ I/O goes through pyzmq", exc)
        return _twin, "python"
    addresses = libzmq_addresses(native.FUNCTIONS)
    if addresses is None:
        log.info("libzmq's functions were not found in this process: ZeroMQ I/O goes through pyzmq")
        return _twin, "python"
    native.bind_library(addresses, COPY_THRESHOLD)
    return native, "cython"


_impl, IMPLEMENTATION = _choose()
events = _impl.events
send_parts = _impl.send_parts
recv_parts = _impl.recv_parts
