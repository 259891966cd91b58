"""Tool calling: the request's tools and tool_choice, how calls are written in the prompt, the grammar that
makes the model's calls well formed, and the parser that turns the reply's text back into OpenAI tool calls.

Calls use one syntax for every model: the Hermes form that Qwen2.5 and Qwen3 are trained on,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, blocks separated by a newline, and a tool's result goes back inside
`<tool_response>` ... `</tool_response>` in a user turn. A model whose chat template defines tools gets
the definitions from its own template; for one without (SmolLM2) Veil's convention writes them into
the system message (TOOLS_PREAMBLE). Either way the grammar fixes the call layout and makes each call's
arguments valid JSON under the function's parameters schema, so parsing the reply cannot fail.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from typing import Any

from edge_proxy.grammar import lark_json
from veil.errors import InvalidRequest

MAX_TOOLS = 128  # OpenAI's limit on 'tools'
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
_HEAD = OPEN + '{"name": "'
_ARGS = '", "arguments": '
_END = "}" + CLOSE  # closes the call object, then the block: cannot occur inside compact JSON arguments
# A model that goes on to write the tool's answer itself has finished calling: the reply ends there, and
# the parser drops this text (models not trained on the format reach for it rather than for EOS).
RESULT = "\n<tool_response>"
# a plain answer: text in which nothing opens like the format's tags (`<tool`, `</tool`), so a model can
# neither write a call the parser would miss nor invent the tool's response instead of calling it
# (llguidance's & and ~ on lexemes)
_TEXT_RULE = r"TEXT: /(?s:.+)/ & ~/(?s:.*)<\/?tool(?s:.*)/"


@dataclasses.dataclass(frozen=True, slots=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]

    def definition(self) -> dict[str, Any]:
        """As OpenAI's request carries it (and as chat templates expect it)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclasses.dataclass(frozen=True, slots=True)
class ToolSpec:
    functions: tuple[Function, ...]
    choice: str  # "auto", "required" or a function's name ("none" never builds a spec)
    parallel: bool = True

    @property
    def named(self) -> bool:
        return self.choice not in ("auto", "required")

    def offered(self) -> tuple[Function, ...]:
        return tuple(f for f in self.functions if f.name == self.choice) if self.named else self.functions


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def _function(raw: Any, i: int) -> Function:
    param = f"tools[{i}]"
    if not isinstance(raw, dict) or raw.get("type") != "function" or not isinstance(raw.get("function"), dict):
        raise _bad(f"{param} must be {{'type': 'function', 'function': {{...}}}}", param)
    fn = raw["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _bad(f"{param}.function.name must be 1-64 letters, digits, '_' or '-'", f"{param}.function.name")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise _bad(f"{param}.function.description must be a string", f"{param}.function.description")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise _bad(f"{param}.function.parameters must be a JSON schema object", f"{param}.function.parameters")
    return Function(name, description, parameters)


def parse_tools(body: dict[str, Any]) -> ToolSpec | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` of a chat request; None when no tool may be called."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    if raw is None:
        if choice not in (None, "none"):
            raise _bad("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(raw, list) or not raw or len(raw) > MAX_TOOLS:
        raise _bad(f"'tools' must be a non-empty array of at most {MAX_TOOLS} functions", "tools")
    functions = tuple(_function(t, i) for i, t in enumerate(raw))
    if len({f.name for f in functions}) != len(functions):
        raise _bad("'tools' names a function twice", "tools")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise _bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if choice is None or choice in ("auto", "required"):
        return ToolSpec(functions, choice or "auto", parallel)
    if choice == "none":
        return None
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise _bad("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                   "{'name': ...}}", "tool_choice")
    if name not in {f.name for f in functions}:
        raise _bad(f"'tool_choice' names a function that is not in 'tools': {name[:64]}", "tool_choice")
    return ToolSpec(functions, name, parallel)


# --- the prompt -----------------------------------------------------------------------------------------

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to help with the user's request. The functions are "
    "described, as JSON schemas, inside <tools></tools>:\n<tools>\n{definitions}\n</tools>\n\n"
    "To call functions, answer with nothing but one block per call, each a JSON object with the function's "
    "name and its arguments inside <tool_call></tool_call>:\n"
    "<tool_call>\n{{\"name\": <function-name>, \"arguments\": <arguments-json-object>}}\n</tool_call>\n"
    "A function's result comes back inside <tool_response></tool_response>. If no function is needed, "
    "answer in plain text."
)


def preamble(spec: ToolSpec) -> str:
    """Veil's convention for a model whose chat template has no tool format."""
    definitions = "\n".join(json.dumps(f.definition(), ensure_ascii=False) for f in spec.offered())
    return TOOLS_PREAMBLE.format(definitions=definitions)


def with_preamble(messages: list[dict[str, str]], spec: ToolSpec) -> list[dict[str, str]]:
    """The preamble joined to the system message (one is added at the front if there is none)."""
    text = preamble(spec)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def call_text(name: str, arguments: str) -> str:
    """One call as the model writes it (and as an assistant turn in the history shows it)."""
    return f"{_HEAD}{name}{_ARGS}{arguments}{_END}"


def assistant_text(content: str, calls: list[tuple[str, str]]) -> str:
    """An assistant turn that called tools, as text: its content, then its calls (as Qwen's template writes them)."""
    blocks = "\n".join(call_text(name, args) for name, args in calls)
    return f"{content}\n{blocks}" if content else blocks


def tool_results_text(results: list[str]) -> str:
    """Consecutive tool messages, as the one user turn that carries them."""
    return "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)


def fold_tool_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Messages with role 'tool' merged, run by run, into user turns of <tool_response> blocks."""
    out: list[dict[str, str]] = []
    run: list[str] = []
    for m in [*messages, {"role": "end", "content": ""}]:
        if m["role"] == "tool":
            run.append(m["content"])
            continue
        if run:
            out.append({"role": "user", "content": tool_results_text(run)})
            run = []
        if m["role"] != "end":
            out.append(m)
    return out


# --- the grammar ----------------------------------------------------------------------------------------

def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a Lark string literal: JSON's escapes are Lark's


def grammar(spec: ToolSpec, answer_rule: str | None = None) -> str:
    """Lark grammar of the reply: calls only (required, named), or calls or a plain answer (auto). An answer
    under response_format is `answer_rule` (a `%json` body) instead of free text."""
    rules, first, later = [], [], []
    for i, fn in enumerate(spec.offered()):
        # the newline between calls belongs to the next call's opening literal: as a lexeme of its own it
        # would be cut off by the longer `\n<tool_response>` before `call` could be read
        rules.append(f"call_{i}: {_literal(_HEAD + fn.name + _ARGS)} args_{i} {_literal(_END)}")
        rules.append(f"next_{i}: {_literal(chr(10) + _HEAD + fn.name + _ARGS)} args_{i} {_literal(_END)}")
        rules.append(f"args_{i}: {lark_json(fn.parameters)}")
        first.append(f"call_{i}")
        later.append(f"next_{i}")
    rules.append("call: " + " | ".join(first))
    rules.append("next: " + " | ".join(later))
    single = spec.named or not spec.parallel
    rules.append(f"calls: call{'' if single else ' next*'} {_literal(RESULT)}?")
    if spec.choice != "auto":
        start = "start: calls"
    elif answer_rule is not None:
        start = "start: calls | answer"
        rules.append(f"answer: {answer_rule}")
    else:
        start = "start: calls | TEXT"
        rules.append(_TEXT_RULE)
    return "\n".join([start, *rules]) + "\n"


# --- the reply ------------------------------------------------------------------------------------------

@dataclasses.dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str = ""

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


class ToolCallParser:
    """Reads a reply's text as it streams: plain content, or tool calls in the grammar's fixed layout.

    `feed` returns OpenAI delta objects (a `content` string, or `tool_calls` entries: the first for a call
    carries its id and name, the rest pieces of its arguments). Text that may still turn out to be part of
    the syntax is held back until it is known."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self.content: str = ""
        self._mode: str | None = None  # None until the first characters decide: "text" or "calls"
        self._buffer = ""
        self._in_args = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        if self._mode is None:
            if OPEN.startswith(self._buffer) and len(self._buffer) < len(OPEN):
                return []  # could still be the opening tag
            self._mode = "calls" if self._buffer.startswith(OPEN) else "text"
        if self._mode == "text":
            out, self._buffer = self._buffer, ""
            self.content += out
            return [{"content": out}] if out else []
        return self._calls()

    def finish(self) -> list[dict[str, Any]]:
        """The reply has ended (EOS, a stop string or the token limit): release what is held back."""
        if self._mode != "calls":
            out, self._buffer = self._buffer, ""
            self.content += out
            return [{"content": out}] if out else []
        deltas = self._calls()
        if self._in_args and self._buffer:  # cut off inside the arguments: pass on what there is
            deltas.append(self._args_delta(self._buffer))
            self._buffer = ""
        return deltas

    def _args_delta(self, piece: str) -> dict[str, Any]:
        self.calls[-1].arguments += piece
        return {"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": piece}}]}

    def _calls(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        while True:
            if self._in_args:
                end = self._buffer.find(_END)
                if end < 0:  # hold back what could be the start of the closing `}\n</tool_call>`
                    keep = next((k for k in range(min(len(_END) - 1, len(self._buffer)), 0, -1)
                                 if _END.startswith(self._buffer[-k:])), 0)
                    piece, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
                    if piece:
                        deltas.append(self._args_delta(piece))
                    return deltas
                if end:
                    deltas.append(self._args_delta(self._buffer[:end]))
                self._buffer = self._buffer[end + len(_END):]
                self._in_args = False
                continue
            if self.calls and self._buffer.startswith("\n"):  # the newline between two calls
                self._buffer = self._buffer[1:]
            if not self._buffer.startswith(_HEAD):
                return deltas
            name_end = self._buffer.find(_ARGS, len(_HEAD))
            if name_end < 0:
                return deltas
            call = ToolCall(new_call_id(), self._buffer[len(_HEAD):name_end])
            self.calls.append(call)
            deltas.append({"tool_calls": [{"index": len(self.calls) - 1, "id": call.id, "type": "function",
                                           "function": {"name": call.name, "arguments": ""}}]})
            self._buffer = self._buffer[name_end + len(_ARGS):]
            self._in_args = True
