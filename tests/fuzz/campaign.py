"""The fuzz campaign: schemathesis over the edge's OpenAPI document, once per identity (no key, and a key of each
scope), against a real core and an auth-enabled edge on loopback.

Checks per response: no status >= 500, the status and content type documented for the operation, and the
body matching the documented schema. After the campaign the edge must still answer a chat completion, and
no key secret, passphrase or planted prompt text may appear in either server's log.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
# the admin key goes last: its cases create, revoke and import policy, which could leave the others without keys
IDENTITIES = ("anonymous", "read", "metrics", "generate", "admin")


@dataclasses.dataclass
class IdentityRun:
    identity: str
    cases: int
    failures: list[str]  # "<check> <method> <path>" per failure; no payloads
    errors: list[str]  # operations schemathesis could not test, by exception type
    exit_code: int
    statuses: dict[int, int] = dataclasses.field(default_factory=dict)  # responses by status code


def schemathesis_run(edge_url: str, identity: str, secret: str | None, max_examples: int, seed: int,
                     report_dir: Path, model: str, *, only_path: str | None = None,
                     phases: str = "examples,coverage,fuzzing", name: str | None = None) -> IdentityRun:
    """One schemathesis run for one identity; the ndjson event stream gives the case count and failures."""
    name = name or identity
    ndjson = report_dir / f"{name}.ndjson"
    cmd = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{edge_url}/schema/openapi.json",
           "--checks", CHECKS, "--max-examples", str(max_examples), "--seed", str(seed), "--workers", "2",
           "--phases", phases, "--suppress-health-check", "all", "--request-timeout", "120",
           "--generation-database", "none", "--no-color", "--continue-on-failure", "--output-sanitize", "true",
           "--report", "ndjson", "--report-ndjson-path", str(ndjson)]
    if secret is not None:
        cmd += ["--header", f"Authorization: Bearer {secret}"]
    if only_path is not None:
        cmd += ["--include-path", only_path]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz.hooks", "FUZZ_MODEL": model,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=3600)
    (report_dir / f"{name}.out").write_text(proc.stdout + proc.stderr)
    cases, failures, errors, statuses = _read_events(ndjson)
    return IdentityRun(name, cases, failures, errors, proc.returncode, statuses)


def _read_events(path: Path) -> tuple[int, list[str], list[str], dict[int, int]]:
    """Count the test cases and responses, and collect the failed checks, from schemathesis' ndjson events."""
    cases, failures, errors = 0, [], []
    statuses: collections.Counter[int] = collections.Counter()
    if not path.exists():
        return 0, [], ["no report written"], {}
    for line in path.read_text().splitlines():
        event = json.loads(line)
        (kind, body), = event.items() if len(event) == 1 else (("", {}),)
        if kind == "ScenarioFinished":
            recorder = body.get("recorder", {})
            cases += len(recorder.get("cases", {}))
            statuses.update(i["response"]["status_code"] for i in recorder.get("interactions", {}).values()
                            if i.get("response"))
            label = recorder.get("label", "?")
            for checks in recorder.get("checks", {}).values():
                failures += [f"{c['name']} {label}" for c in checks if str(c.get("status")).lower() == "failure"]
        elif kind == "NonFatalError":
            errors.append(f"{body.get('label', '?')}: {body.get('value', {}).get('type', '?')}")
    return cases, sorted(set(failures)), errors, dict(sorted(statuses.items()))


def still_serves(edge_url: str, secret: str, model: str) -> bool:
    r = httpx.post(f"{edge_url}/v1/chat/completions", headers={"authorization": f"Bearer {secret}"}, timeout=120,
                   json={"model": model, "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 3})
    return r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def leaked(texts: list[str], secrets: list[str]) -> list[str]:
    """Which of `secrets` appear in any of `texts` (by position in the list, never the value)."""
    return [f"secret #{i}" for i, s in enumerate(secrets) if any(s in t for t in texts)]
