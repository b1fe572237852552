"""The container SDK: what a model author writes and runs.

Write ``predict(batch) -> outputs`` (one output per input; numbers, strings,
bytes or numpy arrays), or a class with ``predict`` and an optional ``load``,
then start it with::

    python -m clipper.container mymodule:predict --name digits --version 1

The batch is a read-only numpy array of shape ``(n, *input_shape)`` for
numeric applications, or a list of ``bytes``/``str`` for those input types.
"""

from .runtime import ContainerRuntime, LoadError, load_predictor, serve

__all__ = ["ContainerRuntime", "LoadError", "load_predictor", "serve"]
