"""What XGBoost and LightGBM boosters answer, by objective, in Clipper's output kinds.

A booster's raw prediction is, by its objective: a row of class
probabilities (multi-class), the positive class's probability (binary), a
class index as a float (XGBoost's ``multi:softmax``), a number, or a row of
numbers (a multi-target regressor). Classifiers
answer ``label`` by default (the class index, as the framework's scikit-learn
wrapper's ``predict`` does), or ``probabilities`` (a row per input; a binary
model's is ``[1 - p, p]``); anything else answers ``number``, or ``vector`` for
several targets.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidConfigError
from ._base import as_numbers, as_vectors, binary_probabilities

# objective family -> the output kinds it can give (the first is the default)
FAMILIES = {
    "multiprob": ("label", "probabilities"),
    "multiclass": ("label",),
    "binary": ("label", "probabilities", "number"),
    "other": ("number", "vector"),
    "multitarget": ("vector",),
}


def converter(family: str, output: str | None, what: str):
    """(output kind, raw prediction -> outputs) for a booster of ``family``."""
    allowed = FAMILIES[family]
    output = output or allowed[0]
    if output not in allowed:
        raise InvalidConfigError(f"{what} answers {list(allowed)}; it cannot answer {output!r}")
    if family == "multiprob":
        if output == "label":
            return output, lambda p: np.asarray(p).reshape(len(p), -1).argmax(axis=1).astype(np.int64)
        return output, lambda p: np.asarray(p).reshape(len(p), -1)
    if family == "multiclass":
        return output, lambda p: np.asarray(p).reshape(-1).astype(np.int64)
    if family == "binary":
        if output == "label":
            return output, lambda p: (np.asarray(p).reshape(-1) > 0.5).astype(np.int64)
        if output == "probabilities":
            return output, binary_probabilities
        return output, as_numbers
    return output, (as_numbers if output == "number" else as_vectors)
