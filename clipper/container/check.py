"""``clipper test-model``: run a predictor in this process exactly as its container would, and time it.

Each batch takes the container's own path: the inputs are assembled into one
buffer as the frontend sends them (``framing.assemble_batch`` /
``assemble_varlen``), decoded by :func:`~clipper.container.runtime.decode_batch`
(the same read-only view ``predict`` sees in a container), and the outputs
go through :func:`~clipper.container.runtime.encode_outputs` (the same count
and type checks) and are decoded back as the frontend decodes them. A model
that passes here passes in a container; one that fails says why here, before
a deploy.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import msgpack
import numpy as np

from .._native import framing
from ..errors import ClipperError, InvalidConfigError, ModelError
from ..management.registry import NUMERIC_DTYPES, OPAQUE_DTYPES, check_dtype
from ..protocol import wire
from ..rpc import messages as m
from ..selection.combine import detect_kind
from .runtime import decode_batch, encode_outputs, load_predictor, rss_bytes

__all__ = ["check_model", "load_inputs", "main_test_model", "run_batch"]

MAX_CALLS = 100_000


def load_inputs(path, dtype: str | None, shape) -> tuple[list, str, tuple]:
    """The inputs in ``path`` (.npy, or JSON: one input or ``{"inputs": [...]}``), as the frontend holds them.

    Returns ``(inputs, dtype, shape)``; a numeric input is a C-contiguous
    little-endian array of ``shape``, a ``str``/``bytes`` input a str/bytes.
    """
    path = Path(path)
    try:
        if path.suffix == ".npy":
            value = np.load(path, allow_pickle=False)
            dtype = dtype or value.dtype.name
            many = False
        else:
            value = json.loads(path.read_text())
            many = isinstance(value, dict) and "inputs" in value
            if many:
                value = value["inputs"]
    except (OSError, ValueError) as exc:
        raise InvalidConfigError(f"cannot read the inputs in {str(path)!r}: {exc}") from None
    dtype = check_dtype(dtype or "float64")
    if dtype in OPAQUE_DTYPES:
        items = list(value) if many or isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            raise InvalidConfigError(f"{dtype} inputs in a JSON file are strings")
        return ([v.encode() for v in items] if dtype == "bytes" else items), dtype, ()
    try:
        arr = np.asarray(value, dtype=NUMERIC_DTYPES[dtype])
    except (TypeError, ValueError) as exc:
        raise InvalidConfigError(f"the inputs in {str(path)!r} are not {dtype} arrays: {exc}") from None
    if shape is None:
        shape = arr.shape[1:] if many else arr.shape
    shape = tuple(shape)
    if arr.shape == shape and not many:
        rows = arr[None]
    elif arr.shape[1:] == shape:
        rows = arr
    else:
        raise InvalidConfigError(f"the inputs in {str(path)!r} have shape {list(arr.shape)}; the model takes "
                                 f"{dtype}{list(shape)} (one input, or a list of them)")
    if len(rows) == 0:
        raise InvalidConfigError(f"{str(path)!r} holds no inputs")
    return [np.ascontiguousarray(r) for r in rows], dtype, shape


def _frames(inputs: list) -> tuple[str, object, bytes]:
    """(encoding, meta, payload) of a batch, built as the frontend's ``send_batch`` builds it."""
    first = inputs[0]
    if isinstance(first, np.ndarray):
        payload = framing.assemble_batch(inputs, first.nbytes)
        return m.ENC_NDARRAY, [wire._TYPESTR[first.dtype].decode(), [len(inputs), *first.shape]], payload
    if type(first) is bytes or type(first) is str:
        return m.ENC_VARLEN, ["bytes" if type(first) is bytes else "str"], framing.assemble_varlen(inputs)
    return m.ENC_MSGPACK, None, wire.pack(inputs)


def _decode_outputs(reply: list, count: int) -> list:
    """The outputs of a reply, decoded as the frontend's RPC server decodes them."""
    header = msgpack.unpackb(reply[0])
    _, _, _, encoding, meta = header
    payload = bytes(reply[1]) if len(reply) > 1 else b""
    if encoding == m.ENC_NDARRAY:
        typestr, shape = meta
        arr = np.frombuffer(payload, dtype=wire.ALLOWED_DTYPES[typestr]).reshape(shape)
        return arr.tolist() if arr.ndim == 1 else list(arr)
    return wire.make_unpacker()(payload)


def run_batch(predict, inputs: list) -> tuple[list, int]:
    """One batch through the container's path: (decoded outputs, nanoseconds from decode to encoded reply).

    Raises the container's ModelError (or WrongOutputCountError) for outputs
    it would refuse; an exception ``predict`` raises comes out as it is.
    """
    encoding, meta, payload = _frames(inputs)
    count = len(inputs)
    t0 = time.perf_counter_ns()
    batch = decode_batch(count, encoding, meta, payload)
    reply = encode_outputs(0, predict(batch), count)
    elapsed = time.perf_counter_ns() - t0
    return _decode_outputs(reply, count), elapsed


def check_model(predict, inputs: list, batch_sizes=(1, 8, 32), *, seconds: float = 0.5,
                min_calls: int = 5) -> dict:
    """Time ``predict`` at each batch size (inputs repeated to fill a batch); the report as a dict.

    Each size runs for about ``seconds`` (at least ``min_calls`` calls):
    median and 99th-percentile time per call, time per input. The first
    call of each size is checked and not timed (warm-up).
    """
    sizes = []
    first_output = kind = None
    for size in batch_sizes:
        if type(size) is not int or size < 1:
            raise InvalidConfigError(f"batch size {size!r} is not a positive integer")
        batch = [inputs[i % len(inputs)] for i in range(size)]
        try:
            outputs, _ = run_batch(predict, batch)
        except ClipperError as exc:
            raise type(exc)(f"at batch size {size}: {exc.message}") from None
        except Exception as exc:
            raise ModelError(f"at batch size {size}: predict raised {type(exc).__name__}: {exc}") from None
        if first_output is None:
            first_output, kind = outputs[0], detect_kind(outputs[0])
        elif detect_kind(outputs[0]) != kind:
            raise ModelError(f"at batch size {size}: the outputs are {detect_kind(outputs[0])}s; at batch size "
                             f"{batch_sizes[0]} they were {kind}s")
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(times) < MAX_CALLS and (len(times) < min_calls or time.perf_counter() < deadline):
            times.append(run_batch(predict, batch)[1])
        t = np.array(times, dtype=np.float64) / 1e6
        median = float(np.median(t))
        sizes.append({"batch_size": size, "calls": len(times), "median_ms": round(median, 4),
                      "p99_ms": round(float(np.percentile(t, 99)), 4),
                      "per_item_us": round(median * 1000 / size, 3)})
    if isinstance(first_output, np.ndarray):
        first_output = first_output.tolist()
    elif isinstance(first_output, bytes):
        first_output = first_output.decode("utf-8", "replace")
    return {"output_kind": kind, "first_output": first_output, "sizes": sizes}


def main_test_model(args, model_file, options: dict) -> int:
    """``clipper test-model``: load, run, print (see :func:`check_model`); 1 with a clear message on failure."""
    dtype, shape = args.input_dtype, args.input_shape
    if model_file is not None:
        from ..deployers import inspect_model_file, predictor_for

        t0 = time.perf_counter()  # from the framework's import on, as a container's load time counts
        d = inspect_model_file(model_file[0], model_file[1], input_dtype=dtype, input_shape=shape,
                               output=args.output, options=options, trusted_types=args.trust_type,
                               trust_pickle=args.trust_pickle)
        dtype, shape, what = d.input_dtype, d.input_shape, f"{d.kind} model {d.path}"
        predict = predictor_for(d).predict
    else:
        what = args.entry
        t0 = time.perf_counter()
        try:
            predict = load_predictor(args.entry)
        except Exception as exc:
            print(f"clipper test-model: cannot load {args.entry!r}: {exc}", file=sys.stderr)
            return 1
    load_ms = (time.perf_counter() - t0) * 1000
    try:
        sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    except ValueError:
        raise InvalidConfigError(f"--batch-sizes {args.batch_sizes!r} is not a comma-separated list of integers") \
            from None
    inputs, dtype, shape = load_inputs(args.input, dtype, shape)
    try:
        report = check_model(predict, inputs, sizes or [1], seconds=args.seconds)
    except ClipperError as exc:
        print(f"clipper test-model: {what} FAILED {exc.message}", file=sys.stderr)
        return 1
    report = {"model": what, "input": f"{dtype}{list(shape)}", "load_ms": round(load_ms, 1),
              "rss_bytes": rss_bytes(), **report}
    if args.json:
        print(json.dumps(report, default=str))
        return 0
    rss = report["rss_bytes"]
    print(f"{what}: input {report['input']}, loaded in {report['load_ms']:.1f} ms, "
          f"resident memory {'-' if rss is None else format(rss / 2**20, '.1f')} MiB")
    first = json.dumps(report["first_output"], default=str)
    print(f"outputs: {report['output_kind']}; the first: {first[:200]}")
    print(f"{'batch':>6s} {'calls':>7s} {'median ms':>10s} {'p99 ms':>9s} {'per item us':>12s}")
    for s in report["sizes"]:
        print(f"{s['batch_size']:6d} {s['calls']:7d} {s['median_ms']:10.3f} {s['p99_ms']:9.3f} "
              f"{s['per_item_us']:12.2f}")
    return 0
