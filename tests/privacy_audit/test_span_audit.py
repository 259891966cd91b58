"""Span protection's measurement: the shipped canary set, and a quick audit on the bundled model.

The quick audit is the check the feature must pass: in placeholder mode the attacks recover at
most 1% of the canaries the detector finds, and restored replies keep at least 95% of the
unprotected model's task utility. Recall and noise-mode recovery are reported, not asserted.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest

from edge_proxy.spans.detect import Span
from edge_proxy.spans.protect import ProtectedPrompt
from privacy_audit.span_audit import (
    MODES,
    QUICK_SPAN_PROMPTS,
    SpanConfig,
    audit_rules,
    found_canaries,
    run_span_audit,
    span_markdown,
)
from privacy_audit.span_canaries import (
    CUSTOMERS,
    DATA_FILE,
    ID_PATTERN,
    TYPES,
    Canary,
    SpanPrompt,
    build_span_prompts,
    iban_valid,
    load_span_prompts,
    luhn_valid,
    to_json,
)


def _canaries(kind: str) -> list[str]:
    return [c.value for p in load_span_prompts() for c in p.canaries if c.type == kind]


def test_shipped_file_is_what_the_builder_writes() -> None:
    assert DATA_FILE.read_text() == "".join(to_json(p) + "\n" for p in build_span_prompts())


def test_at_least_500_distinct_canaries_of_every_type_planted_verbatim() -> None:
    prompts = load_span_prompts()
    values = [c.value for p in prompts for c in p.canaries]
    assert len(prompts) >= 170 and len(set(values)) >= 500 and len(set(values)) == len(values)
    assert len({p.id for p in prompts}) == len(prompts)
    counts = Counter(c.type for p in prompts for c in p.canaries)
    assert set(counts) == set(TYPES) and min(counts.values()) >= 25, counts
    for p in prompts:
        assert 2 <= len(p.canaries) <= 4 and all(c.value in p.text for c in p.canaries), p.id
        roles = [m["role"] for m in p.messages]
        assert roles[-1] == "user" and 1 <= roles.count("user") <= 2 and set(roles) <= {"system", "user"}
    assert any(p.messages[0]["role"] == "system" for p in prompts)
    assert any([m["role"] for m in p.messages].count("user") == 2 for p in prompts)
    assert 0.4 <= sum(p.task for p in prompts) / len(prompts) <= 0.6


def test_formats_vary_within_each_type() -> None:
    emails = _canaries("email")
    assert any(e.endswith(".co.uk") for e in emails) and any(e.endswith(".com.au") for e in emails)
    assert any("+" in e.split("@")[0] for e in emails) and any("_" in e for e in emails)
    assert len({e.split("@")[1] for e in emails}) >= 20
    phones = _canaries("phone")
    for style in (r"^\(\d{3}\) \d{3}-\d{4}$", r"^\d{3}-\d{3}-\d{4}$", r"^\+1 \d{3} \d{3} \d{4}$", r"^\+44 ", r"^0\d",
                  r"^\+49 ", r"^\+33 "):
        assert any(re.search(style, p) for p in phones), style
    cards = _canaries("card")
    assert {c[0] for c in cards} >= {"3", "4", "5"}
    assert any(" " in c for c in cards) and any("-" in c for c in cards) and any(c.isdigit() for c in cards)
    ibans = _canaries("iban")
    assert len({i[:2] for i in ibans}) >= 5 and any(" " in i for i in ibans) and any(" " not in i for i in ibans)
    ids = _canaries("id")
    for style in (r"^\d{4}-\d{2}$", r"^ACC-\d{5}$", r"^INV-20\d\d-\d{4}$", r"^ORD-\d{6}$"):
        assert any(re.match(style, i) for i in ids), style
    assert all(re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", ip) for ip in _canaries("ip"))


def test_cards_pass_luhn_and_ibans_pass_mod_97() -> None:
    assert all(luhn_valid(c) for c in _canaries("card"))
    assert all(iban_valid(i) for i in _canaries("iban"))
    assert luhn_valid("4111 1111 1111 1111") and not luhn_valid("4111 1111 1111 1112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB82 WEST 1234 5698 7654 33")
    assert iban_valid("DE89370400440532013000") and iban_valid("NL91ABNA0417164300")


def test_the_operator_rules_know_the_customers_and_the_id_formats() -> None:
    assert set(_canaries("person")) <= set(CUSTOMERS)
    assert all(re.fullmatch(ID_PATTERN, i) for i in _canaries("id"))
    for other in ("212-555-0147", "4111-1111-1111-1111", "2024-05-12", "+44 20 7946 0958"):
        assert not re.search(ID_PATTERN, other), other
    rules = audit_rules("noise")
    assert [r.protection for r in rules] == ["noise"] * 3
    assert rules[0].entities and rules[1].terms and rules[2].pattern


def test_a_canary_is_found_only_when_spans_cover_every_occurrence() -> None:
    prompt = SpanPrompt("x", [{"role": "system", "content": "Agent: Dana Whitfield"},
                              {"role": "user", "content": "Mail dana@x.io or Dana Whitfield, ref 4417-22"}],
                        [Canary("Dana Whitfield", "person"), Canary("dana@x.io", "email"), Canary("4417-22", "id")],
                        False)

    def spans(*found: tuple[int, int, int]) -> ProtectedPrompt:
        return ProtectedPrompt(prompt.messages, {}, [], [(i, Span(a, b, "X", "r", "placeholder")) for i, a, b in found])

    user = prompt.messages[1]["content"]
    name, mail, ref = user.index("Dana W"), user.index("dana@"), user.index("4417")
    every = spans((0, 7, 21), (1, mail, mail + 9), (1, name, name + 14), (1, ref - 4, ref + 7))
    assert found_canaries(prompt, every) == [True, True, True]
    partial = spans((1, mail, mail + 8), (1, name, name + 14), (1, ref, ref + 7))
    assert found_canaries(prompt, partial) == [False, False, True]  # name missed in the system message


@pytest.mark.slow
def test_quick_span_audit_on_the_bundled_model(smol) -> None:
    section: dict[str, Any] = run_span_audit(smol, SpanConfig.quick())
    assert section["prompts"] == QUICK_SPAN_PROMPTS and set(section["modes"]) == set(MODES)
    assert section["task_prompts"] >= QUICK_SPAN_PROMPTS // 3
    quick_types = {c.type for p in load_span_prompts(QUICK_SPAN_PROMPTS) for c in p.canaries}
    assert set(section["recall"]["by_type"]) == quick_types == set(TYPES)

    none, placeholder, noise = (section["modes"][m] for m in MODES)
    assert none["recovery"]["all"]["mean"] >= 0.95, "without protection the lookup reads the canaries back"
    # the check: at most 1% of the canaries the detector finds are recovered (the mean, as the issue states it)
    assert placeholder["recovery"]["found"]["n"] > 0 and placeholder["recovery"]["found"]["mean"] <= 0.01
    assert placeholder["utility_ratio"] >= 0.95, (placeholder["utility"], none["utility"])
    assert noise["noised_positions"] > 0 and "C_lm_prior" in noise["attacks"]
    assert 0.0 <= noise["recovery"]["found"]["mean"] <= 1.0  # reported, not asserted
    table = span_markdown(section)
    assert "detector recall" in table and all(f"| {m} |" in table for m in MODES)
