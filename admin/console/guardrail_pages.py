"""The guardrails page: rules listed without their terms or patterns, added and removed by form.

A refused rule re-renders the form empty: whatever was typed (terms, a pattern) is never sent back.
"""

from __future__ import annotations

from litestar import Request, Response, get, post

from admin.api import audit_event as audit  # the REST API's lines, the same for a console change
from admin.console import forms
from admin.console.guard import Operator, change, operator, state_of
from admin.console.render import page, redirect
from admin.guardrails import ACTIONS, ENTITY_LABELS, PROTECTIONS, TARGETS
from veil.errors import InvalidRequest

NOTICES = {"added": "The rule was added.", "removed": "The rule was removed."}
_SHOWN = ("id", "action", "applies_to", "entities", "label", "protection", "description")


def _shown(rule: dict) -> dict:
    """What the page may show of a rule: never its terms or pattern, only how many terms and whether a pattern."""
    out = {name: rule.get(name) for name in _SHOWN}
    out["terms_count"] = rule.get("terms_count", len(rule.get("terms") or []))
    out["has_pattern"] = rule.get("has_pattern", bool(rule.get("pattern")))
    return out


def _page(request: Request, me: Operator, status: int = 200, error: str | None = None,
          notice: str | None = None) -> Response[str]:
    rules = [_shown(r) for r in state_of(request).policy.list_guardrails()]
    return page("guardrails.html", status, me=me, active="guardrails", rules=rules, actions=ACTIONS,
                targets=TARGETS, protections=PROTECTIONS, entities=list(ENTITY_LABELS), error=error, notice=notice)


@get("/guardrails")
async def guardrails_list(request: Request) -> Response[str]:
    me = await operator(request)
    return _page(request, me, notice=NOTICES.get(request.query_params.get("done", "")))


@post("/guardrails")
async def guardrail_add(request: Request) -> Response[str]:
    me, form = await change(request)
    try:
        action = forms.choice(form, "action", ACTIONS)
        data = {"id": forms.text(form, "id", max_len=64), "action": action,
                "pattern": forms.text(form, "pattern", max_len=2000, strip=False),
                "terms": forms.lines(form, "terms"), "entities": forms.picks(form, "entities", ENTITY_LABELS),
                "applies_to": forms.picks(form, "applies_to", TARGETS), "description": forms.text(form, "description")}
        if action == "protect":  # label and protection mean nothing to the other actions
            data["label"] = forms.text(form, "label", max_len=24)
            data["protection"] = forms.choice(form, "protection", PROTECTIONS)
        rule = state_of(request).policy.add_guardrail(data)
    except InvalidRequest as exc:
        return _page(request, me, exc.status_code, exc.message)
    audit(request, "guardrail.add", me.key_id, rule_id=rule["id"], action=rule["action"])
    return redirect("/admin/guardrails?done=added")


@post("/guardrails/{rule_id:str}/remove")
async def guardrail_remove(request: Request, rule_id: str) -> Response[str]:
    me, _ = await change(request)
    state_of(request).policy.remove_guardrail(rule_id)  # 404 for an unknown id
    audit(request, "guardrail.remove", me.key_id, rule_id=rule_id)
    return redirect("/admin/guardrails?done=removed")
