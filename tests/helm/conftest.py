"""Fixtures for the chart tests: each variant (values.yaml, ci/*-values.yaml) in turn."""

from __future__ import annotations

import pytest

from tests.helm.helm_render import VARIANTS, Rendered, rendered_variant


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def rendered(variant: str) -> Rendered:
    return rendered_variant(variant)
