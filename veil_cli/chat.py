"""`veil chat`: an interactive terminal chat against a running edge, streamed as it is generated.

It speaks only the public OpenAI API (`/v1/models`, `/v1/chat/completions` with `stream: true`), so it
works against any edge, local or shared. With stdin not a terminal there is no prompt and stdout carries
only the replies, one per input line, so scripts can pipe questions through it; the exit code is then 1
if any turn failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Generator, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import httpx

from veil.errors import VeilError
from veil.settings import Settings

PROMPT, PREFIX = "you> ", "veil> "
HELP = """commands:
  /system TEXT  set or replace the system prompt (/system alone clears it)
  /reset        forget the conversation, keep the system prompt
  /help         this list
  /exit, /quit  leave (Ctrl-D too); Ctrl-C stops a reply while it streams, at the prompt it leaves"""
# Prefill and a wait for a free core session come before the first token: reads get a long timeout.
TIMEOUT = httpx.Timeout(10.0, read=300.0)


def add_parser(sub: Any) -> None:
    chat = sub.add_parser("chat", help="chat with a running edge in the terminal (streamed)")
    chat.add_argument("--url", default=None, help="the edge's root URL (default: VEIL_EDGE_URL, http://127.0.0.1:8000)")
    chat.add_argument("--model", default=None, help="model id (default: the first one the edge lists)")
    chat.add_argument("--api-key", default=None, help="API key to send (default: VEIL_API_KEY; none when empty)")
    chat.add_argument("--system", default="", metavar="TEXT", help="initial system prompt")
    chat.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the edge's)")
    chat.add_argument("--max-tokens", type=int, default=None, help="most tokens per reply (default: the edge's)")
    chat.set_defaults(run=run)


class ChatError(Exception):
    """A turn that failed, in the words to show the user; the session goes on."""


@dataclass(slots=True)
class Conversation:
    """The system prompt and the completed turns, sent in full each turn (the edge keeps no state)."""

    system: str = ""
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, question: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + [{"role": "user", "content": question}]

    def record(self, question: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def run_command(line: str, conv: Conversation) -> str | None:
    """Apply one /command to the conversation: what to tell the user, or None to leave."""
    name, _, rest = line.strip().partition(" ")
    if name in ("/exit", "/quit"):
        return None
    if name == "/reset":
        conv.turns.clear()
        return "history cleared" + (" (system prompt kept)" if conv.system else "")
    if name == "/system":
        conv.system = rest.strip()
        return "system prompt set" if conv.system else "system prompt cleared"
    if name == "/help":
        return HELP
    return f"unknown command {name}; /help lists the commands"


def error_text(payload: Any, status: int | None = None) -> str:
    """`<message> (<code>)` from OpenAI's error object; the HTTP status stands in for what the body lacks."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict) and err.get("message"):
        code = err.get("code") or err.get("type") or (f"HTTP {status}" if status else "")
        return f"{err['message']} ({code})" if code else str(err["message"])
    return f"the edge answered HTTP {status}" if status else "the edge sent an error without a message"


def sse_events(lines: Iterable[str]) -> Iterator[str]:
    """The data of each Server-Sent Event: its `data:` lines joined, up to the blank line that ends it."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        # other fields (event:, id:, retry:) and `:` comments carry nothing a chat needs
    if data:
        yield "\n".join(data)


def chat_deltas(events: Iterable[str]) -> Iterator[str]:
    """The content pieces of a chat completion stream, up to `[DONE]`.

    An error event, or a stream that ends without `[DONE]`, raises ChatError: a reply cut short must not
    enter the history as if it were whole.
    """
    for data in events:
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise ChatError("the edge sent an event that is not JSON") from None
        if not isinstance(chunk, dict):
            raise ChatError("the edge sent an event that is not a JSON object")
        if "error" in chunk:
            raise ChatError(error_text(chunk))
        for choice in chunk.get("choices") or ():
            content = (choice.get("delta") or {}).get("content") if isinstance(choice, dict) else None
            if content:
                yield content
    raise ChatError("the reply stream ended before [DONE]")


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


class Edge:
    """The edge's OpenAI API over one HTTP client; transport failures become one-line errors."""

    def __init__(self, url: str, api_key: str):
        self.url = url.rstrip("/").removesuffix("/v1")  # the OpenAI base URL `veil up` prints works too
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=TIMEOUT)

    def _failure(self, exc: httpx.HTTPError) -> ChatError:
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return ChatError(f"cannot reach the edge at {self.url}")
        return ChatError(f"the connection to the edge at {self.url} failed ({type(exc).__name__})")

    def first_model(self) -> str:
        try:
            r = self.client.get(self.url + "/v1/models", timeout=10)
        except httpx.HTTPError as exc:
            raise self._failure(exc) from None
        body = _json(r)
        if r.status_code >= 400:
            raise ChatError(error_text(body, r.status_code))
        try:
            return str(body["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise ChatError(f"the edge at {self.url} lists no models") from None

    def deltas(self, body: dict[str, Any]) -> Generator[str, None, None]:
        """Stream one completion's content pieces; closing this generator closes the HTTP stream."""
        try:
            with self.client.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ChatError(error_text(_json(r), r.status_code))
                yield from chat_deltas(sse_events(r.iter_lines()))
        except httpx.HTTPError as exc:
            raise self._failure(exc) from None

    def close(self) -> None:
        self.client.close()


class ChatSession:
    """The read-ask-print loop. Prompt and reply prefix appear only on a terminal."""

    def __init__(self, edge: Edge, model: str, conv: Conversation, options: dict[str, Any], interactive: bool):
        self.edge, self.model, self.conv, self.options = edge, model, conv, options
        self.interactive = interactive
        self.failed = False

    def loop(self) -> int:
        while True:
            try:
                line = input(PROMPT if self.interactive else "")
            except EOFError:  # Ctrl-D, or the end of piped input
                if self.interactive:
                    print()
                return self._exit_code()
            except KeyboardInterrupt:  # Ctrl-C at the prompt: leave without a traceback
                print()
                return 0
            if not line.strip():
                continue
            if line.startswith("/"):
                message = run_command(line, self.conv)
                if message is None:
                    return self._exit_code()
                _notice(message)
                continue
            self.ask(line)

    def _exit_code(self) -> int:
        """Piped, a failed turn fails the run, so scripts notice; a person at a terminal already saw it."""
        return 1 if self.failed and not self.interactive else 0

    def ask(self, question: str) -> None:
        """One turn: it enters the history only once its reply is complete (not failed, not stopped)."""
        body = {"model": self.model, "messages": self.conv.messages(question), "stream": True, **self.options}
        answer = self._stream_reply(body)
        if answer is not None:
            self.conv.record(question, answer)

    def _stream_reply(self, body: dict[str, Any]) -> str | None:
        """Print the reply as it arrives; its text, or None when it failed or was stopped."""
        pieces: list[str] = []
        prefix = PREFIX if self.interactive else ""
        try:
            with closing(self.edge.deltas(body)) as deltas:  # closing: a Ctrl-C ends the HTTP stream at once
                for piece in deltas:
                    if not pieces:
                        sys.stdout.write(prefix)
                    pieces.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            _end_line(pieces)
            _notice("(stopped; this reply is not kept)")
            return None
        except ChatError as exc:
            _end_line(pieces)
            print(f"error: {exc}", file=sys.stderr, flush=True)
            self.failed = True
            return None
        sys.stdout.write(("" if pieces else prefix) + "\n")
        sys.stdout.flush()
        return "".join(pieces)


def _end_line(pieces: list[str]) -> None:
    """Finish a reply line cut short, so what follows starts on a line of its own."""
    if pieces:
        sys.stdout.write("\n")
        sys.stdout.flush()


def _notice(message: str) -> None:
    """Confirmations and help go to stderr: stdout carries only replies, for scripts."""
    print(message, file=sys.stderr, flush=True)


def _enable_line_editing() -> None:
    """Arrow keys edit the line and recall earlier ones where GNU readline (or libedit) is available."""
    try:
        import readline  # noqa: F401  (importing it is what makes input() use it)
    except ImportError:
        pass


def run(settings: Settings, args: argparse.Namespace) -> int:
    url = args.url or settings.admin.edge_url
    api_key = settings.admin.api_key if args.api_key is None else args.api_key
    options = {k: v for k, v in (("temperature", args.temperature), ("max_tokens", args.max_tokens)) if v is not None}
    interactive = sys.stdin.isatty()
    edge = Edge(url, api_key)
    try:
        try:
            model = args.model or edge.first_model()
        except ChatError as exc:
            raise VeilError(str(exc), code="chat_start_failed") from None
        if interactive:
            _enable_line_editing()
            _notice(f"veil chat with {model} at {edge.url}; /help lists the commands, Ctrl-D leaves")
        return ChatSession(edge, model, Conversation(system=args.system), options, interactive).loop()
    except KeyboardInterrupt:  # Ctrl-C before the first prompt (a slow edge): leave without a traceback
        print(file=sys.stderr)
        return 130
    finally:
        edge.close()
