"""scikit-learn models from skops files, or from pickles you trust (``pip install 'clipper-serving[sklearn]'``).

Why skops and not pickle: unpickling *runs code*. A pickle names any
importable callable and the arguments to call it with (``__reduce__``), so a
``.pkl`` or ``.joblib`` file is a program, not data, and loading one runs it
with every right of the process that loads it -- here the model container,
which holds credentials to a frontend, and the operator's shell, where the
deploy helper inspects the file. Anyone who can swap the file (a shared
bucket, a download, a colleague's laptop) owns both. A skops file is a zip of
a JSON schema plus numpy arrays; ``skops.io.load`` builds only types on an
allowlist (scikit-learn's estimators, numpy, builtins) and refuses the rest,
so a tampered file fails to load instead of running code.

Types outside skops' default allowlist must be trusted *by name*, each one a
decision: the deploy helper lists what ``skops.io.get_untrusted_types`` finds
in the file and refuses to deploy until every one of them is given in
``trusted_types`` (``--trust-type NAME``); the container loads with exactly
that list, never with "whatever the file holds". (skops explains, for
example, why it does not trust ``sklearn.tree._tree.Tree`` by default: its
node indices are not bounds-checked at ``predict``.)

A pickle (``.joblib``, ``.pkl``, ``.pickle``) is loaded only with the explicit
flag ``trust_pickle=True`` (``--trust-pickle``): say you made the file.

Outputs: a classifier answers ``label`` (``predict``) by default, or
``probabilities`` (``predict_proba``); a regressor answers ``number`` (or
``vector`` for several targets). The input shape is ``(n_features_in_,)``;
the input dtype defaults to float64, scikit-learn's own.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import InvalidConfigError
from ._base import (Deployment, FileModel, as_labels, as_numbers, as_vectors, check_file, check_options,
                    check_output, make_env, require)

__all__ = ["SklearnModel", "inspect_sklearn", "load_estimator"]

ENTRY = "clipper.deployers.sklearn_model:SklearnModel"
EXTRA = "sklearn"
ENV_TRUSTED = "CLIPPER_MODEL_TRUSTED_TYPES"
ENV_TRUST_PICKLE = "CLIPPER_MODEL_TRUST_PICKLE"
SKOPS_SUFFIXES = (".skops",)
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
DEFAULTS: dict = {}


def _check_trusted(trusted_types) -> list[str]:
    if trusted_types is None:
        return []
    if isinstance(trusted_types, str) or not all(isinstance(t, str) and t for t in trusted_types):
        raise InvalidConfigError(f"trusted_types {trusted_types!r} is not a list of type names")
    return sorted(set(trusted_types))


def load_estimator(path: str, trusted_types=None, trust_pickle: bool = False):
    """Load a skops file with exactly ``trusted_types`` beyond skops' defaults; a pickle only if trusted."""
    trusted = _check_trusted(trusted_types)
    if path.lower().endswith(PICKLE_SUFFIXES):
        if not trust_pickle:
            raise InvalidConfigError(
                f"{path!r} is a pickle: loading it runs whatever code it holds. Save the model with "
                "skops.io.dump(model, 'model.skops') instead, or, if you made this file yourself, pass "
                "--trust-pickle (trust_pickle=True)")
        joblib = require("joblib", EXTRA)
        return joblib.load(path)
    sio = require("skops.io", EXTRA)
    untrusted = sio.get_untrusted_types(file=path)
    missing = sorted(set(untrusted) - set(trusted))
    if missing:
        raise InvalidConfigError(
            f"the skops file {path!r} holds types skops does not trust by default: {missing}. Review them "
            "(skops.io.load explains each) and trust them by name: --trust-type NAME for each "
            "(trusted_types=[...])")
    try:
        return sio.load(path, trusted=trusted or None)
    except Exception as exc:
        raise InvalidConfigError(f"skops cannot load {path!r}: {type(exc).__name__}: {exc}") from None


def _is_classifier(est) -> bool:
    return hasattr(est, "classes_") and callable(getattr(est, "predict", None))


def inspect_sklearn(path, *, input_dtype: str | None = None, input_shape=None, output: str | None = None,
                    options: dict | None = None, trusted_types=None, trust_pickle: bool = False) -> Deployment:
    """Load the estimator here (as the container will) and read what it takes and gives."""
    path = check_file(path, "scikit-learn", SKOPS_SUFFIXES + PICKLE_SUFFIXES)
    check_output("scikit-learn", output, ("label", "probabilities", "vector", "number"))
    opts = check_options("sklearn", options, DEFAULTS)
    trusted = _check_trusted(trusted_types)
    est = load_estimator(path, trusted, trust_pickle)
    if not callable(getattr(est, "predict", None)):
        raise InvalidConfigError(f"the object in {path!r} ({type(est).__name__}) has no predict method")
    n = getattr(est, "n_features_in_", None)
    if input_shape is None:
        if not isinstance(n, (int, np.integer)):
            raise InvalidConfigError(f"{type(est).__name__} does not say how many features it takes "
                                     "(n_features_in_); give the input shape (--input-shape)")
        input_shape = (int(n),)
    elif isinstance(n, (int, np.integer)) and int(np.prod(input_shape)) != int(n):
        raise InvalidConfigError(f"input shape {list(input_shape)} given; {type(est).__name__} takes {int(n)} features")
    classifier = _is_classifier(est)
    if output is None:
        output = "label" if classifier else "number"
    if output == "probabilities" and not callable(getattr(est, "predict_proba", None)):
        raise InvalidConfigError(f"{type(est).__name__} has no predict_proba; it cannot answer probabilities")
    if output == "label" and not classifier:
        raise InvalidConfigError(f"{type(est).__name__} is not a classifier (no classes_); choose output 'number' "
                                 "or 'vector'")
    extra = {}
    if trusted:
        extra[ENV_TRUSTED] = json.dumps(trusted)
    if trust_pickle:
        extra[ENV_TRUST_PICKLE] = "1"
    notes = [f"{type(est).__name__}: {input_dtype or 'float64'}{list(input_shape)} -> {output}"]
    if trusted:
        notes.append(f"trusted types beyond skops' defaults: {trusted}")
    return Deployment("sklearn", path, ENTRY, input_dtype or "float64", tuple(int(d) for d in input_shape), output,
                      make_env(path, output, opts, extra), notes)


class SklearnModel(FileModel):
    """A container predictor running a scikit-learn estimator (see the module's docstring)."""

    kind = "sklearn"
    extra = EXTRA
    defaults = DEFAULTS

    def __init__(self, path=None, output=None, options=None, trusted_types=None, trust_pickle=None) -> None:
        super().__init__(path, output, options)
        if trusted_types is None:
            try:
                trusted_types = json.loads(os.environ.get(ENV_TRUSTED) or "[]")
            except json.JSONDecodeError as exc:
                raise InvalidConfigError(f"{ENV_TRUSTED} is not a JSON list: {exc}") from None
        self.trusted_types = _check_trusted(trusted_types)
        self.trust_pickle = bool(trust_pickle if trust_pickle is not None
                                 else os.environ.get(ENV_TRUST_PICKLE) == "1")

    def load(self) -> "SklearnModel":
        self.estimator = est = load_estimator(self.path, self.trusted_types, self.trust_pickle)
        if self.output is None:
            self.output = "label" if _is_classifier(est) else "number"
        if self.output == "probabilities":
            self._fn, self._convert = est.predict_proba, lambda v: np.asarray(v)
        elif self.output == "label":
            self._fn, self._convert = est.predict, lambda v: as_labels(v, len(v))
        elif self.output == "number":
            self._fn, self._convert = est.predict, as_numbers
        else:
            self._fn, self._convert = est.predict, as_vectors
        return self

    def predict(self, batch):
        x = batch.reshape(len(batch), -1) if isinstance(batch, np.ndarray) and batch.ndim > 2 else batch
        return self._convert(self._fn(x))
