"""Losses in [0, 1]: how wrong one model's answer was, once the true label is known.

The bandit policies need bounded losses. Each output kind has a default:

``zero_one``
    labels: 0 when the answer equals the label, else 1. For probability
    vectors, the most likely class against the label (a class index).
``probability``
    probability vectors: 1 minus the probability the model gave the true
    class (the default for ``probabilities``).
``absolute``
    numbers and vectors: the absolute error (for vectors the mean over the
    elements) divided by ``loss_scale`` and clipped to 1 (the default for
    ``number`` and ``vector``; ``loss_scale`` defaults to 1).

A model that did not answer (error, or too late) gets ``missing_loss``
(default 1: an answer that never comes is as bad as a wrong one).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..errors import InvalidConfigError, InvalidInputError
from .combine import _label_key, detect_kind

__all__ = ["LOSSES", "make_loss", "zero_one", "probability_loss", "absolute_loss"]


def zero_one(pred, label, scale: float = 1.0) -> float:
    if isinstance(pred, (list, tuple, np.ndarray)) and detect_kind(pred) == "probabilities":
        return 0.0 if int(np.argmax(np.asarray(pred, dtype=np.float64))) == _class_index(label) else 1.0
    return 0.0 if _label_key(pred) == _label_key(label) else 1.0


def _class_index(label) -> int:
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        if isinstance(label, (float, np.floating)) and float(label).is_integer():
            return int(label)
        raise InvalidInputError(f"label {label!r} is not a class index; probability outputs need an integer label")
    return int(label)


def probability_loss(pred, label, scale: float = 1.0) -> float:
    p = np.asarray(pred, dtype=np.float64).ravel()
    k = _class_index(label)
    if not 0 <= k < p.size:
        raise InvalidInputError(f"label {label!r} is not a class index below {p.size}")
    return float(min(1.0, max(0.0, 1.0 - p[k])))


def absolute_loss(pred, label, scale: float = 1.0) -> float:
    try:
        err = np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(label, dtype=np.float64))
    except (TypeError, ValueError):
        raise InvalidInputError(f"label {label!r} cannot be compared with the output {pred!r}") from None
    if err.size == 0:
        return 0.0
    e = float(err.mean()) / scale
    return 1.0 if not math.isfinite(e) else min(1.0, e)


LOSSES: dict[str, Callable[[Any, Any, float], float]] = {
    "zero_one": zero_one,
    "probability": probability_loss,
    "absolute": absolute_loss,
}
DEFAULT_LOSS = {"label": "zero_one", "probabilities": "probability", "number": "absolute", "vector": "absolute"}


def make_loss(name: str | None, output_kind: str, scale: float = 1.0) -> Callable[[Any, Any], float]:
    """The loss ``(prediction, label) -> [0, 1]`` for an application.

    ``name`` None picks the default of ``output_kind`` (for ``auto``: by the
    kind of each prediction).
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or not math.isfinite(scale):
        raise InvalidConfigError(f"loss_scale {scale!r} is not a positive number")
    if name is not None:
        if name not in LOSSES:
            raise InvalidConfigError(f"loss {name!r} is not one of {sorted(LOSSES)}")
        fn = LOSSES[name]
        return lambda pred, label: fn(pred, label, scale)
    if output_kind != "auto":
        fn = LOSSES[DEFAULT_LOSS[output_kind]]
        return lambda pred, label: fn(pred, label, scale)

    def auto(pred, label):
        return LOSSES[DEFAULT_LOSS[detect_kind(pred)]](pred, label, scale)

    return auto
