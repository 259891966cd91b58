"""Form values, which are hostile: every one is checked for type and range, and a bad one is a 400 naming
the field (never echoing the value)."""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

from multidict import MultiMapping

from veil.errors import InvalidRequest

_WHOLE = re.compile(r"^\d{1,15}$")
_NUMBER = re.compile(r"^\d{1,6}(\.\d{1,6})?$")
Fields = MultiMapping[Any]  # a submitted form or a query string


def text(form: Fields, name: str, *, max_len: int = 200, strip: bool = True) -> str:
    value = form.get(name, "")
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be text", param=name)
    value = value.strip() if strip else value
    if len(value) > max_len:
        raise InvalidRequest(f"{name} must be at most {max_len} characters", param=name)
    return value


def whole(form: Fields, name: str, *, low: int = 1, high: int = 10**15) -> int | None:
    """A whole number in [low, high], or None when the field is empty."""
    value = text(form, name, max_len=20)
    if not value:
        return None
    if not _WHOLE.match(value) or not low <= int(value) <= high:
        raise InvalidRequest(f"{name} must be a whole number from {low} to {high}, or empty", param=name)
    return int(value)


def number(form: Fields, name: str, *, high: float) -> float | None:
    """A non-negative decimal number up to `high`, or None when the field is empty."""
    value = text(form, name, max_len=20)
    if not value:
        return None
    if not _NUMBER.match(value) or not math.isfinite(float(value)) or float(value) > high:
        raise InvalidRequest(f"{name} must be a number from 0 to {high:g}, or empty", param=name)
    return float(value)


def picks(form: Fields, name: str, allowed: Iterable[str]) -> list[str]:
    """The ticked boxes (or chosen options) of `name`, each one of `allowed`."""
    allowed = set(allowed)
    values = form.getall(name) if name in form else []
    if any(not isinstance(v, str) or v not in allowed for v in values):
        raise InvalidRequest(f"{name} must be some of {', '.join(sorted(allowed))}", param=name)
    return list(dict.fromkeys(values))


def choice(form: Fields, name: str, allowed: Iterable[str]) -> str:
    value = text(form, name, max_len=50)
    allowed = tuple(allowed)
    if value not in allowed:
        raise InvalidRequest(f"{name} must be one of {', '.join(allowed)}", param=name)
    return value


def lines(form: Fields, name: str, *, max_len: int = 20_000) -> list[str]:
    """One entry per non-empty line (guardrail terms)."""
    return [line.strip() for line in text(form, name, max_len=max_len).splitlines() if line.strip()]
