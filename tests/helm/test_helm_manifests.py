"""Properties of the rendered veil-core objects that a platform team relies on."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import helm_python
import pytest
import yaml
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
    TEST_EDGE,
    VARIANTS,
    Rendered,
    render,
    rendered_variant,
)

# What the core serves (core_server's contract): liveness and readiness on the API port,
# metrics on their own port.
HEALTHZ, READYZ, METRICS = "/healthz", "/readyz", "/metrics"
METRICS_PORT = 9100
CORE_ENV = {
    "VEIL_CORE_HOST", "VEIL_CORE_PORT", "VEIL_CORE_BUNDLE", "VEIL_CORE_DEVICE", "VEIL_CORE_DTYPE", "VEIL_CORE_QUANTIZE",
    "VEIL_CORE_ENGINE", "VEIL_CORE_TENSOR_PARALLEL_SIZE", "VEIL_CORE_VLLM_BLOCK_SIZE",
    "VEIL_CORE_MAX_SESSIONS", "VEIL_CORE_MAX_TOKENS_PER_SESSION", "VEIL_CORE_SESSION_IDLE_SECONDS",
    "VEIL_CORE_MAX_BATCH_TOKENS", "VEIL_CORE_PREFILL_CHUNK_TOKENS", "VEIL_CORE_BATCH_WAIT_MS",
    "VEIL_CORE_MAX_RESULT_ROWS", "VEIL_CORE_MAX_QUEUED_STEPS",
    "VEIL_CORE_KV_BUDGET_BYTES", "VEIL_CORE_THREADS", "VEIL_LOG_LEVEL",
    "VEIL_CORE_IDENTITY_KEY_FILE", "VEIL_CORE_PREVIOUS_IDENTITY_KEY_FILE", "VEIL_CORE_ALLOWED_EDGES",
    "VEIL_CORE_METRICS_HOST", "VEIL_CORE_METRICS_PORT", "VEIL_CORE_LOCKER_AFTER_SECONDS",
    "VEIL_LOCKER_REDIS_URL", "VEIL_LOCKER_REDIS_PASSWORD_FILE", "VEIL_LOCKER_TTL_SECONDS",
    "VEIL_LOCKER_MAX_SNAPSHOT_BYTES",
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
    port, metrics = container["ports"]
    assert port["name"] == "http"
    assert str(port["containerPort"]) == core_settings(rendered)["VEIL_CORE_PORT"]
    assert metrics["name"] == "metrics" and metrics["containerPort"] == METRICS_PORT
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
        assert container["image"].endswith("-vllm" if variant == "vllm" else "-cuda")
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
    # callers reach the API port only, scrapers the metrics port only
    sources = VARIANTS[variant].get("networkPolicy", {}).get("ingress", {})
    expected = [({"port": "http", "protocol": "TCP"}, sources.get("from", "default"))]
    if sources.get("metricsFrom"):
        expected.append(({"port": "metrics", "protocol": "TCP"}, sources["metricsFrom"]))
    assert [r["ports"] for r in policy["ingress"]] == [[port] for port, _ in expected]
    for rule, (_, peers) in zip(policy["ingress"], expected):
        assert peers == "default" or rule["from"] == peers
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
        secret = render().one("Secret", "veil-core-identity")
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
    secret = render({"identity": {"privateKey": pem}}).one("Secret", "veil-core-identity")
    assert base64.b64decode(secret["data"]["identity.key"]).decode() == pem
    rendered = rendered_variant("locker")  # identity.existingSecret: veil-core-identity
    assert not [s for s in rendered.all("Secret") if s["metadata"]["name"].endswith("-identity")]
    volumes = {v["name"]: v for v in pod_spec(core_deployment(rendered))["volumes"]}
    assert volumes["identity"]["secret"]["secretName"] == "veil-core-identity"


def test_service_monitor_only_when_the_operator_api_exists(variant: str) -> None:
    with_operator = rendered_variant(variant, operator=True)
    monitor = with_operator.one("ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == METRICS
    name = core_deployment(with_operator)["metadata"]["name"]
    # it scrapes the headless metrics Service, never the API Service (which may be a LoadBalancer)
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    metrics_service = with_operator.one("Service", f"{name}-metrics")
    assert selector <= metrics_service["metadata"]["labels"].items()
    assert not selector <= with_operator.one("Service", name)["metadata"]["labels"].items()
    assert metrics_service["spec"]["clusterIP"] == "None"
    pod_labels = core_deployment(with_operator)["spec"]["template"]["metadata"]["labels"]
    assert metrics_service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = metrics_service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("metrics", METRICS_PORT, "metrics")
    assert f"/metrics on port {METRICS_PORT}" in with_operator.notes
    without = rendered_variant(variant, operator=False)
    assert "ServiceMonitor" not in without.kinds()
    assert not [s for s in without.all("Service") if s["metadata"]["name"].endswith("-metrics")]
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


def volume_of(rendered: Rendered, mount_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volumeMount, volume) of the core container at `mount_dir`."""
    mounts = {m["mountPath"]: m for m in core_container(rendered)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(core_deployment(rendered))["volumes"]}
    mount = mounts[mount_dir]
    return mount, volumes[mount["name"]]


def test_enrolled_edges_are_a_mounted_secret_the_core_reads() -> None:
    rendered = rendered_variant("gpu")
    path = core_settings(rendered)["VEIL_CORE_ALLOWED_EDGES"]
    assert path == "/etc/veil/enrollment/allowed_edges.yaml"
    directory, file = path.rsplit("/", 1)
    mount, volume = volume_of(rendered, directory)
    assert mount["readOnly"] is True
    assert volume["secret"]["secretName"] == "veil-core-enrollment"
    assert volume["secret"]["items"] == [{"key": file, "path": file}]
    assert volume["secret"]["defaultMode"] == 0o440
    secret = rendered.one("Secret", "veil-core-enrollment")
    assert "annotations" not in secret["metadata"]  # not kept: it is rendered from values on every upgrade
    listed = yaml.safe_load(base64.b64decode(secret["data"][file]))
    assert listed == {
        "edges": [
            {"name": "alice-laptop", "public_key": "x25519:pluMgJLj214xAg4AiAsZhWD1-MR8jokyluSJIg06-lU", "max_sessions": 16},
            {"name": "edge-gateway.prod", "public_key": "x25519:wuWDhqvRifHr3XyHTpTlFl85fpolHNad5KtjWP4Nr9g"},
        ]
    }
    assert "alice-laptop, edge-gateway.prod" in rendered.notes


def test_enrolled_edges_from_an_existing_secret() -> None:
    rendered = rendered_variant("locker")  # enrollment.existingSecret: veil-core-allowed-edges
    assert not [s for s in rendered.all("Secret") if s["metadata"]["name"] == "veil-core-enrollment"]
    _, volume = volume_of(rendered, "/etc/veil/enrollment")
    assert volume["secret"]["secretName"] == "veil-core-allowed-edges"
    assert core_settings(rendered)["VEIL_CORE_ALLOWED_EDGES"] == "/etc/veil/enrollment/allowed_edges.yaml"
    assert "rollout restart" in rendered.notes
    custom = render({"enrollment": {"existingSecret": "edges", "secretKey": "edges.yaml", "mountPath": "/etc/edges"}})
    assert core_settings(custom)["VEIL_CORE_ALLOWED_EDGES"] == "/etc/edges/edges.yaml"
    _, volume = volume_of(custom, "/etc/edges")
    assert volume["secret"] == {
        "secretName": "edges",
        "defaultMode": 0o440,
        "items": [{"key": "edges.yaml", "path": "edges.yaml"}],
    }


@pytest.mark.parametrize("values", [None, {"enrollment": {"allowedEdges": []}}], ids=["values.yaml", "empty-list"])
def test_a_core_that_admits_no_edge_fails_to_render(values: dict | None) -> None:
    with pytest.raises(helm_python.HelmRenderError, match="no edge is enrolled, so this core would admit nobody"):
        render(values, enroll=False)
    # (`helm lint` only logs a template's `fail`; install, upgrade and template stop on it)


OTHER_KEY = "x25519:" + base64.urlsafe_b64encode(b"\x07" * 32).rstrip(b"=").decode()


def test_changing_the_edges_or_the_keys_rolls_the_pods() -> None:
    def annotations(values: dict) -> dict[str, str]:
        return core_deployment(render(values))["spec"]["template"]["metadata"]["annotations"]

    base = annotations({})
    more = annotations({"enrollment": {"allowedEdges": [TEST_EDGE, {**TEST_EDGE, "name": "other", "publicKey": OTHER_KEY}]}})
    assert more["checksum/enrollment"] != base["checksum/enrollment"]
    rotated = annotations({"identity": {"previous": {"existingSecret": "old-key"}}})
    assert rotated["checksum/identity"] != base["checksum/identity"]
    # a generated key is not in it: every `helm template` would roll the pods otherwise
    assert annotations({})["checksum/identity"] == base["checksum/identity"]


def test_previous_identity_is_wired_only_during_a_rotation() -> None:
    plain = rendered_variant("default")
    assert "VEIL_CORE_PREVIOUS_IDENTITY_KEY_FILE" not in core_settings(plain)
    assert "previous-identity" not in {v["name"] for v in pod_spec(core_deployment(plain))["volumes"]}
    assert "Key rotation in progress" not in plain.notes
    # from its own Secret (ci/autoscaling-values.yaml)
    rotating = rendered_variant("autoscaling")
    path = core_settings(rotating)["VEIL_CORE_PREVIOUS_IDENTITY_KEY_FILE"]
    assert path == "/etc/veil/previous-identity/identity.key"
    mount, volume = volume_of(rotating, "/etc/veil/previous-identity")
    assert mount["readOnly"] is True and volume["secret"]["secretName"] == "veil-core-identity-2024"
    assert not [s for s in rotating.all("Secret") if "previous" in s["metadata"]["name"]]
    assert "Key rotation in progress" in rotating.notes
    # from a PEM given in the values: a chart-managed Secret, not kept on uninstall
    pem = X25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    supplied = render({"identity": {"previous": {"privateKey": pem}}})
    secret = supplied.one("Secret", "veil-core-previous-identity")
    assert base64.b64decode(secret["data"]["identity.key"]).decode() == pem
    assert "annotations" not in secret["metadata"]
    _, volume = volume_of(supplied, "/etc/veil/previous-identity")
    assert volume["secret"]["secretName"] == "veil-core-previous-identity"
    assert core_settings(supplied)["VEIL_CORE_IDENTITY_KEY_FILE"] == "/etc/veil/identity/identity.key"


def test_services_balance_per_connection_without_affinity(variant: str, rendered: Rendered) -> None:
    for service in rendered.all("Service"):
        if service["metadata"]["name"].startswith("veil-core-locker"):
            continue
        assert service["spec"]["sessionAffinity"] == "None", service["metadata"]["name"]
    api = rendered.one("Service", core_deployment(rendered)["metadata"]["name"])
    assert [p["name"] for p in api["spec"]["ports"]] == ["http"]  # /metrics is never on the API Service


def test_several_replicas_need_no_affinity_and_get_time_to_drain() -> None:
    rendered = render({"replicaCount": 3, "locker": {"enabled": True}})
    deployment = core_deployment(rendered)
    assert deployment["spec"]["replicas"] == 3
    assert "affinity" not in pod_spec(deployment)
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= 60
    assert "no session affinity is needed" in rendered.notes
    assert "WARNING: terminationGracePeriodSeconds" not in rendered.notes
    short = render({"locker": {"enabled": True}, "terminationGracePeriodSeconds": 10})
    assert "WARNING: terminationGracePeriodSeconds=10" in short.notes
    assert "No locker" in render({"replicaCount": 2}).notes


def test_locker_knobs_reach_the_core(variant: str, rendered: Rendered) -> None:
    settings = core_settings(rendered)
    values = VARIANTS[variant]
    assert settings["VEIL_CORE_LOCKER_AFTER_SECONDS"] == str(values.get("core", {}).get("lockerAfterSeconds", 30))
    if variant == "locker":
        assert settings["VEIL_LOCKER_TTL_SECONDS"] == "1800"
        assert settings["VEIL_LOCKER_MAX_SNAPSHOT_BYTES"] == "268435456"
    else:
        assert "VEIL_LOCKER_TTL_SECONDS" not in settings and "VEIL_LOCKER_REDIS_URL" not in settings
    defaults = core_settings(render({"locker": {"enabled": True}}))
    assert (defaults["VEIL_LOCKER_TTL_SECONDS"], defaults["VEIL_LOCKER_MAX_SNAPSHOT_BYTES"]) == ("3600", "536870912")


def test_metrics_have_their_own_port_everywhere(variant: str, rendered: Rendered) -> None:
    settings = core_settings(rendered)
    assert (settings["VEIL_CORE_METRICS_HOST"], settings["VEIL_CORE_METRICS_PORT"]) == ("0.0.0.0", str(METRICS_PORT))
    annotations = core_deployment(rendered)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert f"port-forward deployment/veil-core {METRICS_PORT}:{METRICS_PORT}" in rendered.notes
    assert f"127.0.0.1:{METRICS_PORT}/metrics" in rendered.notes
    assert f"127.0.0.1:{settings['VEIL_CORE_PORT']}/metrics" not in rendered.notes
    moved = render({"metrics": {"port": 9400}}, api_versions=("monitoring.coreos.com/v1",))
    assert core_settings(moved)["VEIL_CORE_METRICS_PORT"] == "9400"
    assert {p["name"]: p["containerPort"] for p in core_container(moved)["ports"]}["metrics"] == 9400
    assert moved.one("Service", "veil-core-metrics")["spec"]["ports"][0]["port"] == 9400


def test_vllm_variant_runs_the_vllm_image_over_two_gpus_with_shm_and_an_export_home() -> None:
    rendered = rendered_variant("vllm")
    settings = core_settings(rendered)
    assert (settings["VEIL_CORE_ENGINE"], settings["VEIL_CORE_TENSOR_PARALLEL_SIZE"]) == ("vllm", "2")
    assert settings["VEIL_CORE_VLLM_BLOCK_SIZE"] == "16"
    container = core_container(rendered)
    assert container["image"] == "veil-core:0.1.0-vllm"
    gpu = "nvidia.com/gpu"
    assert container["resources"]["limits"][gpu] == container["resources"]["requests"][gpu] == 2
    # /dev/shm: a memory-backed emptyDir (the runtime's 64Mi default starves vLLM's workers)
    mount, volume = volume_of(rendered, "/dev/shm")
    assert not mount.get("readOnly")
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    # the core's home, where it writes the bundle's HF export: writable, on disk, VEIL_HOME points at it
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount, volume = volume_of(rendered, env["VEIL_HOME"])
    assert env["VEIL_HOME"] == "/var/lib/veil/home" and not mount.get("readOnly")
    assert volume["emptyDir"] == {"sizeLimit": "40Gi"}
    # vLLM starts slower: the startup probe waits at least vllm.startupFailureThreshold periods
    startup = container["startupProbe"]
    assert startup["failureThreshold"] == 180 and startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    assert "allows 1800 s" in rendered.notes and "Engine: vllm" in rendered.notes


def test_only_the_vllm_engine_gets_shm_and_an_export_home(variant: str, rendered: Rendered) -> None:
    settings = core_settings(rendered)
    vllm = variant == "vllm"
    assert settings["VEIL_CORE_ENGINE"] == ("vllm" if vllm else "native")
    assert settings["VEIL_CORE_TENSOR_PARALLEL_SIZE"] == ("2" if vllm else "1")
    container = core_container(rendered)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert ("/dev/shm" in mounts) == vllm and ("/var/lib/veil/home" in mounts) == vllm
    assert ("VEIL_HOME" in {e["name"] for e in container["env"]}) == vllm
    assert ("Engine: vllm" in rendered.notes) == vllm


def test_vllm_engine_defaults_and_overrides() -> None:
    container = core_container(render({"core": {"engine": "vllm"}}))
    assert container["image"] == "veil-core:0.1.0-vllm"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["startupProbe"]["failureThreshold"] == 180  # values.yaml: 90 for the native engine
    _, shm = volume_of(render({"core": {"engine": "vllm"}}), "/dev/shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    # a longer startup budget set in probes.startup is kept; an explicit tag or digest wins
    custom = core_container(
        render({"core": {"engine": "vllm"}, "probes": {"startup": {"failureThreshold": 400}}, "image": {"tag": "mine"}})
    )
    assert custom["startupProbe"]["failureThreshold"] == 400 and custom["image"] == "veil-core:mine"
    # vLLM on CPU: only with an image of your own (the -vllm image is vLLM's CUDA build)
    cpu = render({"core": {"engine": "vllm", "device": "cpu"}, "gpu": {"enabled": False}, "image": {"tag": "vllm-cpu"}})
    assert core_settings(cpu)["VEIL_CORE_ENGINE"] == "vllm" and core_container(cpu)["image"] == "veil-core:vllm-cpu"
