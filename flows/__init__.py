"""Prefect flows: ``audit_model`` and ``audit_zoo`` (DESIGN.md §2)."""

from .audit_model import audit_model
from .audit_zoo import audit_zoo

__all__ = ["audit_model", "audit_zoo"]
