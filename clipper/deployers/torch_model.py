"""PyTorch models: TorchScript files or ``torch.export`` programs (``pip install 'clipper-serving[torch]'``).

``.pt2`` files (``torch.export.save``) record their input: its dtype and
shape are read from the program, and a dynamic first dimension
(``dynamic_shapes={0: Dim("batch")}``) is Clipper's batch. TorchScript files
(``torch.jit.save``, ``.pt`` / ``.pth``) do not, so give the input shape (and
dtype, default float32). Either way the deploy helper runs a batch of two
zeros once, so a shape the model cannot take fails the deploy, not the first
query.

The model's output for a batch is one tensor with one row per input; it is
served as ``vector`` (the rows), ``number`` (one value per input), ``label``
(the index of each row's largest value: logits or scores of classes) or
``probabilities`` (the rows as they are: end the model with a softmax).
Inference runs under ``torch.inference_mode`` with ``threads`` intra-op
threads (option, default 1) on the CPU.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import InvalidConfigError
from ._base import (Deployment, FileModel, as_numbers, as_vectors, check_file, check_options, check_output,
                    make_env, require)

__all__ = ["TorchModel", "inspect_torch", "load_module"]

ENTRY = "clipper.deployers.torch_model:TorchModel"
EXTRA = "torch"
EXPORT_SUFFIXES = (".pt2",)
SCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
DEFAULTS = {"threads": 1}


def load_module(path: str, threads: int = 1):
    """(callable module, exported input (dtype, shape) or None) of a TorchScript or exported file."""
    torch = require("torch", EXTRA)
    if threads:
        torch.set_num_threads(threads)
    try:
        if path.lower().endswith(EXPORT_SUFFIXES):
            ep = torch.export.load(path)
            return ep.module(), _exported_input(ep)
        module = torch.jit.load(path, map_location="cpu")
        module.eval()
        return module, None
    except InvalidConfigError:
        raise
    except Exception as exc:
        raise InvalidConfigError(f"torch cannot load {path!r}: {type(exc).__name__}: {exc}") from None


def _exported_input(ep) -> tuple[str, list]:
    """The dtype name and shape (None for a dynamic dimension) of an exported program's one user input."""
    from torch.export.graph_signature import InputKind

    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    if len(names) != 1:
        raise InvalidConfigError(f"the exported program takes {len(names)} inputs; Clipper serves models with one")
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name == names[0]:
            val = node.meta["val"]
            return str(val.dtype).removeprefix("torch."), [d if isinstance(d, int) else None for d in val.shape]
    raise InvalidConfigError("the exported program's input has no recorded shape")


def inspect_torch(path, *, input_dtype: str | None = None, input_shape=None, output: str | None = None,
                  options: dict | None = None) -> Deployment:
    path = check_file(path, "PyTorch", EXPORT_SUFFIXES + SCRIPT_SUFFIXES)
    check_output("PyTorch", output, ("label", "probabilities", "vector", "number"))
    opts = check_options("torch", options, DEFAULTS)
    module, exported = load_module(path, opts["threads"])
    notes = []
    if exported is not None:
        dtype, dims = exported
        if input_dtype is not None and input_dtype != dtype:
            raise InvalidConfigError(f"input dtype {input_dtype!r} given; the exported program takes {dtype}")
        if not dims or dims[0] is not None:
            raise InvalidConfigError(f"the exported program's input has shape {dims}: export it with a dynamic "
                                     "batch dimension, dynamic_shapes={0: torch.export.Dim('batch')}")
        if input_shape is None:
            if any(d is None for d in dims[1:]):
                raise InvalidConfigError(f"the exported program's input has dynamic dimensions {dims[1:]} after "
                                         "the batch; give the input shape (--input-shape)")
            input_shape = dims[1:]
        notes.append(f"exported program: input {dtype}{dims} (dimension 0 is Clipper's batch)")
        input_dtype = dtype
    else:
        if input_shape is None:
            raise InvalidConfigError("a TorchScript file does not record its input shape; give it (--input-shape, "
                                     "input_shape=...), or save the model with torch.export")
        input_dtype = input_dtype or "float32"
    shape = tuple(int(d) for d in input_shape)
    try:
        probe = _run(module, np.zeros((2, *shape), dtype=input_dtype))
    except Exception as exc:
        raise InvalidConfigError(f"the model cannot take a batch of {input_dtype}{list(shape)}: "
                                 f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}") from None
    if len(probe) != 2:
        raise InvalidConfigError(f"the model answered {len(probe)} rows for a batch of 2 inputs {list(shape)}")
    if output is None:
        output = "number" if probe.reshape(2, -1).shape[1] == 1 else "vector"
    notes.append(f"{input_dtype}{list(shape)} -> {output} (a probe batch gave {list(probe.shape)})")
    return Deployment("torch", path, ENTRY, input_dtype, shape, output, make_env(path, output, dict(options or {})),
                      notes)


def _run(module, batch: np.ndarray) -> np.ndarray:
    torch = require("torch", EXTRA)
    with torch.inference_mode():
        out = module(torch.from_numpy(batch))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().numpy()


class TorchModel(FileModel):
    """A container predictor running a TorchScript or exported PyTorch model (see the module's docstring)."""

    kind = "torch"
    extra = EXTRA
    defaults = DEFAULTS

    def load(self) -> "TorchModel":
        self.module, _ = load_module(self.path, self.options["threads"])
        self._torch = require("torch", EXTRA)
        # The batch is a read-only view of the received frame; the model only reads it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        output = self.output or "vector"
        self.output = output
        self._convert = {"label": lambda v: as_vectors(v).argmax(axis=1).astype(np.int64),
                         "probabilities": as_vectors, "vector": as_vectors, "number": as_numbers}[output]
        return self

    def predict(self, batch):
        torch = self._torch
        with torch.inference_mode():
            out = self.module(torch.from_numpy(batch))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return self._convert(out.numpy())
