"""Clipper across hosts, for real: Redis, frontends, containers and the client each on a host of their
own (a network namespace, tests/hosts.py), talking over a private switch; the frontends are real
``python -m clipper start`` processes sharing one Redis and one container RPC key pair, the containers
real ``python -m clipper.container`` processes started by hand with operator credentials."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path

import numpy as np
import pytest

from clipper import errors as E
from clipper.client import AsyncClient
from clipper.security.container_keys import save_credentials

from hosts import ContainerOnHost, FrontendOnHost, Host, Network, RedisOnHost, network, wait_for  # noqa: F401

APP, MODEL, VERSION, KEY = "sum", "sum-model", "1", "sum-model:1"
DEFAULT = -1.0  # the application's default output: what a query without a model's answer gets


@pytest.fixture(scope="module")
def lan(network: Network) -> Network:  # noqa: F811 - the fixture imported from hosts
    """The hosts: r (Redis), a, b, e (frontends), c, d (containers), q (the client)."""
    for name in "rabecdq":
        network.add_host(name)
    return network


@pytest.fixture
def system(lan: Network, tmp_path: Path):
    """Per test: a Redis on host r; every process the test starts is stopped and every cable plugged
    back in at its end."""
    try:
        yield RedisOnHost(lan["r"], tmp_path / "redis")
    finally:
        for host in lan.hosts.values():
            host.restore()
        lan.stop_all()


def register(fe: FrontendOnHost, *, slo_ms: float = 5000.0) -> None:
    """The application and its model, with no replicas of the frontend's own: containers come by hand."""
    def setup(a):
        a.register_application(APP, "float32", [4], slo_ms, default_output=DEFAULT)
        a.deploy_model(MODEL, VERSION, "float32", [4], replicas=0, max_batch=16, wait=False)
        a.link_model_to_app(APP, MODEL)

    fe.admin(setup)


def credentials(fe: FrontendOnHost, folder: Path, label: str) -> Path:
    """Operator credentials for the model, issued through ``fe``'s admin API, saved 0600."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{label}.credentials"
    save_credentials(path, fe.admin(lambda a: a.issue_container_credentials(MODEL, VERSION, frontend=fe.rpc,
                                                                            label=label)))
    return path


def served_by(fe: FrontendOnHost, *hosts: Host, timeout: float = 30.0) -> dict[str, dict]:
    """Wait until ``fe``'s replicas of the model are exactly one per host in ``hosts`` (by peer address);
    returns them by host name."""
    want = {h.ip: h.name for h in hosts}

    def check():
        reps = fe.replicas(KEY)
        peers = [r["peer"] for r in reps]
        return {want[r["peer"]]: r for r in reps} if sorted(peers) == sorted(want) else None

    return wait_for(check, f"{fe.host.name}'s replicas of {KEY} on {sorted(want.values())}", timeout, every=0.05,
                    detail=lambda: f"replicas: {fe.replicas(KEY)}\n{fe.host.net.logs()}")


def inputs(n: int, seed: int) -> np.ndarray:
    """Distinct inputs (no two share a cache entry)."""
    return np.random.default_rng(seed).random((n, 4), dtype=np.float32)


def expected(x: np.ndarray) -> float:
    return float(x.astype(np.float64).sum())


def query(client: Host, fe: FrontendOnHost, xs: np.ndarray, *, concurrency: int = 16, rate: float | None = None,
          progress: list | None = None, timeout_s: float = 30.0) -> list:
    """Send every input of ``xs`` from host ``client`` to ``fe``, at most ``concurrency`` in flight (and at
    most ``rate`` per second), on one pipelined connection made on that host; one result per input: a
    Prediction, or the error it got. ``progress[0]`` counts results as they come."""
    async def run():
        results: list = [None] * len(xs)
        slots = asyncio.Semaphore(concurrency)
        start = time.monotonic()
        async with await AsyncClient.connect(fe.host.ip, fe.query_port, timeout=timeout_s) as c:
            async def one(i):
                try:
                    results[i] = await c.predict(APP, xs[i])
                except E.ClipperError as exc:
                    results[i] = exc
                finally:
                    slots.release()
                    if progress is not None:
                        progress[0] += 1

            tasks = []
            for i in range(len(xs)):
                if rate:
                    await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                await slots.acquire()
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.wait_for(asyncio.gather(*tasks), timeout_s + 10)
        return results

    return client.call(lambda: asyncio.run(run()), timeout=timeout_s + 60)


def right(results: list, xs: np.ndarray) -> int:
    """How many results are the model's correct, non-default answer."""
    return sum(1 for p, x in zip(results, xs)
               if not isinstance(p, Exception) and not p.is_default and p.output == pytest.approx(expected(x)))


def assert_all_right(results: list, xs: np.ndarray) -> None:
    wrong = [(p, expected(x)) for p, x in zip(results, xs)
             if isinstance(p, Exception) or p.is_default or p.output != pytest.approx(expected(x))]
    assert not wrong, f"{len(wrong)} of {len(xs)} not answered by the model, e.g. {wrong[:3]}"


def start_two_frontends(lan: Network, redis: RedisOnHost, tmp_path: Path) -> tuple[FrontendOnHost, FrontendOnHost]:
    """Frontend A, the application registered on it, then frontend B with A's server key pair."""
    a = FrontendOnHost(lan["a"], tmp_path / "fe-a", redis.url)
    register(a)
    b = FrontendOnHost(lan["b"], tmp_path / "fe-b", redis.url, server_key_from=a)
    return a, b


def knows_model(fe: FrontendOnHost) -> bool:
    st = fe.status()
    return APP in st["applications"] and MODEL in st["applications"][APP]["linked_models"] \
        and VERSION in st["models"].get(MODEL, {}).get("versions", {})


# ---------------------------------------------------------------- a. one system over five hosts
def test_frontends_redis_and_a_container_on_separate_hosts(lan, system, tmp_path):
    """Redis on r, frontends on a and b, the container on c, the client on q: a registration on A reaches
    B through Redis, and A's queries are answered by the container across the switch.

    Catches: frontends that listen (queries or container RPC) only on loopback; a credential whose
    address or server key does not reach a frontend on another host; a Redis URL whose password is
    dropped; a registry that does not travel through Redis to another frontend's process; shared
    server keys not taken from the secrets folder."""
    a, b = start_two_frontends(lan, system, tmp_path)
    wait_for(lambda: knows_model(b), "frontend B to learn the application and model through Redis")
    assert b.replicas(KEY) == []  # it learned the model, and runs nothing of it itself
    assert b.status()["security"]["rpc_security"] == "curve"
    creds = credentials(a, tmp_path / "creds", "host-c")
    ContainerOnHost(lan["c"], tmp_path / "c", "row_sum", MODEL, VERSION, creds)
    rep = served_by(a, lan["c"])["c"]
    assert rep["transport"] == "tcp" and rep["pid"] is None  # a remote peer: nothing claimed is believed
    xs = inputs(500, seed=1)
    assert_all_right(query(lan["q"], a, xs), xs)
    assert served_by(a, lan["c"])["c"]["batches_done"] >= 1


# ---------------------------------------------------------------- b. a cut cable
def test_cutting_a_hosts_link_fails_its_batches_over_and_restoring_it_serves_again(lan, system, tmp_path):
    """Two containers of one model, on c (slow: 0.5 s a batch, so it surely holds one) and d, serve
    frontend A while 3,000 queries run from q at 1,000/s; c's cable is pulled a third of the way in,
    while c holds a batch. Every query is answered (the right prediction, or the default output or a
    typed error), the batch c held is sent again, later queries are all served by d, and once the cable
    is back c serves again.

    Catches: a batch lost with an unreachable container never answered (a query left hanging) or not
    retried on the other replica; a silent container kept as a replica (queries sent into the void);
    a container that does not reconnect after a partition, or a frontend that does not take it back."""
    a = FrontendOnHost(lan["a"], tmp_path / "fe-a", system.url)
    register(a)
    creds = credentials(a, tmp_path / "creds", "c-and-d")
    ContainerOnHost(lan["c"], tmp_path / "c", "row_sum_after_sleep", MODEL, VERSION, creds,
                    env={"CLIPPER_TEST_SLEEP_S": "0.5"})
    ContainerOnHost(lan["d"], tmp_path / "d", "row_sum", MODEL, VERSION, creds)
    served_by(a, lan["c"], lan["d"])
    xs = inputs(3000, seed=2)
    progress = [0]
    with concurrent.futures.ThreadPoolExecutor(1) as load:
        running = load.submit(query, lan["q"], a, xs, concurrency=32, rate=1000.0, progress=progress)
        wait_for(lambda: progress[0] >= 1000 or running.done(), "a third of the load answered", timeout=30)
        wait_for(lambda: running.done() or served_by(a, lan["c"], lan["d"])["c"]["busy"], "c to hold a batch",
                 timeout=10, every=0.005)
        assert not running.done(), "the load ended before the cut"
        lan["c"].cut()
        sent_at_cut = a.status()["traffic"]["models"][KEY]["queries_sent"]
        results = running.result(timeout=90)
    unanswered = [p for p in results if p is None or isinstance(p, (E.ClientTimeoutError, E.ConnectionClosedError))]
    assert not unanswered, f"{len(unanswered)} queries left without an answer: {unanswered[:3]}"
    n_right = right(results, xs)
    for p, x in zip(results, xs):  # what the model did not answer got the default output, or a typed error
        if isinstance(p, Exception) or p.is_default or p.output != pytest.approx(expected(x)):
            assert isinstance(p, E.ClipperError) or (p.is_default and p.output == DEFAULT), p
    resent = a.status()["traffic"]["models"][KEY]["queries_sent"] - len(xs)
    print(f"cut during load: {n_right} of {len(xs)} answered by the model, {len(xs) - n_right} by default or "
          f"error; {resent} sent twice")
    assert n_right >= len(xs) // 2  # d took over: most queries got the model's answer
    assert resent >= 1, f"nothing was sent twice: c's batch at the cut ({sent_at_cut} sent then) was not retried"

    only_d = served_by(a, lan["d"])["d"]  # c is dropped (its heartbeats stopped)
    later = inputs(300, seed=3)
    assert_all_right(query(lan["q"], a, later), later)
    assert served_by(a, lan["d"])["d"]["batches_done"] > only_d["batches_done"]

    lan["c"].restore()
    served_by(a, lan["c"], lan["d"])  # c reconnects by itself once it hears nothing and tries again

    def c_served() -> bool:
        more = inputs(200, seed=int(time.monotonic() * 1000) % 100_000)
        assert_all_right(query(lan["q"], a, more, concurrency=32), more)
        return served_by(a, lan["c"], lan["d"])["c"]["batches_done"] > 0

    wait_for(c_served, "c to serve batches again", timeout=30)


# ---------------------------------------------------------------- c. a frontend moved to another host
def test_a_frontend_restarted_on_another_host_rejoins_from_redis(lan, system, tmp_path):
    """Frontend B stops; a new frontend on host e, on the same Redis with the shared server key, learns
    the registry from Redis, takes a container (credentials issued earlier by A) and answers queries.

    Catches: a registry or container credentials kept only in a frontend's memory or local files; a
    frontend that needs its own earlier state file to start; a server key that is per frontend (the
    credentials A issued would not authenticate e)."""
    a, b = start_two_frontends(lan, system, tmp_path)
    creds = credentials(a, tmp_path / "creds", "moves")
    wait_for(lambda: knows_model(b), "frontend B to learn the model")
    assert b.stop() == 0
    e = FrontendOnHost(lan["e"], tmp_path / "fe-e", system.url, server_key_from=a)
    wait_for(lambda: knows_model(e), "frontend E to learn the registry from Redis")
    assert [c["model"] for c in e.admin(lambda adm: adm.list_container_credentials())] == [MODEL]
    ContainerOnHost(lan["c"], tmp_path / "c", "row_sum", MODEL, VERSION, creds, frontends=[e.rpc])
    served_by(e, lan["c"])
    xs = inputs(300, seed=4)
    assert_all_right(query(lan["q"], e, xs), xs)


# ---------------------------------------------------------------- d. one container, two frontends
def test_one_container_serves_both_frontends_and_outlives_one(lan, system, tmp_path):
    """One container process on host c, given both frontends (``--frontend`` twice), is a replica of A
    and of B at once; both answer from it; frontend A killed (SIGKILL), and once the container has noticed
    (its heartbeat timeout), B is still served by it.

    Catches: a container runtime that dials only one of several frontends, or that exits or stops
    serving the others when one frontend disappears."""
    a, b = start_two_frontends(lan, system, tmp_path)
    wait_for(lambda: knows_model(b), "frontend B to learn the model")
    creds = credentials(a, tmp_path / "creds", "both")
    box = ContainerOnHost(lan["c"], tmp_path / "c", "row_sum", MODEL, VERSION, creds, frontends=[a.rpc, b.rpc])
    served_by(a, lan["c"])
    served_by(b, lan["c"])
    for fe, seed in ((a, 5), (b, 6)):
        xs = inputs(300, seed=seed)
        assert_all_right(query(lan["q"], fe, xs), xs)
        assert served_by(fe, lan["c"])["c"]["batches_done"] >= 1  # the container answered each
    a.proc.kill()  # a crash: no drain, no goodbye
    a.proc.wait(10)
    wait_for(lambda: f"frontend {a.rpc} silent" in box.log(), "the container to notice frontend A is gone",
             timeout=15, every=0.05, detail=box.log)  # (its heartbeat timeout: then it redials A)
    assert box.proc.poll() is None, f"the container exited when A went away: {box.log()}"
    before = served_by(b, lan["c"])["c"]["batches_done"]
    xs = inputs(300, seed=7)
    assert_all_right(query(lan["q"], b, xs), xs)
    assert served_by(b, lan["c"])["c"]["batches_done"] > before
