"""The policies Clipper ships: a single model, Exp3, Exp4 and UCB1.

Step sizes follow the Clipper paper (Crankshaw et al., NSDI 2017, section
5.1 and its simulations): ``eta = 0.05`` for Exp3 and ``eta = 0.2`` for Exp4.
Weights are kept as log-weights relative to the largest (so they never
underflow), and never fall below ``min_weight`` times the largest: a model
that failed for a while can win back its place once it recovers, in about
``ln(1 / min_weight) / (eta * loss difference)`` labelled queries.
"""

from __future__ import annotations

import math
from typing import Any

from .combine import combine
from .policy import Option, Policy, register_policy

__all__ = ["MISSING", "SingleModel", "Exp3", "Exp4", "UCB1"]


class _Missing:
    """Stands for the prediction of a model that was asked but did not answer."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING = _Missing()


def answered(predictions: dict) -> dict:
    """The predictions without the MISSING ones."""
    return {m: p for m, p in predictions.items() if p is not MISSING}


@register_policy("single")
class SingleModel(Policy):
    """The first linked model answers every query; feedback changes nothing."""

    learns = False

    def init(self) -> dict:
        return {}

    def select(self, state, x) -> list[str]:
        return [self.models[0]]

    def combine(self, state, x, predictions) -> tuple[Any, float]:
        for m in self.models:
            if m in predictions:
                return predictions[m], 1.0
        return next(iter(predictions.values())), 1.0

    def observe(self, state, x, label, predictions) -> dict:
        return state

    def feedback_models(self, state, x) -> list[str]:
        return []


_MIN_WEIGHT = Option(1e-3, 0.0, 1.0, "no weight falls below this fraction of the largest (0: no floor)")


class _Weighted(Policy):
    """Log-weights per model: ``state = {"logw": {model: float}, "updates": int}``."""

    mergeable = True  # log-weights move by a sum of per-feedback steps

    def init(self) -> dict:
        return {"logw": {m: 0.0 for m in self.models}, "updates": 0}

    def log_weights(self, state) -> list[float]:
        """Log-weights in link order; a model the state has not met starts at the mean of the others."""
        logw = state.get("logw", {}) if state else {}
        known = [logw[m] for m in self.models if m in logw]
        start = sum(known) / len(known) if known else 0.0
        return [float(logw.get(m, start)) for m in self.models]

    def weights(self, state) -> list[float]:
        lw = self.log_weights(state)
        top = max(lw)
        return [math.exp(v - top) for v in lw]

    def _normalized(self, lw: list[float]) -> dict:
        top = max(lw)
        floor = self.options["min_weight"]
        low = math.log(floor) if floor > 0 else -math.inf
        return {m: max(v - top, low) for m, v in zip(self.models, lw)}

    def _updated(self, state, lw: list[float]) -> dict:
        return {"logw": self._normalized(lw), "updates": int(state.get("updates", 0) if state else 0) + 1}


@register_policy("exp3")
class Exp3(_Weighted):
    """Exp3: one model per query, drawn with probability from its weight.

    ``p_i = (1 - gamma) * w_i / sum(w) + gamma / K``. Feedback draws a model
    from the same distribution and, with its loss ``L``, sets
    ``w_i <- w_i * exp(-eta * L / p_i)`` (the importance-weighted estimate of
    the loss: unbiased, so each model's weight falls by ``eta`` times its
    expected loss per labelled query).
    """

    OPTIONS = {
        "eta": Option(0.05, 0.0, 100.0, "step size (the paper: 0.05)", lo_open=True),
        "gamma": Option(0.0, 0.0, 1.0, "share of uniform exploration in the draw"),
        "min_weight": _MIN_WEIGHT,
    }

    def probabilities(self, state) -> list[float]:
        w = self.weights(state)
        total = sum(w)
        if not total > 0:  # cannot happen with min_weight > 0; with 0, weights may underflow
            w, total = [1.0] * len(w), float(len(w))
        g = self.options["gamma"]
        k = len(w)
        return [(1 - g) * wi / total + g / k for wi in w]

    def _draw(self, state) -> str:
        p = self.probabilities(state)
        return self.rng.choices(self.models, weights=p, k=1)[0]

    def select(self, state, x) -> list[str]:
        return [self._draw(state)]

    def combine(self, state, x, predictions) -> tuple[Any, float]:
        return next(iter(predictions.values())), 1.0

    def observe(self, state, x, label, predictions) -> dict:
        lw = self.log_weights(state)
        p = self.probabilities(state)
        eta = self.options["eta"]
        losses = self.losses(label, answered(predictions), [m for m in predictions if m in self.models])
        for i, m in enumerate(self.models):
            if m in losses:
                lw[i] -= eta * losses[m] / p[i]
        return self._updated(state, lw)


@register_policy("exp4")
class Exp4(_Weighted):
    """Exp4: every model answers; the answers combine weighted by ``w``.

    Feedback asks every model and sets ``w_i <- w_i * exp(-eta * L_i)``.
    Confidence is the weight share of the models that agree with the
    combined answer.
    """

    OPTIONS = {
        "eta": Option(0.2, 0.0, 100.0, "step size (the paper: 0.2)", lo_open=True),
        "min_weight": _MIN_WEIGHT,
    }

    def select(self, state, x) -> list[str]:
        return list(self.models)

    def combine(self, state, x, predictions) -> tuple[Any, float]:
        w = self.weights(state)
        names, outs, ws = [], [], []
        for m, wi in zip(self.models, w):
            if m in predictions:
                names.append(m)
                outs.append(predictions[m])
                ws.append(wi)
        return combine(self.output_kind, outs, ws, self.tolerance)

    def observe(self, state, x, label, predictions) -> dict:
        lw = self.log_weights(state)
        eta = self.options["eta"]
        losses = self.losses(label, answered(predictions), [m for m in predictions if m in self.models])
        for i, m in enumerate(self.models):
            if m in losses:
                lw[i] -= eta * losses[m]
        return self._updated(state, lw)


@register_policy("ucb1")
class UCB1(Policy):
    """UCB1: the model with the best upper confidence bound on its reward answers.

    Reward is ``1 - loss``. A model not yet tried goes first; then the one
    with the largest ``mean_i + c * sqrt(ln(n) / n_i)`` (``n`` labelled
    queries in all, ``n_i`` of model ``i``; ``c = sqrt(2)`` is Auer et al.'s
    UCB1). Feedback asks the model UCB1 would pick now and updates it.
    ``discount`` < 1 makes it forget: before each update every count and sum
    is multiplied by it (discounted UCB, for models whose quality changes).
    State: ``{"n": {model: count}, "reward": {model: sum}}``.
    """

    OPTIONS = {
        "c": Option(math.sqrt(2.0), 0.0, 100.0, "width of the confidence bound"),
        "discount": Option(1.0, 0.0, 1.0, "forgetting factor per update (1: none)", lo_open=True),
    }

    @property
    def mergeable(self) -> bool:
        return self.options["discount"] == 1.0  # counts and sums; a discount multiplies them

    def init(self) -> dict:
        return {"n": {m: 0.0 for m in self.models}, "reward": {m: 0.0 for m in self.models}}

    def scores(self, state) -> list[float]:
        n = state.get("n", {}) if state else {}
        r = state.get("reward", {}) if state else {}
        total = sum(float(n.get(m, 0.0)) for m in self.models)
        c = self.options["c"]
        out = []
        for m in self.models:
            nm = float(n.get(m, 0.0))
            if nm <= 0:
                out.append(math.inf)
            else:
                out.append(float(r.get(m, 0.0)) / nm + c * math.sqrt(math.log(max(total, 1.0)) / nm))
        return out

    def select(self, state, x) -> list[str]:
        s = self.scores(state)
        return [self.models[max(range(len(s)), key=s.__getitem__)]]

    def combine(self, state, x, predictions) -> tuple[Any, float]:
        return next(iter(predictions.values())), 1.0

    def observe(self, state, x, label, predictions) -> dict:
        d = self.options["discount"]
        n = {m: float((state or {}).get("n", {}).get(m, 0.0)) * d for m in self.models}
        r = {m: float((state or {}).get("reward", {}).get(m, 0.0)) * d for m in self.models}
        losses = self.losses(label, answered(predictions), [m for m in predictions if m in self.models])
        for m, loss in losses.items():
            n[m] += 1.0
            r[m] += 1.0 - loss
        return {"n": n, "reward": r}
