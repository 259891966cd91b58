"""The usage page: tokens and refusals per UTC day as charts, and the same numbers per key and per day."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from admin.console import forms
from admin.console.charts import stacked_bars
from admin.console.guard import operator, state_of
from admin.console.render import page
from admin.usage import COUNTERS, days_from, parse_since, totals

PERIODS = [("7d", "Last 7 days"), ("30d", "Last 30 days"), ("90d", "Last 90 days")]
TOKENS = [("prompt_tokens", "prompt tokens"), ("completion_tokens", "completion tokens")]
REFUSALS = [("refused_401", "401 no or bad key"), ("refused_403", "403 scope"), ("refused_429", "429 limits"),
            ("refused_policy", "guardrail blocks")]
COLUMNS = [("requests", "Requests"), ("prompt_tokens", "Prompt tokens"), ("completion_tokens", "Completion tokens"),
           ("refused_401", "401"), ("refused_403", "403"), ("refused_429", "429"), ("refused_policy", "Blocked"),
           ("protected_spans", "Protected spans")]


def _summed(rows: list[dict[str, Any]], by: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        mine = out.setdefault(row[by], dict.fromkeys(COUNTERS, 0))
        for name in COUNTERS:
            mine[name] += row[name]
    return out


@get("/usage")
async def usage(request: Request) -> Response[str]:
    me = await operator(request)
    state = state_of(request)
    query = request.query_params
    since_text = forms.text(query, "since", max_len=20) or "7d"
    chosen = forms.text(query, "key", max_len=200) or None
    first = parse_since(since_text)  # 400 for anything but 'Nd' or a date in range
    rows = await state.usage.rows(chosen, first)
    names = {k["id"]: k["name"] for k in state.policy.list_keys()}
    days = days_from(first)
    per_day = _summed(rows, "day")
    per_key = [{"principal": who, "name": names.get(who, "—"), **counts}
               for who, counts in sorted(_summed(rows, "principal").items())]
    options = [{"id": key_id, "label": f"{name} ({key_id})"} for key_id, name in sorted(names.items())]
    if chosen is not None and chosen not in names:  # a JWT subject or 'unknown', reached by its URL
        options.append({"id": chosen, "label": chosen})
    periods = PERIODS if any(v == since_text for v, _ in PERIODS) else PERIODS + [(since_text, f"Since {first}")]
    return page("usage.html", me=me, active="usage", key_options=options, chosen_key=chosen, periods=periods,
                since=since_text, first_day=first.isoformat(), columns=COLUMNS, per_key=per_key, total=totals(rows),
                per_day=[{"day": d, **per_day[d]} for d in days if d in per_day],
                tokens_chart=stacked_bars("tokens", "Tokens per day", days, TOKENS, per_day),
                refusals_chart=stacked_bars("refusals", "Refusals per day", days, REFUSALS, per_day))
