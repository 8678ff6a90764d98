"""Argument checks shared by the backbone builders and norm layers."""
from __future__ import annotations


def check_positive_int(name: str, value) -> None:
    """ValueError naming ``name`` unless ``value`` is a positive int (a bool is not: ``True`` is no size)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
