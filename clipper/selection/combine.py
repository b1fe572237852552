"""Combining the answers of several models into one, and how much they agree.

Each application declares the kind of its outputs (``output_kind``); the
combine and loss functions below follow from it:

``label``
    discrete answers (ints, bools, strings, bytes): a weighted vote. The
    winner is the answer with the most weight (ties go to the answer first
    seen, in the order the models are linked). Confidence: the winner's share
    of the weight of the models that answered.
``number``
    one real number: the weighted mean. Confidence: the weight share of the
    models within ``tolerance`` of the mean (absolute, or relative to the
    mean's magnitude when that is larger than 1).
``vector``
    a fixed-length vector of numbers: the element-wise weighted mean.
    Confidence as for numbers, with the largest element difference.
``probabilities``
    a probability vector per model (non-negative, summing to 1): the weighted
    mean vector, which is again a probability vector. Confidence: the weight
    share of the models whose most likely class is the mean's most likely
    class.
``auto``
    decided per query from the first answer: ints, bools, strings and bytes
    are labels, a float is a number, a float vector that looks like a
    probability vector (non-negative, sums to 1 within 1e-3) is
    probabilities, any other vector a vector.

Weights need not be normalized; a model without weight counts as 1.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..errors import InvalidConfigError, InvalidInputError

__all__ = ["OUTPUT_KINDS", "detect_kind", "combine", "vote", "weighted_mean", "mean_vector", "mean_probabilities"]

OUTPUT_KINDS = ("auto", "label", "number", "vector", "probabilities")
DEFAULT_TOLERANCE = 1e-6
_PROB_SUM_TOL = 1e-3


def check_output_kind(kind) -> str:
    if kind not in OUTPUT_KINDS:
        raise InvalidConfigError(f"output_kind {kind!r} is not one of {list(OUTPUT_KINDS)}")
    return kind


def detect_kind(output) -> str:
    """The output kind of one answer (what ``auto`` uses)."""
    if isinstance(output, (bool, np.bool_, int, np.integer, str, bytes)):
        return "label"
    if isinstance(output, (float, np.floating)):
        return "number"
    if isinstance(output, (list, tuple, np.ndarray)):
        try:
            arr = np.asarray(output, dtype=np.float64)
        except (TypeError, ValueError):
            return "label"
        if arr.ndim == 0:
            return "number"
        if arr.size and arr.ndim == 1 and np.all(arr >= 0) and abs(float(arr.sum()) - 1.0) <= _PROB_SUM_TOL:
            return "probabilities"
        return "vector"
    return "label"  # anything else can still be compared for equality


def _label_key(output):
    """A hashable stand-in for a label (numpy scalars compare equal to Python ones)."""
    if isinstance(output, np.generic):
        return output.item()
    if isinstance(output, np.ndarray):
        return ("nd", output.dtype.str, output.shape, output.tobytes())
    if isinstance(output, list):
        return ("list", repr(output))
    if isinstance(output, dict):
        return ("dict", repr(sorted(output.items(), key=repr)))
    return output


def vote(outputs: Sequence, weights: Sequence[float]) -> tuple[Any, float]:
    """Weighted majority vote: ``(winner, winner's weight share)``."""
    totals: dict = {}
    first: dict = {}
    for out, w in zip(outputs, weights):
        k = _label_key(out)
        if k not in totals:
            totals[k] = 0.0
            first[k] = out
        totals[k] += w
    total = sum(totals.values())
    best = max(totals, key=totals.__getitem__)  # max keeps the first of equal weights
    winner = first[best]
    if isinstance(winner, np.generic):
        winner = winner.item()
    return winner, (totals[best] / total if total > 0 else 1.0 / len(totals))


def _agreement(distances: np.ndarray, weights: np.ndarray, tolerance: float, scale: float) -> float:
    tol = tolerance * max(1.0, scale)
    total = float(weights.sum())
    if total <= 0:
        return float(np.mean(distances <= tol))
    return float(weights[distances <= tol].sum() / total)


def _norm_weights(weights: Sequence[float], n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InvalidInputError(f"weights {list(weights)!r} are not {n} finite non-negative numbers")
    if w.sum() <= 0:
        w = np.ones(n)
    return w


def weighted_mean(outputs: Sequence, weights: Sequence[float], tolerance: float = DEFAULT_TOLERANCE) -> tuple[float, float]:
    """Weighted mean of numbers and the weight share of those within ``tolerance`` of it."""
    try:
        x = np.asarray([float(o) for o in outputs], dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"outputs {list(outputs)!r} are not all numbers") from None
    w = _norm_weights(weights, len(x))
    mean = float(np.dot(w, x) / w.sum())
    return mean, _agreement(np.abs(x - mean), w, tolerance, abs(mean))


def _stack(outputs: Sequence) -> np.ndarray:
    try:
        arr = np.asarray([np.asarray(o, dtype=np.float64) for o in outputs])
    except (TypeError, ValueError):
        raise InvalidInputError("the models' outputs are not vectors of numbers of one length") from None
    if arr.ndim < 2:
        raise InvalidInputError(f"the models' outputs have shapes that differ or are not vectors: {arr.shape}")
    return arr


def mean_vector(outputs: Sequence, weights: Sequence[float], tolerance: float = DEFAULT_TOLERANCE) -> tuple[np.ndarray, float]:
    """Element-wise weighted mean and the weight share of the vectors within ``tolerance`` of it."""
    arr = _stack(outputs)
    w = _norm_weights(weights, len(arr))
    mean = np.tensordot(w, arr, axes=1) / w.sum()
    dist = np.abs(arr - mean).reshape(len(arr), -1).max(axis=1)
    scale = float(np.abs(mean).max()) if mean.size else 0.0
    return mean, _agreement(dist, w, tolerance, scale)


def mean_probabilities(outputs: Sequence, weights: Sequence[float]) -> tuple[np.ndarray, float]:
    """Weighted mean of probability vectors and the weight share of models agreeing on its argmax."""
    arr = _stack(outputs)
    if arr.ndim != 2:
        raise InvalidInputError(f"probability outputs must be vectors, not arrays of shape {arr.shape[1:]}")
    w = _norm_weights(weights, len(arr))
    mean = w @ arr / w.sum()
    top = int(np.argmax(mean))
    agree = np.argmax(arr, axis=1) == top
    return mean, float(w[agree].sum() / w.sum())


def combine(kind: str, outputs: Sequence, weights: Sequence[float] | None = None,
            tolerance: float = DEFAULT_TOLERANCE) -> tuple[Any, float]:
    """Combine ``outputs`` (one per model, in link order) of the given kind: ``(output, confidence)``.

    A single answer is returned as it is, with confidence 1.
    """
    n = len(outputs)
    if n == 0:
        raise InvalidInputError("nothing to combine: no model answered")
    if weights is None:
        weights = [1.0] * n
    if n == 1:
        return outputs[0], 1.0
    if kind == "auto":
        kind = detect_kind(outputs[0])
    if kind == "label":
        return vote(outputs, weights)
    if kind == "number":
        return weighted_mean(outputs, weights, tolerance)
    if kind == "vector":
        return mean_vector(outputs, weights, tolerance)
    if kind == "probabilities":
        return mean_probabilities(outputs, weights)
    raise InvalidConfigError(f"output_kind {kind!r} is not one of {list(OUTPUT_KINDS)}")


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(float(x))
