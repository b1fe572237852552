"""ZeroMQ message I/O on libzmq itself (``clipper._native._zmqio``) against its pyzmq twin.

Both run over real ZeroMQ sockets (a ROUTER bound on loopback TCP and a DEALER, the RPC's pair, and a
CURVE-less PLAIN pair for message metadata): whatever one sends the other receives part for part, byte
for byte, in either direction and with either implementation at either end; errors are pyzmq's.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import uvloop
import zmq
from hypothesis import given, settings, strategies as st

from clipper._native import NO_EXTENSIONS
from clipper._native import _zmqio as native
from clipper._native import zmqio_py as twin
from clipper.rpc import zio
from clipper.rpc.server import ContainerServer

IMPLS = {"native": native, "twin": twin}


@pytest.fixture(scope="module", autouse=True)
def bound():
    """The native module bound to the process's libzmq, as clipper.rpc.zio does at import."""
    if not native.ready:
        addresses = zio.libzmq_addresses(native.FUNCTIONS)
        assert addresses is not None, "this process's libzmq was not found"
        native.bind_library(addresses, zio.COPY_THRESHOLD)
    # the one the RPC uses here
    assert zio.IMPLEMENTATION == ("python" if NO_EXTENSIONS or os.environ.get("CLIPPER_ZMQIO") == "pyzmq"
                                  else "cython")
    yield


@pytest.fixture(scope="module")
def pair():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.copy_threshold = zio.COPY_THRESHOLD
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.copy_threshold = zio.COPY_THRESHOLD
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hello")
    ident, hello = router.recv_multipart()
    assert hello == b"hello"
    yield router, dealer, ident
    dealer.close(0)
    router.close(0)
    ctx.term()


def _wait(sock) -> None:
    assert sock.poll(5000, zmq.POLLIN), "the message did not arrive"


# Parts around ZeroMQ's in-message size and past the copy threshold. A large part is a drawn size filled
# from a drawn seed: Hypothesis drawing 30-70 KB byte by byte took most of this module's time.
_large = st.builds(lambda n, seed: np.random.default_rng(seed).bytes(n), st.integers(30_000, 70_000),
                   st.integers(0, 2**32 - 1))
_part = st.one_of(st.binary(max_size=300), _large, st.sampled_from([b"", b"\x00" * 33, b"\xff" * 34]))


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(_part, min_size=1, max_size=5), send_with=st.sampled_from(sorted(IMPLS)),
       recv_with=st.sampled_from(sorted(IMPLS)), frames_at=st.integers(0, 0b11111), kind=st.sampled_from(
           ["bytes", "bytearray", "memoryview", "ndarray"]))
def test_a_message_arrives_whole_whichever_end_is_native(pair, parts, send_with, recv_with, frames_at, kind):
    router, dealer, ident = pair
    wrap = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview,
            "ndarray": lambda b: np.frombuffer(b, dtype=np.uint8)}[kind]
    IMPLS[send_with].send_parts(router, [ident, *[wrap(p) for p in parts]])
    _wait(dealer)
    assert IMPLS[recv_with].events(dealer) & zio.POLLIN
    got = IMPLS[recv_with].recv_parts(dealer, zio.NOBLOCK, frames_at)
    assert len(got) == len(parts)
    for i, (g, p) in enumerate(zip(got, parts)):
        if (frames_at >> i) & 1:
            assert type(g) is not bytes and bytes(g) == p and g.bytes == p and len(g) == len(p)
            assert bytes(g.buffer) == p
            assert g.more == (i < len(parts) - 1)
        else:
            assert type(g) is bytes and g == p
    # and back: the DEALER's answer reaches the ROUTER with the routing id in front
    IMPLS[recv_with].send_parts(dealer, [wrap(p) for p in parts], zio.NOBLOCK)
    _wait(router)
    back = IMPLS[send_with].recv_parts(router, zio.NOBLOCK)
    assert back == [ident, *parts]
    assert not IMPLS[send_with].events(router) & zio.POLLIN


def _kept(parts: list, max_parts: int) -> list:
    """What recv_parts returns for ``parts`` under ``max_parts``: the first that many, then one None."""
    return list(parts) if not 0 <= max_parts < len(parts) else [*parts[:max_parts], None]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 7), max_parts=st.integers(-1, 8), frames_at=st.integers(0, 0b1111111),
       impl=st.sampled_from(sorted(IMPLS)))
def test_parts_past_max_parts_are_dropped_and_the_next_message_arrives_whole(pair, n, max_parts, frames_at, impl):
    router, dealer, ident = pair
    parts = [bytes([i]) * (i * 20) for i in range(n)]
    router.send_multipart([ident, *parts])
    router.send_multipart([ident, b"next", b"message"])
    _wait(dealer)
    got = IMPLS[impl].recv_parts(dealer, zio.NOBLOCK, frames_at, max_parts)
    assert [None if g is None else bytes(g) for g in got] == _kept(parts, max_parts)
    _wait(dealer)
    assert IMPLS[impl].recv_parts(dealer, zio.NOBLOCK, 0, max_parts) == _kept([b"next", b"message"], max_parts)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_nothing_to_read_is_zmq_again_and_events_says_so(pair, impl):
    router, dealer, ident = pair
    assert not IMPLS[impl].events(dealer) & zio.POLLIN
    with pytest.raises(zmq.Again):
        IMPLS[impl].recv_parts(dealer, zio.NOBLOCK)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_a_message_part_is_a_writable_buffer_that_outlives_its_neighbours(pair, impl):
    router, dealer, ident = pair
    payload = np.arange(100_000, dtype=np.float32)
    IMPLS[impl].send_parts(router, [ident, b"header", payload.tobytes()])
    _wait(dealer)
    head, body = IMPLS[impl].recv_parts(dealer, zio.NOBLOCK, 0b10)
    view = np.frombuffer(body, dtype=np.float32)  # what a container's batch decoding does
    del body
    gc.collect()
    assert head == b"header" and np.array_equal(view, payload)
    view[0] = 7.0  # writable, as pyzmq's Frame is
    assert view[0] == 7.0


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_sending_no_parts_is_refused(pair, impl):
    router, _, _ = pair
    with pytest.raises(ValueError):
        IMPLS[impl].send_parts(router, [])


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_a_closed_socket_is_an_error_not_a_crash(impl):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.close(0)
    try:
        for call in (lambda: IMPLS[impl].events(sock), lambda: IMPLS[impl].send_parts(sock, [b"x"]),
                     lambda: IMPLS[impl].recv_parts(sock, zio.NOBLOCK)):
            with pytest.raises(zmq.ZMQError) as err:
                call()
            assert err.value.errno == zmq.ENOTSOCK
    finally:
        ctx.term()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_an_unroutable_send_fails_as_pyzmq_says(impl):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.LINGER, 0)
    try:
        with pytest.raises(zmq.ZMQError) as err:
            IMPLS[impl].send_parts(router, [b"nobody", b"x"])
        assert err.value.errno == zmq.EHOSTUNREACH
    finally:
        router.close(0)
        ctx.term()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_message_metadata_reads_as_pyzmqs(impl):
    """A PLAIN handshake gives each message its User-Id; a part asked for as a message object has it,
    and Peer-Address; a property the message lacks is a ZMQError."""
    from zmq.auth.thread import ThreadAuthenticator

    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_plain(domain="*", passwords={"alice": "secret"})
    router = ctx.socket(zmq.ROUTER)
    router.plain_server = True
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.plain_username, dealer.plain_password = b"alice", b"secret"
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        IMPLS[impl].send_parts(dealer, [b"head", b"body"])
        _wait(router)
        ident, head, body = IMPLS[impl].recv_parts(router, zio.NOBLOCK, 0b010)
        assert head.bytes == b"head" and body == b"body"
        assert head.get("User-Id") == "alice"
        assert head.get("Peer-Address") == "127.0.0.1"
        with pytest.raises(zmq.ZMQError):
            head.get("No-Such-Property")
    finally:
        dealer.close(0)
        router.close(0)
        auth.stop()
        ctx.term()


def test_the_native_module_finds_pyzmqs_libzmq():
    addresses = zio.libzmq_addresses(native.FUNCTIONS)
    assert addresses is not None and set(addresses) == set(native.FUNCTIONS)
    assert all(type(a) is int and a > 0 for a in addresses.values())
    with pytest.raises(ValueError):
        native.bind_library({**addresses, "zmq_send": 0}, zio.COPY_THRESHOLD)


@pytest.mark.parametrize("env, expected", [({}, "cython"), ({"CLIPPER_ZMQIO": "native"}, "cython"),
                                           ({"CLIPPER_ZMQIO": "pyzmq"}, "python"),
                                           ({"CLIPPER_NO_EXTENSIONS": "1"}, "python")])
def test_which_implementation_the_rpc_uses(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("CLIPPER_ZMQIO", "CLIPPER_NO_EXTENSIONS")}
    out = subprocess.run([sys.executable, "-c", "from clipper.rpc import zio; print(zio.IMPLEMENTATION)"],
                         env={**base, **env}, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == expected


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_a_message_with_an_unsendable_part_is_not_sent_at_all(pair, impl):
    """Parts are checked before the first goes out: nothing half-sent is left queued to be glued onto
    the next message."""
    router, dealer, ident = pair
    with pytest.raises(TypeError):
        IMPLS[impl].send_parts(router, [ident, b"first", object()])
    IMPLS[impl].send_parts(router, [ident, b"next"])
    _wait(dealer)
    assert IMPLS[impl].recv_parts(dealer, zio.NOBLOCK) == [b"next"]


def test_a_message_object_made_by_hand_is_empty_not_a_crash():
    msg = native.Msg()
    assert len(msg) == 0 and msg.bytes == b"" and bytes(msg.buffer) == b"" and not msg.more


def test_a_failed_send_still_schedules_a_read():
    """A send that fails (the peer is gone: EHOSTUNREACH) has handled the socket's pending commands
    first, taking the FD's edge with them; the server reads on a later turn all the same."""
    loop = uvloop.new_event_loop()
    server = ContainerServer(loop, "tcp://127.0.0.1:0", lambda model, version: None, heartbeat_interval_ms=1000,
                             heartbeat_timeout_ms=5000, batch_timeout_ms=5000)
    try:
        server.start()
        ch = server.tcp
        loop.run_until_complete(asyncio.sleep(0))  # the start's own check runs and clears
        assert not ch.check_scheduled
        with pytest.raises(zmq.ZMQError) as err:
            server._send(ch, b"nobody", [b"x"])
        assert err.value.errno == zmq.EHOSTUNREACH
        assert ch.check_scheduled
    finally:
        server.close()
        loop.close()


def test_an_unknown_zmqio_choice_is_refused_by_name():
    base = {k: v for k, v in os.environ.items() if k not in ("CLIPPER_ZMQIO", "CLIPPER_NO_EXTENSIONS")}
    out = subprocess.run([sys.executable, "-c", "import clipper.rpc.zio"], env={**base, "CLIPPER_ZMQIO": "pyzmqq"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "CLIPPER_ZMQIO is 'pyzmqq'" in out.stderr
