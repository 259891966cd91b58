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


DISGUISES = ["ｐａｓｓｗｏｒｄ", "pass\u200bword", "pass\u00adword", "p\u200ca\u200ds\u2060s\ufeffword", "PASSWORD",
             "pass\u202eword"]


@pytest.mark.parametrize("text", DISGUISES)
def test_terms_match_through_fullwidth_letters_and_invisible_characters(text: str) -> None:
    g = Guardrails([GuardrailRule("pw", "block", terms=["password"])])
    with pytest.raises(PolicyViolation):
        g.check_prompt(_msgs(f"my {text} is hunter2"))
    r = Guardrails([GuardrailRule("pw", "redact", terms=["password"])])
    out, fired = r.check_prompt(_msgs(f"my {text} is hunter2"))
    assert out[0]["content"] == f"my {REDACTED} is hunter2" and fired == ["pw"]  # redacted in the original


def test_a_fullwidth_term_matches_its_ascii_form_and_patterns_see_folded_text() -> None:
    g = Guardrails([GuardrailRule("f", "redact", terms=["ＦＡＬＣＯＮ"]), GuardrailRule("d", "redact", pattern=r"\d{4}")])
    out, fired = g.check_prompt(_msgs("falcon pin １２\u200b３４ end"))
    assert out[0]["content"] == f"{REDACTED} pin {REDACTED} end" and fired == ["f", "d"]


@pytest.mark.parametrize("pieces", [["The code is f", "\u200ba\u200bl", "\u200bc\u200bo", "\u200bn!"],
                                    ["ｆａｌ", "ｃｏｎ"], ["f" + "\u200b" * 40, "alcon"]])
def test_output_gate_holds_back_by_folded_length(pieces: list[str]) -> None:
    gate = Guardrails([GuardrailRule("s", "block", terms=["falcon"], applies_to=["output"])]).output_gate()
    sent, rule = [], None
    for piece in pieces:
        text, rule = gate.feed(piece)
        sent.append(text)
        if rule:
            break
    assert rule == "s"
    assert not any(c in "".join(sent).replace("The code is ", "") for c in "fａｆ"), sent


def test_output_patterns_hold_back_their_longest_match_or_are_refused() -> None:
    long_rule = GuardrailRule("k", "block", pattern=r"sk-[a-z]{100}", applies_to=["output"])
    assert long_rule.holdback() == 103  # was a fixed 64: a longer match streamed before the rule fired
    gate = Guardrails([long_rule]).output_gate()
    secret = "sk-" + "q" * 100
    sent = [gate.feed(secret[i:i + 7]) for i in range(0, len(secret), 7)]
    assert sent[-1][1] == "k" and "".join(t for t, _ in sent) == ""
    for pattern in (r"sk-[a-z]+", r"secret.*", r"x{5,2000}"):
        with pytest.raises(InvalidRequest, match="bounded"):
            GuardrailRule("u", "block", pattern=pattern, applies_to=["output"])
    GuardrailRule("u", "block", pattern=r"secret.*", applies_to=["prompt"])  # prompts are matched whole
