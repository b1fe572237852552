"""ONNX models through onnxruntime (``pip install 'clipper-serving[onnx]'``).

The deploy helper reads the model's one input: its element type becomes the
model's input dtype, its dimensions after the first the input shape, and the
first dimension, when free (``None`` or a symbol such as ``"N"``), is
Clipper's batch: a batch of n queries is one ``session.run`` on an
``(n, *shape)`` tensor. A model exported with a fixed first dimension of 1 is
run once per query instead (say so when exporting: a free batch dimension is
much faster).

Outputs map to Clipper's output kinds. A classifier (an integer or string
label output beside a probability output, as skl2onnx and most converters
write) answers ``label`` by default, ``probabilities`` on request (a ZipMap's
list of maps is turned into rows ordered by class); a model with one float
output answers ``vector`` (or ``number`` when it is one value per input).
Option ``output_name`` picks an output by name.

Sessions are built for latency, not throughput: one intra-op thread (replicas,
not threads, use the other cores; a thread pool that spins between batches
burns a core while idle), one inter-op thread, sequential execution, every
graph optimization. Options override each: ``intra_op_num_threads``,
``inter_op_num_threads``, ``execution_mode`` (``sequential`` / ``parallel``),
``graph_optimization_level`` (``all`` / ``extended`` / ``basic`` /
``disabled``), ``allow_spinning``.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidConfigError
from ._base import (Deployment, FileModel, as_labels, as_numbers, as_vectors, check_file, check_options,
                    check_output, make_env, probability_rows, require)

__all__ = ["OnnxModel", "inspect_onnx", "make_session"]

ENTRY = "clipper.deployers.onnx_model:OnnxModel"
EXTRA = "onnx"

DEFAULTS = {"intra_op_num_threads": 1, "inter_op_num_threads": 1, "execution_mode": "sequential",
            "graph_optimization_level": "all", "allow_spinning": False, "output_name": None}

_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(uint16)": "uint16",
    "tensor(int32)": "int32", "tensor(uint32)": "uint32", "tensor(int64)": "int64", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool", "tensor(string)": "str",
}
_LABEL_TYPES = ("tensor(int64)", "tensor(int32)", "tensor(string)")
_FLOAT_TYPES = ("tensor(float)", "tensor(double)", "tensor(float16)")


def make_session(path: str, options: dict | None = None):
    """An onnxruntime session on the CPU, configured for low latency (see the module's docstring)."""
    ort = require("onnxruntime", EXTRA)
    opts = check_options("onnx", options, DEFAULTS)
    so = ort.SessionOptions()
    so.intra_op_num_threads = opts["intra_op_num_threads"]
    so.inter_op_num_threads = opts["inter_op_num_threads"]
    modes = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "parallel": ort.ExecutionMode.ORT_PARALLEL}
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    try:
        so.execution_mode = modes[opts["execution_mode"]]
        so.graph_optimization_level = levels[opts["graph_optimization_level"]]
    except KeyError as exc:
        raise InvalidConfigError(f"onnx option value {exc.args[0]!r} is not known; execution_mode is one of "
                                 f"{list(modes)}, graph_optimization_level one of {list(levels)}") from None
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts["allow_spinning"] else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if opts["allow_spinning"] else "0")
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own (Fail, InvalidGraph, ...) for a bad file
        raise InvalidConfigError(f"onnxruntime cannot load {path!r}: {type(exc).__name__}: {exc}") from None


def _free(dim) -> bool:
    return not isinstance(dim, int) or dim < 0


def _input_signature(sess, input_dtype=None, input_shape=None):
    """(input name, Clipper dtype, Clipper shape, per_item) of the session's one input."""
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise InvalidConfigError(f"the ONNX model has {len(inputs)} inputs {[i.name for i in inputs]}; "
                                 "Clipper serves models with one input tensor")
    inp = inputs[0]
    dtype = _DTYPES.get(inp.type)
    if dtype is None:
        raise InvalidConfigError(f"the ONNX model's input {inp.name!r} has type {inp.type}; "
                                 f"Clipper serves {sorted(set(_DTYPES))}")
    if input_dtype is not None and input_dtype != dtype:
        raise InvalidConfigError(f"input dtype {input_dtype!r} given; the ONNX model's input {inp.name!r} "
                                 f"takes {dtype} ({inp.type})")
    dims = list(inp.shape or [])
    if not dims:
        raise InvalidConfigError(f"the ONNX model's input {inp.name!r} is a scalar; it needs a batch dimension")
    first, rest = dims[0], dims[1:]
    per_item = False
    if not _free(first):
        if first != 1:
            raise InvalidConfigError(f"the ONNX model's input {inp.name!r} has a fixed first dimension {first}; "
                                     "export it with a free batch dimension (or 1: one query per run)")
        per_item = True
    if dtype == "str":  # a batch of strings: [N] or [N, 1]
        if rest not in ([], [1]):
            raise InvalidConfigError(f"the ONNX model's string input {inp.name!r} has shape {dims}; "
                                     "Clipper serves one string per query ([N] or [N, 1])")
        return inp.name, dtype, (), per_item, tuple(rest)
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != len(rest) or any(not _free(r) and r != s for r, s in zip(rest, shape)):
            raise InvalidConfigError(f"input shape {list(shape)} given; the ONNX model's input {inp.name!r} "
                                     f"has dimensions {rest} after the batch dimension")
    else:
        if any(_free(d) for d in rest):
            raise InvalidConfigError(f"the ONNX model's input {inp.name!r} has free dimensions {rest} after the "
                                     "batch dimension; give the input shape (--input-shape)")
        shape = tuple(rest)
    return inp.name, dtype, shape, per_item, shape


def _one_per_input(shape) -> bool:
    """A shape of one value per input: [N] or [N, 1]."""
    shape = list(shape or [])
    return len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)


def _output_signature(sess, output=None, output_name=None):
    """(output name, output kind) chosen from the session's outputs (see the module's docstring)."""
    outs = sess.get_outputs()
    by_name = {o.name: o for o in outs}
    labels = [o for o in outs if o.type in _LABEL_TYPES and _one_per_input(o.shape)]
    probs = [o for o in outs if o.type.startswith("seq(map(") or (o.type in _FLOAT_TYPES and len(o.shape or []) == 2)]
    if output_name is not None:
        if output_name not in by_name:
            raise InvalidConfigError(f"the ONNX model has no output {output_name!r}; it has {list(by_name)}")
        o = by_name[output_name]
        if output is None:
            if o.type in _LABEL_TYPES:
                output = "label"
            elif o.type.startswith("seq(map("):
                output = "probabilities"
            else:
                output = "number" if _one_per_input(o.shape) else "vector"
        return o.name, output
    classifier = bool(labels) and bool(probs) and labels[0] is not probs[0]
    if output is None:
        if classifier or (labels and len(outs) == 1):
            output = "label"
        else:
            output = "number" if _one_per_input(outs[0].shape) else "vector"
    if output == "label":
        if not labels:
            raise InvalidConfigError(f"the ONNX model has no label output (outputs: "
                                     f"{[(o.name, o.type) for o in outs]}); choose output 'vector' or 'number'")
        return labels[0].name, output
    if output == "probabilities":
        if not probs:
            raise InvalidConfigError(f"the ONNX model has no probability output (outputs: "
                                     f"{[(o.name, o.type) for o in outs]})")
        cand = [o for o in probs if o not in labels]
        return (cand or probs)[0].name, output
    floats = [o for o in outs if o.type in _FLOAT_TYPES] or outs
    return floats[0].name, output


def inspect_onnx(path, *, input_dtype: str | None = None, input_shape=None, output: str | None = None,
                 options: dict | None = None) -> Deployment:
    """Read an ONNX model's input and outputs: the deployment that serves it (see the module's docstring)."""
    path = check_file(path, "ONNX", (".onnx", ".ort"))
    check_output("ONNX", output, ("label", "probabilities", "vector", "number"))
    opts = check_options("onnx", options, DEFAULTS)
    sess = make_session(path, opts)
    name, dtype, shape, per_item, _ = _input_signature(sess, input_dtype, input_shape)
    out_name, kind = _output_signature(sess, output, opts["output_name"])
    first = sess.get_inputs()[0].shape[0]
    notes = [f"input {name!r}: {dtype}{list(shape)}; " + (
        "fixed batch of 1: one run per query" if per_item else f"batch dimension {first!r} is Clipper's batch"),
             f"output {out_name!r} served as {kind}"]
    given = {k: v for k, v in (options or {}).items()}
    if opts["output_name"] is None:
        given["output_name"] = out_name
    return Deployment("onnx", path, ENTRY, dtype, shape, kind, make_env(path, kind, given), notes)


class OnnxModel(FileModel):
    """A container predictor running an ONNX file through onnxruntime (see the module's docstring)."""

    kind = "onnx"
    extra = EXTRA
    defaults = DEFAULTS

    def load(self) -> "OnnxModel":
        self.session = make_session(self.path, self.options)
        self._input, self.input_dtype, self.input_shape, self._per_item, self._feed_rest = _input_signature(self.session)
        self._output, self.output = _output_signature(self.session, self.output, self.options["output_name"])
        self._outputs = [self._output]
        convert = {"label": as_labels, "probabilities": lambda v, n: probability_rows(v),
                   "vector": lambda v, n: as_vectors(v), "number": lambda v, n: as_numbers(v)}[self.output]
        self._convert = convert
        self._run = self.session.run
        return self

    def predict(self, batch):
        n = len(batch)
        if self.input_dtype == "str":
            x = np.array(batch, dtype=object).reshape(n, *self._feed_rest)
        else:
            x = batch
        if self._per_item:
            parts = [self._run(self._outputs, {self._input: x[i:i + 1]})[0] for i in range(n)]
            out = [v for p in parts for v in p] if isinstance(parts[0], list) else np.concatenate(parts)
        else:
            out = self._run(self._outputs, {self._input: x})[0]
        return self._convert(out, n)
