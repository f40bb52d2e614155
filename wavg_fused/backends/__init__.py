"""Backends: ``registry`` decides which one runs; each backend module implements ``base.Backend``."""

from .registry import available_backends, backend_report, select_backend

__all__ = ["available_backends", "backend_report", "select_backend"]
