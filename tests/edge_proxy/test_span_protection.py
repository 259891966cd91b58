"""Span protection end to end: a real uvicorn edge (SmolLM2) with protect rules, the official openai
client, and a recording core that keeps every step payload exactly as the edge sent it."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
import openai
import pytest
import torch

from admin.plane import build_plane
from cloaking.secretbox import KeySource
from edge_proxy.app import create_app
from edge_proxy.edge_model import EdgeModel
from edge_proxy.spans.restore import PLACEHOLDER
from tests.conftest import SMOL_NAME
from tests.edge_app import ThreadedEdge
from tests.inprocess_core import InProcessCore
from veil.settings import Settings

pytestmark = pytest.mark.slow

EMAIL, NAME, INVOICE, PROJECT = "dana.whitfield@acme.io", "Dana Whitfield", "4417-22", "Falcon"
RULES = [
    {"id": "pii", "action": "protect", "entities": ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD"]},
    {"id": "customers", "action": "protect", "terms": [NAME], "label": "PERSON"},
    {"id": "invoices", "action": "protect", "pattern": r"\b\d{4}-\d{2}\b", "label": "ID"},
    {"id": "codenames", "action": "protect", "terms": [PROJECT], "label": "PROJECT", "protection": "noise"},
]
COPY = [{"role": "user", "content": f"Write a short email to {NAME} confirming that order {INVOICE} has shipped."}]
LETTER = [{"role": "user", "content": f"Write one sentence to {NAME} ({EMAIL}) saying invoice {INVOICE} is paid."}]


@pytest.fixture(scope="module")
def protected(smol_bundles, key_file: Path, tmp_path_factory):
    edge_dir, core_dir = smol_bundles
    settings = Settings()
    settings.home = str(tmp_path_factory.mktemp("spans-home"))
    settings.model.name = SMOL_NAME
    plane = build_plane(settings)
    for rule in RULES:
        plane.policy.add_guardrail(rule)
    model = EdgeModel.load(edge_dir, KeySource(key_file=key_file))
    core = InProcessCore(core_dir)
    edge = ThreadedEdge(create_app(settings, model, core=core, plane=plane))
    client = openai.OpenAI(base_url=edge.url + "/v1", api_key="unused", max_retries=0)
    yield {"client": client, "core": core, "model": model, "edge": edge}
    edge.stop()


def _received_ids(model: EdgeModel, states: list[torch.Tensor]) -> list[int]:
    """Token ids of noise-free step payloads: each row equals one row of the rotated embedding table."""
    table = model.rotated_embed
    rows = torch.cat(states)
    nearest = torch.cdist(rows, table).argmin(-1)
    return [int(i) if torch.equal(row, table[i]) else -1 for row, i in zip(rows, nearest)]


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def _chat(client: openai.OpenAI, messages, stream: bool, max_tokens: int = 40) -> str:
    if not stream:
        return client.chat.completions.create(model=SMOL_NAME, messages=messages, temperature=0,
                                              max_tokens=max_tokens).choices[0].message.content
    chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=SMOL_NAME, messages=messages, temperature=0, max_tokens=max_tokens, stream=True) if c.choices]
    return "".join(chunks)


def test_values_never_reach_the_core_and_replies_come_back_restored(protected, caplog) -> None:
    client, core, model = protected["client"], protected["core"], protected["model"]
    tok = model.tokenizer
    caplog.set_level(logging.DEBUG)
    core.received.clear()
    texts = [_chat(client, LETTER, stream) for stream in (False, True)]
    copy = [_chat(client, COPY, stream, 24) for stream in (False, True)]
    assert texts[0] == texts[1] and copy[0] == copy[1], "streaming and non-streaming restore the same text"
    assert NAME in copy[0], "the model wrote <PERSON_1>; the client gets the name back"
    for text in texts + copy:
        assert not PLACEHOLDER.search(text), text

    ids = _received_ids(model, core.received)
    assert -1 not in ids, "every payload row is a plain token embedding (no noise rule fired here)"
    seen = tok.decode(ids)
    assert "<EMAIL_1>" in seen and "<PERSON_1>" in seen and "<ID_1>" in seen
    for value in (EMAIL, NAME, INVOICE, "whitfield", "acme.io", "4417"):
        assert value.lower() not in seen.lower()
        for variant in (value, " " + value):
            sub = tok(variant, add_special_tokens=False)["input_ids"]
            assert len(sub) < 2 or not _contains(ids, sub), value
    logs = caplog.text
    assert "rid=" in logs or "chat" in logs
    for value in (EMAIL, NAME, INVOICE, "<EMAIL_1>"):
        assert value not in logs


def test_noise_rule_sends_the_span_noised_and_everything_else_exact(protected) -> None:
    client, core, model = protected["client"], protected["core"], protected["model"]
    core.received.clear()
    _chat(client, [{"role": "user", "content": f"Is Project {PROJECT} on schedule?"}], False, 4)
    ids = _received_ids(model, core.received[:1])  # the prefill
    prompt = model.tokenizer(model.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Is Project {PROJECT} on schedule?"}], add_generation_prompt=True,
        tokenize=False), add_special_tokens=False)["input_ids"]
    noised = [i for i, t in enumerate(ids) if t == -1]
    assert noised and len(ids) == len(prompt)
    assert model.tokenizer.decode([prompt[i] for i in noised]).strip() == PROJECT
    assert all(ids[i] == prompt[i] for i in range(len(prompt)) if i not in noised)


def test_metrics_count_spans_and_restorations_by_type_only(protected) -> None:
    client = protected["client"]
    _chat(client, COPY, False, 24)
    metrics = httpx.get(protected["edge"].url + "/metrics").text
    assert re.search(r'veil_edge_protected_spans_total\{label="EMAIL",protection="placeholder"\} [1-9]', metrics)
    assert re.search(r'veil_edge_placeholders_total\{outcome="restored"\} [1-9]', metrics)
    assert EMAIL not in metrics and "whitfield" not in metrics.lower()
