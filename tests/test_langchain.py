"""LangChain's ChatOpenAI through the edge: structured output (json_schema and function calling), bound tools
and a tool round trip. Nothing here reaches the network: only the chat completions API is used (no token
counting, so tiktoken never downloads its encodings)."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.conftest import SMOL_NAME

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tracing, and any connection that is not to loopback fails the test (tiktoken, LangSmith, ...)."""
    for name in ("LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING", "LANGSMITH_TRACING", "LANGCHAIN_API_KEY",
                 "LANGSMITH_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_PROXY"):
        monkeypatch.delenv(name, raising=False)
    connect = socket.socket.connect

    def guarded(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"a test reached for the network: {address!r}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(description="The person's first name", max_length=40)
    age: int = Field(description="The person's age in years", ge=0, le=150)


@tool
def get_weather(city: str, unit: str = "celsius") -> str:
    """The current weather in a city."""
    return f'{{"city": "{city}", "temperature": 21, "unit": "{unit}", "sky": "sunny"}}'


def _llm(smol_servers, max_tokens: int = 120) -> ChatOpenAI:
    return ChatOpenAI(base_url=smol_servers.base_url, api_key="unused", model=SMOL_NAME, temperature=0,
                      max_tokens=max_tokens, max_retries=0, timeout=300)


PROMPT = "Extract the person from this sentence: Maria is 34 years old and lives in Lisbon."


@pytest.mark.parametrize("method", [None, "json_schema", "function_calling"])
def test_structured_output_gives_a_validated_model(smol_servers, method: str | None) -> None:
    llm = _llm(smol_servers)
    structured = llm.with_structured_output(Person) if method is None else \
        llm.with_structured_output(Person, method=method)
    result = structured.invoke(PROMPT)
    assert isinstance(result, Person), repr(result)
    assert isinstance(result.name, str) and len(result.name) <= 40
    assert isinstance(result.age, int) and 0 <= result.age <= 150


def test_structured_output_include_raw_keeps_the_message(smol_servers) -> None:
    structured = _llm(smol_servers).with_structured_output(Person, method="json_schema", include_raw=True)
    out = structured.invoke(PROMPT)
    assert out["parsing_error"] is None and isinstance(out["parsed"], Person)
    assert isinstance(out["raw"], AIMessage) and Person.model_validate_json(out["raw"].content) == out["parsed"]


def _forced_call(llm: ChatOpenAI, messages: list, strict: bool) -> tuple[AIMessage, dict]:
    ai = llm.bind_tools([get_weather], tool_choice="get_weather", strict=strict).invoke(messages)
    assert isinstance(ai, AIMessage) and not ai.invalid_tool_calls, ai
    assert len(ai.tool_calls) == 1, ai.tool_calls
    call = ai.tool_calls[0]
    assert call["name"] == "get_weather" and call["id"] and call["type"] == "tool_call"
    args = call["args"]
    assert isinstance(args, dict) and isinstance(args["city"], str), call
    if strict:  # every property required, no others
        assert set(args) == {"city", "unit"} and isinstance(args["unit"], str), call
    else:  # only 'city' is required, and the schema does not forbid other properties
        assert isinstance(args.get("unit", "celsius"), str), call
    return ai, call


def test_bound_tool_call_and_round_trip(smol_servers) -> None:
    llm = _llm(smol_servers)
    messages = [HumanMessage("What is the weather like in Paris today?")]
    _forced_call(llm, messages, strict=False)
    ai, call = _forced_call(llm, messages, strict=True)

    result = get_weather.invoke(call)  # a ToolMessage carrying the call's id
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    messages += [ai, result]
    final = llm.bind_tools([get_weather]).invoke(messages)
    assert isinstance(final, AIMessage)
    # the model may call the tool again (tool_choice is auto): either way the shape must be right
    if final.tool_calls:
        assert all(c["name"] == "get_weather" and isinstance(c["args"], dict) for c in final.tool_calls)
    else:
        assert isinstance(final.content, str) and final.content.strip(), final
    plain = llm.invoke(messages)  # without tools in the request: a text answer
    assert isinstance(plain, AIMessage) and not plain.tool_calls
    assert isinstance(plain.content, str) and plain.content.strip(), plain
    assert plain.response_metadata["finish_reason"] in ("stop", "length")
    assert plain.usage_metadata["output_tokens"] > 0
