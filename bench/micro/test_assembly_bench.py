"""Micro benchmarks of batch assembly: the compiled module, its pure-Python
twin, and numpy's own ``np.stack`` + ``tobytes`` for reference.

Run with ``python -m pytest bench/micro -p no:cacheprovider --benchmark-enable --benchmark-only``.
Fixed-size inputs are MNIST-sized (784 float32, 3136 bytes each) as the query
path holds them: one ndarray per query. Variable-size inputs are str of 20 to
200 characters. Divide a round by the batch size for the cost per input.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

IMPLS = {
    "native": importlib.import_module("clipper._native._framing"),
    "python": importlib.import_module("clipper._native.framing_py"),
}
SIZES = [1, 32, 256]


def fixed_inputs(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    # separate arrays, as queries decoded from separate frames are
    return [rng.random(784, dtype=np.float32) for _ in range(n)]


def text_inputs(n: int) -> list[str]:
    rng = np.random.default_rng(n)
    return ["x" * int(k) for k in rng.integers(20, 200, n)]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", list(IMPLS))
def test_assemble_fixed(benchmark, name, n):
    benchmark.group = f"assemble {n} x 784 float32"
    inputs = fixed_inputs(n)
    out = benchmark(IMPLS[name].assemble_batch, inputs, 3136)
    assert len(out) == 3136 * n


@pytest.mark.parametrize("n", SIZES)
def test_numpy_stack_reference(benchmark, n):
    benchmark.group = f"assemble {n} x 784 float32"
    inputs = fixed_inputs(n)
    out = benchmark(lambda xs: np.stack(xs).tobytes(), inputs)
    assert len(out) == 3136 * n


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", list(IMPLS))
def test_assemble_varlen(benchmark, name, n):
    benchmark.group = f"assemble {n} str, 20-200 chars"
    inputs = text_inputs(n)
    out = benchmark(IMPLS[name].assemble_varlen, inputs)
    assert len(out) == 8 * (n + 1) + sum(map(len, inputs))
