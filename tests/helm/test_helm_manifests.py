"""Properties of the rendered veil-core objects that a platform team relies on."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from tests.helm.helm_render import (
    CHART_DIR,
    NAMESPACE,
    VARIANTS,
    Rendered,
    render,
    rendered_variant,
)

# What the core serves (core_server's contract): liveness, readiness, metrics.
HEALTHZ, READYZ, METRICS = "/healthz", "/readyz", "/metrics"
CORE_ENV = {
    "VEIL_CORE_HOST", "VEIL_CORE_PORT", "VEIL_CORE_BUNDLE", "VEIL_CORE_DEVICE",
    "VEIL_CORE_MAX_SESSIONS", "VEIL_CORE_MAX_TOKENS_PER_SESSION", "VEIL_CORE_SESSION_IDLE_SECONDS",
    "VEIL_CORE_MAX_BATCH_TOKENS", "VEIL_CORE_MAX_RESULT_ROWS", "VEIL_CORE_MAX_QUEUED_STEPS",
    "VEIL_CORE_KV_BUDGET_BYTES", "VEIL_CORE_THREADS", "VEIL_LOG_LEVEL",
    "VEIL_CORE_IDENTITY_KEY_FILE", "VEIL_LOCKER_REDIS_URL", "VEIL_LOCKER_REDIS_PASSWORD_FILE",
}  # fmt: skip
CORE_METRICS = {
    "veil_core_queued_steps", "veil_core_active_sessions", "veil_core_step_seconds",
    "veil_core_tokens_total", "veil_core_batch_tokens", "veil_core_errors_total",
}  # fmt: skip
SECRET_NAME = re.compile(
    r"(PASSWORD|PASSPHRASE|SECRET|TOKEN|_KEY)$", re.I
)  # names of values, not of *_FILE paths


def core_deployment(rendered: Rendered) -> dict[str, Any]:
    return rendered.one("Deployment")


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def core_container(rendered: Rendered) -> dict[str, Any]:
    containers = pod_spec(core_deployment(rendered))["containers"]
    return next(c for c in containers if c["name"] == "core")


def core_settings(rendered: Rendered) -> dict[str, str]:
    name = core_deployment(rendered)["metadata"]["name"]
    return rendered.one("ConfigMap", name)["data"]


def secret_values(rendered: Rendered) -> list[str]:
    out = []
    for secret in rendered.all("Secret"):
        out += [base64.b64decode(v).decode() for v in (secret.get("data") or {}).values()]
        out += list((secret.get("stringData") or {}).values())
    return out


def test_probes_point_at_the_cores_endpoints_on_its_port(rendered: Rendered) -> None:
    container = core_container(rendered)
    (port,) = container["ports"]
    assert port["name"] == "http"
    assert str(port["containerPort"]) == core_settings(rendered)["VEIL_CORE_PORT"]
    probes = {
        "startupProbe": READYZ,  # held until the bundle is loaded
        "readinessProbe": READYZ,
        "livenessProbe": HEALTHZ,
    }
    for probe, path in probes.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = container["startupProbe"]
    # Slow model loads: at least five minutes before the kubelet gives up.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    service = rendered.one("Service", core_deployment(rendered)["metadata"]["name"])
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_resources_are_set_and_gpu_follows_values(variant: str, rendered: Rendered) -> None:
    container = core_container(rendered)
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    gpu = "nvidia.com/gpu"
    if variant == "cpu":
        assert gpu not in resources["limits"] and gpu not in resources["requests"]
        assert container["image"].endswith("-cpu")
        assert core_settings(rendered)["VEIL_CORE_DEVICE"] == "cpu"
    else:
        assert resources["limits"][gpu] == resources["requests"][gpu] >= 1
        assert container["image"].endswith("-cuda")
    if variant == "gpu":
        spec = pod_spec(core_deployment(rendered))
        assert resources["limits"][gpu] == 2
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert spec["affinity"]["nodeAffinity"] and spec["runtimeClassName"] == "nvidia"
        assert any(t["key"] == gpu for t in spec["tolerations"])
    for workload in rendered.all("StatefulSet"):
        for c in pod_spec(workload)["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"]


def test_every_pod_is_non_root_read_only_and_drops_all_capabilities(rendered: Rendered) -> None:
    for workload in rendered.all("Deployment") + rendered.all("StatefulSet"):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False  # else VEIL_CORE_PORT=tcp://… lands in env
        for c in spec["containers"] + spec.get("initContainers", []):
            ctx = c["securityContext"]
            assert ctx["runAsNonRoot"] is True, c["name"]
            assert ctx["runAsUser"] != 0, c["name"]
            assert ctx["readOnlyRootFilesystem"] is True, c["name"]
            assert ctx["allowPrivilegeEscalation"] is False, c["name"]
            assert ctx["capabilities"]["drop"] == ["ALL"], c["name"]
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
    # The read-only root needs a writable /tmp, the only place the core writes.
    mounts = {m["mountPath"]: m for m in core_container(rendered)["volumeMounts"]}
    assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly")
    volumes = {v["name"]: v for v in pod_spec(core_deployment(rendered))["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_network_policy_admits_only_configured_sources(variant: str, rendered: Rendered) -> None:
    name = core_deployment(rendered)["metadata"]["name"]
    policy = rendered.one("NetworkPolicy", name)["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    labels = core_deployment(rendered)["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["ingress"], "the default sources should be rendered"
    for rule in policy["ingress"]:
        assert rule["from"], "a rule without 'from' admits every source"
        assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    egress = policy["egress"]
    dns = [r for r in egress if {p["port"] for p in r["ports"]} == {53}]
    assert len(dns) == 1 and all(r.get("to") for r in egress)
    locker_rules = [r for r in egress if any(p["port"] == 6379 for p in r["ports"])]
    assert len(locker_rules) == (1 if variant == "locker" else 0)
    extra = VARIANTS[variant].get("networkPolicy", {}).get("egress", {}).get("extraRules", [])
    assert len(egress) == 1 + len(locker_rules) + len(extra)


def test_empty_ingress_sources_deny_all_instead_of_allowing_all() -> None:
    rendered = render({"networkPolicy": {"ingress": {"from": [], "metricsFrom": []}}})
    assert rendered.one("NetworkPolicy")["spec"]["ingress"] == []
    assert "nothing can reach the core" in rendered.notes


def test_no_secret_value_lands_in_a_config_map(variant: str, rendered: Rendered) -> None:
    secrets = [s for s in secret_values(rendered) if s]
    for cm in rendered.all("ConfigMap"):
        for key, value in (cm.get("data") or {}).items():
            assert not SECRET_NAME.search(key), f"{cm['metadata']['name']}: {key}"
            assert "PRIVATE KEY" not in value and "requirepass" not in value
            for secret in secrets:
                assert secret not in value, f"a Secret value is in ConfigMap {cm['metadata']['name']}"
    # Paths to secret files are fine; the files come from Secrets, mounted read-only.
    settings = core_settings(rendered)
    assert set(settings) <= CORE_ENV
    mounts = {m["mountPath"]: m for m in core_container(rendered)["volumeMounts"]}
    key_dir = settings["VEIL_CORE_IDENTITY_KEY_FILE"].rsplit("/", 1)[0]
    assert mounts[key_dir]["readOnly"] is True


def test_generated_identity_key_is_a_fresh_x25519_pem_in_a_kept_secret() -> None:
    keys = []
    for _ in range(2):
        secret = render().one("Secret")
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        pem = base64.b64decode(secret["data"]["identity.key"])
        key = load_pem_private_key(pem, password=None)
        assert isinstance(key, X25519PrivateKey)
        keys.append(pem)
    assert keys[0] != keys[1]


def test_supplied_or_existing_identity_key_is_used() -> None:
    pem = (
        X25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    )
    secret = render({"identity": {"privateKey": pem}}).one("Secret")
    assert base64.b64decode(secret["data"]["identity.key"]).decode() == pem
    rendered = rendered_variant("locker")  # identity.existingSecret: veil-core-identity
    assert not [s for s in rendered.all("Secret") if s["metadata"]["name"].endswith("-identity")]
    volumes = {v["name"]: v for v in pod_spec(core_deployment(rendered))["volumes"]}
    assert volumes["identity"]["secret"]["secretName"] == "veil-core-identity"


def test_service_monitor_only_when_the_operator_api_exists(variant: str) -> None:
    with_operator = rendered_variant(variant, operator=True)
    monitor = with_operator.one("ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == METRICS
    service = with_operator.one("Service", core_deployment(with_operator)["metadata"]["name"])
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    without = rendered_variant(variant, operator=False)
    assert "ServiceMonitor" not in without.kinds()
    assert "no ServiceMonitor was created" in without.notes


def test_autoscaling_uses_queued_steps_with_cpu_fallback() -> None:
    rendered = rendered_variant("autoscaling")
    hpa = rendered.one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == core_deployment(rendered)["metadata"]["name"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 8)
    by_type = {m["type"]: m for m in hpa["metrics"]}
    assert by_type["Pods"]["pods"]["metric"]["name"] == "veil_core_queued_steps"
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    assert "replicas" not in core_deployment(rendered)["spec"]  # the HPA owns it
    assert "HorizontalPodAutoscaler" not in rendered_variant("default").kinds()


def test_disruption_budget_selects_the_core_pods(rendered: Rendered) -> None:
    pdb = rendered.one("PodDisruptionBudget")["spec"]
    assert ("minAvailable" in pdb) != ("maxUnavailable" in pdb)
    labels = core_deployment(rendered)["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


def test_locker_is_an_ephemeral_password_protected_redis() -> None:
    rendered = rendered_variant("locker")
    sts = rendered.one("StatefulSet")
    assert "volumeClaimTemplates" not in sts["spec"]
    (redis,) = pod_spec(sts)["containers"]
    script = redis["args"][0]
    assert '--save ""' in script and "--appendonly no" in script and "--maxmemory 2gb" in script
    env = {e["name"]: e for e in redis["env"]}
    secret_name = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
    password_secret = rendered.one("Secret", secret_name)
    assert len(base64.b64decode(password_secret["data"]["redis-password"])) >= 32
    assert {s["metadata"]["name"] for s in rendered.all("Service")} >= {
        "veil-core-locker",
        "veil-core-locker-headless",
    }
    settings = core_settings(rendered)
    assert settings["VEIL_LOCKER_REDIS_URL"] == f"redis://veil-core-locker.{NAMESPACE}.svc:6379/0"
    volumes = {v["name"]: v for v in pod_spec(core_deployment(rendered))["volumes"]}
    assert volumes["locker-password"]["secret"]["secretName"] == secret_name
    policy = rendered.one("NetworkPolicy", "veil-core-locker")["spec"]
    assert policy["egress"] == [] and len(policy["ingress"]) == 1
    assert "StatefulSet" not in rendered_variant("default").kinds()


def test_bundle_sources(variant: str, rendered: Rendered) -> None:
    spec = pod_spec(core_deployment(rendered))
    volumes = {v["name"]: v for v in spec["volumes"]}
    mount = next(m for m in core_container(rendered)["volumeMounts"] if m["name"] == "bundle")
    assert mount["readOnly"] is True
    assert mount["mountPath"] == core_settings(rendered)["VEIL_CORE_BUNDLE"]
    init = {c["name"]: c for c in spec.get("initContainers", [])}
    if variant == "cpu":  # url
        assert init["fetch-bundle"]["command"] == ["python", "/opt/veil-scripts/fetch-bundle.py"]
        assert "fetch-bundle.py" in rendered.one("ConfigMap", "veil-core-scripts")["data"]
        assert "emptyDir" in volumes["bundle"]
    elif variant == "locker":  # s3
        assert init["fetch-bundle"]["command"] == ["aws"]
        assert "s3://veil-bundles/smollm2-135m-instruct/core" in init["fetch-bundle"]["args"]
        assert "emptyDir" in volumes["bundle"]
    else:
        assert not init
        claim = volumes["bundle"]["persistentVolumeClaim"]
        assert claim["readOnly"] is True
        if variant == "autoscaling":
            pvc = rendered.one("PersistentVolumeClaim", claim["claimName"])
            assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        if variant == "gpu":
            assert claim["claimName"] == "veil-bundles"
            assert mount["subPath"] == "smollm2-135m-instruct/core"


def test_grafana_dashboard_is_off_by_default_and_charts_core_metrics() -> None:
    assert not [
        c
        for c in rendered_variant("default").all("ConfigMap")
        if c["metadata"]["name"].endswith("-dashboard")
    ]
    cm = rendered_variant("locker").one("ConfigMap", "veil-core-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["veil-core.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in CORE_METRICS:
        assert metric in exprs, metric
    assert dashboard == json.loads((CHART_DIR / "dashboards" / "veil-core.json").read_text())


@pytest.mark.parametrize("bad", ["1e+06", "6.7108864e+07"])
def test_large_numbers_render_as_plain_integers(bad: str) -> None:
    settings = core_settings(render({"core": {"maxBatchTokens": 67108864, "maxSessions": 1000000}}))
    assert settings["VEIL_CORE_MAX_BATCH_TOKENS"] == "67108864"
    assert bad not in json.dumps(settings)
