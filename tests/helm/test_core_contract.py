"""The chart against the real core: its routes, its settings loader, its metric names."""

from __future__ import annotations

import json
import re

import pytest

from core_server.app import create_app
from core_server.metrics import CoreMetrics
from tests.helm.helm_render import CHART_DIR, VARIANTS, render, rendered_variant
from veil.settings import Settings, load_settings

# Settings the chart sets ahead of the core reading them (later issues).
NOT_YET_READ = {"VEIL_CORE_IDENTITY_KEY_FILE", "VEIL_LOCKER_REDIS_URL", "VEIL_LOCKER_REDIS_PASSWORD_FILE"}


def core_routes() -> set[str]:
    return {route.path for route in create_app(Settings()).routes}


def metric_names() -> set[str]:
    return {metric.name for metric in CoreMetrics().registry.collect()}


def known_env_names() -> set[str]:
    names = set()
    for section in ("core", "log", "bundle", "model", "edge"):
        for field in getattr(Settings(), section).__slots__:
            names.add(f"VEIL_{section}_{field}".upper())
    return names


def test_probe_and_scrape_paths_are_routes_of_the_core() -> None:
    rendered = rendered_variant("default")
    container = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    paths = {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    paths.add(rendered.one("ServiceMonitor")["spec"]["endpoints"][0]["path"])
    assert paths == {"/healthz", "/readyz", "/metrics"}
    assert paths <= core_routes()


def test_core_loads_the_rendered_settings(variant: str) -> None:
    rendered = rendered_variant(variant)
    data = rendered.one("ConfigMap", "veil-core")["data"]
    unknown = set(data) - known_env_names() - NOT_YET_READ
    assert not unknown, f"the core would ignore {unknown}"
    settings = load_settings(environ=data)
    container = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert settings.core.host == "0.0.0.0"
    assert settings.core.port == container["ports"][0]["containerPort"]
    bundle_mount = next(m for m in container["volumeMounts"] if m["name"] == "bundle")
    assert settings.core.bundle == bundle_mount["mountPath"]
    values = VARIANTS[variant].get("core", {})
    assert settings.core.device == values.get("device", "cuda")
    assert settings.core.max_sessions == values.get("maxSessions", 64)


def test_settings_the_core_rejects_fail_at_install_instead() -> None:
    # Each would crash the core at start-up; the chart refuses them first.
    for values in ({"core": {"maxSessions": 0}}, {"core": {"device": "tpu"}}, {"core": {"port": 0}}):
        with pytest.raises(Exception, match="values don't meet the specifications"):
            render(values)


def test_dashboard_and_autoscaler_use_metrics_the_core_exports() -> None:
    exported = metric_names()
    dashboard = json.loads((CHART_DIR / "dashboards" / "veil-core.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\bveil_core_[a-z_]+", target["expr"]))
    used = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    used = {name.removesuffix("_total") for name in used}
    assert used <= exported, used - exported
    hpa = rendered_variant("autoscaling").one("HorizontalPodAutoscaler")
    pods_metric = next(m for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    assert pods_metric["pods"]["metric"]["name"] in exported
