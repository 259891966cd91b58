"""Structured outputs, tool calls, n and logprobs through the chat route, with the real openai client over a
real uvicorn edge and an in-process tiny core. The tiny model has random weights: whatever it prefers, the
grammar must hold it to the schema, so these are the grammar's hardest cases. Fast (make test-fast)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest
import torch

from admin.plane import build_plane
from cloaking.secretbox import KeySource
from edge_proxy.app import create_app
from edge_proxy.chat_template import render_prompt
from edge_proxy.edge_model import EdgeModel
from tests.edge_app import ThreadedEdge
from tests.edge_proxy.test_routes import MODEL, tiny_edge_settings
from tests.inprocess_core import InProcessCore

ASK = [{"role": "user", "content": "Describe a thing as JSON."}]
# bounded everywhere, so even a random model must close every string and array within the token budget
BOUNDED = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -5, "maximum": 5}},
     "required": ["ok", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
     "required": ["color", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "inner": {"type": "object", "properties": {"x": {"type": "number", "minimum": 0,
                                                                                       "maximum": 1}},
                                                "required": ["x"], "additionalProperties": False}},
     "required": ["name", "inner"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                      "maybe": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}},
     "required": ["code"], "additionalProperties": False},
]
TOOL = {"type": "function", "function": {"name": "pick", "description": "Pick a color",
                                          "parameters": BOUNDED[1]}}


@pytest.fixture(scope="module")
def edge(tiny_bundles, key_file: Path, tmp_path_factory):
    ckpt, edge_dir, core_dir = tiny_bundles["llama"]
    settings = tiny_edge_settings(tmp_path_factory.mktemp("structured-home"))
    model = EdgeModel.load(edge_dir, KeySource(key_file=key_file))
    core = InProcessCore(core_dir)
    server = ThreadedEdge(create_app(settings, model, core=core, plane=build_plane(settings)))
    yield server, core, model, ckpt
    server.stop()


@pytest.fixture(scope="module")
def client(edge) -> openai.OpenAI:
    return openai.OpenAI(base_url=edge[0].url + "/v1", api_key="unused", max_retries=0)


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}


@pytest.mark.parametrize("index", range(len(BOUNDED)))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_always_validates(client: openai.OpenAI, index: int, temperature: float) -> None:
    schema = BOUNDED[index]
    kwargs = dict(model=MODEL, messages=ASK, max_tokens=120, temperature=temperature, response_format=_schema_format(schema))
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole.choices[0].message.content), schema)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    jsonschema.validate(json.loads(streamed), schema)
    if temperature == 0:
        assert streamed == whole.choices[0].message.content


def test_json_object_output_is_an_object(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=0,
                                         response_format={"type": "json_object"})
    if out.choices[0].finish_reason == "stop":  # an unbounded object may run to the token limit
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:
        assert out.choices[0].message.content.startswith("{")


def test_a_schema_is_compiled_once(client: openai.OpenAI, edge) -> None:
    grammars = edge[2].grammars
    schema = {"type": "object", "properties": {"once": {"type": "boolean"}}, "required": ["once"]}
    for _ in range(3):
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=20, temperature=0,
                                       response_format=_schema_format(schema))
    before = grammars.compiled
    client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=20, temperature=0,
                                   response_format=_schema_format(schema))
    assert grammars.compiled == before


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "pick"}}])
def test_forced_tool_calls_have_valid_arguments(client: openai.OpenAI, choice) -> None:
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Pick."}], tools=[TOOL], tool_choice=choice,
                  max_tokens=120, temperature=0.0)
    out = client.chat.completions.create(**kwargs)
    msg = out.choices[0].message
    assert msg.content is None and msg.tool_calls and all(c.function.name == "pick" for c in msg.tool_calls)
    for call in msg.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), BOUNDED[1])
        assert call.id.startswith("call_") and call.type == "function"
    assert out.choices[0].finish_reason == ("tool_calls" if choice == "required" else "stop")
    calls: dict[int, dict] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
            entry["arguments"] += tc.function.arguments or ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in msg.tool_calls]


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=[TOOL], tool_choice="none", max_tokens=5,
                                         temperature=0)
    assert out.choices[0].message.tool_calls is None


def test_n_choices_greedy_identical_sampled_distinct(client: openai.OpenAI, edge) -> None:
    greedy = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    one = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    assert greedy.choices[0].message.content == one.choices[0].message.content
    assert greedy.usage.prompt_tokens == one.usage.prompt_tokens
    assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens
    sampled = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=1.0, n=3, seed=7)
    assert len({c.message.content for c in sampled.choices}) == 3
    again = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=1.0, n=3, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in sampled.choices]
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=1.0, n=3,
                                                 seed=7, stream=True))
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(3)]
    assert texts == [c.message.content for c in sampled.choices]
    assert len(edge[1].table) == 0, "the request's one core session was closed"


def test_logprobs_are_the_unsplit_models_log_softmax(client: openai.OpenAI, edge) -> None:
    model, ckpt = edge[2], edge[3]
    no_eos = {str(t): -100 for t in model.eos_ids}
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=5, logit_bias=no_eos)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    prompt = render_prompt(ckpt.tokenizer, ASK)
    # teacher-forced through the unsplit model: the logits at each position that produced a reply token
    ids = prompt + _reply_ids(out, model)
    with torch.inference_mode():
        logits = ckpt.model(torch.tensor([ids])).logits[0]
    want = torch.log_softmax(logits.float(), dim=-1)
    for i, entry in enumerate(content):
        pos = len(prompt) - 1 + i
        assert entry.logprob == pytest.approx(float(want[pos, ids[pos + 1]]), abs=1e-3)
        top = torch.topk(want[pos], 5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    streamed = [e for c in client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, temperature=0,
                                                           logprobs=True, top_logprobs=5, logit_bias=no_eos, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def _reply_ids(out, model: EdgeModel) -> list[int]:
    """The reply's token ids, from the bytes the logprobs report (one entry per token)."""
    table = {}
    for i in range(model.vocab_size):
        table.setdefault(model.grammars.token_bytes(i), i)
    return [table[bytes(e.bytes)] for e in out.choices[0].logprobs.content]


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"n": 17}, "n"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
])
def test_bad_structured_requests_are_400s(client: openai.OpenAI, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, extra_body=body)
    assert err.value.body["param"] == param
