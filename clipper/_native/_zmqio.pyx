# cython: language_level=3
"""ZeroMQ message I/O for the per-batch path, calling libzmq directly (native). Twin: zmqio_py.py.

pyzmq's compiled ``Socket.get`` turns every option into a ``SocketOption``
enum member through Python-level enum code before it asks libzmq: measured
with callgrind on the frontend at one query in flight, the five ``get`` calls
of a query (``EVENTS`` three times, ``RCVMORE`` twice) took 18% of all its
instructions, about 8,400 each. This module makes the same calls into the
libzmq that pyzmq itself loaded, on the socket's own handle
(``Socket.underlying``, pyzmq's documented address of the libzmq socket):

* :func:`events` is one ``zmq_getsockopt(ZMQ_EVENTS)``;
* :func:`recv_parts` receives a whole multipart message with ``zmq_msg_recv``,
  each part as ``bytes`` (copied) or as a :class:`Msg` (the message itself,
  no copy: a batch's inputs are numpy views of it, and its ``User-Id`` and
  ``Peer-Address`` properties are read from it);
* :func:`send_parts` sends each part below the copy threshold with
  ``zmq_send`` (libzmq copies it) and hands larger ones to pyzmq's zero-copy
  send.

libzmq's functions are given to :func:`bind_library` by ``clipper.rpc.zio``,
which looks them up through pyzmq's own extension module (so they are those of
the libzmq it is linked with); until then :data:`ready` is False and ``zio``
uses the twin. A message is sent whole or not at all as far as its parts'
types go (each is checked before the first is sent). A closed socket raises
``zmq.ZMQError(ENOTSOCK)`` as pyzmq does: its handle is never used.
"""

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_SIMPLE, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport uintptr_t

import errno as _errno

import zmq

ready = False
"""True once :func:`bind_library` found libzmq's functions."""

# libzmq's message: 64 opaque bytes, aligned like a pointer (zmq.h).
cdef union zmsg_t:
    unsigned char raw[64]
    void *align_p
    double align_d

ctypedef int (*getsockopt_f)(void *, int, void *, size_t *) nogil
ctypedef int (*send_f)(void *, const void *, size_t, int) nogil
ctypedef int (*msg_init_f)(zmsg_t *) nogil
ctypedef int (*msg_recv_f)(zmsg_t *, void *, int) nogil
ctypedef void *(*msg_data_f)(zmsg_t *) nogil
ctypedef size_t (*msg_size_f)(const zmsg_t *) nogil
ctypedef int (*msg_more_f)(const zmsg_t *) nogil
ctypedef int (*msg_close_f)(zmsg_t *) nogil
ctypedef const char *(*msg_gets_f)(const zmsg_t *, const char *) nogil
ctypedef int (*errno_f)() nogil

cdef getsockopt_f z_getsockopt = NULL
cdef send_f z_send = NULL
cdef msg_init_f z_msg_init = NULL
cdef msg_recv_f z_msg_recv = NULL
cdef msg_data_f z_msg_data = NULL
cdef msg_size_f z_msg_size = NULL
cdef msg_more_f z_msg_more = NULL
cdef msg_close_f z_msg_close = NULL
cdef msg_gets_f z_msg_gets = NULL
cdef errno_f z_errno = NULL

cdef int ZMQ_EVENTS = zmq.EVENTS
cdef int ZMQ_DONTWAIT = zmq.DONTWAIT
cdef int ZMQ_SNDMORE = zmq.SNDMORE
cdef int E_INTR = _errno.EINTR
cdef int E_NOTSOCK = _errno.ENOTSOCK
cdef int E_AGAIN = zmq.EAGAIN
cdef int E_TERM = zmq.ETERM
cdef Py_ssize_t copy_threshold = 256 * 1024

FUNCTIONS = ("zmq_getsockopt", "zmq_send", "zmq_msg_init", "zmq_msg_recv", "zmq_msg_data", "zmq_msg_size",
             "zmq_msg_more", "zmq_msg_close", "zmq_msg_gets", "zmq_errno")
"""The libzmq functions :func:`bind_library` needs."""


def bind_library(dict addresses, Py_ssize_t threshold):
    """Use the libzmq functions at ``addresses`` (name -> address, every name of
    :data:`FUNCTIONS`, all from the libzmq pyzmq loaded); parts of ``threshold``
    bytes or more go through pyzmq's zero-copy send."""
    global z_getsockopt, z_send, z_msg_init, z_msg_recv, z_msg_data, z_msg_size, z_msg_more, z_msg_close
    global z_msg_gets, z_errno, copy_threshold, ready
    for name in FUNCTIONS:  # all checked before any is used
        value = addresses[name]
        if type(value) is not int or value <= 0:
            raise ValueError(f"no address for {name}")
    a = addresses
    z_getsockopt = <getsockopt_f><uintptr_t>a["zmq_getsockopt"]
    z_send = <send_f><uintptr_t>a["zmq_send"]
    z_msg_init = <msg_init_f><uintptr_t>a["zmq_msg_init"]
    z_msg_recv = <msg_recv_f><uintptr_t>a["zmq_msg_recv"]
    z_msg_data = <msg_data_f><uintptr_t>a["zmq_msg_data"]
    z_msg_size = <msg_size_f><uintptr_t>a["zmq_msg_size"]
    z_msg_more = <msg_more_f><uintptr_t>a["zmq_msg_more"]
    z_msg_close = <msg_close_f><uintptr_t>a["zmq_msg_close"]
    z_msg_gets = <msg_gets_f><uintptr_t>a["zmq_msg_gets"]
    z_errno = <errno_f><uintptr_t>a["zmq_errno"]
    copy_threshold = threshold
    ready = True


cdef inline void *_handle(sock) except NULL:
    if not ready:
        raise RuntimeError("clipper._native._zmqio: bind_library was not called")
    if sock.closed:
        raise zmq.ZMQError(E_NOTSOCK)
    return <void *><uintptr_t>sock.underlying


cdef int _raise() except -1:
    """Raise what pyzmq raises for libzmq's current error."""
    cdef int err = z_errno()
    if err == E_AGAIN:
        raise zmq.Again(err)
    if err == E_TERM:
        raise zmq.ContextTerminated(err)
    if err == E_INTR:
        raise zmq.InterruptedSystemCall(err)
    raise zmq.ZMQError(err)


cdef class Msg:
    """One received message part, owned (libzmq's ``zmq_msg_t``): a writable buffer over its bytes
    (as pyzmq's ``Frame``), ``len()``, :attr:`bytes`, :attr:`buffer` and :meth:`get`."""

    cdef zmsg_t msg
    cdef bint live
    cdef Py_ssize_t shape[1]
    cdef object _bytes

    def __cinit__(self):
        if not ready:
            raise RuntimeError("clipper._native._zmqio: bind_library was not called")
        z_msg_init(&self.msg)  # an empty message until one is received into it
        self.live = True

    def __dealloc__(self):
        if self.live:
            z_msg_close(&self.msg)
            self.live = False

    def __len__(self):
        return z_msg_size(&self.msg)

    def __getbuffer__(self, Py_buffer *view, int flags):
        self.shape[0] = <Py_ssize_t>z_msg_size(&self.msg)
        view.buf = z_msg_data(&self.msg)
        view.len = self.shape[0]
        view.obj = self
        view.readonly = 0
        view.format = NULL
        if flags & PyBUF_FORMAT:
            view.format = b"B"
        view.ndim = 1
        view.shape = self.shape
        view.strides = NULL
        view.suboffsets = NULL
        view.itemsize = 1
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer *view):
        pass

    @property
    def bytes(self) -> bytes:
        """The part's bytes (copied once, then kept)."""
        if self._bytes is None:
            self._bytes = PyBytes_FromStringAndSize(<char *>z_msg_data(&self.msg), z_msg_size(&self.msg))
        return self._bytes

    @property
    def buffer(self) -> memoryview:
        """A memoryview of the part (no copy)."""
        return memoryview(self)

    @property
    def more(self) -> bool:
        """Another part of the same message follows."""
        return z_msg_more(&self.msg) != 0

    def get(self, str name) -> str:
        """A metadata property (``"User-Id"``, ``"Peer-Address"``, ...) as a str;
        ``zmq.ZMQError`` when the message has none."""
        key = name.encode()
        cdef const char *value = z_msg_gets(&self.msg, key)
        if value == NULL:
            _raise()
        return value.decode("utf-8", "replace")


def events(sock) -> int:
    """The socket's ``ZMQ_EVENTS`` (``& POLLIN``: a message can be read now)."""
    cdef void *h = _handle(sock)
    cdef int value = 0
    cdef size_t size = sizeof(int)
    if z_getsockopt(h, ZMQ_EVENTS, &value, &size) != 0:
        _raise()
    return value


cdef int _finished(int rc) except -1:
    """1 when a call returned ``rc`` >= 0; 0 when a signal interrupted it (to be called again, once the
    signal's Python handler ran); the call's error raised otherwise."""
    if rc >= 0:
        return 1
    if z_errno() == E_INTR:
        PyErr_CheckSignals()
        return 0
    return _raise()


cdef int _recv_into(zmsg_t *msg, void *h, int flags) except -1:
    cdef int rc = -1
    while True:
        if flags & ZMQ_DONTWAIT:
            rc = z_msg_recv(msg, h, flags)
        else:
            with nogil:
                rc = z_msg_recv(msg, h, flags)
        if _finished(rc):
            return 0


def recv_parts(sock, int flags, unsigned long frames_at=0, Py_ssize_t max_parts=-1) -> list:
    """Receive one multipart message; part ``i`` is a :class:`Msg` when bit ``i`` of ``frames_at``
    is set, else ``bytes``. Raises ``zmq.Again`` under NOBLOCK when no message waits. With
    ``max_parts`` >= 0, the parts past that many are received and dropped uncopied, and ``None``
    ends the list in their place (one for all of them)."""
    cdef void *h = _handle(sock)
    cdef list parts = []
    cdef zmsg_t tmp
    cdef Msg part
    cdef int more = 1
    cdef unsigned int i = 0
    while more:
        if max_parts >= 0 and i >= <size_t>max_parts:
            z_msg_init(&tmp)
            try:
                _recv_into(&tmp, h, flags)
                more = z_msg_more(&tmp)
            finally:
                z_msg_close(&tmp)
            if i == <size_t>max_parts:
                parts.append(None)
        elif i < 64 and (frames_at >> i) & 1:
            part = Msg.__new__(Msg)
            _recv_into(&part.msg, h, flags)
            more = z_msg_more(&part.msg)
            parts.append(part)
        else:
            z_msg_init(&tmp)
            try:
                _recv_into(&tmp, h, flags)
                parts.append(PyBytes_FromStringAndSize(<char *>z_msg_data(&tmp), z_msg_size(&tmp)))
                more = z_msg_more(&tmp)
            finally:
                z_msg_close(&tmp)
        i += 1
        flags |= ZMQ_DONTWAIT  # the message's other parts are here already (ZeroMQ delivers it whole)
    return parts


cdef int _send_copy(void *h, const char *data, size_t size, int flags) except -1:
    cdef int rc = -1
    while True:
        if flags & ZMQ_DONTWAIT:
            rc = z_send(h, data, size, flags)
        else:
            with nogil:
                rc = z_send(h, data, size, flags)
        if _finished(rc):
            return 0


def send_parts(sock, list parts, int flags=0) -> None:
    """Send ``parts`` (bytes-like objects) as one multipart message (``flags``: 0 or NOBLOCK).

    A part below the copy threshold is copied by libzmq (``zmq_send``); a larger one goes without a
    copy through pyzmq (which keeps a reference until ZeroMQ has sent it)."""
    cdef void *h = _handle(sock)
    cdef Py_ssize_t n = len(parts)
    cdef Py_ssize_t i
    cdef int f
    cdef Py_buffer view
    if n == 0:
        raise ValueError("a message has at least one part")
    for i in range(n):  # all or nothing: a part found unsendable halfway would leave the others queued
        part = parts[i]
        if type(part) is not bytes and not PyObject_CheckBuffer(part):
            raise TypeError(f"part {i} of a message is a {type(part).__name__}, not a bytes-like object")
    for i in range(n):
        f = flags | ZMQ_SNDMORE if i < n - 1 else flags
        part = parts[i]
        if type(part) is bytes:
            if PyBytes_GET_SIZE(part) < copy_threshold:
                _send_copy(h, PyBytes_AS_STRING(part), <size_t>PyBytes_GET_SIZE(part), f)
                continue
        else:
            PyObject_GetBuffer(part, &view, PyBUF_SIMPLE)
            try:
                if view.len < copy_threshold:
                    _send_copy(h, <const char *>view.buf, <size_t>view.len, f)
                    continue
            finally:
                PyBuffer_Release(&view)
        sock.send(part, f, copy=False)
