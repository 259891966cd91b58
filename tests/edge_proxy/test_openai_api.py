"""The official `openai` client against real edge and core servers on loopback ports, with the core on each
engine (native and vllm)."""

from __future__ import annotations

import concurrent.futures
import re
import time

import httpx
import openai
import pytest

from tests.conftest import SMOL_NAME
from veil_cli.processes import Server, base_env, free_port

pytestmark = pytest.mark.slow


@pytest.fixture()
def client(smol_servers_by_engine) -> openai.OpenAI:
    return openai.OpenAI(base_url=smol_servers_by_engine.base_url, api_key="unused", max_retries=0)


def _chat(client: openai.OpenAI, content: str, **kw):
    return client.chat.completions.create(model=SMOL_NAME, messages=[{"role": "user", "content": content}], **kw)


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [SMOL_NAME]
    assert client.models.retrieve(SMOL_NAME).id == SMOL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_non_stream_chat_has_usage_and_finish_reason(client: openai.OpenAI) -> None:
    r = _chat(client, "What is 2+2?", temperature=0, max_tokens=40)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
    assert r.usage.prompt_tokens > 10 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_chunks_follow_the_openai_format_with_usage(client: openai.OpenAI) -> None:
    chunks = list(_chat(client, "Name a color.", temperature=0, max_tokens=20, stream=True,
                        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_ends_with_done(smol_servers_by_engine) -> None:
    body = {"model": SMOL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", smol_servers_by_engine.base_url + "/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    r = _chat(client, "Write a long story about a dragon.", temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = _chat(client, "Write a long story about a dragon.", temperature=0, max_completion_tokens=4)
    assert r.usage.completion_tokens == 4


def test_stop_sequences_cut_and_never_leak(client: openai.OpenAI) -> None:
    full = _chat(client, "Count from 1 to 10, separated by commas.", temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    assert "5" in text
    stop = text[text.index("5"):text.index("5") + 2]  # e.g. "5," — spans a token boundary
    for stream in (False, True):
        if stream:
            pieces = [c.choices[0].delta.content or "" for c in _chat(
                client, "Count from 1 to 10, separated by commas.", temperature=0, max_tokens=40,
                stop=[stop, "zzz"], stream=True) if c.choices]
            got = "".join(pieces)
        else:
            r = _chat(client, "Count from 1 to 10, separated by commas.", temperature=0, max_tokens=40, stop=stop)
            got = r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop"
        assert got == text[: text.index(stop)] and stop not in got


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    kw = dict(temperature=1.0, top_p=0.95, max_tokens=24)
    a = _chat(client, "Invent a name for a cat.", seed=1234, **kw).choices[0].message.content
    b = _chat(client, "Invent a name for a cat.", seed=1234, **kw).choices[0].message.content
    outs = {_chat(client, "Invent a name for a cat.", seed=s, **kw).choices[0].message.content for s in range(4)}
    assert a == b and len(outs) > 1


def test_unicode_streams_intact(client: openai.OpenAI) -> None:
    prompt = "Repeat exactly: 🐉🔥 日本語 中文 ✨"
    full = _chat(client, prompt, temperature=0, max_tokens=40).choices[0].message.content
    pieces = [c.choices[0].delta.content for c in _chat(client, prompt, temperature=0, max_tokens=40, stream=True)
              if c.choices and c.choices[0].delta.content]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == full
    assert any(ord(ch) > 0x2E80 for ch in full), "the reply has emoji or CJK to stream"


def test_eight_concurrent_streams_complete_correctly(client: openai.OpenAI) -> None:
    prompts = [f"Give one fact about the number {i}." for i in range(8)]
    expected = [_chat(client, p, temperature=0, max_tokens=24).choices[0].message.content for p in prompts]

    def stream(p: str) -> str:
        return "".join(c.choices[0].delta.content or "" for c in
                       _chat(client, p, temperature=0, max_tokens=24, stream=True) if c.choices)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(stream, prompts))
    assert got == expected


def _active_sessions(metrics_url: str) -> float:
    text = httpx.get(metrics_url + "/metrics").text
    return float(re.search(r"^veil_core_active_sessions (\S+)$", text, re.M).group(1))


def test_client_disconnect_stops_generation_and_frees_the_core_session(client, smol_servers_by_engine) -> None:
    body = {"model": SMOL_NAME, "messages": [{"role": "user", "content": "Write a very long essay about rivers."}],
            "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream("POST", smol_servers_by_engine.base_url + "/chat/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 5:
                break
    deadline = time.monotonic() + 15
    while _active_sessions(smol_servers_by_engine.metrics_url) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _active_sessions(smol_servers_by_engine.metrics_url) == 0
    assert re.search(r"status=disconnected stream=True prompt_tokens=\d+ completion_tokens=(\d+)",
                     smol_servers_by_engine.edge.log())
    n = int(re.findall(r"status=disconnected stream=True prompt_tokens=\d+ completion_tokens=(\d+)",
                       smol_servers_by_engine.edge.log())[-1])
    assert n < 200, "generation stopped soon after the client left"


# --- errors: OpenAI's JSON shape and the right status ---------------------------------------------

def _post(smol_servers_by_engine, body: bytes | dict) -> httpx.Response:
    url = smol_servers_by_engine.base_url + "/chat/completions"
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(url, json=body, timeout=60)


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": SMOL_NAME}, 400, "'messages' is required"),
    ({"model": SMOL_NAME, "messages": []}, 400, "non-empty"),
    ({"model": SMOL_NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ({"model": SMOL_NAME, "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
    ({"model": SMOL_NAME, "messages": [{"role": "user", "content": "x"}], "top_p": -0.1}, 400, "top_p"),
    ({"model": SMOL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": SMOL_NAME, "messages": [{"role": "user", "content": "x"}], "n": 17}, 400, "n"),
    ({"model": SMOL_NAME, "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400, "stop"),
    ({"model": SMOL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4000}, 400, "2048"),
])
def test_bad_requests_get_openai_errors(smol_servers_by_engine, body, status: int, needle: str) -> None:
    r = _post(smol_servers_by_engine, body)
    assert r.status_code == status
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text


def test_prompt_longer_than_the_context_names_the_limit(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        _chat(client, "word " * 3000, max_tokens=10)
    assert exc.value.code == "context_length_exceeded" and "2048" in exc.value.message


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        _chat(client, "x", temperature=-1)


def test_core_unreachable_is_503(smol_bundles, key_file, tmp_path) -> None:
    port = free_port()
    env = base_env(tmp_path, VEIL_EDGE_PORT=str(port), VEIL_EDGE_CORE_URL=f"http://127.0.0.1:{free_port()}",
                   VEIL_BUNDLE_EDGE_DIR=str(smol_bundles[0]), VEIL_BUNDLE_KEY_FILE=str(key_file),
                   VEIL_MODEL_NAME=SMOL_NAME, VEIL_EDGE_CORE_PUBLIC_KEY="SHA256:" + "A" * 43)
    edge = Server("edge", env, port, tmp_path / "edge.log")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(edge.url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and edge.proc.poll() is None
                time.sleep(0.3)
        assert httpx.get(edge.url + "/readyz").status_code == 503
        c = openai.OpenAI(base_url=edge.url + "/v1", api_key="unused", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as exc:
                r = c.chat.completions.create(model=SMOL_NAME, messages=[{"role": "user", "content": "x"}],
                                              stream=stream)
                list(r) if stream else None
            assert exc.value.status_code == 503
    finally:
        edge.stop()


def test_oversized_body_is_413(smol_servers_by_engine) -> None:
    big = {"model": SMOL_NAME, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    r = _post(smol_servers_by_engine, big)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
