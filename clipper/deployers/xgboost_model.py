"""XGBoost boosters from their native files (``pip install 'clipper-serving[xgboost]'``).

Save with ``booster.save_model("model.json")`` (or ``.ubj``; an
``XGBClassifier``'s ``save_model`` writes the same file). The input shape is
the booster's ``num_features()``, the input dtype float32 (XGBoost's own;
float64 on request). Predictions go through ``inplace_predict`` (no
``DMatrix`` per batch) with ``nthread`` threads (option, default 1). Outputs
by objective: see :mod:`clipper.deployers._boosters`.
"""

from __future__ import annotations

import json

from ..errors import InvalidConfigError
from ._base import Deployment, FileModel, booster_deployment, check_file, check_options, require
from ._boosters import converter

__all__ = ["XGBoostModel", "inspect_xgboost", "load_booster"]

ENTRY = "clipper.deployers.xgboost_model:XGBoostModel"
EXTRA = "xgboost"
SUFFIXES = (".json", ".ubj")
DEFAULTS = {"nthread": 1}


def load_booster(path: str, nthread: int = 1):
    xgb = require("xgboost", EXTRA)
    booster = xgb.Booster()
    try:
        booster.load_model(path)
    except Exception as exc:
        raise InvalidConfigError(f"xgboost cannot load {path!r}: {type(exc).__name__}: {exc}") from None
    booster.set_param({"nthread": nthread})
    return booster


def family(booster) -> tuple[str, str]:
    """(output family, objective name) of a booster."""
    learner = json.loads(booster.save_config())["learner"]
    objective = learner["objective"]["name"]
    if objective == "multi:softprob":
        return "multiprob", objective
    if objective == "multi:softmax":
        return "multiclass", objective
    if objective == "binary:logistic":
        return "binary", objective
    if int(learner.get("learner_model_param", {}).get("num_target", "1")) > 1:
        return "multitarget", objective
    return "other", objective


def inspect_xgboost(path, *, input_dtype: str | None = None, input_shape=None, output: str | None = None,
                    options: dict | None = None) -> Deployment:
    path = check_file(path, "XGBoost", SUFFIXES)
    opts = check_options("xgboost", options, DEFAULTS)
    booster = load_booster(path, opts["nthread"])
    fam, objective = family(booster)
    kind, _ = converter(fam, output, f"an XGBoost booster with objective {objective}")
    return booster_deployment("xgboost", "XGBoost", path, ENTRY, booster.num_features(), objective, kind,
                              input_dtype, input_shape, "float32", options)


class XGBoostModel(FileModel):
    """A container predictor running an XGBoost booster (see the module's docstring)."""

    kind = "xgboost"
    extra = EXTRA
    defaults = DEFAULTS

    def load(self) -> "XGBoostModel":
        self.booster = load_booster(self.path, self.options["nthread"])
        fam, objective = family(self.booster)
        self.output, self._convert = converter(fam, self.output, f"an XGBoost booster with objective {objective}")
        self._predict = self.booster.inplace_predict
        return self

    def predict(self, batch):
        return self._convert(self._predict(batch))
