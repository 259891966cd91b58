"""Span protection pieces: protect rules, offline detection, placeholders, token positions, span noise."""

from __future__ import annotations

import socket

import pytest
import torch

from admin.guardrails import DEFAULT_ENTITIES, GuardrailRule, Guardrails, rule_from_dict
from edge_proxy.chat_template import render_prompt, render_with_positions
from edge_proxy.spans.detect import SpanDetector
from edge_proxy.spans.protect import protect
from edge_proxy.spans.restore import PLACEHOLDER
from veil.errors import InvalidRequest

PII = GuardrailRule(id="pii", action="protect", entities=[e for e in DEFAULT_ENTITIES if e != "PERSON"])
NAMES = GuardrailRule(id="customers", action="protect", terms=["Dana Whitfield", "Kenji Takahashi"], label="PERSON")
INVOICES = GuardrailRule(id="invoices", action="protect", pattern=r"\b\d{4}-\d{2}\b", label="ID")
TEXT = ("Email Dana Whitfield at dana@acme.io about invoice 4417-22. Call +44 20 7946 0958 or (212) 555-0147; "
        "card 4111 1111 1111 1111, IBAN GB82 WEST 1234 5698 7654 32, server 10.0.0.17.")


@pytest.fixture(scope="module")
def detector() -> SpanDetector:
    d = SpanDetector([PII, NAMES, INVOICES])
    d.warm()
    return d


def test_protect_rules_are_validated() -> None:
    assert GuardrailRule(id="p", action="protect", terms=["x"]).label == "SECRET"
    with pytest.raises(InvalidRequest, match="unknown entity"):
        GuardrailRule(id="p", action="protect", entities=["SHOE_SIZE"])
    with pytest.raises(InvalidRequest, match="protect rules only"):
        GuardrailRule(id="p", action="block", entities=["EMAIL_ADDRESS"])
    with pytest.raises(InvalidRequest, match="label"):
        GuardrailRule(id="p", action="protect", terms=["x"], label="lower")
    with pytest.raises(InvalidRequest, match="protection"):
        GuardrailRule(id="p", action="protect", terms=["x"], protection="hide")
    with pytest.raises(InvalidRequest, match="exactly one"):
        GuardrailRule(id="p", action="protect", terms=["x"], entities=["EMAIL_ADDRESS"])
    with pytest.raises(InvalidRequest, match="output"):
        GuardrailRule(id="p", action="protect", terms=["x"], applies_to=["output"])
    rails = Guardrails([PII, GuardrailRule(id="b", action="block", terms=["nope"])])
    assert [r.id for r in rails.protect_rules] == ["pii"] and [r.id for r, _ in rails.prompt_rules] == ["b"]
    assert rails.check_prompt([{"role": "user", "content": "dana@acme.io"}])[1] == []  # protect is not redact
    old = {"id": "o", "action": "block", "pattern": "x", "terms": [], "applies_to": ["prompt"], "description": ""}
    assert rule_from_dict(old).entities == []  # rules stored before protect existed still load


def test_detection_runs_offline_and_finds_each_kind(detector: SpanDetector, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("span detection tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    found = {TEXT[s.start:s.end]: s.label for s in SpanDetector([PII, NAMES, INVOICES]).find(TEXT)}
    assert found == {"Dana Whitfield": "PERSON", "dana@acme.io": "EMAIL", "4417-22": "ID",
                     "+44 20 7946 0958": "PHONE", "(212) 555-0147": "PHONE", "4111 1111 1111 1111": "CARD",
                     "GB82 WEST 1234 5698 7654 32": "IBAN", "10.0.0.17": "IP"}
    # checksums: a card number failing Luhn and an IBAN failing mod 97 are not flagged as such
    labels = {s.label for s in detector.find("card 4111 1111 1111 1112, IBAN GB82 WEST 1234 5698 7654 33")}
    assert "CARD" not in labels and "IBAN" not in labels
    assert detector.find("the meeting is at noon in Leeds") == []
    ip = "ssh to 192.168.10.201 now"  # the phone recognizer also matches it, weakly: the IP label wins
    assert [(ip[s.start:s.end], s.label) for s in detector.find(ip)] == [("192.168.10.201", "IP")]


def test_overlapping_findings_merge_into_one_covering_span() -> None:
    rules = [GuardrailRule(id="a", action="protect", terms=["dana"], label="PERSON"),
             GuardrailRule(id="b", action="protect", entities=["EMAIL_ADDRESS"])]
    spans = SpanDetector(rules).find("write to dana@acme.io now")
    assert [(s.start, s.end, s.label) for s in spans] == [(9, 21, "EMAIL")]


def test_placeholders_are_typed_numbered_and_consistent_across_messages(detector: SpanDetector) -> None:
    messages = [{"role": "system", "content": "The user is Dana Whitfield."},
                {"role": "user", "content": "Mail dana@acme.io and Kenji Takahashi at k@x.org. "
                                            "Sign as Dana Whitfield. Literal <PERSON_1> stays."}]
    p = protect(detector, messages)
    assert p.messages[0]["content"] == "The user is <PERSON_2>."
    assert p.messages[1]["content"] == ("Mail <EMAIL_1> and <PERSON_3> at <EMAIL_2>. "
                                        "Sign as <PERSON_2>. Literal <PERSON_1> stays.")
    assert p.mapping == {"<PERSON_2>": "Dana Whitfield", "<EMAIL_1>": "dana@acme.io", "<PERSON_3>": "Kenji Takahashi",
                         "<EMAIL_2>": "k@x.org"}
    assert all(PLACEHOLDER.fullmatch(ph) for ph in p.mapping)
    assert p.noisy == [] and len(p.spans) == 5


def test_noise_spans_are_marked_in_the_substituted_text() -> None:
    rules = [GuardrailRule(id="n", action="protect", terms=["Project Falcon"], label="PROJECT", protection="noise"),
             GuardrailRule(id="e", action="protect", entities=["EMAIL_ADDRESS"])]
    p = protect(SpanDetector(rules), [{"role": "user", "content": "Ask a.b@acme.io about Project Falcon today."}])
    text = p.messages[0]["content"]
    assert text == "Ask <EMAIL_1> about Project Falcon today."
    (i, a, b), = p.noisy
    assert i == 0 and text[a:b] == "Project Falcon"


def test_placeholders_survive_template_and_tokenizer(smol, detector: SpanDetector) -> None:
    tok = smol.tokenizer
    p = protect(detector, [{"role": "user", "content": TEXT}])
    ids = render_prompt(tok, p.messages)
    decoded = tok.decode(ids)
    for ph in p.mapping:
        assert ph in decoded
    for value in p.mapping.values():
        assert value not in decoded


def test_token_positions_cover_exactly_the_spans(smol) -> None:
    tok = smol.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Codename Falcon, go."}]
    ids, positions = render_with_positions(tok, messages, [(1, 9, 15)])
    assert ids == render_prompt(tok, messages)
    assert positions and tok.decode([ids[t] for t in sorted(positions)]).strip() == "Falcon"
    assert render_with_positions(tok, messages, [])[1] == frozenset()


def test_span_noise_touches_only_marked_positions(tiny_checkpoints, key_file, tmp_path) -> None:
    from cloaking.checkpoint import load_checkpoint
    from cloaking.cloak import cloak
    from cloaking.secretbox import KeySource
    from edge_proxy.edge_model import EdgeModel
    from edge_proxy.outgoing import NoiseSpec, OutgoingStates, SpanNoise

    cloak(load_checkpoint(tiny_checkpoints["llama"]), tmp_path / "edge", tmp_path / "core", KeySource(key_file=key_file),
          "tiny", progress=False)
    model = EdgeModel.load(tmp_path / "edge", KeySource(key_file=key_file))
    ids = [5, 6, 7, 8, 9]
    clean = OutgoingStates(model, NoiseSpec())(ids, 0)
    noisy = OutgoingStates(model, NoiseSpec(), torch.Generator().manual_seed(1), SpanNoise(frozenset({1, 3, 7}), 3.0))
    first, second = noisy(ids[:3], 0), noisy(ids[3:], 3)
    out = torch.cat([first, second])
    changed = [i for i in range(5) if not torch.equal(out[i], clean[i])]
    assert changed == [1, 3]
    sigma = 3.0 * model.embedding_rms
    assert 0.5 * sigma < float((out[changed] - clean[changed]).std()) < 2 * sigma
