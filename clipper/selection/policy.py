"""The selection policy interface and the registry of policies.

A policy decides, per query, which of an application's models answer it and
how their answers combine; from feedback it learns which models to trust.
It has the four operations of the Clipper paper (section 5)::

    init()                                   -> state
    select(state, x)                         -> [model, ...]
    combine(state, x, predictions)           -> (output, confidence)
    observe(state, x, label, predictions)    -> state

One policy object serves one application (it knows the linked models and the
options); everything it learns lives in the *state*, one per application and
user, which the frontend keeps in its state store. A state must be plain data
that msgpack can carry: dicts with str keys, lists, numbers, strings.

``predictions`` maps a model's name (as linked to the application) to its
answer, for the models that answered; a model that failed or was too late is
absent. ``combine`` is never called with an empty mapping (the frontend
answers the default output then).

Write your own by subclassing :class:`Policy` and registering it::

    @register_policy("always-first")
    class AlwaysFirst(Policy):
        learns = False
        def init(self): return {}
        def select(self, state, x): return [self.models[0]]
        def combine(self, state, x, predictions): return next(iter(predictions.values())), 1.0
        def observe(self, state, x, label, predictions): return state

or name it in an application's config as ``policy = "package.module:Class"``.
"""

from __future__ import annotations

import importlib
import math
import random
from typing import Any, Callable, Sequence

from ..errors import InvalidConfigError
from .combine import DEFAULT_TOLERANCE, check_output_kind, combine
from .losses import make_loss

__all__ = ["Policy", "register_policy", "get_policy_class", "make_policy", "policy_names", "Option"]


class Option:
    """A documented, validated policy option: a number in ``[lo, hi]``."""

    def __init__(self, default: float, lo: float, hi: float, doc: str, *, integer: bool = False,
                 lo_open: bool = False) -> None:
        self.default, self.lo, self.hi, self.doc, self.integer, self.lo_open = default, lo, hi, doc, integer, lo_open

    def check(self, name: str, value) -> float:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if ok and self.integer:
            ok = float(value).is_integer()
        if ok:
            ok = (self.lo < value if self.lo_open else self.lo <= value) and value <= self.hi
        if not ok:
            kind = "an integer" if self.integer else "a number"
            raise InvalidConfigError(
                f"policy option {name} = {value!r} is not {kind} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]")
        return int(value) if self.integer else float(value)


# Options every policy takes: how answers combine and how losses are measured.
COMMON_OPTIONS = {
    "loss_scale": Option(1.0, 0.0, 1e300, "absolute losses are divided by this, then clipped to 1", lo_open=True),
    "missing_loss": Option(1.0, 0.0, 1.0, "the loss of a model that did not answer in time"),
    "tolerance": Option(DEFAULT_TOLERANCE, 0.0, 1e300,
                        "numbers and vectors within this of the combined answer agree with it"),
    "seed": Option(-1, -1, 2**63 - 1, "seed of the policy's random draws (-1: from the OS)", integer=True),
}


class Policy:
    """Base class of selection policies (see the module docstring).

    Attributes:
        name: the name the policy is registered under.
        learns: False when ``observe`` never changes the state; the frontend
            then answers feedback at once, without asking any model.
        OPTIONS: the policy's own options (name -> :class:`Option`), on top
            of the common ``loss_scale``, ``missing_loss``, ``tolerance``
            and ``seed``.
        models: the application's linked models, in link order.
        output_kind: ``auto``, ``label``, ``number``, ``vector`` or
            ``probabilities`` (see :mod:`clipper.selection.combine`).
        loss: ``(prediction, label) -> [0, 1]``.
    """

    name = "base"
    learns = True
    OPTIONS: dict[str, Option] = {}

    def __init__(self, models: Sequence[str], *, output_kind: str = "auto", loss: str | None = None,
                 options: dict | None = None) -> None:
        if not models:
            raise InvalidConfigError(f"policy {self.name!r} needs at least one model")
        self.models = list(models)
        self.output_kind = check_output_kind(output_kind)
        opts = dict(options or {})
        known = {**COMMON_OPTIONS, **self.OPTIONS}
        unknown = set(opts) - set(known)
        if unknown:
            raise InvalidConfigError(
                f"unknown option(s) {sorted(unknown)} for policy {self.name!r}; it takes {sorted(known)}")
        self.options = {k: o.check(k, opts[k]) if k in opts else o.default for k, o in known.items()}
        self.loss_name = loss
        self.loss: Callable[[Any, Any], float] = make_loss(loss, self.output_kind, self.options["loss_scale"])
        self.missing_loss = self.options["missing_loss"]
        self.tolerance = self.options["tolerance"]
        seed = self.options["seed"]
        self.rng = random.Random(None if seed < 0 else seed)

    @property
    def mergeable(self) -> bool:
        """Whether the numbers of this policy's state are sums of per-feedback steps, so that updates
        made by several frontends at once may be merged by adding each one's difference
        (:func:`clipper.store.states.merge_states`). False (the default for a policy of your own): with a
        shared store the last write of a user's state wins."""
        return False

    # -- the four operations
    def init(self) -> dict:
        """The state of a user the policy has not seen."""
        raise NotImplementedError

    def select(self, state: dict, x) -> list[str]:
        """The models to ask for query ``x`` (a non-empty subset of ``self.models``)."""
        raise NotImplementedError

    def combine(self, state: dict, x, predictions: dict[str, Any]) -> tuple[Any, float]:
        """One output and its confidence in [0, 1] from the models that answered."""
        names = [m for m in self.models if m in predictions]
        return combine(self.output_kind, [predictions[m] for m in names], None, self.tolerance)

    def observe(self, state: dict, x, label, predictions: dict[str, Any]) -> dict:
        """The state after learning that ``label`` was the right answer for ``x``."""
        raise NotImplementedError

    # -- helpers for feedback
    def feedback_models(self, state: dict, x) -> list[str]:
        """The models whose predictions ``observe`` needs for feedback on ``x`` (default: ``select``'s)."""
        return self.select(state, x)

    def losses(self, label, predictions: dict[str, Any], models: Sequence[str]) -> dict[str, float]:
        """Each model's loss, ``missing_loss`` for those without a prediction."""
        out = {}
        for m in models:
            if m in predictions:
                out[m] = float(self.loss(predictions[m], label))
            else:
                out[m] = self.missing_loss
        return out

    def describe(self) -> dict:
        return {"policy": self.name, "models": list(self.models), "output_kind": self.output_kind,
                "loss": self.loss_name, "options": dict(self.options)}


_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(name: str, cls: type[Policy] | None = None):
    """Register a :class:`Policy` subclass under ``name`` (usable as a decorator)."""

    def do(c: type[Policy]) -> type[Policy]:
        if not (isinstance(c, type) and issubclass(c, Policy)):
            raise TypeError(f"{c!r} is not a subclass of clipper.selection.Policy")
        c.name = name
        _REGISTRY[name] = c
        return c

    return do(cls) if cls is not None else do


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def get_policy_class(spec: str) -> type[Policy]:
    """A registered name (``"exp4"``) or an import path (``"package.module:Class"``)."""
    if not isinstance(spec, str) or not spec:
        raise InvalidConfigError(f"policy {spec!r} is not a policy name or a module:Class path")
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" not in spec:
        raise InvalidConfigError(f"policy {spec!r} is not one of {policy_names()} nor a module:Class path")
    mod_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except Exception as exc:
        raise InvalidConfigError(f"policy {spec!r} cannot be imported: {type(exc).__name__}: {exc}") from None
    if not (isinstance(obj, type) and issubclass(obj, Policy)):
        raise InvalidConfigError(f"policy {spec!r} is not a subclass of clipper.selection.Policy")
    return obj


def make_policy(spec: str, models: Sequence[str], *, output_kind: str = "auto", loss: str | None = None,
                options: dict | None = None) -> Policy:
    """Build the policy ``spec`` for an application with ``models`` linked."""
    cls = get_policy_class(spec)
    if options is not None and not isinstance(options, dict):
        raise InvalidConfigError(f"policy_options {options!r} is not a table of option = value")
    return cls(models, output_kind=output_kind, loss=loss, options=options)
