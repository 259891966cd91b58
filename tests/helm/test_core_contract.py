"""The chart against the real core: its routes, its settings loader, its key and edge files, its metric names."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from core_server.app import create_app
from core_server.metrics import CoreMetrics
from tests.helm.helm_render import CHART_DIR, VARIANTS, Rendered, render, rendered_variant
from veil.identity import fingerprint, private_pem, public_text, write_private_key
from veil.settings import Settings, load_settings

# The core's API port (core_server/app.py); /metrics is served on its own port, not here.
CORE_ROUTES = {
    "/v1/sessions",  # POST: the sealed hello
    "/v1/sessions/{sid:str}/step",  # POST: a sealed step
    "/v1/sessions/{sid:str}",  # DELETE: a sealed close
    "/v1/info",
    "/healthz",
    "/readyz",
}
METRICS_PORT = 9100
# Sections of Settings the core process reads (besides `home`); the chart sets nothing else.
CORE_SECTIONS = ("core", "locker", "log", "bundle", "model")


def core_routes(home: Path) -> set[str]:
    write_private_key(home / "core.key", x25519.X25519PrivateKey.generate())
    return {route.path for route in create_app(Settings(home=str(home))).routes}


def metric_names() -> set[str]:
    return {metric.name for metric in CoreMetrics().registry.collect()}


def known_env_names() -> set[str]:
    settings = Settings()
    return {
        f"VEIL_{section}_{field.name}".upper()
        for section in CORE_SECTIONS
        for field in dataclasses.fields(getattr(settings, section))
    }


def core_container(rendered: Rendered) -> dict[str, Any]:
    return rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_probes_use_the_api_port_and_the_scrape_the_metrics_port(tmp_path: Path) -> None:
    routes = core_routes(tmp_path)
    assert routes == CORE_ROUTES
    assert "/metrics" not in routes
    rendered = rendered_variant("default")
    container = core_container(rendered)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = load_settings(environ=rendered.one("ConfigMap", "veil-core")["data"])
    assert ports == {"http": settings.core.port, "metrics": METRICS_PORT}
    assert settings.core.metrics_port == METRICS_PORT and settings.core.metrics_host == "0.0.0.0"
    probes = {p: container[p]["httpGet"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {p["path"] for p in probes.values()} == {"/healthz", "/readyz"} <= routes
    assert all(p["port"] == "http" for p in probes.values())
    # every scraper: the ServiceMonitor (through the metrics Service) and the pod annotations
    (endpoint,) = rendered.one("ServiceMonitor")["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    (service_port,) = rendered.one("Service", "veil-core-metrics")["spec"]["ports"]
    assert (service_port["name"], service_port["port"], service_port["targetPort"]) == (
        "metrics",
        METRICS_PORT,
        "metrics",
    )
    annotations = rendered.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_core_loads_the_rendered_settings(variant: str) -> None:
    rendered = rendered_variant(variant)
    data = rendered.one("ConfigMap", "veil-core")["data"]
    unknown = set(data) - known_env_names()
    assert not unknown, f"the core would ignore {unknown}"
    settings = load_settings(environ=data)
    container = core_container(rendered)
    assert settings.core.host == "0.0.0.0"
    assert settings.core.port == container["ports"][0]["containerPort"]
    bundle_mount = next(m for m in container["volumeMounts"] if m["name"] == "bundle")
    assert settings.core.bundle == bundle_mount["mountPath"]
    values = VARIANTS[variant].get("core", {})
    assert settings.core.device == values.get("device", "cuda")
    assert (settings.core.dtype, settings.core.quantize) == (values.get("dtype", "auto"), values.get("quantize", "none"))
    assert settings.core.max_sessions == values.get("maxSessions", 64)
    assert settings.core.locker_after_seconds == values.get("lockerAfterSeconds", 30)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for path in (settings.core.identity_key_file, settings.core.allowed_edges):
        assert str(Path(path).parent) in mounts, path
    if variant == "locker":
        assert (settings.locker.ttl_seconds, settings.locker.max_snapshot_bytes) == (1800, 268435456)


def _files_of(rendered: Rendered, root: Path) -> dict[str, str]:
    """Write each Secret the core mounts under `root` as the pod would see it; -> its env, paths moved there."""
    spec = rendered.one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in core_container(rendered)["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        data = rendered.one("Secret", secret["secretName"])["data"]
        for item in secret["items"]:
            path = root / mount["mountPath"].lstrip("/") / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base64.b64decode(data[item["key"]]))
    env = dict(rendered.one("ConfigMap", "veil-core")["data"])
    return {k: str(root / v.lstrip("/")) if v.startswith("/etc/veil/") else v for k, v in env.items()}


def test_the_core_starts_from_the_keys_and_edges_the_chart_renders(tmp_path: Path) -> None:
    current, previous = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    alice, bob = x25519.X25519PrivateKey.generate().public_key(), x25519.X25519PrivateKey.generate().public_key()
    bob_pem = bob.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    rendered = render(
        {
            "identity": {
                "privateKey": private_pem(current).decode(),
                "previous": {"privateKey": private_pem(previous).decode()},
            },
            "enrollment": {
                "allowedEdges": [
                    {"name": "alice-laptop", "publicKey": public_text(alice), "maxSessions": 16},
                    {"name": "bob.pem", "publicKey": bob_pem},
                ]
            },
            "core": {"maxSessions": 32},
        }
    )
    env = _files_of(rendered, tmp_path)
    settings = load_settings(environ={**env, "VEIL_HOME": str(tmp_path / "home")})
    state = create_app(settings).state
    # /v1/info lists the current key first, then the one being rotated out
    assert [fingerprint(i.public) for i in state.identities] == [
        fingerprint(current.public_key()),
        fingerprint(previous.public_key()),
    ]
    edges = {e.name: e.max_sessions for e in state.edges.values()}
    assert edges == {"alice-laptop": 16, "bob.pem": 32}  # no maxSessions: core.maxSessions


def test_settings_the_core_rejects_fail_at_install_instead() -> None:
    # Each would crash the core at start-up; the chart refuses them first.
    for values in (
        {"core": {"maxSessions": 0}},
        {"core": {"device": "tpu"}},
        {"core": {"quantize": "int4"}},
        {"core": {"dtype": "int8"}},
        {"core": {"port": 0}},
        {"core": {"lockerAfterSeconds": 0}},
        {"locker": {"enabled": True, "ttlSeconds": 0}},
        {"locker": {"enabled": True, "maxSnapshotBytes": 0}},
        {"metrics": {"port": 0}},
    ):
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
