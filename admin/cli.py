"""`veil admin …`: the admin REST API from the command line (VEIL_EDGE_URL, VEIL_ADMIN_KEY).

`veil admin policy init` alone works on the local files (VEIL_POLICY_STORE, VEIL_POLICY_PASSPHRASE,
VEIL_REDIS_URL): it is the one way to create a store where an edge would refuse to.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from admin.guardrails import ACTIONS, DEFAULT_ENTITIES, PROTECTIONS
from admin.policy import LIMITS
from veil.errors import VeilError
from veil.settings import Settings

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> int:
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError("use a number with s, m, h or d, e.g. 30d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _limit(text: str) -> int | None:
    return None if text in ("none", "unlimited", "0") else int(text)


def _rule_matcher(rule: dict[str, Any]) -> str:
    """What a rule matches, without echoing its terms or pattern (they may be the sensitive values)."""
    if rule.get("entities"):
        return "entities " + ",".join(rule["entities"])
    what = "pattern" if rule["has_pattern"] else f"{rule['terms_count']} terms"
    return f"{what} -> <{rule['label']}_n>" if rule.get("action") == "protect" else what


def add_parser(sub: Any) -> None:
    admin = sub.add_parser("admin", help="manage keys, limits, guardrails, audit and policy of a running edge")
    admin.add_argument("--json", action="store_true", help="machine-readable output")
    admin.set_defaults(run=run)
    groups = admin.add_subparsers(dest="admin_group", required=True)

    keys = groups.add_parser("keys", help="API keys").add_subparsers(dest="admin_action", required=True)
    create = keys.add_parser("create", help="create a key; its secret is printed once")
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", default="generate,read", help="comma list of generate, read, admin")
    create.add_argument("--rpm", type=_limit, default=None, help="requests per minute")
    create.add_argument("--tpm", type=_limit, default=None, help="tokens per minute")
    create.add_argument("--max-concurrent", type=_limit, default=None,
                        help="concurrent generations (default: the deployment's edge.max_concurrent_per_key)")
    create.add_argument("--expires-in", type=_duration, default=None, help="e.g. 90d")
    create.add_argument("--noise-rho", type=float, default=None,
                        help="embedding noise for this key's requests (default: the deployment's)")
    keys.add_parser("list")
    for name in ("show", "revoke", "rotate"):
        keys.add_parser(name).add_argument("key_id")

    limits = groups.add_parser("limits", help="rate limits").add_subparsers(dest="admin_action", required=True)
    lset = limits.add_parser("set", help="set a key's limits ('none' = unlimited)")
    lset.add_argument("key_id")
    lset.add_argument("--rpm", type=_limit, default=argparse.SUPPRESS, help="requests per minute ('none' clears it)")
    lset.add_argument("--tpm", type=_limit, default=argparse.SUPPRESS, help="tokens per minute ('none' clears it)")
    lset.add_argument("--max-concurrent", type=_limit, default=argparse.SUPPRESS,
                      help="concurrent generations ('none' clears it)")

    guard = groups.add_parser("guardrails", help="guardrail rules").add_subparsers(dest="admin_action", required=True)
    gadd = guard.add_parser("add", help="add a rule")
    gadd.add_argument("--id", default=None, help="rule id (default: generated)")
    what = gadd.add_mutually_exclusive_group(required=True)
    what.add_argument("--pattern", help="a regular expression")
    what.add_argument("--terms", help="comma-separated terms (blocklist, or values to protect)")
    what.add_argument("--entities", help="protect only: comma-separated built-in entity types, or 'default' for "
                                         f"{','.join(DEFAULT_ENTITIES)}")
    gadd.add_argument("--action", choices=list(ACTIONS), required=True)
    gadd.add_argument("--label", default="", help="protect: placeholder type of a pattern/terms rule, e.g. PERSON")
    gadd.add_argument("--protection", choices=list(PROTECTIONS), default="placeholder",
                      help="protect: replace spans by placeholders (default) or send them under heavy noise")
    gadd.add_argument("--applies-to", default="prompt", help="prompt, output or prompt,output")
    gadd.add_argument("--description", default="")
    guard.add_parser("list")
    guard.add_parser("remove").add_argument("rule_id")

    audit = groups.add_parser("audit", help="the audit log").add_subparsers(dest="admin_action", required=True)
    audit.add_parser("tail").add_argument("-n", type=int, default=20)
    audit.add_parser("verify")

    policy = groups.add_parser("policy", help="create, back up and restore the policy store").add_subparsers(
        dest="admin_action", required=True)
    init = policy.add_parser("init", help="create a new, empty policy store here (local files, no edge needed)")
    init.add_argument("--force", action="store_true",
                      help="also where traces of an earlier store remain (mark, audit log, Redis anchor); audited")
    policy.add_parser("export").add_argument("--out", help="file to write (default: stdout)")
    policy.add_parser("import").add_argument("file")

    use = groups.add_parser("usage", help="requests, tokens and refusals per key and per UTC day")
    use.add_argument("--key", default=None, help="one key id (or jwt:<subject>); default: every principal")
    use.add_argument("--since", default="7d", help="'7d' (the last 7 days, today included) or a date YYYY-MM-DD")
    use.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")

    groups.add_parser("whoami", help="the key in VEIL_ADMIN_KEY: id, scopes, limits")


def _request(settings: Settings, method: str, path: str, body: Any = None) -> Any:
    import httpx  # edge-side dependency; `veil admin` runs where the edge extras are installed

    headers = {"authorization": f"Bearer {settings.auth.admin_key}"} if settings.auth.admin_key else {}
    try:
        r = httpx.request(method, settings.admin.edge_url.rstrip("/") + path, json=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise VeilError(f"cannot reach the edge at {settings.admin.edge_url}", code="edge_unreachable") from exc
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {r.status_code}"
        raise VeilError(f"{message} (HTTP {r.status_code})", code="admin_request_failed")
    return r.json() if r.content else None


def _show_key(k: dict[str, Any]) -> str:
    limits = f"rpm={k['rpm'] or '-'} tpm={k['tpm'] or '-'} concurrent={k.get('max_concurrent') or '-'}"
    state = "active" if k["active"] else ("revoked" if k["revoked_at"] else "expired")
    return f"{k['id']}  {k['name']:<20} {','.join(k['scopes']):<22} {limits:<22} {state}"


_USAGE_COLUMNS = (("requests", "requests"), ("prompt", "prompt_tokens"), ("completion", "completion_tokens"),
                  ("401", "refused_401"), ("403", "refused_403"), ("429", "refused_429"),
                  ("policy", "refused_policy"), ("spans", "protected_spans"))


def _usage_table(report: dict[str, Any], names: dict[str, str]) -> str:
    """One line per day and principal, then the totals; refusals by status, protected spans last."""
    head = f"{'day':<10}  {'principal':<24} " + " ".join(f"{title:>10}" for title, _ in _USAGE_COLUMNS)
    lines = [head]
    for row in report["data"]:
        who = row["principal"] + (f" ({names[row['principal']]})" if row["principal"] in names else "")
        lines.append(f"{row['day']:<10}  {who[:24]:<24} " + " ".join(f"{row[c]:>10}" for _, c in _USAGE_COLUMNS))
    total = report["total"]
    lines.append(f"{'total':<10}  {'since ' + report['since']:<24} " +
                 " ".join(f"{total[c]:>10}" for _, c in _USAGE_COLUMNS))
    return "\n".join(lines)


def _policy_init(settings: Settings, force: bool) -> tuple[dict[str, Any], str]:
    """Works on the local files with VEIL_POLICY_PASSPHRASE: this is how a store is re-created on purpose."""
    from admin.policy_setup import init_policy

    store_id, found = init_policy(settings, force=force)
    out = {"store": str(settings.policy_store_path()), "store_id": store_id, "version": 1, "forced": force,
           "traces": found}
    text = f"created an empty policy store {out['store']} (store {store_id}, version 1)"
    if found:
        text += "\nover the traces of an earlier store (recorded in the audit log):\n" + "\n".join(f"  {t}" for t in found)
    return out, text


def run(settings: Settings, args: argparse.Namespace) -> int:
    g, a = args.admin_group, getattr(args, "admin_action", None)
    call = lambda method, path, body=None: _request(settings, method, path, body)  # noqa: E731
    if g == "keys" and a == "create":
        body = {"name": args.name, "scopes": [s for s in args.scopes.split(",") if s], "rpm": args.rpm,
                "tpm": args.tpm, "expires_in_s": args.expires_in, "noise_rho": args.noise_rho,
                "max_concurrent": args.max_concurrent}
        out = call("POST", "/admin/v1/keys", body)
        text = f"created {_show_key(out['key'])}\nsecret (shown once, store it now):\n{out['secret']}"
    elif g == "keys" and a == "list":
        out = call("GET", "/admin/v1/keys")
        text = "\n".join(_show_key(k) for k in out["data"]) or "no keys"
    elif g == "keys" and a == "show":
        out = call("GET", f"/admin/v1/keys/{args.key_id}")
        text = _show_key(out)
    elif g == "keys" and a == "revoke":
        out = call("POST", f"/admin/v1/keys/{args.key_id}/revoke")
        text = f"revoked {_show_key(out)}"
    elif g == "keys" and a == "rotate":
        out = call("POST", f"/admin/v1/keys/{args.key_id}/rotate")
        text = f"rotated {_show_key(out['key'])}\nnew secret (shown once):\n{out['secret']}"
    elif g == "limits":
        changes = {k: getattr(args, k) for k in LIMITS if hasattr(args, k)}  # only what was given
        if not changes:
            raise SystemExit("veil admin limits set: give --rpm, --tpm and/or --max-concurrent ('none' clears one)")
        out = call("PATCH", f"/admin/v1/keys/{args.key_id}/limits", changes)
        text = _show_key(out)
    elif g == "guardrails" and a == "add":
        import secrets

        body = {"id": args.id or f"rule-{secrets.token_hex(3)}", "action": args.action,
                "pattern": args.pattern or "", "terms": [t for t in (args.terms or "").split(",") if t],
                "applies_to": [t for t in args.applies_to.split(",") if t], "description": args.description}
        if args.entities:
            entities = [e.strip() for e in args.entities.split(",") if e.strip()]
            body["entities"] = DEFAULT_ENTITIES if entities == ["default"] else entities
        if args.action == "protect":
            body.update(label=args.label, protection=args.protection)
        out = call("POST", "/admin/v1/guardrails", body)
        how = f"{out['action']} ({out['protection']})" if out["action"] == "protect" else out["action"]
        text = f"added guardrail {out['id']} ({how} on {','.join(out['applies_to'])})"
    elif g == "guardrails" and a == "list":
        out = call("GET", "/admin/v1/guardrails")
        text = "\n".join(f"{r['id']}  {r['action']:<7} {','.join(r['applies_to']):<14} {_rule_matcher(r)}  "
                         f"{r['description']}" for r in out["data"]) or "no guardrails"
    elif g == "guardrails" and a == "remove":
        out = call("DELETE", f"/admin/v1/guardrails/{args.rule_id}")
        text = f"removed guardrail {args.rule_id}"
    elif g == "audit" and a == "tail":
        out = call("GET", f"/admin/v1/audit?n={args.n}")
        text = "\n".join(json.dumps(line, sort_keys=True) for line in out["data"])
    elif g == "audit" and a == "verify":
        out = call("GET", "/admin/v1/audit/verify")
        text = f"audit log ok ({out['lines']} lines)" if out["ok"] else \
            f"audit log BROKEN at line {out['bad_line']}: {out['reason']}"
        if not args.json:
            print(text)
            return 0 if out["ok"] else 1
    elif g == "policy" and a == "init":
        out, text = _policy_init(settings, args.force)
    elif g == "policy" and a == "export":
        out = call("GET", "/admin/v1/policy/export")
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
            text = f"exported policy version {out['version']} to {args.out}"
        else:
            text = json.dumps(out, indent=2)
    elif g == "policy" and a == "import":
        out = call("POST", "/admin/v1/policy/import", json.loads(Path(args.file).read_text()))
        text = f"imported; policy is now version {out['version']}"
    elif g == "usage":
        from urllib.parse import urlencode

        query = urlencode({"since": args.since, **({"key_id": args.key} if args.key else {})})
        out = call("GET", f"/admin/v1/usage?{query}")
        names = {k["id"]: k["name"] for k in call("GET", "/admin/v1/keys")["data"]} if not args.json else {}
        text = _usage_table(out, names)
    else:  # whoami
        out = call("GET", "/v1/me")
        text = f"{out['key_id']} ({out['kind']}) scopes={','.join(out['scopes'])} rpm={out['rpm']} tpm={out['tpm']}"
    print(json.dumps(out, indent=2) if args.json else text)
    if g == "audit" and a == "verify":
        return 0 if out["ok"] else 1
    return 0
