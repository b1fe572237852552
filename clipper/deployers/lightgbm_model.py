"""LightGBM boosters from their native text files (``pip install 'clipper-serving[lightgbm]'``).

Save with ``booster.save_model("model.txt")`` (an ``LGBMClassifier``'s is
``model.booster_``). The input shape is the booster's ``num_feature()``, the
input dtype float64 (LightGBM's own; float32 on request). Predictions run
with ``num_threads`` threads (option, default 1). Outputs by objective: see
:mod:`clipper.deployers._boosters`.
"""

from __future__ import annotations

from ..errors import InvalidConfigError
from ._base import Deployment, FileModel, booster_deployment, check_file, check_options, require
from ._boosters import converter

__all__ = ["LightGBMModel", "inspect_lightgbm", "load_booster"]

ENTRY = "clipper.deployers.lightgbm_model:LightGBMModel"
EXTRA = "lightgbm"
SUFFIXES = (".txt", ".lgb", ".model")
DEFAULTS = {"num_threads": 1}


def load_booster(path: str):
    lgb = require("lightgbm", EXTRA)
    try:
        return lgb.Booster(model_file=path)
    except Exception as exc:
        raise InvalidConfigError(f"lightgbm cannot load {path!r}: {type(exc).__name__}: {exc}") from None


def family(booster) -> tuple[str, str]:
    objective = str(booster.params.get("objective", ""))
    if not objective:  # older files: the header line "objective=multiclass num_class:3"
        for line in booster.model_to_string(num_iteration=0).splitlines()[:64]:
            if line.startswith("objective="):
                objective = line.split("=", 1)[1].split()[0]
                break
    if objective in ("multiclass", "softmax", "multiclassova", "multiclass_ova", "ova", "ovr"):
        return "multiprob", objective
    if objective in ("binary", "cross_entropy", "xentropy"):
        return "binary", objective
    return "other", objective or "unknown"


def inspect_lightgbm(path, *, input_dtype: str | None = None, input_shape=None, output: str | None = None,
                     options: dict | None = None) -> Deployment:
    path = check_file(path, "LightGBM", SUFFIXES)
    check_options("lightgbm", options, DEFAULTS)
    booster = load_booster(path)
    fam, objective = family(booster)
    kind, _ = converter(fam, output, f"a LightGBM booster with objective {objective}")
    return booster_deployment("lightgbm", "LightGBM", path, ENTRY, booster.num_feature(), objective, kind,
                              input_dtype, input_shape, "float64", options)


class LightGBMModel(FileModel):
    """A container predictor running a LightGBM booster (see the module's docstring)."""

    kind = "lightgbm"
    extra = EXTRA
    defaults = DEFAULTS

    def load(self) -> "LightGBMModel":
        self.booster = load_booster(self.path)
        fam, objective = family(self.booster)
        self.output, self._convert = converter(fam, self.output, f"a LightGBM booster with objective {objective}")
        self._threads = self.options["num_threads"]
        return self

    def predict(self, batch):
        return self._convert(self.booster.predict(batch, num_threads=self._threads))
