"""`veil chat`: its stream parsing and commands alone, then the real command under a pseudo-terminal
against a real edge, checked against direct greedy requests with the same history."""

from __future__ import annotations

import codecs
import fcntl
import io
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import SMOL_NAME
from veil.settings import load_settings
from veil_cli import chat
from veil_cli.processes import free_port

# --- the parsing and the commands, without a server ----------------------------------------------


def _chunk(content: str) -> str:
    return 'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":%s}}]}' % (
        '"' + content + '"')


def test_sse_deltas_join_data_lines_skip_other_fields_and_stop_at_done() -> None:
    lines = [": keep-alive", "", 'data: {"choices":[{"delta":{"role":"assistant"}}]}', "",
             _chunk("Hel"), "", "event: message", "id: 3", _chunk("lo"), "",
             'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}', "", 'data: {"choices":[]}', "",
             "data: [DONE]", "", _chunk("never")]
    assert list(chat.chat_deltas(chat.sse_events(lines))) == ["Hel", "lo"]
    # one event may span several data: lines (joined with newlines); the space after the colon is optional
    assert list(chat.sse_events(['data:{"a":', "data: 1}", "", "data:[DONE]"])) == ['{"a":\n1}', "[DONE]"]


@pytest.mark.parametrize("lines, before, message", [
    ([_chunk("a"), "", 'data: {"error":{"message":"the core went away","type":"server_error","code":"core_unavailable"}}'],
     ["a"], "the core went away (core_unavailable)"),
    ([_chunk("a"), ""], ["a"], "the reply stream ended before [DONE]"),
    (["data: {not json", ""], [], "the edge sent an event that is not JSON"),
])
def test_sse_errors_and_cut_streams_raise(lines: list[str], before: list[str], message: str) -> None:
    got: list[str] = []
    with pytest.raises(chat.ChatError, match=re.escape(message)):
        for piece in chat.chat_deltas(chat.sse_events(lines)):
            got.append(piece)
    assert got == before


def test_error_text_reads_openai_errors_and_falls_back_to_the_status() -> None:
    body = {"error": {"message": "The model 'x' does not exist", "type": "invalid_request_error", "code": "model_not_found"}}
    assert chat.error_text(body, 404) == "The model 'x' does not exist (model_not_found)"
    no_code = {"error": {"message": "slow down", "type": "rate_limit", "code": None}}
    assert chat.error_text(no_code) == "slow down (rate_limit)"
    assert chat.error_text("<html>bad gateway</html>", 502) == "the edge answered HTTP 502"


def test_commands_change_the_conversation() -> None:
    conv = chat.Conversation(system="Be brief.")
    conv.record("Hi", "Hello!")
    assert conv.messages("Again") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"}]
    assert chat.run_command("/reset", conv) == "history cleared (system prompt kept)" and conv.turns == []
    assert chat.run_command("/system  Talk like a pirate. ", conv) == "system prompt set"
    assert conv.system == "Talk like a pirate."
    assert chat.run_command("/system", conv) == "system prompt cleared" and conv.messages("Q")[0]["role"] == "user"
    assert "/reset" in (chat.run_command("/help", conv) or "")
    assert chat.run_command("/exit", conv) is None and chat.run_command("/quit", conv) is None
    assert (chat.run_command("/sistem x", conv) or "").startswith("unknown command /sistem")


class _FakeEdge:
    """Replies from a script: pieces, then the end of the stream or an exception."""

    def __init__(self, *replies: tuple[list[str], BaseException | None]):
        self.replies = list(replies)
        self.bodies: list[dict[str, Any]] = []

    def deltas(self, body: dict[str, Any]) -> Iterator[str]:
        self.bodies.append(body)
        pieces, end = self.replies.pop(0)
        yield from pieces
        if end is not None:
            raise end


def test_failed_and_stopped_turns_stay_out_of_the_history(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    edge = _FakeEdge((["Par", "is"], None), (["Ber"], KeyboardInterrupt()), (["x"], chat.ChatError("boom (code)")),
                     (["Rome"], None))
    monkeypatch.setattr(sys, "stdin", io.StringIO("France?\n\nGermany?\n/bogus\nSpain?\nItaly?\n"))
    session = chat.ChatSession(edge, "m", chat.Conversation(), {"max_tokens": 5}, interactive=False)  # type: ignore[arg-type]
    assert session.loop() == 1  # piped, and a turn failed: a script sees it
    assert [m["content"] for m in edge.bodies[-1]["messages"]] == ["France?", "Paris", "Italy?"]
    assert edge.bodies[0] == {"model": "m", "messages": [{"role": "user", "content": "France?"}], "stream": True,
                              "max_tokens": 5}
    out, err = capsys.readouterr()
    assert out == "Paris\nBer\nx\nRome\n"  # piped: only the replies (a cut one ends its line)
    assert "error: boom (code)" in err and "stopped" in err and "unknown command /bogus" in err


def test_the_edge_client_takes_the_base_url_too_and_sends_a_key_only_when_set() -> None:
    assert load_settings(environ={"VEIL_API_KEY": "sk-veil-x"}).admin.api_key == "sk-veil-x"
    with_key, without = chat.Edge("http://127.0.0.1:8000/v1/", "sk-veil-x"), chat.Edge("http://h:1", "")
    assert with_key.url == "http://127.0.0.1:8000" and with_key.client.headers["authorization"] == "Bearer sk-veil-x"
    assert without.url == "http://h:1" and "authorization" not in without.client.headers
    with_key.close()
    without.close()


# --- the real command under a pseudo-terminal, against a real edge --------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


class Terminal:
    """`python -m veil_cli chat ...` on a pseudo-terminal: what a user sees, and keys as a user types them."""

    def __init__(self, *args: str):
        env = {k: v for k, v in os.environ.items() if not k.startswith("VEIL_")}
        env.update(TERM="dumb", HF_HUB_OFFLINE="1")  # dumb: readline draws no escape sequences to wade through
        argv = [sys.executable, "-m", "veil_cli", "chat", *args]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a session of its own with the pty as its controlling terminal
            try:
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        # wide enough that readline never scrolls a long input line sideways
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 500, 0, 0))
        self.raw, self.pos = "", 0
        self.status: int | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def text(self) -> str:
        return _ANSI.sub("", self.raw)

    def _read(self, timeout: float) -> bytes | None:
        """What the child wrote within `timeout` (None: nothing yet; b"": it closed the terminal)."""
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not ready:
            return None
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        self.raw += self._decoder.decode(data)
        return data

    def expect(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """Wait for `pattern` after the previous match; the transcript is in the failure message."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern, re.S).search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.monotonic() > deadline or self._read(deadline - time.monotonic()) == b"":
                pytest.fail(f"no {pattern!r} in the transcript:\n{self.text[-3000:]}")

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def ask(self, question: str) -> str:
        """Type a question and Enter; the reply as it appeared between the prefix and the next prompt."""
        self.type(question + "\r")
        return self.expect(r"veil> (.*?)\nyou> ").group(1)

    def command(self, line: str, confirmation: str) -> None:
        self.type(line + "\r")
        self.expect(re.escape(confirmation) + r"\nyou> ")

    def wait(self, timeout: float = 15) -> int:
        """The exit code, reading on so the child never blocks on a full terminal."""
        deadline = time.monotonic() + timeout
        while self.status is None and time.monotonic() < deadline:
            self._read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        if self.status is None:
            pytest.fail(f"veil chat did not exit; transcript:\n{self.text[-3000:]}")
        while self._read(0.1):
            pass  # what it wrote last
        return self.status

    def close(self) -> None:
        """Kill the child only while it is ours and unreaped, so no other process can be hit."""
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            self.status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    made: list[Terminal] = []
    yield made
    for t in made:
        t.close()


def _greedy(base_url: str, messages: list[dict[str, str]], max_tokens: int = 16) -> str:
    body = {"model": SMOL_NAME, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    r = httpx.post(base_url + "/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _streamed(smol_servers: Any, status: str = r"\S+") -> list[int]:
    """Prompt token counts of the streamed chats the edge has logged (with that end status)."""
    log = smol_servers.edge.log()
    return [int(n) for n in re.findall(rf"chat rid=\S+ status={status} stream=True prompt_tokens=(\d+)", log)]


def _wait_logged(smol_servers: Any, before: int, status: str = r"\S+") -> list[int]:
    """The edge logs a chat as it ends, maybe just after the client has its reply."""
    deadline = time.monotonic() + 15
    while len(got := _streamed(smol_servers, status)) <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


Q1, Q2 = "What is the capital of France?", "And what is the capital of Germany?"


@pytest.mark.slow
def test_a_conversation_streams_keeps_its_history_and_obeys_the_commands(smol_servers, terminals) -> None:
    t = Terminal("--url", smol_servers.edge.url, "--temperature", "0", "--max-tokens", "16")
    terminals.append(t)
    t.expect(re.escape(f"veil chat with {SMOL_NAME} at {smol_servers.edge.url}") + r".*?you> ")

    logged = len(_streamed(smol_servers))
    r1 = t.ask(Q1)
    assert r1.strip() and r1 == _greedy(smol_servers.base_url, [_user(Q1)])
    first_prompt = _wait_logged(smol_servers, logged)[-1]

    r2 = t.ask(Q2)  # sent with the first exchange: the edge's prompt grows, the reply is that history's
    assert r2 == _greedy(smol_servers.base_url, [_user(Q1), _assistant(r1), _user(Q2)])
    second_prompt = _wait_logged(smol_servers, logged + 1)[-1]
    assert second_prompt > first_prompt + 10

    system = "You are a pirate. Always answer like a pirate."
    t.command(f"/system {system}", "system prompt set")
    t.command("/reset", "history cleared (system prompt kept)")
    r3 = t.ask(Q1)
    assert r3 == _greedy(smol_servers.base_url, [{"role": "system", "content": system}, _user(Q1)])
    # the template's default system prompt gave way to ours, and the first exchange is gone
    assert _wait_logged(smol_servers, logged + 2)[-1] not in (first_prompt, second_prompt)

    t.command("/system", "system prompt cleared")
    t.command("/reset", "history cleared")
    assert t.ask(Q1) == r1  # greedy, from a clean slate again
    assert _wait_logged(smol_servers, logged + 3)[-1] == first_prompt

    t.command("/help", "at the prompt it leaves")
    t.type("\x04")  # Ctrl-D at an empty prompt
    assert t.wait() == 0
    assert "Traceback" not in t.text


@pytest.mark.slow
def test_an_error_answer_is_one_line_and_the_session_goes_on(smol_servers, terminals) -> None:
    t = Terminal("--url", smol_servers.edge.url, "--model", "nope", "--max-tokens", "16")
    terminals.append(t)
    t.expect("you> ")
    t.type("Hi\r")
    t.expect(r"\nerror: The model 'nope' does not exist \(model_not_found\)\nyou> ")
    t.type("Hello?\r")
    t.expect(r"\nerror: The model 'nope' does not exist \(model_not_found\)\nyou> ")
    t.type("/quit\r")
    assert t.wait() == 0
    assert "Traceback" not in t.text and "veil> " not in t.text


@pytest.mark.slow
def test_ctrl_c_stops_a_long_reply_and_at_the_prompt_leaves(smol_servers, terminals) -> None:
    t = Terminal("--url", smol_servers.edge.url, "--temperature", "0", "--max-tokens", "1000")
    terminals.append(t)
    t.expect("you> ")
    disconnected = len(_streamed(smol_servers, "disconnected"))
    t.type("Write a very long essay about rivers, their history and their importance.\r")
    t.expect(r"veil> \S+ \S+")  # the reply is streaming
    t.type("\x03")
    t.expect(r"\(stopped; this reply is not kept\)\nyou> ", timeout=10)
    assert len(_wait_logged(smol_servers, disconnected, "disconnected")) > disconnected  # the stream was closed
    t.type("\x03")  # at the prompt: leave
    assert t.wait() == 0
    assert "Traceback" not in t.text and "KeyboardInterrupt" not in t.text


@pytest.mark.slow
def test_piped_input_prints_only_the_replies_and_an_unreachable_edge_one_line(smol_servers) -> None:
    command = [sys.executable, "-m", "veil_cli", "chat", "--temperature", "0", "--max-tokens", "16"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VEIL_")}, "VEIL_EDGE_URL": smol_servers.edge.url}
    piped = subprocess.run(command, input=f"{Q1}\n/reset\n\n{Q1}\n", env=env, capture_output=True, text=True, timeout=60)
    r1 = _greedy(smol_servers.base_url, [_user(Q1)])
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == f"{r1}\n{r1}\n" and "you> " not in piped.stdout + piped.stderr

    env["VEIL_EDGE_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    down = subprocess.run(command, input=f"{Q1}\n", env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 2 and down.stdout == ""
    assert down.stderr.strip() == f"veil chat: cannot reach the edge at {env['VEIL_EDGE_URL']}"
