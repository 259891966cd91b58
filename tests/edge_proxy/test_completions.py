"""The legacy `/v1/completions` route with the real openai client: fast tests on a tiny in-process core, and greedy
and log-probability parity with transformers on real core and edge servers (slow)."""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

import httpx
import openai
import pytest
import torch
from litestar import Litestar

from admin.plane import build_plane
from cloaking.secretbox import KeySource
from edge_proxy.app import create_app
from edge_proxy.edge_model import EdgeModel
from tests.conftest import SMOL_NAME, reference_greedy
from tests.edge_app import ThreadedEdge
from tests.edge_proxy.test_routes import MODEL, tiny_edge_settings
from tests.inprocess_core import InProcessCore
from veil.bundle import read_edge_spec
from veil.errors import CoreUnavailable
from veil.wire import StepRequest, StepResult

PROMPT = "The capital of France is"
OTHER = "Once upon a time"


class FlakyCore(InProcessCore):
    """The in-process core, failing as an unreachable core once it has answered `fail_after` more steps."""

    fail_after: int | None = None

    async def step(self, req: StepRequest) -> StepResult:
        if self.fail_after is not None:
            if self.fail_after == 0:
                raise CoreUnavailable("the core is unreachable")
            self.fail_after -= 1
        return await super().step(req)


@dataclasses.dataclass
class Edge:
    url: str
    core: FlakyCore
    model: EdgeModel
    app: Litestar

    def ids(self, text: str) -> list[int]:
        return list(self.model.tokenizer(text)["input_ids"])

    def no_eos(self) -> dict[str, int]:
        """A logit_bias that keeps the tiny model from stopping early."""
        return {str(t): -100 for t in self.model.eos_ids}

    def idle(self) -> bool:
        """Every core session closed and every admission released."""
        return len(self.core.table) == 0 and self.app.state.gate.sessions.total == 0


@pytest.fixture(scope="module")
def edge(tiny_bundles, key_file, tmp_path_factory):
    _, edge_dir, core_dir = tiny_bundles["llama"]
    settings = tiny_edge_settings(tmp_path_factory.mktemp("completions-home"))
    model = EdgeModel.load(edge_dir, KeySource(key_file=key_file))
    core = FlakyCore(core_dir)
    app = create_app(settings, model, core=core, plane=build_plane(settings))
    server = ThreadedEdge(app)
    yield Edge(server.url, core, model, app)
    server.stop()


@pytest.fixture(scope="module")
def client(edge: Edge) -> openai.OpenAI:
    return openai.OpenAI(base_url=edge.url + "/v1", api_key="unused", max_retries=0)


def _create(client: openai.OpenAI, **kw: Any) -> Any:
    return client.completions.create(model=kw.pop("model", MODEL), **kw)


_LOGPROB_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def _joined(parts: list[Any]) -> dict[str, list]:
    """Streamed logprobs objects as one."""
    return {k: list(itertools.chain.from_iterable(getattr(p, k) for p in parts)) for k in _LOGPROB_KEYS}


def test_a_completion_is_openai_shaped(client: openai.OpenAI, edge: Edge) -> None:
    out = _create(client, prompt=PROMPT, temperature=0, logit_bias=edge.no_eos())
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.system_fingerprint.startswith("fp_veil_")
    [choice] = out.choices
    assert choice.index == 0 and choice.logprobs is None and isinstance(choice.text, str)
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 16, "max_tokens defaults to 16"
    assert out.usage.prompt_tokens == len(edge.ids(PROMPT))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert edge.idle()


def test_stream_and_non_stream_agree(client: openai.OpenAI, edge: Edge) -> None:
    kw = dict(prompt=PROMPT, max_tokens=8, temperature=0)
    whole = _create(client, **kw)
    chunks = list(_create(client, stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "text_completion" for c in chunks) and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    with httpx.stream("POST", edge.url + "/v1/completions", json={"model": MODEL, "stream": True, **kw}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert edge.idle()


def test_prompts_and_choices_are_indexed_prompt_major(client: openai.OpenAI, edge: Edge) -> None:
    kw = dict(max_tokens=4, temperature=0)
    singles = [_create(client, prompt=p, **kw) for p in (PROMPT, OTHER)]
    out = _create(client, prompt=[PROMPT, OTHER], n=2, best_of=2, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [singles[0].choices[0].text] * 2 + [singles[1].choices[0].text] * 2
    assert out.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles), "a prompt counts once, not per choice"
    assert out.usage.completion_tokens == 2 * sum(s.usage.completion_tokens for s in singles)
    chunks = [c for c in _create(client, prompt=[PROMPT, OTHER], n=2, stream=True, **kw) if c.choices]
    order = [c.choices[0].index for c in chunks]
    assert order == sorted(order) and set(order) == {0, 1, 2, 3}
    for choice in out.choices:
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == choice.index) == choice.text
    assert edge.idle()


def test_echo_with_logprobs_covers_prompt_and_completion(client: openai.OpenAI, edge: Edge) -> None:
    kw = dict(prompt=PROMPT, echo=True, logprobs=2, max_tokens=3, temperature=0, logit_bias=edge.no_eos())
    out = _create(client, **kw)
    [choice], n_prompt = out.choices, out.usage.prompt_tokens
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT) and choice.finish_reason == "length"
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 3
    assert "".join(lp.tokens[:n_prompt]) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, "nothing predicts the first prompt token"
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(1 <= len(t) <= 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset == list(itertools.accumulate([0] + [len(t) for t in lp.tokens[:-1]]))
    for value, top in zip(lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:]):
        assert value <= max(top.values()) + 1e-6
    chunks = [c for c in _create(client, stream=True, **kw) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert _joined([c.choices[0].logprobs for c in chunks]) == {k: getattr(lp, k) for k in _LOGPROB_KEYS}
    assert edge.idle()


def test_logprobs_without_echo_count_offsets_from_the_prompt(client: openai.OpenAI, edge: Edge) -> None:
    out = _create(client, prompt=PROMPT, logprobs=0, max_tokens=4, temperature=0, logit_bias=edge.no_eos())
    lp = out.choices[0].logprobs
    assert not out.choices[0].text.startswith(PROMPT)
    assert len(lp.tokens) == 4 and lp.text_offset[0] == len(PROMPT) and all(t == {} for t in lp.top_logprobs)


def test_every_choice_of_an_echoed_prompt_carries_its_logprobs(client: openai.OpenAI, edge: Edge) -> None:
    out = _create(client, prompt=[PROMPT, OTHER], n=2, echo=True, logprobs=1, max_tokens=2, temperature=0)
    prompts = [c.logprobs.token_logprobs[:len(edge.ids(PROMPT))] for c in out.choices[:2]]
    assert prompts[0] == prompts[1] and prompts[0][0] is None and None not in prompts[0][1:]
    assert out.choices[2].text.startswith(OTHER) and out.choices[3].logprobs.tokens[0] != out.choices[0].logprobs.tokens[0]


def test_token_id_prompts_run_as_their_text(client: openai.OpenAI, edge: Edge) -> None:
    kw = dict(max_tokens=4, temperature=0)
    by_text = _create(client, prompt=PROMPT, **kw).choices[0].text
    assert _create(client, prompt=edge.ids(PROMPT), **kw).choices[0].text == by_text
    both = _create(client, prompt=[edge.ids(PROMPT), edge.ids(OTHER)], echo=True, **kw)
    assert both.choices[0].text == PROMPT + by_text and both.choices[1].text.startswith(OTHER)
    split = edge.ids(PROMPT[:2]) + edge.ids(PROMPT[2:])  # the same text, but not as the tokenizer encodes it
    assert split != edge.ids(PROMPT)
    for bad in (split, [edge.model.vocab_size], [[1, 2], []]):
        with pytest.raises(openai.BadRequestError) as err:
            _create(client, prompt=bad, **kw)
        assert err.value.body["param"] == "prompt"


def _post(edge: Edge, body: bytes | dict) -> httpx.Response:
    url = edge.url + "/v1/completions"
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(url, json=body, timeout=60)


@pytest.mark.parametrize("body, status, param, code", [
    (b"{nope", 400, None, "invalid_json"),
    ({"model": MODEL}, 400, "prompt", "missing_required_parameter"),
    ({"model": MODEL, "prompt": []}, 400, "prompt", "invalid_value"),
    ({"model": MODEL, "prompt": [""]}, 400, "prompt", "invalid_value"),
    ({"model": MODEL, "prompt": ["x", 1]}, 400, "prompt", "invalid_value"),
    ({"model": MODEL, "prompt": ["x"] * 17}, 400, "prompt", "invalid_value"),
    ({"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix", "unsupported_parameter"),
    ({"model": MODEL, "prompt": "x", "best_of": 2}, 400, "best_of", "unsupported_parameter"),
    ({"model": MODEL, "prompt": "x", "logprobs": 6}, 400, "logprobs", "invalid_value"),
    ({"model": MODEL, "prompt": "x", "logprobs": True}, 400, "logprobs", "invalid_value"),
    ({"model": MODEL, "prompt": "x", "echo": "yes"}, 400, "echo", "invalid_value"),
    ({"model": MODEL, "prompt": "x", "n": 17}, 400, "n", "invalid_value"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**7}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
    ({"model": "gpt-3.5-turbo-instruct", "prompt": "x"}, 404, "model", "model_not_found"),
])
def test_bad_requests_are_openai_errors(edge: Edge, body: bytes | dict, status: int, param: str | None,
                                        code: str) -> None:
    r = _post(edge, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == code
    assert edge.idle()


def test_the_openai_client_gets_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="suffix"):
        _create(client, prompt="x", suffix="y")
    with pytest.raises(openai.BadRequestError, match="best_of"):
        _create(client, prompt="x", n=1, best_of=3)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        _create(client, prompt="x", logprobs=6)
    with pytest.raises(openai.NotFoundError):
        _create(client, model="davinci-002", prompt="x")


def test_a_client_leaving_mid_stream_frees_everything(edge: Edge) -> None:
    body = {"model": MODEL, "prompt": [PROMPT, OTHER], "max_tokens": 400, "stream": True, "logit_bias": edge.no_eos()}
    with httpx.stream("POST", edge.url + "/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    deadline = time.monotonic() + 15
    while not edge.idle() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert edge.idle()


@pytest.mark.parametrize("stream", [False, True])
def test_a_core_down_before_the_first_byte_is_an_error_status(client: openai.OpenAI, edge: Edge, stream: bool) -> None:
    edge.core.fail_after = 0
    try:
        with pytest.raises(openai.InternalServerError) as err:
            out = _create(client, prompt=[PROMPT, OTHER], max_tokens=4, stream=stream)
            list(out) if stream else None
    finally:
        edge.core.fail_after = None
    assert err.value.status_code == 503 and edge.idle()


def test_a_core_lost_mid_stream_is_an_error_event(edge: Edge) -> None:
    body = {"model": MODEL, "prompt": [PROMPT, OTHER], "max_tokens": 4, "stream": True, "logit_bias": edge.no_eos()}
    edge.core.fail_after = 4  # the first prompt's prefill and its 3 decode steps: the second prompt's prefill fails
    try:
        with httpx.stream("POST", edge.url + "/v1/completions", json=body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
    finally:
        edge.core.fail_after = None
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in lines[-3] and '"code":"core_unavailable"' in lines[-2]
    assert edge.idle()


def test_the_route_documents_its_request_and_responses(edge: Edge) -> None:
    op = edge.app.openapi_schema.to_schema()["paths"]["/v1/completions"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["model", "prompt"] and schema["properties"]["logprobs"]["maximum"] == 5
    assert set(op["responses"]) == {"200", "400", "401", "403", "404", "413", "429", "502", "503", "504"}
    ok = op["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["properties"]["object"] == {"const": "text_completion"}
    assert "text/event-stream" in ok


# --- parity with transformers on real servers (SmolLM2) ----------------------------------------------------------

SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Three primary colors are"]
NEW_TOKENS = 24


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    return list(itertools.takewhile(lambda t: t not in eos, ids))


@pytest.mark.slow
def test_smollm2_greedy_completions_equal_transformers_generate(smol, smol_servers, smol_bundles) -> None:
    client = openai.OpenAI(base_url=smol_servers.base_url, api_key="unused", max_retries=0)
    eos = set(read_edge_spec(smol_bundles[0]).eos_token_ids)
    for prompt in SMOL_PROMPTS:
        ids = smol.tokenizer(prompt)["input_ids"]  # as the route tokenizes a raw prompt
        want = smol.tokenizer.decode(_until_eos(reference_greedy(smol, ids, NEW_TOKENS), eos), skip_special_tokens=True)
        kw = dict(model=SMOL_NAME, prompt=prompt, temperature=0, max_tokens=NEW_TOKENS)
        assert client.completions.create(**kw).choices[0].text == want, prompt
        assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices) == want
    batch = client.completions.create(model=SMOL_NAME, prompt=SMOL_PROMPTS, temperature=0, max_tokens=NEW_TOKENS)
    assert [c.text for c in batch.choices] == [client.completions.create(
        model=SMOL_NAME, prompt=p, temperature=0, max_tokens=NEW_TOKENS).choices[0].text for p in SMOL_PROMPTS]


@pytest.mark.slow
def test_smollm2_echo_logprobs_equal_the_unsplit_models(smol, smol_servers, smol_bundles) -> None:
    client = openai.OpenAI(base_url=smol_servers.base_url, api_key="unused", max_retries=0)
    prompt = SMOL_PROMPTS[0]
    ids = smol.tokenizer(prompt)["input_ids"]
    full = ids + _until_eos(reference_greedy(smol, ids, 8), set(read_edge_spec(smol_bundles[0]).eos_token_ids))
    with torch.inference_mode():
        logp = torch.log_softmax(smol.model(torch.tensor([full])).logits[0].float(), dim=-1)  # [T, V]
    for stream in (False, True):
        out = client.completions.create(model=SMOL_NAME, prompt=prompt, echo=True, logprobs=2, temperature=0,
                                        max_tokens=8, stream=stream)
        chunks = [c for c in out if c.choices] if stream else [out]
        lp = _joined([c.choices[0].logprobs for c in chunks])
        assert len(lp["token_logprobs"]) == len(full) and lp["token_logprobs"][0] is None
        for i in range(1, len(full)):
            assert lp["token_logprobs"][i] == pytest.approx(logp[i - 1, full[i]].item(), abs=1e-3), (stream, i)
            best = sorted(lp["top_logprobs"][i].values(), reverse=True)
            assert best == pytest.approx(logp[i - 1].topk(2).values.tolist(), abs=1e-3), (stream, i)
