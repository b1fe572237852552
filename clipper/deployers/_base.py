"""What every deployer shares: the optional-extra import, the model's environment, output kinds.

A deployed model file runs in an ordinary SDK container: its entry is a
predictor class of this package (``clipper.deployers.onnx_model:OnnxModel``)
and its environment names the file and how to read it:

``CLIPPER_MODEL_FILE``
    the model file (an absolute path on the machine that runs the container).
``CLIPPER_MODEL_OUTPUT``
    the output kind the predictor returns: ``label``, ``probabilities``,
    ``vector`` or ``number`` (Clipper's output kinds, see
    :mod:`clipper.selection.combine`), so applications that link several
    models combine them: labels by vote, probabilities by their mean.
``CLIPPER_MODEL_OPTIONS``
    a JSON object of deployer options (thread counts, the output's name...).

The deploy helper writes these after inspecting the file; the container
reads them back in ``load()``.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidConfigError

ENV_FILE = "CLIPPER_MODEL_FILE"
ENV_OUTPUT = "CLIPPER_MODEL_OUTPUT"
ENV_OPTIONS = "CLIPPER_MODEL_OPTIONS"

OUTPUT_KINDS = ("label", "probabilities", "vector", "number")
MAX_THREADS = 256


def require(module: str, extra: str):
    """Import ``module`` (a framework), or raise InvalidConfigError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InvalidConfigError(
            f"serving {extra} models needs the Python package {module!r}, which is not installed here "
            f"({exc}); install it with: pip install 'clipper-serving[{extra}]'") from None


def check_options(kind: str, options: dict | None, known: dict[str, Any]) -> dict:
    """``options`` over the deployer's defaults ``known``; an unknown key or a wrong type is refused."""
    options = dict(options or {})
    unknown = set(options) - set(known)
    if unknown:
        raise InvalidConfigError(f"unknown {kind} option(s) {sorted(unknown)}; known: {sorted(known)}")
    out = dict(known)
    for key, value in options.items():
        default = known[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = type(value) is int and 0 <= value <= MAX_THREADS
        elif isinstance(default, str) or default is None:
            ok = value is None or isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise InvalidConfigError(f"{kind} option {key}={value!r} is not valid (default {default!r})")
        out[key] = value
    return out


def check_output(kind: str, output: str | None, allowed: tuple[str, ...]) -> str | None:
    if output is not None and output not in allowed:
        raise InvalidConfigError(f"output {output!r} is not one this {kind} model gives; it gives {list(allowed)}")
    return output


@dataclass
class Deployment:
    """What a deploy helper learned from a model file: how to run it and what it takes and gives."""

    kind: str  # onnx, sklearn, xgboost, lightgbm, torch
    path: str  # absolute
    entry: str  # the predictor class, module:Class
    input_dtype: str
    input_shape: tuple[int, ...]
    output_kind: str  # label, probabilities, vector, number
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was inferred, for the operator

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "entry": self.entry, "input_dtype": self.input_dtype,
                "input_shape": list(self.input_shape), "output_kind": self.output_kind, "env": dict(self.env),
                "notes": list(self.notes)}


def make_env(path: str, output_kind: str, options: dict, extra: dict | None = None) -> dict[str, str]:
    env = {ENV_FILE: path, ENV_OUTPUT: output_kind}
    if options:
        env[ENV_OPTIONS] = json.dumps(options, sort_keys=True)
    env.update(extra or {})
    return env


def booster_deployment(kind: str, what: str, path: str, entry: str, n: int, objective: str, output_kind: str,
                       input_dtype: str | None, input_shape, default_dtype: str, options: dict | None) -> Deployment:
    """The deployment of a gradient-boosted booster file (XGBoost, LightGBM): ``n`` float features, the
    dtype given (float32 or float64) or ``default_dtype``; a given input shape must be ``[n]``."""
    if input_shape is not None and list(input_shape) != [n]:
        raise InvalidConfigError(f"input shape {list(input_shape)} given; the booster takes {n} features")
    dtype = input_dtype or default_dtype
    if dtype not in ("float32", "float64"):
        raise InvalidConfigError(f"input dtype {dtype!r}: {what} boosters take float32 or float64")
    notes = [f"objective {objective}: {dtype}[{n}] -> {output_kind}"]
    return Deployment(kind, path, entry, dtype, (n,), output_kind, make_env(path, output_kind, dict(options or {})),
                      notes)


def check_file(path, kind: str, suffixes: tuple[str, ...] | None = None) -> str:
    """The absolute path of an existing model file (with one of ``suffixes``, when given)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidConfigError(f"{kind} model file {path!r} is not a path")
    full = os.path.abspath(os.fspath(path))
    if not os.path.isfile(full):
        raise InvalidConfigError(f"{kind} model file {full!r} does not exist")
    if suffixes and not full.lower().endswith(suffixes):
        raise InvalidConfigError(f"{kind} model file {full!r} does not end in {' or '.join(suffixes)}")
    return full


class FileModel:
    """Base of the container-side predictors: a model file, its output kind and options.

    The SDK makes one with no arguments (everything comes from the
    environment, see the module's docstring) and calls ``load()`` once; in a
    Python process, pass them: ``OnnxModel("m.onnx", output="label").load()``.
    """

    kind = ""
    extra = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, path: str | None = None, output: str | None = None, options: dict | None = None) -> None:
        path = path if path is not None else os.environ.get(ENV_FILE)
        if not path:
            raise InvalidConfigError(f"{type(self).__name__} needs its model file: set {ENV_FILE}")
        self.path = os.fspath(path)
        self.output = output if output is not None else (os.environ.get(ENV_OUTPUT) or None)
        if self.output is not None and self.output not in OUTPUT_KINDS:
            raise InvalidConfigError(f"output kind {self.output!r} is not one of {list(OUTPUT_KINDS)}")
        if options is None:
            try:
                options = json.loads(os.environ.get(ENV_OPTIONS) or "{}")
            except json.JSONDecodeError as exc:
                raise InvalidConfigError(f"{ENV_OPTIONS} is not a JSON object: {exc}") from None
        if not isinstance(options, dict):
            raise InvalidConfigError(f"{self.kind} options {options!r} are not a mapping")
        self.options = check_options(self.kind, options, self.defaults)

    def load(self) -> "FileModel":
        raise NotImplementedError

    def predict(self, batch):
        raise NotImplementedError


# ------------------------------------------------------------- output kinds
def as_labels(values, n: int):
    """One label per input: int64 for integer (or integral float) classes, else a list (str, bytes)."""
    arr = np.asarray(values)
    if arr.ndim > 1:
        arr = arr.reshape(len(arr), -1)
        if arr.shape[1] != 1:
            raise ValueError(f"labels of shape {arr.shape} are not one per input")
        arr = arr[:, 0]
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f":
        return arr.astype(np.int64)
    return [v.item() if isinstance(v, np.generic) else v for v in arr.tolist()]


def probability_rows(values) -> np.ndarray:
    """A 2-d array of probabilities from a 2-d array or a list of {class: probability} maps (ONNX ZipMap)."""
    if isinstance(values, list) and values and isinstance(values[0], dict):
        keys = sorted(values[0])
        return np.array([[row[k] for k in keys] for row in values], dtype=np.float32)
    arr = np.asarray(values)
    return arr.reshape(len(arr), -1)


def binary_probabilities(p) -> np.ndarray:
    """[P(class 0), P(class 1)] rows from the positive class's probability."""
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    return np.column_stack([1.0 - p, p])


def as_numbers(values) -> np.ndarray:
    arr = np.asarray(values)
    arr = arr.reshape(len(arr), -1)
    if arr.shape[1] != 1:
        raise ValueError(f"outputs of shape {arr.shape} are not one number per input; use output 'vector'")
    return arr[:, 0].astype(np.float64, copy=False)


def as_vectors(values) -> np.ndarray:
    arr = np.asarray(values)
    return arr.reshape(len(arr), -1)
