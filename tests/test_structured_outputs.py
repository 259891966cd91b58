"""Structured outputs and tool calls with the real SmolLM2 behind real core and edge servers, through the
official openai client: every schema's output validates, stream and not, and tool-call round trips work."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import SMOL_NAME
from tests.json_schemas import CASES

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
# one earlier exchange in the history, so the small model sees how a call and its result look
EXAMPLE = [
    {"role": "user", "content": "What is the weather in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 24, "sky": "sunny"}'},
    {"role": "assistant", "content": "It is sunny in Rome, 24 degrees."},
]


@pytest.fixture(scope="module")
def client(smol_servers) -> openai.OpenAI:
    return openai.OpenAI(base_url=smol_servers.base_url, api_key="unused", max_retries=0)


@pytest.mark.parametrize("name, prompt, schema", CASES, ids=[c[0] for c in CASES])
def test_json_schema_output_validates_stream_and_not(client: openai.OpenAI, name: str, prompt: str,
                                                      schema: dict) -> None:
    kwargs = dict(model=SMOL_NAME, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=200,
                  response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                                          "strict": True}})
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].finish_reason == "stop", whole.choices[0].message.content
    jsonschema.validate(json.loads(whole.choices[0].message.content), schema)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content  # greedy: the same tokens either way
    jsonschema.validate(json.loads(streamed), schema)


def _call_back(messages: list[dict], reply) -> list[dict]:
    call = reply.choices[0].message.tool_calls[0]
    result = json.dumps({"temperature_c": 18, "sky": "cloudy"})
    return [*messages, reply.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": result}]


@pytest.mark.parametrize("choice", ["auto", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_call_round_trip(client: openai.OpenAI, choice) -> None:
    messages = [*EXAMPLE, {"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=SMOL_NAME, messages=messages, tools=[WEATHER], tool_choice=choice,
                                           temperature=0, max_tokens=60)
    calls = first.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather", first.choices[0].message.content
    assert first.choices[0].finish_reason == ("tool_calls" if choice == "auto" else "stop")
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    final = client.chat.completions.create(model=SMOL_NAME, messages=_call_back(messages, first), tools=[WEATHER],
                                           tool_choice="auto", temperature=0, max_tokens=40)
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content


def test_streamed_tool_call_matches_the_whole_one(client: openai.OpenAI) -> None:
    kwargs = dict(model=SMOL_NAME, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
                  tool_choice="required", temperature=0, max_tokens=60)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    args = "".join(tc.function.arguments or "" for c in chunks for tc in c.choices[0].delta.tool_calls or [])
    assert args == whole.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "tool_calls"
