"""Property tests: any sampling parameters the API admits, on any logits, give a valid token id (never an
exception), inside the nucleus top_p keeps, and the same seed gives the same draws."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_proxy.sampling import Sampler, SamplingParams

VOCAB = 64

params = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=2.0), st.sampled_from([5e-324, 1e-300,
                                                                                                    1e-8, 2.0])),
    top_p=st.one_of(st.floats(min_value=0.0, max_value=1.0), st.sampled_from([0.0, 5e-324, 1.0])),
    seed=st.integers(min_value=0, max_value=2**63 - 1),
    presence_penalty=st.floats(min_value=-2.0, max_value=2.0),
    frequency_penalty=st.floats(min_value=-2.0, max_value=2.0),
    logit_bias=st.dictionaries(st.integers(0, VOCAB - 1), st.floats(min_value=-100, max_value=100), max_size=8),
)
# logits as a float32 LM head gives them: finite, from flat to wildly peaked
logits = st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=VOCAB, max_size=VOCAB)


@settings(max_examples=400, deadline=None)
@given(p=params, rows=st.lists(logits, min_size=1, max_size=4))
def test_any_admitted_parameters_sample_a_valid_token_repeatably(p: SamplingParams, rows: list[list[float]]) -> None:
    a, b = Sampler(p, VOCAB), Sampler(p, VOCAB)
    for row in rows:
        x = torch.tensor(row, dtype=torch.float32)
        token = a.sample(x)
        assert 0 <= token < VOCAB
        assert b.sample(x) == token  # same seed, same parameters, same draw


@settings(max_examples=200, deadline=None)
@given(row=logits, top_p=st.floats(min_value=0.0, max_value=0.999), seed=st.integers(0, 2**32))
def test_top_p_draws_only_from_the_nucleus(row: list[float], top_p: float, seed: int) -> None:
    x = torch.tensor(row, dtype=torch.float32)
    probs = torch.softmax(x.double(), dim=-1)
    token = Sampler(SamplingParams(temperature=1.0, top_p=top_p, seed=seed), VOCAB).sample(x)
    # every token strictly more likely than the drawn one is in the nucleus before it: their mass is < top_p
    above = float(probs[probs > probs[token]].sum())
    assert above < top_p or math.isclose(above, top_p, rel_tol=1e-4, abs_tol=1e-6) or above == 0.0


@settings(max_examples=200, deadline=None)
@given(row=logits)
def test_temperature_zero_is_argmax_after_bias(row: list[float]) -> None:
    x = torch.tensor(row, dtype=torch.float32)
    assert Sampler(SamplingParams(temperature=0.0), VOCAB).sample(x) == int(torch.argmax(x))
