"""Speculative decoding with prompt-lookup drafts: the same reply as plain decoding, in fewer core steps."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from cloaking.secretbox import KeySource
from edge_proxy.drafts import MAX_PAUSE, DraftPacer, NgramDrafter
from edge_proxy.edge_model import EdgeModel
from edge_proxy.generate import Engine
from edge_proxy.generation import Generation, Status
from edge_proxy.grammar import json_schema_grammar
from edge_proxy.metrics import EdgeMetrics
from edge_proxy.outgoing import NoiseSpec, OutgoingStates
from edge_proxy.sampling import SamplingParams
from tests.inprocess_core import InProcessCore
from veil.errors import CoreProtocolError

# a prompt that repeats itself, as code, lists and quoted text do: drafts find matches in it
PROMPT = "alpha beta gamma delta, alpha beta gamma delta, alpha beta gamma delta, alpha beta"


def test_drafter_follows_the_latest_earlier_occurrence_of_the_longest_suffix() -> None:
    drafter = NgramDrafter([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3])
    assert drafter.propose(2) == [5, 6]  # (2, 3) last occurred before 5, 6; the earlier (2, 3, 4) is older
    drafter.extend([5])
    assert drafter.propose(3) == [6, 2, 3]  # (2, 3, 5) matches: the three tokens that followed it
    assert drafter.propose(0) == []
    assert NgramDrafter([7, 8]).propose(4) == []  # nothing repeats yet
    assert NgramDrafter([4, 1, 4]).propose(5) == [1, 4, 1, 4, 1]  # a match 2 back: read as a period of 2
    assert NgramDrafter([3, 3]).propose(3) == [3, 3, 3]


def test_drafter_built_at_once_equals_one_extended_token_by_token() -> None:
    tokens = torch.randint(0, 6, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    grown = NgramDrafter(tokens[:1])
    for i in range(1, len(tokens)):
        grown.extend([tokens[i]])
        whole = NgramDrafter(tokens[: i + 1])
        assert grown.propose(5) == whole.propose(5)
        # the reference: the latest earlier end of the longest matching suffix (n <= 3), searched by hand
        seen = tokens[: i + 1]
        expected: list[int] = []
        for n in range(min(3, len(seen)), 0, -1):
            ends = [e for e in range(n - 1, len(seen) - 1) if seen[e - n + 1 : e + 1] == seen[-n:]]
            if ends:
                period = len(seen) - 1 - ends[-1]
                expected = [seen[len(seen) - period + i % period] for i in range(5)]
                break
        assert whole.propose(5) == expected


def test_pacer_pauses_drafting_longer_after_each_step_whose_drafts_were_all_rejected() -> None:
    pacer = DraftPacer(4)
    assert pacer.allowance() == 4
    pauses = []
    for _ in range(7):
        pacer.record(4, 0)
        waited = 0
        while pacer.allowance() == 0:
            waited += 1
        pauses.append(waited)
    assert pauses == [1, 2, 4, 8, 16, MAX_PAUSE, MAX_PAUSE]
    pacer.record(4, 1)  # a kept draft ends the pause at once
    assert pacer.allowance() == 4
    pacer.record(4, 0)
    assert [pacer.allowance(), pacer.allowance()] == [0, 4]
    pacer.record(0, 0)  # a step without drafts says nothing
    assert pacer.allowance() == 4


class CountingCore(InProcessCore):
    """Records every step's row count, and can pretend to be another engine in /v1/info."""

    def __init__(self, core_dir: Path, info: dict[str, Any] | None = None):
        super().__init__(core_dir)
        self.rows: list[int] = []
        self.extra_info = info or {}

    async def step(self, req):
        self.rows.append(req.hidden.shape[0])
        return await super().step(req)

    async def info(self) -> dict[str, Any]:
        return {**(await super().info()), **self.extra_info}


def _generate(model: EdgeModel, core: CountingCore, drafts: int, n: int, **kwargs: Any) -> tuple[Generation, str,
                                                                                                 Engine]:
    engine = Engine(model, core, EdgeMetrics(), speculative_tokens=drafts)
    sampling = kwargs.pop("sampling", SamplingParams(temperature=0.0))
    gen = Generation("t", model.tokenizer.encode(PROMPT), n, sampling, **kwargs)

    async def run() -> str:
        await engine.connect()
        return "".join([text async for text in engine.run(gen)])

    text = asyncio.run(run())
    assert gen.status is Status.FINISHED
    return gen, text, engine


def _same(a: Generation, b: Generation) -> None:
    assert a.output_ids == b.output_ids and a.finish_reason == b.finish_reason
    assert [t.token for t in a.token_logprobs] == [t.token for t in b.token_logprobs]
    for x, y in zip(a.token_logprobs, b.token_logprobs):
        assert abs(x.logprob - y.logprob) < 1e-4 and [t for t, _ in x.top] == [t for t, _ in y.top]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_with_drafts_equals_plain_decoding(arch: str, tiny_bundles, key_file: Path) -> None:
    _, edge, core_dir = tiny_bundles[arch]
    model = EdgeModel.load(edge, KeySource(key_file=key_file))
    plain_core, drafted_core = CountingCore(core_dir), CountingCore(core_dir)
    plain, plain_text, _ = _generate(model, plain_core, 0, 48, logprobs=3)
    drafted, drafted_text, engine = _generate(model, drafted_core, 4, 48, logprobs=3)
    _same(plain, drafted)
    assert drafted_text == plain_text
    assert max(plain_core.rows[1:]) == 1 and max(drafted_core.rows[1:]) == 5
    # a random model rarely repeats its prompt: most drafts are rejected, and the reply is the same all the same
    assert engine.metrics.draft_tokens.labels("rejected")._value.get() > 0


def test_a_reply_that_repeats_itself_takes_fewer_core_steps(tiny_bundles, key_file: Path) -> None:
    _, edge, core_dir = tiny_bundles["llama"]
    model = EdgeModel.load(edge, KeySource(key_file=key_file))
    forced = SamplingParams(temperature=0.0, logit_bias={290: 100.0})  # one token, again and again
    plain_core, drafted_core = CountingCore(core_dir), CountingCore(core_dir)
    plain, _, _ = _generate(model, plain_core, 0, 40, sampling=forced)
    drafted, _, engine = _generate(model, drafted_core, 4, 40, sampling=forced)
    _same(plain, drafted)
    assert plain.output_ids == [290] * 40
    accepted = engine.metrics.draft_tokens.labels("accepted")._value.get()
    assert len(plain_core.rows) == 40 and len(drafted_core.rows) == 40 - accepted
    assert len(drafted_core.rows) <= 1 + 1 + 39 // 5 + 1  # the prefill, one plain step, then five tokens a step


def test_seeded_sampling_with_penalties_draws_the_same_reply_with_drafts(tiny_bundles, key_file: Path) -> None:
    _, edge, core_dir = tiny_bundles["llama"]
    model = EdgeModel.load(edge, KeySource(key_file=key_file))
    for seed in (1, 2, 3):
        sampling = dict(temperature=0.7, top_p=0.9, seed=seed, frequency_penalty=0.3, logit_bias={17: 2.0})
        plain, _, _ = _generate(model, CountingCore(core_dir), 0, 32, sampling=SamplingParams(**sampling))
        drafted, _, _ = _generate(model, CountingCore(core_dir), 6, 32, sampling=SamplingParams(**sampling))
        _same(plain, drafted)


@pytest.mark.parametrize("n", [1, 2, 7, 30])
def test_stops_and_token_limits_end_a_drafted_reply_where_plain_decoding_ends_it(n: int, tiny_bundles,
                                                                                 key_file: Path) -> None:
    _, edge, core_dir = tiny_bundles["llama"]
    model = EdgeModel.load(edge, KeySource(key_file=key_file))
    plain, plain_text, _ = _generate(model, CountingCore(core_dir), 0, n)
    drafted, drafted_text, _ = _generate(model, CountingCore(core_dir), 8, n)
    _same(plain, drafted)
    assert drafted_text == plain_text and len(drafted.output_ids) <= n
    if len(plain_text) > 6:  # a stop string inside the reply: both end there, with nothing after it
        stop = plain_text[3:6]
        plain, plain_text, _ = _generate(model, CountingCore(core_dir), 0, n, stops=[stop])
        drafted, drafted_text, _ = _generate(model, CountingCore(core_dir), 8, n, stops=[stop])
        _same(plain, drafted)
        assert drafted_text == plain_text and stop not in drafted_text


def test_a_grammar_is_followed_token_by_token_with_drafts(tiny_bundles, key_file: Path) -> None:
    _, edge, core_dir = tiny_bundles["llama"]
    model = EdgeModel.load(edge, KeySource(key_file=key_file))
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 12},
                                               "b": {"type": "array", "items": {"type": "integer"}, "maxItems": 4}},
              "required": ["a", "b"], "additionalProperties": False}
    grammar = json_schema_grammar(schema)
    out = []
    for drafts in (0, 4):
        gen, text, _ = _generate(model, CountingCore(core_dir), drafts, 80,
                                 constraint=model.grammars.constraint(grammar, "response_format"))
        out.append((gen.output_ids, gen.finish_reason, text))
    assert out[0] == out[1]


def test_a_core_that_cannot_verify_drafts_gets_plain_steps_and_a_warning(tiny_bundles, key_file: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    _, edge, core_dir = tiny_bundles["llama"]
    model = EdgeModel.load(edge, KeySource(key_file=key_file))
    core = CountingCore(core_dir, {"verifies_drafts": False})
    with caplog.at_level(logging.WARNING, logger="veil.edge.generate"):
        _, _, engine = _generate(model, core, 4, 24)
    assert engine.draft_limit == 0 and max(core.rows[1:]) == 1
    assert "speculative_tokens=4 is not used" in caplog.text
    # the core's own limit on rows per step bounds the drafts
    _, _, engine = _generate(model, CountingCore(core_dir, {"max_result_rows": 3}), 8, 8)
    assert engine.draft_limit == 2
    with pytest.raises(CoreProtocolError, match="max_result_rows"):
        _generate(model, CountingCore(core_dir, {"max_result_rows": "many"}), 4, 8)


def test_a_position_sent_again_with_the_same_token_carries_the_same_noise(tiny_bundles, key_file: Path) -> None:
    """Rejected drafts make the edge send a position again: the same token there must not get a second,
    independent noise draw (two samples of one row average to half the noise variance)."""
    _, edge, _ = tiny_bundles["llama"]
    model = EdgeModel.load(edge, KeySource(key_file=key_file))
    out = OutgoingStates(model, NoiseSpec(rho=0.5), torch.Generator().manual_seed(4))
    first = out([5, 6, 7, 8], 0)
    tried = out([9, 7, 8], 1)  # drafts at 2 and 3 after another token at 1
    again = out([6, 7, 8], 1)  # position 1 gets its first token back, and 2 and 3 theirs
    assert torch.equal(again, first[1:]) and not torch.equal(tried[0], first[1])
    assert torch.equal(tried[1:], first[2:])  # no edge-held layers: a row is its token's, its position's draw
    fresh = OutgoingStates(model, NoiseSpec(rho=0.5))([5, 6, 7, 8], 0)  # another request: another key
    assert not torch.equal(fresh, first)
