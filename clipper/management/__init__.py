"""Management: the registry of applications, models and links, and container managers."""

from .registry import Application, Model, ModelVersion, Registry

__all__ = ["Application", "Model", "ModelVersion", "Registry"]
