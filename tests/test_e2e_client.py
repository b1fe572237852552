"""The Python clients against a real frontend with real model containers."""

import asyncio

import numpy as np
import pytest

import clipper.errors as E
from clipper.client import AsyncClient, Client


@pytest.fixture
def served(frontend):
    frontend.deploy("sum", "row_sum", max_batch=16)
    frontend.deploy("desc", "describe")
    frontend.deploy("raising", "raise_on_negative")
    return frontend


def test_sync_client_end_to_end(served):
    with Client("127.0.0.1", served.port, timeout=30) as client:
        client.ping()
        p = client.predict("sum", np.arange(4, dtype=np.float32))
        assert p.output == 6.0 and p.is_default is False and p.query_id > 0
        # a list of numbers is accepted for a float32 application
        assert client.predict("sum", [1, 2, 3, 4]).output == 10.0
        xs = np.arange(200 * 4, dtype=np.float32).reshape(200, 4)
        got = client.predict_many("sum", xs)
        assert [g.output for g in got] == xs.sum(axis=1).tolist()
        d = client.predict("desc", np.zeros(4, np.float32))
        assert d.output["label"] == "row-0"
        np.testing.assert_array_equal(d.output["vec"], np.arange(3, dtype=np.float32))


@pytest.mark.parametrize("call, exc", [
    (lambda c: c.predict("nope", np.zeros(4, np.float32)), E.UnknownApplicationError),
    (lambda c: c.predict("sum", np.zeros(5, np.float32)), E.ShapeMismatchError),
    (lambda c: c.predict("sum", np.zeros(4, np.float64)), E.DTypeMismatchError),
    (lambda c: c.predict("raising", np.array([-1, 0, 0, 0], np.float32)), E.ModelError),
])
def test_sync_client_raises_the_servers_error_class(served, call, exc):
    with Client("127.0.0.1", served.port, timeout=30) as client:
        with pytest.raises(exc):
            call(client)
        # the connection stays usable after an error
        assert client.predict("sum", np.ones(4, np.float32)).output == 4.0


def test_model_error_message_reaches_the_client(served):
    with Client("127.0.0.1", served.port, timeout=30) as client:
        with pytest.raises(E.ModelError, match="negative pixel -3"):
            client.predict("raising", np.array([-3, 0, 0, 0], np.float32))


def test_async_client_concurrent_predicts(served):
    async def main():
        client = await AsyncClient.connect("127.0.0.1", served.port, timeout=30)
        try:
            xs = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
            got = await asyncio.gather(*(client.predict("sum", x) for x in xs))
            assert [g.output for g in got] == xs.sum(axis=1).tolist()
            with pytest.raises(E.UnknownApplicationError):
                await client.predict("nope", xs[0])
            many = await client.predict_many("sum", xs[:10])
            assert [g.output for g in many] == xs[:10].sum(axis=1).tolist()
        finally:
            await client.close()

    asyncio.run(main())
