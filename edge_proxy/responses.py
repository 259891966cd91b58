"""The OpenAI Responses API, stateless: a request body to a ChatRequest, and the Response object and its events.

Input items become the chat messages a ChatRequest carries (function calls and their outputs through the same
helpers as chat's tool turns), so everything after parsing (policy, template, grammar, generation) is chat's.
Nothing is stored: `store` is answered as false, and whatever needs a stored object is refused with a 400.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from typing import Any

from edge_proxy import openai_shapes as shapes
from edge_proxy import sse
from edge_proxy.generation import Generation
from edge_proxy.reply import ChoiceReply
from edge_proxy.sampling import SamplingParams
from edge_proxy.schemas import (
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    ChatRequest,
    int_param,
    invalid_value,
    load_object,
    number_param,
    output_schema,
)
from edge_proxy.tools import ToolCall, ToolSpec, assistant_text, fold_tool_messages, parse_tools
from veil.errors import InvalidRequest, VeilError

ROLES = {"user", "system", "developer", "assistant"}
MAX_METADATA = 16  # OpenAI's limits on 'metadata': pairs, key and value lengths
MAX_METADATA_KEY, MAX_METADATA_VALUE = 64, 512
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a json_schema format's name
_TEXT_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal"}  # part type -> its text field
# refused when set (a client relying on one would silently get something else): param -> why
REFUSED = {"previous_response_id": "Veil stores no responses; send the whole conversation in 'input'",
           "conversation": "Veil stores no conversations; send the whole conversation in 'input'",
           "prompt": "Veil stores no prompt templates", "background": "Veil runs no background responses",
           "include": "Veil has no extra output data to include", "reasoning": "the model has no reasoning options",
           "top_logprobs": "Veil's Responses API gives no log-probabilities"}
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}  # finish reason -> why incomplete


@dataclasses.dataclass(slots=True)
class ResponsesRequest:
    chat: ChatRequest
    echo: dict[str, Any]  # the request fields the Response object repeats


def _unsupported(message: str, param: str, code: str = "unsupported_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


# --- input items -> chat messages -----------------------------------------------------------------------

def _part_text(part: Any, param: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    field = _TEXT_PARTS.get(kind) if isinstance(kind, str) else None
    if field is None:
        raise _unsupported(f"{param}: only text parts are supported, got {str(kind)[:40]!r}", param)
    text = part.get(field)
    if not isinstance(text, str):
        raise invalid_value(f"{param}: a {kind} part needs a '{field}' string", param)
    return text


def _content(content: Any, param: str) -> str:
    """A message's (or a function output's) content: a string, or text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or len(content) > MAX_CONTENT_PARTS:
        raise invalid_value(f"{param} must be a string or a list of at most {MAX_CONTENT_PARTS} text parts", param)
    return "".join(_part_text(p, f"{param}[{j}]") for j, p in enumerate(content))


def _message(item: dict[str, Any], param: str) -> dict[str, str]:
    role = item.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise invalid_value(f"{param}.role must be one of {', '.join(sorted(ROLES))}", f"{param}.role")
    return {"role": "system" if role == "developer" else role, "content": _content(item.get("content"), f"{param}.content")}


def _call(item: dict[str, Any], param: str) -> tuple[str, str]:
    """An earlier function call: (name, arguments), the arguments as the model wrote them."""
    name, args, call_id = item.get("name"), item.get("arguments"), item.get("call_id")
    if not isinstance(name, str) or not isinstance(args, str) or not isinstance(call_id, str):
        raise invalid_value(f"{param}: a function_call needs 'call_id', 'name' and 'arguments' strings", param)
    return name, args


def _call_output(item: dict[str, Any], param: str) -> dict[str, str]:
    if not isinstance(item.get("call_id"), str):
        raise invalid_value(f"{param}: a function_call_output needs a 'call_id' string", f"{param}.call_id")
    return {"role": "tool", "content": _content(item.get("output"), f"{param}.output")}


def _calls_turn(out: list[dict[str, str]], calls: list[tuple[str, str]]) -> None:
    """A run of function calls is one assistant turn, joined to the assistant message just before it (as chat's
    tool_calls join that message's content)."""
    content = out.pop()["content"] if out and out[-1]["role"] == "assistant" else ""
    out.append({"role": "assistant", "content": assistant_text(content, calls)})


def _items(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        raise InvalidRequest("'input' is required", param="input", code="missing_required_parameter")
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw or len(raw) > MAX_MESSAGES:
        raise invalid_value(f"'input' must be a string or a non-empty array of at most {MAX_MESSAGES} items", "input")
    return raw


def input_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """`instructions` and `input` as chat messages: a leading system message, then one message per turn."""
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid_value("'instructions' must be a string", "instructions")
    out = [{"role": "system", "content": instructions}] if instructions else []
    calls: list[tuple[str, str]] = []
    for i, item in enumerate(_items(body.get("input"))):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid_value(f"{param} must be an object", param)
        kind = item.get("type", "message")
        if kind == "function_call":
            calls.append(_call(item, param))
            continue
        if calls:
            _calls_turn(out, calls)
            calls = []
        if kind == "message":
            out.append(_message(item, param))
        elif kind == "function_call_output":
            out.append(_call_output(item, param))
        else:
            raise _unsupported(f"{param}: items of type {str(kind)[:40]!r} are not supported", f"{param}.type")
    if calls:
        _calls_turn(out, calls)
    return fold_tool_messages(out)


# --- tools, text format, the rest -----------------------------------------------------------------------

def _function_tool(raw: Any, i: int) -> dict[str, Any]:
    """A flat Responses function tool -> chat's nested form (parse_tools checks the rest)."""
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind != "function":
        raise _unsupported(f"tools[{i}]: {str(kind)[:40]!r} tools are not supported, only 'function'", f"tools[{i}].type")
    strict = raw.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid_value(f"tools[{i}].strict must be a boolean", f"tools[{i}].strict")
    return {"type": "function", "function": {k: raw[k] for k in ("name", "description", "parameters") if k in raw}}


def _tool_choice(choice: Any) -> Any:
    """A Responses tool_choice -> chat's: strings as they are, {'type': 'function', 'name'} nested."""
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") != "function":
        raise _unsupported(f"'tool_choice' of type {str(choice.get('type'))[:40]!r} is not supported", "tool_choice")
    return {"type": "function", "function": {"name": choice.get("name")}}


def _tools(body: dict[str, Any]) -> tuple[ToolSpec | None, list[dict[str, Any]]]:
    """The ToolSpec, and the tools as the Response object repeats them."""
    raw, choice, parallel = body.get("tools") or None, body.get("tool_choice"), body.get("parallel_tool_calls")
    if raw is not None and not isinstance(raw, list):
        raise invalid_value("'tools' must be an array of function tools", "tools")
    chat = [_function_tool(t, i) for i, t in enumerate(raw or [])]
    if raw is None and choice == "auto":  # Responses' default choice, with or without tools
        choice = None
    try:
        spec = parse_tools({"tools": chat or None, "tool_choice": _tool_choice(choice),
                            "parallel_tool_calls": True if parallel is None else parallel})
    except InvalidRequest as exc:  # chat's errors name fields under 'function': a Responses tool is flat
        exc.message, exc.param = exc.message.replace(".function.", "."), exc.param and exc.param.replace(".function.", ".")
        raise
    # Responses' function tools are strict unless they say otherwise (Veil's grammar enforces them either way)
    echoed = [{"type": "function", "name": t["function"]["name"], "description": t["function"].get("description"),
               "parameters": t["function"].get("parameters"), "strict": raw_tool.get("strict") is not False}
              for t, raw_tool in zip(chat, raw or [])]
    return spec, echoed


def _json_schema(fmt: dict[str, Any]) -> dict[str, Any]:
    """A flat json_schema format (Responses puts name and schema beside 'type', chat nests them)."""
    name, schema, strict = fmt.get("name"), fmt.get("schema"), fmt.get("strict")
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid_value("text.format.name must be 1-64 letters, digits, '_' or '-'", "text.format.name")
    if not isinstance(schema, dict):
        raise invalid_value("text.format.schema must be a JSON schema object", "text.format.schema")
    if strict is not None and not isinstance(strict, bool):
        raise invalid_value("text.format.strict must be a boolean", "text.format.strict")
    return schema


def _text_format(body: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The JSON schema the reply must match (None for text), and `text` as the Response object repeats it."""
    text = body.get("text")
    if text is None:
        return None, {"format": {"type": "text"}}
    if not isinstance(text, dict):
        raise invalid_value("'text' must be an object", "text")
    fmt = text.get("format") or {"type": "text"}
    schema = _json_schema(fmt) if isinstance(fmt, dict) and fmt.get("type") == "json_schema" \
        else output_schema(fmt, "text.format")
    return schema, {**text, "format": fmt}


def _metadata(body: dict[str, Any]) -> dict[str, str]:
    raw = body.get("metadata")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_METADATA or not all(
            isinstance(k, str) and len(k) <= MAX_METADATA_KEY and isinstance(v, str) and len(v) <= MAX_METADATA_VALUE
            for k, v in raw.items()):
        raise invalid_value(f"'metadata' must map at most {MAX_METADATA} keys (up to {MAX_METADATA_KEY} characters) "
                            f"to strings (up to {MAX_METADATA_VALUE})", "metadata")
    return raw


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for key, why in REFUSED.items():
        if body.get(key):
            raise _unsupported(f"'{key}' is not supported: {why}", key, "unsupported_parameter")
    if body.get("truncation") not in (None, "disabled"):
        raise _unsupported("only truncation 'disabled' is supported: a prompt over the context is a 400", "truncation",
                           "unsupported_parameter")
    if not isinstance(body.get("store", False), (bool, type(None))):
        raise invalid_value("'store' must be a boolean", "store")


def parse_responses_request(raw: bytes) -> ResponsesRequest:
    body = load_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model", code="missing_required_parameter")
    _refuse_unsupported(body)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise invalid_value("'stream' must be a boolean", "stream")
    sampling = SamplingParams(temperature=number_param(body, "temperature", 1.0, 0.0, 2.0),
                              top_p=number_param(body, "top_p", 1.0, 0.0, 1.0))
    max_tokens = int_param(body, "max_output_tokens", 1)
    schema, text = _text_format(body)
    spec, tools = _tools(body)
    chat = ChatRequest(model=model, messages=input_messages(body), sampling=sampling, stream=stream,
                       max_tokens=max_tokens, output_schema=schema, tools=spec)
    echo = {"instructions": body.get("instructions"), "max_output_tokens": max_tokens, "metadata": _metadata(body),
            "parallel_tool_calls": body.get("parallel_tool_calls") is not False, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "text": text, "tool_choice": body.get("tool_choice") or "auto", "tools": tools}
    return ResponsesRequest(chat, echo)


# --- the Response object --------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def response_object(ids: shapes.ChatIds, echo: dict[str, Any], status: str, output: list[dict[str, Any]],
                    gens: list[Generation] | None = None, incomplete: str | None = None,
                    error: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Response: `gens` (once it has ended) gives its usage."""
    return {"id": ids.id, "object": "response", "created_at": ids.created, "status": status, "background": False,
            "completed_at": int(time.time()) if status == "completed" else None, "error": error,
            "incomplete_details": None if incomplete is None else {"reason": incomplete}, "model": ids.model,
            "output": output, "previous_response_id": None, "reasoning": None, "store": False,
            "truncation": "disabled", "usage": None if gens is None else usage(gens), **echo}


def usage(gens: list[Generation]) -> dict[str, Any]:
    used = shapes.usage(gens)
    return {"input_tokens": used["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": used["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": used["total_tokens"]}


def outcome(reply: ChoiceReply) -> tuple[str, str | None]:
    """(status, why incomplete) of the response a finished reply makes."""
    why = _INCOMPLETE.get(reply.finish_reason or "")
    return ("completed", None) if why is None else ("incomplete", why)


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [text_part(text)]}


def call_item(item_id: str, call: ToolCall, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name, "arguments": call.arguments,
            "status": status}


def final_response(ids: shapes.ChatIds, echo: dict[str, Any], reply: ChoiceReply,
                   gens: list[Generation]) -> dict[str, Any]:
    """The non-streaming answer: the reply's function calls, or its text as one message."""
    reply.finish()
    status, why = outcome(reply)
    calls = reply.parser.calls if reply.parser is not None else []
    if calls:
        output = [call_item(new_id("fc"), c, "completed") for c in calls]
    else:
        output = [message_item(new_id("msg"), reply.parser.content if reply.parser is not None else reply.text,
                               "completed")]
    output[-1]["status"] = status  # a cut-off reply leaves its last item incomplete
    return response_object(ids, echo, status, output, gens, why)


def failure(exc: VeilError) -> dict[str, Any]:
    """A failure after the 200, as the Response's `error`: OpenAI's codes, Veil's message."""
    code = "server_error" if exc.status_code >= 500 else "rate_limit_exceeded" if exc.status_code == 429 \
        else "invalid_prompt"
    return {"code": code, "message": exc.message}


# --- the event stream -----------------------------------------------------------------------------------

class ResponseEvents:
    """One response's server-sent events, numbered in order: an output item opens with its first delta and closes
    when the next one opens or the reply ends; the Response's output holds the items as they stand."""

    def __init__(self, ids: shapes.ChatIds, echo: dict[str, Any]):
        self.ids, self.echo = ids, echo
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self._open = False  # the last item of `output` still takes deltas

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\n".encode() + sse.event(data)

    def start(self) -> list[bytes]:
        snapshot = response_object(self.ids, self.echo, "in_progress", [])
        return [self._event("response.created", response=snapshot), self._event("response.in_progress", response=snapshot)]

    def deltas(self, deltas: list[dict[str, Any]]) -> list[bytes]:
        """A ChoiceReply's delta objects -> events."""
        out: list[bytes] = []
        for delta in deltas:
            if "content" in delta:
                out += self._text(delta["content"])
            for call in delta.get("tool_calls", []):
                out += self._call(call)
        return out

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.output[-1]["id"], "output_index": len(self.output) - 1}

    def _add(self, item: dict[str, Any], shown: dict[str, Any]) -> list[bytes]:
        """Open `item` (announced as `shown`), closing the one before it."""
        out = self.close("completed")
        self.output.append(item)
        self._open = True
        return [*out, self._event("response.output_item.added", output_index=len(self.output) - 1, item=shown)]

    def _open_message(self) -> list[bytes]:
        item = message_item(new_id("msg"), "", "in_progress")
        out = self._add(item, {**item, "content": []})
        return [*out, self._event("response.content_part.added", **self._where(), content_index=0, part=text_part(""))]

    def _text(self, text: str) -> list[bytes]:
        out = [] if self._open and self.output[-1]["type"] == "message" else self._open_message()
        self.output[-1]["content"][0]["text"] += text
        return [*out, self._event("response.output_text.delta", **self._where(), content_index=0, delta=text,
                                  logprobs=[])]

    def _call(self, delta: dict[str, Any]) -> list[bytes]:
        fn = delta.get("function", {})
        if "id" in delta:  # a new call: its id and name come first, its arguments after
            item = call_item(new_id("fc"), ToolCall(delta["id"], fn["name"]), "in_progress")
            return self._add(item, item)
        self.output[-1]["arguments"] += fn["arguments"]
        return [self._event("response.function_call_arguments.delta", **self._where(), delta=fn["arguments"])]

    def close(self, status: str) -> list[bytes]:
        """Close the open item, if any, with this status."""
        if not self._open:
            return []
        self._open = False
        item, where = self.output[-1], self._where()
        item["status"] = status
        if item["type"] == "function_call":
            out = [self._event("response.function_call_arguments.done", **where, arguments=item["arguments"])]
        else:
            part = item["content"][0]
            out = [self._event("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[]),
                   self._event("response.content_part.done", **where, content_index=0, part=part)]
        return [*out, self._event("response.output_item.done", output_index=where["output_index"], item=item)]

    def finish(self, reply: ChoiceReply, gens: list[Generation]) -> list[bytes]:
        """The reply has ended: close its last item (an empty message if it wrote nothing), then the Response."""
        status, why = outcome(reply)
        out = [] if self.output else self._open_message()  # an empty reply is an empty message, as without stream
        out += self.close(status)
        final = response_object(self.ids, self.echo, status, self.output, gens, why)
        return [*out, self._event(f"response.{status}", response=final)]

    def failed(self, exc: VeilError, gens: list[Generation]) -> bytes:
        return self._event("response.failed", response=response_object(self.ids, self.echo, "failed", self.output, gens,
                                                                         error=failure(exc)))
