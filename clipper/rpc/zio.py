"""ZeroMQ message I/O for the per-batch path: :func:`events`, :func:`send_parts`, :func:`recv_parts`.

Every batch pays each of them at least once, and a lone client's query is a
batch of one. They call libzmq directly (``clipper._native._zmqio``), bound
here to the libzmq that pyzmq loaded: pyzmq's own ``Socket.get`` passes each
option through Python-level enum code, 18% of the frontend's instructions at
one query in flight (five calls a query, measured with callgrind). Where that
libzmq cannot be found unambiguously (not one ``libzmq`` in the process's
memory map, a version other than pyzmq's, no ``/proc``), with
``CLIPPER_NO_EXTENSIONS=1``, or with ``CLIPPER_ZMQIO=pyzmq`` (the escape hatch
should an unusual pyzmq build disagree with the binding), the pure twin
``clipper._native.zmqio_py`` calls pyzmq instead; :data:`IMPLEMENTATION` says
which.

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
    """The addresses of libzmq's functions ``names`` in the one libzmq this process has loaded
    (pyzmq's); None when there is not exactly one, or it is not the version pyzmq reports."""
    try:
        paths = set()
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split(None, 5)
                if len(fields) == 6:
                    path = fields[5].strip()
                    if os.path.basename(path).startswith("libzmq") and ".so" in path:
                        paths.add(path)
        if len(paths) != 1:
            return None
        lib = ctypes.CDLL(paths.pop(), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        lib.zmq_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
        if (major.value, minor.value, patch.value) != zmq.zmq_version_info():
            return None
        return {name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in names}
    except (OSError, AttributeError, ValueError):
        return None


def _choose():
    if NO_EXTENSIONS or os.environ.get("CLIPPER_ZMQIO", "") == "pyzmq":
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
