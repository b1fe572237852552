"""The embedded registry: applications, models and their versions, links.

Plain data with validation. The :class:`~clipper.frontend.Frontend` applies
changes to the running query path; this module only decides what is valid.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidConfigError, UnknownApplicationError, UnknownModelError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
NAME_RULE = "1-128 characters of letters, digits, '_', '.', '-', starting with a letter or digit"

# Application input types: numpy dtypes with a fixed shape, or variable-size bytes / str.
NUMERIC_DTYPES = {
    name: np.dtype(name).newbyteorder("<") if np.dtype(name).itemsize > 1 else np.dtype(name)
    for name in ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                 "float16", "float32", "float64")
}
OPAQUE_DTYPES = ("bytes", "str")
INPUT_DTYPES = tuple(NUMERIC_DTYPES) + OPAQUE_DTYPES
MAX_SLO_MS = 3_600_000.0
MAX_REPLICAS = 64
MAX_BATCH = 65_536
BATCHING_MODES = ("aimd", "quantile", "fixed")
MAX_BATCH_DELAY_MS = 1000.0
# A dimension of an input shape that may have any length (``[-1]``: a vector of any length, what the
# original Clipper's input types are). Such inputs are bounded by max_input_bytes alone.
FREE_DIM = -1
MAX_DESCRIPTION_CHARS = 4096  # an application's description
MAX_WORKDIR_CHARS = 4096  # a model version's workdir (Linux's PATH_MAX)


def check_name(kind: str, value) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidConfigError(f"{kind} {value!r} is not a valid name: {NAME_RULE}")
    return value


def check_version(value) -> str:
    """A model version as callers give it: a string, or a non-negative integer (``2`` is version ``"2"``).

    Any other type is refused rather than turned into text: ``null`` would deploy version ``"None"``.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidConfigError(f"model version {value!r} is not a string or an integer")
    if isinstance(value, int):
        if not 0 <= value < 10**128:  # (str() of a huge integer would raise, and no name is that long)
            shown = value if abs(value) < 10**128 else "of more than 128 digits"
            raise InvalidConfigError(f"model version {shown} is not an integer in [0, 10**128)")
        value = str(value)
    return check_name("model version", value)


def _check_no_nul(what: str, value: str, key: str) -> None:
    # A NUL cannot reach exec(), a folder name or the environment: the container would never start.
    if "\0" in value:
        raise InvalidConfigError(f"{what} {value!r} of model {key} holds a NUL character")


def check_dtype(value) -> str:
    if value not in INPUT_DTYPES:
        raise InvalidConfigError(f"input dtype {value!r} is not supported; expected one of {list(INPUT_DTYPES)}")
    return value


def check_shape(dtype: str, value) -> tuple[int, ...]:
    if dtype in OPAQUE_DTYPES:
        if value not in (None, (), []):
            raise InvalidConfigError(f"input shape {value!r} given for dtype {dtype!r}; {dtype} inputs have no shape")
        return ()
    if value is None:
        raise InvalidConfigError(f"dtype {dtype!r} needs an input shape, e.g. [784]")
    try:
        shape = tuple(value)
    except TypeError:
        raise InvalidConfigError(f"input shape {value!r} is not a list of positive integers") from None
    if len(shape) > 32 or not all(isinstance(d, int) and not isinstance(d, bool) and (0 < d <= 2**31 or d == FREE_DIM)
                                  for d in shape):
        raise InvalidConfigError(f"input shape {value!r} is not a list of at most 32 positive integers "
                                 f"(or {FREE_DIM} for a dimension of any length)")
    return shape


def is_variable(shape) -> bool:
    """True when ``shape`` leaves a dimension free (``-1``: any length, as the original Clipper's vectors)."""
    return FREE_DIM in shape


def _check_ms(label: str, value, lo: float, hi: float, *, zero_ok: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if ok:
        ok = (lo <= value <= hi) if zero_ok else (lo < value <= hi)
    if not ok:
        bracket = "[" if zero_ok else "("
        raise InvalidConfigError(f"{label} {value!r} is not a number in {bracket}{lo:g}, {hi:g}]")
    return float(value)


@dataclass
class Application:
    """An application: what queries look like and what it promises.

    ``slo_ms`` is the latency objective: at that deadline a query still
    without an answer gets ``default_output`` (flagged as a default).
    """

    name: str
    input_dtype: str
    input_shape: tuple[int, ...] = ()
    slo_ms: float = 100.0
    default_output: object = None
    on_deadline: str = "default"  # "default": answer default_output; "error": DEADLINE_EXCEEDED
    description: str = ""
    cache: bool = True  # look predictions up in the prediction cache (turn off for non-deterministic models)
    policy: str = "single"  # selection policy: single, exp3, exp4, ucb1, or "module:Class"
    policy_options: dict = field(default_factory=dict)  # e.g. {eta = 0.1}; see clipper.selection
    output_kind: str = "auto"  # auto, label, number, vector, probabilities: how answers combine
    loss: str | None = None  # zero_one, probability, absolute; None: the output kind's default
    confidence_threshold: float = 0.0  # below it a response is marked low_confidence
    on_low_confidence: str = "flag"  # "flag": answer and mark it; "default": answer the default output
    # A query that admission control refuses (its model cannot answer it within the SLO): "error" answers
    # OVERLOADED (REST 503 + Retry-After), "default" answers default_output at once; None: as on_deadline.
    on_overload: str | None = None
    # How the REST port answers this application's queries: "clipper" (this project's format), or
    # "original" (the original Clipper's, for applications registered through clipper_admin): str outputs
    # holding JSON are parsed, a one-item input_batch is answered as one object, errors say
    # {"error": NAME, "cause": message, "code": N}. docs/rest.md, "Coming from the original Clipper".
    rest_format: str = "clipper"

    def __post_init__(self) -> None:
        check_name("application name", self.name)
        if not isinstance(self.description, str):
            raise InvalidConfigError(f"description {self.description!r} for application {self.name!r} is not a string")
        if len(self.description) > MAX_DESCRIPTION_CHARS:
            raise InvalidConfigError(f"description for application {self.name!r} has {len(self.description)} "
                                     f"characters; at most {MAX_DESCRIPTION_CHARS}")
        if self.rest_format not in ("clipper", "original"):
            raise InvalidConfigError(f"rest_format {self.rest_format!r} is not 'clipper' or 'original'")
        if self.on_overload is None:
            self.on_overload = self.on_deadline if self.on_deadline in ("default", "error") else "error"
        if self.on_overload not in ("default", "error"):
            raise InvalidConfigError(f"on_overload {self.on_overload!r} is not 'default' or 'error'")
        if not isinstance(self.cache, bool):
            raise InvalidConfigError(f"cache {self.cache!r} for application {self.name!r} is not true or false")
        self._check_selection()
        if self.on_deadline not in ("default", "error"):
            raise InvalidConfigError(f"on_deadline {self.on_deadline!r} is not 'default' or 'error'")
        check_dtype(self.input_dtype)
        self.input_shape = check_shape(self.input_dtype, self.input_shape)
        slo = self.slo_ms
        if isinstance(slo, bool) or not isinstance(slo, (int, float)) or not (0 < slo <= MAX_SLO_MS) or math.isnan(slo):
            raise InvalidConfigError(f"slo_ms {slo!r} is not a number in (0, {MAX_SLO_MS:g}]")
        self.slo_ms = float(slo)

    def _check_selection(self) -> None:
        from ..selection.combine import check_output_kind
        from ..selection.policy import make_policy

        where = f"for application {self.name!r}"
        check_output_kind(self.output_kind)
        if self.policy_options is None:
            self.policy_options = {}
        if not isinstance(self.policy_options, dict) or not all(isinstance(k, str) for k in self.policy_options):
            raise InvalidConfigError(f"policy_options {self.policy_options!r} {where} is not a table of option = value")
        if self.on_low_confidence not in ("flag", "default"):
            raise InvalidConfigError(f"on_low_confidence {self.on_low_confidence!r} {where} is not 'flag' or 'default'")
        t = self.confidence_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or not 0 <= t <= 1:
            raise InvalidConfigError(f"confidence_threshold {t!r} {where} is not a number in [0, 1]")
        self.confidence_threshold = float(t)
        # Build the policy once over a stand-in model: checks its name, options and loss now.
        try:
            make_policy(self.policy, ["model"], output_kind=self.output_kind, loss=self.loss,
                        options=self.policy_options)
        except InvalidConfigError as exc:
            raise InvalidConfigError(f"{exc.message} ({where})") from None

    @property
    def np_dtype(self) -> np.dtype | None:
        return NUMERIC_DTYPES.get(self.input_dtype)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "input_dtype": self.input_dtype,
            "input_shape": list(self.input_shape),
            "slo_ms": self.slo_ms,
            "default_output": self.default_output,
            "on_deadline": self.on_deadline,
            "description": self.description,
            "cache": self.cache,
            "policy": self.policy,
            "policy_options": dict(self.policy_options),
            "output_kind": self.output_kind,
            "loss": self.loss,
            "confidence_threshold": self.confidence_threshold,
            "on_low_confidence": self.on_low_confidence,
            "on_overload": self.on_overload,
            "rest_format": self.rest_format,
        }


@dataclass
class ModelVersion:
    """One deployed version of a model and how to start its containers.

    Give ``entry`` (``module:function`` or ``path/to/file.py:function`` for the
    container SDK) or ``command`` (a full argv that starts a container), or
    neither when containers are started by hand or by another manager.

    Batching: each replica's batch size is tuned after every batch by
    ``batching`` -- ``"aimd"`` (the default), ``"quantile"`` (quantile
    regression of batch latency on batch size) or ``"fixed"`` -- against the
    model's latency budget, never above ``max_batch``. The budget is
    ``latency_budget_ms`` when given, else the frontend derives it from the
    SLOs of the applications the model serves. ``batch_delay_ms`` > 0 turns on
    delayed batching: while a free replica's batch is not full and queries are
    arriving fast enough to fill it, wait up to that long from the oldest
    queued query's arrival.
    """

    name: str
    version: str
    input_dtype: str
    input_shape: tuple[int, ...] = ()
    entry: str | None = None
    command: list[str] | None = None
    replicas: int = 1
    max_batch: int = 256
    workdir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    batching: str = "aimd"
    batch_delay_ms: float = 0.0
    latency_budget_ms: float | None = None
    # A closure deployed with cloudpickle: where its file is and what made it
    # ({"python", "cloudpickle", "sha256"}); its entry is "closure:<file>".
    closure: dict | None = None

    def __post_init__(self) -> None:
        check_name("model name", self.name)
        self.version = check_version(self.version)
        check_dtype(self.input_dtype)
        self.input_shape = check_shape(self.input_dtype, self.input_shape)
        if self.entry is not None and self.command is not None:
            raise InvalidConfigError(f"model {self.key}: give entry or command, not both")
        if self.entry is not None and (not isinstance(self.entry, str) or ":" not in self.entry):
            raise InvalidConfigError(f"model entry {self.entry!r} is not of the form module:function")
        if self.entry is not None:
            _check_no_nul("entry", self.entry, self.key)
        if self.command is not None and (
            not isinstance(self.command, list) or not self.command or not all(isinstance(a, str) for a in self.command)
        ):
            raise InvalidConfigError(f"model command {self.command!r} is not a non-empty list of strings")
        for arg in self.command or ():
            _check_no_nul("command argument", arg, self.key)
        if self.workdir is not None:
            if not isinstance(self.workdir, str):
                raise InvalidConfigError(f"workdir {self.workdir!r} for model {self.key} is not a string")
            if len(self.workdir) > MAX_WORKDIR_CHARS:
                raise InvalidConfigError(f"workdir for model {self.key} has {len(self.workdir)} characters; "
                                         f"at most {MAX_WORKDIR_CHARS}")
            _check_no_nul("workdir", self.workdir, self.key)
        for label, val, hi in (("replicas", self.replicas, MAX_REPLICAS), ("max_batch", self.max_batch, MAX_BATCH)):
            lo = 0 if label == "replicas" else 1
            if isinstance(val, bool) or not isinstance(val, int) or not lo <= val <= hi:
                raise InvalidConfigError(f"{label} {val!r} for model {self.key} is not an integer in [{lo}, {hi}]")
        if not isinstance(self.env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()):
            raise InvalidConfigError(f"env for model {self.key} must map strings to strings")
        for k, v in self.env.items():
            if not k or "=" in k:  # (the environment has no place for either: exec() would refuse it)
                raise InvalidConfigError(f"env variable name {k!r} for model {self.key} is empty or holds '='")
            _check_no_nul("env variable name", k, self.key)
            _check_no_nul(f"env value of {k!r}", v, self.key)
        if self.batching not in BATCHING_MODES:
            raise InvalidConfigError(
                f"batching {self.batching!r} for model {self.key} is not one of {list(BATCHING_MODES)}")
        self.batch_delay_ms = _check_ms(f"batch_delay_ms for model {self.key}", self.batch_delay_ms,
                                        0.0, MAX_BATCH_DELAY_MS, zero_ok=True)
        if self.latency_budget_ms is not None:
            self.latency_budget_ms = _check_ms(f"latency_budget_ms for model {self.key}", self.latency_budget_ms,
                                               0.0, MAX_SLO_MS, zero_ok=False)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "input_dtype": self.input_dtype,
            "input_shape": list(self.input_shape),
            "entry": self.entry,
            "command": self.command,
            "replicas": self.replicas,
            "max_batch": self.max_batch,
            "workdir": self.workdir,
            "env": dict(self.env),
            "batching": self.batching,
            "batch_delay_ms": self.batch_delay_ms,
            "latency_budget_ms": self.latency_budget_ms,
            "closure": dict(self.closure) if self.closure else None,
        }


@dataclass
class Model:
    name: str
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    current_version: str | None = None

    @property
    def current(self) -> ModelVersion | None:
        return self.versions.get(self.current_version) if self.current_version else None


class Registry:
    """Applications, models (with versions) and the links between them."""

    def __init__(self) -> None:
        self.applications: dict[str, Application] = {}
        self.models: dict[str, Model] = {}
        self.links: dict[str, list[str]] = {}  # application -> model names

    # -- applications
    def add_application(self, app: Application) -> Application:
        if app.name in self.applications:
            raise InvalidConfigError(f"application {app.name!r} is already registered")
        self.applications[app.name] = app
        self.links[app.name] = []
        return app

    def get_application(self, name: str) -> Application:
        try:
            return self.applications[name]
        except KeyError:
            raise UnknownApplicationError(f"no application named {name!r} is registered") from None

    def remove_application(self, name: str) -> Application:
        app = self.get_application(name)
        del self.applications[name]
        self.links.pop(name, None)
        return app

    # -- models
    def add_model_version(self, mv: ModelVersion, make_current: bool = True) -> ModelVersion:
        model = self.models.setdefault(mv.name, Model(mv.name))
        if mv.version in model.versions:
            raise InvalidConfigError(f"model {mv.key} is already deployed")
        if model.versions:
            first = next(iter(model.versions.values()))
            if (first.input_dtype, first.input_shape) != (mv.input_dtype, mv.input_shape):
                raise InvalidConfigError(
                    f"model {mv.key} takes {mv.input_dtype}{list(mv.input_shape)}; "
                    f"its other versions take {first.input_dtype}{list(first.input_shape)}"
                )
        model.versions[mv.version] = mv
        if make_current or model.current_version is None:
            model.current_version = mv.version
        return mv

    def remove_model_version(self, name: str, version: str) -> ModelVersion:
        """Forget one version; if it was current, the model has no current version until one is set."""
        mv = self.get_model_version(name, version)
        model = self.models[name]
        del model.versions[mv.version]
        if model.current_version == mv.version:
            model.current_version = None
        pinned = f"{name}:{mv.version}"
        for links in self.links.values():  # a link pinned to this version goes with it
            links[:] = [n for n in links if n != pinned]
        return mv

    def remove_model(self, name: str) -> Model:
        """Forget a model and every link to it."""
        model = self.get_model(name)
        del self.models[name]
        for links in self.links.values():
            links[:] = [n for n in links if n.partition(":")[0] != name]
        return model

    def set_current(self, name: str, version: str) -> ModelVersion:
        mv = self.get_model_version(name, version)
        self.models[name].current_version = mv.version
        return mv

    def snapshot(self) -> dict:
        """Everything, as plain data (what the state store keeps across restarts)."""
        return {
            "applications": [a.to_dict() for a in self.applications.values()],
            "models": [{"name": m.name, "current_version": m.current_version,
                        "versions": [mv.to_dict() for mv in m.versions.values()]} for m in self.models.values()],
            "links": {app: list(names) for app, names in self.links.items()},
        }

    def get_model(self, name: str) -> Model:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModelError(f"no model named {name!r} is deployed") from None

    def get_model_version(self, name: str, version: str) -> ModelVersion:
        model = self.get_model(name)
        try:
            return model.versions[str(version)]
        except KeyError:
            raise UnknownModelError(
                f"model {name!r} has no version {version!r}; it has {sorted(model.versions)}"
            ) from None

    # -- links
    def link(self, app_name: str, model_name: str, version: str | None = None) -> str:
        """Link a model to an application; returns the link's name.

        Without ``version`` the link follows the model's current version
        (its name is the model's); with one it stays on that version (its
        name is ``model:version``), so an application can link several
        versions of one model.
        """
        app = self.get_application(app_name)
        if version is None and isinstance(model_name, str) and ":" in model_name:
            model_name, _, version = model_name.partition(":")
        model = self.get_model(model_name)
        mv = model.current if version is None else self.get_model_version(model_name, version)
        if mv is not None and (mv.input_dtype, mv.input_shape) != (app.input_dtype, app.input_shape):
            raise InvalidConfigError(
                f"model {model_name!r} takes {mv.input_dtype}{list(mv.input_shape)}; application "
                f"{app_name!r} sends {app.input_dtype}{list(app.input_shape)}"
            )
        name = model_name if version is None else f"{model_name}:{version}"
        links = self.links[app_name]
        if name not in links:
            links.append(name)
        return name

    def unlink(self, app_name: str, link_name: str) -> None:
        self.get_application(app_name)
        links = self.links[app_name]
        if link_name not in links:
            raise InvalidConfigError(f"application {app_name!r} has no linked model {link_name!r}; "
                                     f"it has {links}")
        links.remove(link_name)

    def resolve_link(self, link_name: str) -> ModelVersion | None:
        """The model version a link points at now (None: no current version)."""
        name, _, version = link_name.partition(":")
        model = self.models.get(name)
        if model is None:
            return None
        return model.versions.get(version) if version else model.current

    def linked_models(self, app_name: str) -> list[str]:
        self.get_application(app_name)
        return list(self.links.get(app_name, ()))
