"""POST /v1/responses with the real openai client: a tiny in-process core (fast), and SmolLM2 (slow).

Greedy parity with chat completions is the check that input items, instructions, tools and formats become
exactly the chat messages and options they stand for.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from litestar import Litestar

from admin.plane import build_plane
from cloaking.secretbox import KeySource
from edge_proxy.app import create_app
from edge_proxy.edge_model import EdgeModel
from edge_proxy.responses_route import STREAM_EVENTS, responses
from tests.conftest import SMOL_NAME
from tests.edge_app import ThreadedEdge
from tests.edge_proxy.test_routes import MODEL, tiny_edge_settings
from tests.inprocess_core import InProcessCore
from veil.errors import CoreTimeout
from veil.wire import StepRequest, StepResult

PICK = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER}
CHAT_TOOL = {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}
ARGS = '{"city": "Paris", "unit": "c"}'


class FlakyCore(InProcessCore):
    """Times out on a session's third decode step: after the stream's 200, before the reply ends."""

    def __init__(self, core_dir: Any):
        super().__init__(core_dir)
        self.decodes: dict[str, int] = {}

    async def step(self, req: StepRequest) -> StepResult:
        if req.offset:
            self.decodes[req.session] = self.decodes.get(req.session, 0) + 1
            if self.decodes[req.session] == 3:
                raise CoreTimeout("the core did not answer in time")
        return await super().step(req)


def _serve(tiny_bundles, key_file, tmp_path_factory, core_class: type[InProcessCore]):
    _, edge_dir, core_dir = tiny_bundles["llama"]
    settings = tiny_edge_settings(tmp_path_factory.mktemp("responses-home"))
    core = core_class(core_dir)
    app = create_app(settings, EdgeModel.load(edge_dir, KeySource(key_file=key_file)), core=core,
                     plane=build_plane(settings))
    return ThreadedEdge(app), core, app


@pytest.fixture(scope="module")
def edge(tiny_bundles, key_file, tmp_path_factory):
    server, core, app = _serve(tiny_bundles, key_file, tmp_path_factory, InProcessCore)
    yield server, core, app
    server.stop()


@pytest.fixture(scope="module")
def client(edge) -> openai.OpenAI:
    return openai.OpenAI(base_url=edge[0].url + "/v1", api_key="unused", max_retries=0)


def _settled(app: Litestar, core: InProcessCore) -> bool:
    """Every admission released and every core session closed (the release runs just after the last byte)."""
    deadline = time.monotonic() + 5
    while app.state.gate.sessions.total or len(core.table):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _same_as_chat(r: Any, chat: Any) -> None:
    """A Response says what the chat completion for the same conversation says."""
    message = chat.choices[0].message
    if message.tool_calls:
        assert [(o.type, o.name, o.arguments) for o in r.output] == [
            ("function_call", c.function.name, c.function.arguments) for c in message.tool_calls]
    else:
        assert r.output_text == message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens


def test_a_string_input_is_one_user_message(client: openai.OpenAI, edge) -> None:
    r = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8, temperature=0,
                                metadata={"team": "a"}, store=True)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.status in ("completed", "incomplete") and r.store is False and r.metadata == {"team": "a"}
    [item] = r.output
    assert item.type == "message" and item.id.startswith("msg_") and item.role == "assistant"
    assert item.content[0].type == "output_text" and r.output_text == item.content[0].text
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens and r.error is None
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                          max_tokens=8, temperature=0)
    _same_as_chat(r, chat)
    assert _settled(edge[2], edge[1])


def test_message_items_and_instructions_are_the_chat_messages(client: openai.OpenAI) -> None:
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi. "},
                                                              {"type": "input_text", "text": "Name a fruit."}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Apple."}]},
             {"role": "user", "content": "Another?"}]
    r = client.responses.create(model=MODEL, instructions="You are terse.", input=items, max_output_tokens=10,
                                temperature=0)
    assert r.instructions == "You are terse."
    chat = client.chat.completions.create(model=MODEL, max_tokens=10, temperature=0, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi. Name a fruit."}, {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "Another?"}])
    _same_as_chat(r, chat)


def _check_sequence(events: list[Any]) -> None:
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert {e.type for e in events} <= set(STREAM_EVENTS)
    final = events[-1].response
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.id for i in done] == [o.id for o in final.output]
    assert [e.output_index for e in events if e.type == "response.output_item.added"] == list(range(len(done)))


def test_a_text_stream_is_ordered_numbered_and_adds_up(client: openai.OpenAI, edge) -> None:
    kw: dict[str, Any] = dict(model=MODEL, input="Say hello.", max_output_tokens=12, temperature=0)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    _check_sequence(events)
    kinds = [e.type for e in events]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in events[3:-2] if hasattr(e, "item_id"))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text == events[-4].text == final.output_text == whole.output_text
    assert final.usage.total_tokens == whole.usage.total_tokens and final.status == whole.status
    with client.responses.stream(**kw) as stream:  # the SDK's own accumulator agrees
        snapshots = [e.snapshot for e in stream if e.type == "response.output_text.delta"]
    assert snapshots[-1] == text
    assert _settled(edge[2], edge[1])


def test_the_raw_stream_names_each_event_and_has_no_done_line(edge) -> None:
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 4, "stream": True}
    with httpx.stream("POST", edge[0].url + "/v1/responses", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        blocks = r.read().decode().split("\n\n")
    assert blocks[-1] == "" and "[DONE]" not in "".join(blocks)
    for block in blocks[:-1]:
        event, data = block.split("\n")
        assert event.startswith("event: ") and json.loads(data.removeprefix("data: "))["type"] == event[7:]


def test_a_client_that_leaves_mid_stream_frees_its_session(edge) -> None:
    body = {"model": MODEL, "input": "Write a long story.", "max_output_tokens": 400, "stream": True}
    with httpx.stream("POST", edge[0].url + "/v1/responses", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    assert _settled(edge[2], edge[1])


def test_a_json_schema_format_gives_valid_json(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "name": "pick", "schema": PICK, "strict": True}
    r = client.responses.create(model=MODEL, input="Pick a color.", text={"format": fmt}, max_output_tokens=40,
                                temperature=0)
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), PICK)


@pytest.mark.parametrize("choice", [{"type": "function", "name": "get_weather"}, "required"])
def test_a_forced_tool_gives_a_function_call(client: openai.OpenAI, choice: Any) -> None:
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[TOOL], tool_choice=choice,
                                parallel_tool_calls=False, max_output_tokens=60, temperature=0)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_") and r.output_text == ""
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    assert r.tools[0].name == "get_weather" and r.tools[0].strict is True and r.parallel_tool_calls is False
    assert r.tool_choice == choice if isinstance(choice, str) else r.tool_choice.name == "get_weather"


def test_a_streamed_call_sends_its_arguments_in_pieces(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=MODEL, input="Weather in Paris?", tools=[TOOL], stream=True,
                                          tool_choice={"type": "function", "name": "get_weather"},
                                          max_output_tokens=60, temperature=0))
    _check_sequence(events)
    added = events[2]
    assert added.type == "response.output_item.added" and added.item.type == "function_call"
    assert added.item.arguments == "" and added.item.status == "in_progress"
    pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    [call] = events[-1].response.output
    assert pieces == done.arguments == call.arguments and call.call_id == added.item.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER)


def test_a_function_call_round_trip_is_the_chat_tool_turn(client: openai.OpenAI) -> None:
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": ARGS},
             {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees"}]
    r = client.responses.create(model=MODEL, input=items, tools=[TOOL], parallel_tool_calls=False,
                                max_output_tokens=30, temperature=0)
    chat = client.chat.completions.create(model=MODEL, tools=[CHAT_TOOL], parallel_tool_calls=False, max_tokens=30,
                                          temperature=0, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}])
    _same_as_chat(r, chat)


@pytest.mark.parametrize("extra, param, code", [
    ({"previous_response_id": "resp_123"}, "previous_response_id", "unsupported_parameter"),
    ({"conversation": "conv_1"}, "conversation", "unsupported_parameter"),
    ({"background": True}, "background", "unsupported_parameter"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_value"),
    ({"tools": [{**TOOL, "name": "two words"}]}, "tools[0].name", "invalid_value"),
    ({"text": {"format": {"type": "xml"}}}, "text.format", "invalid_value"),
    ({"text": {"format": {"type": "json_schema", "schema": PICK}}}, "text.format.name", "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]",
     "unsupported_value"),
])
def test_what_cannot_be_served_is_a_400_naming_the_param(client: openai.OpenAI, edge, extra: dict, param: str,
                                                          code: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(**{"model": MODEL, "input": "Hi", **extra})
    assert err.value.body["param"] == param and err.value.body["code"] == code
    assert _settled(edge[2], edge[1])


def test_an_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-5", input="Hi")


def test_a_failure_after_the_200_is_a_failed_response(tiny_bundles, key_file, tmp_path_factory) -> None:
    server, core, app = _serve(tiny_bundles, key_file, tmp_path_factory, FlakyCore)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        events = list(client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=40, stream=True,
                                              temperature=0))
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert "response.output_text.delta" in {e.type for e in events}, "the 200 went out before the failure"
        failed = events[-1]
        assert failed.type == "response.failed" and failed.response.status == "failed"
        assert failed.response.error.code == "server_error" and "in time" in failed.response.error.message
        with pytest.raises(openai.InternalServerError) as err:  # not streamed: the error's own status
            client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=40, temperature=0)
        assert err.value.status_code == 504
        assert _settled(app, core)
    finally:
        server.stop()


def test_the_route_documents_its_request_events_and_errors() -> None:
    op = Litestar(route_handlers=[responses]).openapi_schema.to_schema()["paths"]["/v1/responses"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["required"] == ["model", "input"]
    assert set(op["responses"]) == {"200", "400", "401", "403", "404", "413", "429", "502", "503", "504"}
    assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}


@pytest.mark.slow
def test_greedy_output_text_is_the_chat_completion(smol_servers) -> None:
    client = openai.OpenAI(base_url=smol_servers.base_url, api_key="unused", max_retries=0)
    question = "What is the capital of France?"
    r = client.responses.create(model=SMOL_NAME, input=question, temperature=0, max_output_tokens=40)
    chat = client.chat.completions.create(model=SMOL_NAME, messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=40)
    assert r.output_text and r.output_text == chat.choices[0].message.content
