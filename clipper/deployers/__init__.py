"""Deployers: serve a saved model file without writing ``predict``.

Each kind is an optional extra, imported only when used::

    kind       file                                   extra                            predictor entry
    onnx       model.onnx                             clipper-serving[onnx]            onnx_model:OnnxModel
    sklearn    model.skops (or a trusted .joblib)     clipper-serving[sklearn]         sklearn_model:SklearnModel
    xgboost    model.json / model.ubj                 clipper-serving[xgboost]         xgboost_model:XGBoostModel
    lightgbm   model.txt                              clipper-serving[lightgbm]        lightgbm_model:LightGBMModel
    torch      model.pt2 (torch.export) / model.pt    clipper-serving[torch]           torch_model:TorchModel

:func:`inspect_model_file` reads a file (its input dtype and shape, what it
answers) and returns the :class:`Deployment` that serves it: an SDK container
running the kind's predictor class, with the file named in its environment.
``AdminClient.deploy_model_file`` and ``clipper deploy NAME VERSION --onnx
FILE`` use it. The file must be readable at the same path where the
frontend's containers run.
"""

from __future__ import annotations

import importlib

from ..errors import InvalidConfigError
from ._base import ENV_FILE, ENV_OPTIONS, ENV_OUTPUT, OUTPUT_KINDS, Deployment, FileModel, require

__all__ = ["KINDS", "Deployment", "FileModel", "inspect_model_file", "predictor_for", "require",
           "ENV_FILE", "ENV_OUTPUT", "ENV_OPTIONS", "OUTPUT_KINDS"]

# kind -> (module, inspect function, predictor class)
KINDS = {
    "onnx": ("onnx_model", "inspect_onnx", "OnnxModel"),
    "sklearn": ("sklearn_model", "inspect_sklearn", "SklearnModel"),
    "xgboost": ("xgboost_model", "inspect_xgboost", "XGBoostModel"),
    "lightgbm": ("lightgbm_model", "inspect_lightgbm", "LightGBMModel"),
    "torch": ("torch_model", "inspect_torch", "TorchModel"),
}


def _module(kind: str):
    if kind not in KINDS:
        raise InvalidConfigError(f"model file kind {kind!r} is not one of {list(KINDS)}")
    return importlib.import_module(f"{__name__}.{KINDS[kind][0]}")


def inspect_model_file(kind: str, path, *, input_dtype: str | None = None, input_shape=None,
                       output: str | None = None, options: dict | None = None, trusted_types=None,
                       trust_pickle: bool = False) -> Deployment:
    """Read a model file of ``kind``; the :class:`Deployment` (entry, env, input, output kind) that serves it.

    ``output`` picks the output kind (``label``, ``probabilities``,
    ``vector``, ``number``; default: what the model is); ``options`` are the
    kind's (thread counts, ...). ``trusted_types`` and ``trust_pickle`` are
    scikit-learn's (see :mod:`clipper.deployers.sklearn_model`).
    """
    mod = _module(kind)
    fn = getattr(mod, KINDS[kind][1])
    if input_shape is not None:
        input_shape = tuple(input_shape) or None
    kw = {"input_dtype": input_dtype, "input_shape": input_shape, "output": output, "options": options}
    if kind == "sklearn":
        kw.update(trusted_types=trusted_types, trust_pickle=trust_pickle)
    elif trusted_types or trust_pickle:
        raise InvalidConfigError(f"trusted types and --trust-pickle apply to scikit-learn files, not {kind}")
    return fn(path, **kw)


def predictor_for(deployment: Deployment):
    """The deployment's predictor, loaded in this process (what its container runs)."""
    mod = _module(deployment.kind)
    cls = getattr(mod, KINDS[deployment.kind][2])
    return _from_env(cls, deployment.env)


def _from_env(cls, env: dict):
    """``cls()`` loaded under ``env`` (as in its container), the process's environment restored after."""
    import os

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return cls().load()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
