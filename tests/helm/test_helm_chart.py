"""helm/veil-core: lint, render, Kubernetes 1.30 schema validation, values.schema.json."""

from __future__ import annotations

import json
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest

from tests.helm.helm_render import (
    CHART_DIR,
    KUBE_VERSION,
    VARIANTS,
    lint,
    render,
    rendered_variant,
    validate_values,
)

K8S = KUBE_VERSION.removeprefix("v")
KEY = "x25519:" + "A" * 43
KEY2 = "x25519:" + "B" * 43
PEM = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VuBCIEI" + "E" * 43 + "\n-----END PRIVATE KEY-----\n"


def edges(**fields: object) -> dict[str, Any]:
    """Values enrolling one edge with `fields` (name "e" and KEY unless given)."""
    return {"enrollment": {"allowedEdges": [{"name": "e", "publicKey": KEY, **fields}]}}


# The Prometheus operator's CRD is not among the Kubernetes schemas; this is the
# subset of monitoring.coreos.com/v1 ServiceMonitor that the chart writes.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                "namespaceSelector": {
                    "type": "object",
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


def test_tooling_is_real_helm_and_has_k8s_1_30_schemas() -> None:
    assert helm_python.helm_sdk_version().startswith("v4.")
    # A broken object must be refused, or the validation below proves nothing.
    broken = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i", "resourcez": {}}]},
            },
        },
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S, strict=True)


def test_variants_cover_gpu_cpu_locker_autoscaling_vllm() -> None:
    assert {"default", "gpu", "cpu", "locker", "autoscaling", "vllm"} <= set(VARIANTS)
    assert VARIANTS["vllm"]["core"]["engine"] == "vllm" and VARIANTS["vllm"]["core"]["tensorParallelSize"] == 2


def test_helm_lint_passes(variant: str) -> None:
    report = lint(VARIANTS[variant] or None)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_chart_renders(variant: str) -> None:
    rendered = rendered_variant(variant)
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"} <= rendered.kinds()
    assert "/readyz" in rendered.notes and "port-forward" in rendered.notes


@pytest.mark.parametrize("operator", [True, False], ids=["with-prometheus-operator", "plain-cluster"])
def test_manifests_validate_against_kubernetes_1_30(variant: str, operator: bool) -> None:
    rendered = rendered_variant(variant, operator=operator)
    for obj in rendered.objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "ServiceMonitor":
            jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
            continue
        try:
            kubernetes_validate.validate(obj, K8S, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} is not valid Kubernetes {K8S}: {exc.message} at {list(exc.path)}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}")


def test_default_values_pass_the_schema() -> None:
    validate_values(None)
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)


@pytest.mark.parametrize(
    ("values", "where", "why"),
    [
        ({"replicaCount": -1}, "/replicaCount", "minimum"),
        ({"replicaCount": "2"}, "/replicaCount", "want integer"),
        ({"core": {"port": 70000}}, "/core/port", "maximum"),
        ({"core": {"device": "tpu"}}, "/core/device", "must be one of"),
        ({"core": {"maxSessions": 0}}, "/core/maxSessions", "minimum"),
        ({"gpu": {"count": 0}}, "/gpu/count", "minimum"),
        ({"core": {"extraSettings": {"VEIL_BUNDLE_PASSPHRASE": "hunter2"}}}, "VEIL_BUNDLE_PASSPHRASE", ""),
        ({"securityContext": {"runAsNonRoot": False}}, "/securityContext/runAsNonRoot", "true"),
        (
            {"securityContext": {"readOnlyRootFilesystem": False}},
            "/securityContext/readOnlyRootFilesystem",
            "",
        ),
        ({"bundle": {"source": "url"}}, "/bundle/url/baseUrl", "minLength"),
        ({"bundle": {"source": "ftp"}}, "/bundle/source", "must be one of"),
        ({"locker": {"external": {"url": "redis://:pw@redis:6379"}}}, "/locker/external/url", "pattern"),
        ({"image": {"digest": "latest"}}, "/image/digest", "pattern"),
        ({"replicas": 2}, "replicas", "not allowed"),
        (edges(name="-bad"), "/enrollment/allowedEdges/0/name", "pattern"),
        (edges(name="a" * 64), "/enrollment/allowedEdges/0/name", "pattern"),
        (edges(publicKey="x25519:short"), "/enrollment/allowedEdges/0/publicKey", "pattern"),
        (edges(publicKey="SHA256:" + "A" * 43), "/enrollment/allowedEdges/0/publicKey", "pattern"),
        (edges(maxSessions=0), "/enrollment/allowedEdges/0/maxSessions", "minimum"),
        ({"enrollment": {"allowedEdges": [{"name": "e"}]}}, "/enrollment/allowedEdges/0", "publicKey"),
        (edges(quota=3), "quota", "not allowed"),
        ({"identity": {"previous": {"privateKey": "hello"}}}, "/identity/previous/privateKey", "pattern"),
        ({"metrics": {"port": 70000}}, "/metrics/port", "maximum"),
        ({"core": {"lockerAfterSeconds": 0}}, "/core/lockerAfterSeconds", "exclusiveMinimum"),
        ({"locker": {"ttlSeconds": 0}}, "/locker/ttlSeconds", "minimum"),
        ({"locker": {"maxSnapshotBytes": 0}}, "/locker/maxSnapshotBytes", "minimum"),
        ({"core": {"engine": "tgi"}}, "/core/engine", "must be one of"),
        ({"core": {"tensorParallelSize": 0}}, "/core/tensorParallelSize", "minimum"),
        ({"core": {"vllmBlockSize": -1}}, "/core/vllmBlockSize", "minimum"),
        ({"vllm": {"shmSize": "lots"}}, "/vllm/shmSize", ""),
        ({"vllm": {"exportVolume": {"mountPath": "home"}}}, "/vllm/exportVolume/mountPath", "pattern"),
    ],
)
def test_schema_rejects_bad_values_with_a_clear_message(values: dict, where: str, why: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as caught:
        render(values)
    message = str(caught.value)
    assert where in message and why in message, message


def test_negative_replicas_fail_install_render_and_lint() -> None:
    with pytest.raises(helm_python.HelmValuesError, match=r"/replicaCount': minimum: got -1, want 0"):
        validate_values({"replicaCount": -1})
    report = lint({"replicaCount": -1})
    assert any("/replicaCount" in e for e in report["errors"]), report


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "must not exceed"),
        ({"gpu": {"enabled": False}}, 'core.device is "cuda" but gpu.enabled is false'),
        (
            {"locker": {"enabled": True, "external": {"url": "redis://r:6379", "existingSecret": "s"}}},
            "not both",
        ),
        ({"locker": {"external": {"url": "redis://r:6379"}}}, "locker.external.existingSecret"),
        (
            {"identity": {"existingSecret": "k", "privateKey": "-----BEGIN PRIVATE KEY-----\nx\n"}},
            "identity.existingSecret or identity.privateKey",
        ),
        (
            {"identity": {"previous": {"existingSecret": "k", "privateKey": "-----BEGIN PRIVATE KEY-----\nx\n"}}},
            "identity.previous.existingSecret or identity.previous.privateKey",
        ),
        (
            {"identity": {"privateKey": PEM, "previous": {"privateKey": PEM}}},
            "identity.previous.privateKey is the current identity.privateKey",
        ),
        ({"identity": {"previous": {"existingSecret": "veil-core-identity"}}}, "same Secret and key as the current"),
        ({"identity": {"previous": {"existingSecret": "old", "mountPath": "/etc/veil/identity"}}}, "must differ"),
        ({"enrollment": {"allowedEdges": [{"name": "e", "publicKey": KEY}], "existingSecret": "s"}}, "not both"),
        (
            {"enrollment": {"allowedEdges": [{"name": "e", "publicKey": KEY}, {"name": "e", "publicKey": KEY2}]}},
            'lists the name "e" twice',
        ),
        (
            {"enrollment": {"allowedEdges": [{"name": "e", "publicKey": KEY}, {"name": "f", "publicKey": KEY}]}},
            'lists the key of "f" twice',
        ),
        ({"metrics": {"port": 8001}}, r"metrics.port \(8001\) must differ from core.port"),
        (
            {"core": {"engine": "vllm", "tensorParallelSize": 4}, "gpu": {"count": 2}},
            r"core.tensorParallelSize \(4\) needs as many GPUs per pod, but gpu.count is 2",
        ),
        (
            {"core": {"tensorParallelSize": 2}, "gpu": {"count": 2}},
            'core.tensorParallelSize is 2 but core.engine is "native": only the vllm engine',
        ),
        (
            {"core": {"engine": "vllm", "device": "cpu"}, "gpu": {"enabled": False}},
            "core.engine is vllm but gpu.enabled is false",
        ),
        ({"core": {"quantize": "int8"}}, "core.quantize is int8, which runs on the native engine on a CPU"),
        (
            {"core": {"quantize": "int8", "device": "cpu", "dtype": "bfloat16"}, "gpu": {"enabled": False}},
            "core.quantize is int8, which runs on the native engine on a CPU",
        ),
    ],
)
def test_cross_field_mistakes_fail_with_a_clear_message(values: dict, message: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(values)
