"""Render and lint helm/veil-core with Helm's own Go SDK (helm-python-sdk), offline.

Run it as a script to see what a values file renders to:
    .venv/bin/python tests/helm/helm_render.py -f helm/veil-core/ci/locker-values.yaml

values.yaml alone enrolls no edge, which the chart refuses (a core that admits nobody is a
misconfiguration); so every render here that does not set `enrollment` itself gets
TEST_ENROLLMENT, unless asked not to (`enroll=False`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import yaml

try:
    import helm_python
    from helm_python import _native
except ImportError as exc:  # fail loudly: these tests never skip for missing tools
    raise ImportError("helm-python-sdk is missing: run scripts/install_helm_tools.sh") from exc

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "veil-core"
CI_DIR = CHART_DIR / "ci"
KUBE_VERSION = "v1.30.0"
RELEASE = "veil-core"
NAMESPACE = "veil"
PROMETHEUS_OPERATOR_API = "monitoring.coreos.com/v1"
# One enrolled edge (a random X25519 public key), for values that enroll none themselves.
TEST_EDGE = {"name": "test-edge", "publicKey": "x25519:KPtTTdG1L0HDLLjwTL9JU4UPAaH0651auZ0vomPgTTU"}
TEST_ENROLLMENT = {"allowedEdges": [TEST_EDGE]}


@dataclasses.dataclass
class Rendered:
    """One `helm template`: the parsed objects plus NOTES.txt."""

    objects: list[dict[str, Any]]
    notes: str

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def kinds(self) -> set[str]:
        return {o["kind"] for o in self.objects}


def load_values(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    assert isinstance(data, dict), f"{path} must hold a mapping"
    return data


def enrolled(values: dict[str, Any] | None) -> dict[str, Any]:
    """`values` with TEST_ENROLLMENT where they enroll no edge themselves."""
    values = dict(values or {})
    values.setdefault("enrollment", TEST_ENROLLMENT)
    return values


def render(
    values: dict[str, Any] | None = None,
    *,
    api_versions: tuple[str, ...] = (),
    name: str = RELEASE,
    namespace: str = NAMESPACE,
    enroll: bool = True,
) -> Rendered:
    """`helm template` with the chart's schema check, as `helm install` would do it.

    The SDK's Python wrapper does not expose --api-versions/--kube-version yet, so
    the options go straight to its C entry point (both are Helm render options).
    """
    if enroll:
        values = enrolled(values)
    opts = {
        "name": name,
        "namespace": namespace,
        "is_install": True,
        "kube_version": KUBE_VERSION,
        "api_versions": list(api_versions),
    }
    with helm_python.Chart.load(CHART_DIR) as chart:
        raw = _native.call_string(
            "helm_render",
            chart._raw(),
            None if values is None else json.dumps(values),
            json.dumps(opts),
        )
    manifests: dict[str, str] = json.loads(raw)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path in sorted(manifests):
        if path.endswith("NOTES.txt"):
            notes = manifests[path]
            continue
        for doc in yaml.safe_load_all(manifests[path]):
            if doc:
                objects.append(doc)
    return Rendered(objects, notes)


def validate_values(values: dict[str, Any] | None) -> None:
    """values.schema.json check alone; raises helm_python.HelmValuesError."""
    with helm_python.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(values)


def lint(values: dict[str, Any] | None = None, *, enroll: bool = True) -> dict[str, Any]:
    """`helm lint --strict --kube-version 1.30`; returns the SDK's report."""
    if enroll:
        values = enrolled(values)
    return helm_python.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version=KUBE_VERSION)


# "default" is values.yaml alone; the rest are the chart's ci/ values files.
VARIANTS: dict[str, dict[str, Any]] = {"default": {}}
VARIANTS.update(
    {p.name.removesuffix("-values.yaml"): load_values(p) for p in sorted(CI_DIR.glob("*-values.yaml"))}
)
_cache: dict[tuple[str, bool], Rendered] = {}


def rendered_variant(variant: str, *, operator: bool = True) -> Rendered:
    """Render a variant once per session; `operator`: the Prometheus operator's API exists."""
    key = (variant, operator)
    if key not in _cache:
        api = (PROMETHEUS_OPERATOR_API,) if operator else ()
        _cache[key] = render(VARIANTS[variant] or None, api_versions=api)
    return _cache[key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--values", type=Path, help="values file")
    parser.add_argument("--api-versions", action="append", default=[])
    parser.add_argument("--no-test-edge", action="store_true", help="do not add TEST_ENROLLMENT")
    args = parser.parse_args(argv)
    values = load_values(args.values) if args.values else None
    rendered = render(values, api_versions=tuple(args.api_versions), enroll=not args.no_test_edge)
    print(yaml.safe_dump_all(rendered.objects, sort_keys=False), end="")
    print("---\n# NOTES.txt\n" + "\n".join(f"# {line}" for line in rendered.notes.splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
