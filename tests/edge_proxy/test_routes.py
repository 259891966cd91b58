"""The edge's routes with the real openai client, over a real uvicorn edge and an in-process tiny core.

Fast (no subprocesses, a tiny model): these run in `make test-fast`.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from admin.plane import build_plane
from cloaking.secretbox import KeySource
from edge_proxy.app import create_app
from edge_proxy.edge_model import EdgeModel
from tests.edge_app import ThreadedEdge
from tests.inprocess_core import InProcessCore
from veil.settings import Settings

MODEL = "tiny-llama"
HELLO = [{"role": "user", "content": "Say hello."}]


def tiny_edge_settings(home: Path) -> Settings:
    settings = Settings()
    settings.home = str(home)
    settings.model.name = MODEL
    return settings


@pytest.fixture(scope="module")
def edge(tiny_bundles, key_file: Path, tmp_path_factory):
    _, edge_dir, core_dir = tiny_bundles["llama"]
    settings = tiny_edge_settings(tmp_path_factory.mktemp("routes-home"))
    model = EdgeModel.load(edge_dir, KeySource(key_file=key_file))
    core = InProcessCore(core_dir)
    server = ThreadedEdge(create_app(settings, model, core=core, plane=build_plane(settings)))
    yield server, core, model
    server.stop()


@pytest.fixture(scope="module")
def client(edge) -> openai.OpenAI:
    return openai.OpenAI(base_url=edge[0].url + "/v1", api_key="unused", max_retries=0)


def test_models_are_listed(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "veil"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_stream_and_non_stream_agree(client: openai.OpenAI, edge) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert len(edge[1].table) == 0, "every core session was closed"


def test_a_length_finish_counts_exactly_max_tokens(client: openai.OpenAI, edge) -> None:
    no_eos = {str(t): -100 for t in edge[2].eos_ids}  # keep the tiny model from stopping early
    out = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, temperature=0, logit_bias=no_eos)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 3


def test_bad_requests_are_openai_shaped_400s(edge, client: openai.OpenAI) -> None:
    raw = httpx.post(edge[0].url + "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=3)
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10**7)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=HELLO)


def test_the_request_id_is_echoed_or_made(edge) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    mine = httpx.post(edge[0].url + "/v1/chat/completions", json=body, headers={"x-request-id": "my-id.1"})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "my-id.1"
    made = httpx.post(edge[0].url + "/v1/chat/completions", json=body, headers={"x-request-id": "bad id!"})
    assert made.status_code == 200 and made.headers["x-request-id"] != "bad id!"
