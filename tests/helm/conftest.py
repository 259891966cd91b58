"""Fixtures for the chart tests: every variant rendered once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helm_render import (  # noqa: E402
    CI_DIR,
    PROMETHEUS_OPERATOR_API,
    Rendered,
    load_values,
    render,
)

# "default" is values.yaml alone; the rest are the chart's ci/ values files.
VARIANTS: dict[str, dict] = {"default": {}}
VARIANTS.update({p.name.removesuffix("-values.yaml"): load_values(p) for p in sorted(CI_DIR.glob("*-values.yaml"))})

_cache: dict[tuple[str, bool], Rendered] = {}


def rendered_variant(variant: str, *, operator: bool = True) -> Rendered:
    """Render a variant; `operator` says whether the Prometheus operator's API exists."""
    key = (variant, operator)
    if key not in _cache:
        api = (PROMETHEUS_OPERATOR_API,) if operator else ()
        _cache[key] = render(VARIANTS[variant] or None, api_versions=api)
    return _cache[key]


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def rendered(variant: str) -> Rendered:
    return rendered_variant(variant)
