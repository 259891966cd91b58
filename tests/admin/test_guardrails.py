import pytest

from admin.guardrails import REDACTED, GuardrailRule, Guardrails
from admin.policy import MemoryStore, PolicyService
from veil.errors import InvalidRequest, PolicyViolation


def _msgs(*texts: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": t} for t in texts]


def test_block_names_the_rule_and_never_the_text() -> None:
    g = Guardrails([GuardrailRule("codename-rule", "block", pattern=r"(?i)\bproject-x\b")])
    with pytest.raises(PolicyViolation) as exc:
        g.check_prompt(_msgs("hello", "Tell me about PROJECT-X now"))
    assert exc.value.rule_id == "codename-rule" and "codename-rule" in exc.value.message
    assert "project-x" not in exc.value.message.lower()
    assert exc.value.status_code == 400 and exc.value.code == "policy_violation"
    assert g.check_prompt(_msgs("projects are fine")) == (_msgs("projects are fine"), [])


def test_redact_terms_case_insensitively_on_word_boundaries() -> None:
    g = Guardrails([GuardrailRule("names", "redact", terms=["Dana Whitfield", "acme"])])
    out, fired = g.check_prompt(_msgs("Email dana whitfield at ACME, not acmeville."))
    assert out[0]["content"] == f"Email {REDACTED} at {REDACTED}, not acmeville." and fired == ["names"]


def test_output_gate_stops_before_a_blocked_term_is_sent() -> None:
    gate = Guardrails([GuardrailRule("secret", "block", terms=["falcon"], applies_to=["prompt", "output"])]).output_gate()
    sent = []
    for piece in ["The code name is ", "fal", "con and more"]:
        text, rule = gate.feed(piece)
        sent.append(text)
        if rule:
            break
    assert rule == "secret" and "fal" not in "".join(sent)
    gate2 = Guardrails([GuardrailRule("s", "block", terms=["falcon"], applies_to=["output"])]).output_gate()
    text, rule = gate2.feed("a falafel")
    assert rule is None and text + gate2.flush() == "a falafel"


@pytest.mark.parametrize("kwargs, needle", [
    (dict(id="x", action="explode", pattern="a"), "action"),
    (dict(id="x", action="block"), "exactly one"),
    (dict(id="x", action="block", pattern="(unclosed"), "regular expression"),
    (dict(id="bad id!", action="block", pattern="a"), "id"),
    (dict(id="x", action="redact", pattern="a", applies_to=["output"]), "output rules"),
])
def test_bad_rules_are_clear_400s(kwargs: dict, needle: str) -> None:
    with pytest.raises(InvalidRequest, match=needle):
        GuardrailRule(**kwargs)


def test_policy_service_manages_rules_and_recompiles_per_version() -> None:
    policy = PolicyService(MemoryStore())
    policy.add_guardrail({"id": "r1", "action": "block", "terms": ["zebra"]})
    with pytest.raises(InvalidRequest, match="exists"):
        policy.add_guardrail({"id": "r1", "action": "block", "terms": ["x"]})
    with pytest.raises(PolicyViolation):
        policy.guardrails().check_prompt(_msgs("a zebra"))
    policy.remove_guardrail("r1")
    assert policy.guardrails().check_prompt(_msgs("a zebra"))[1] == []
