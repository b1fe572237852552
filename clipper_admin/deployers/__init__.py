"""The original's deployers: ``clipper_admin.deployers.python`` (functions and closures)."""
