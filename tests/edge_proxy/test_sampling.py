import torch

from edge_proxy.sampling import Sampler, SamplingParams


def _draws(params: SamplingParams, n: int = 50) -> list[int]:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    s = Sampler(params, 1000)
    return [s.sample(logits) for _ in range(n)]


def test_greedy_is_argmax() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert Sampler(SamplingParams(temperature=0.0), 1000).sample(logits) == int(logits.argmax())


def test_greedy_picks_what_torchs_argmax_picks_for_ties_nans_views_bias_and_masks() -> None:
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(6, 1000, generator=gen)
    rows[1, [17, 400]] = 9.0  # a tie: the first one
    rows[2, 700] = float("nan")  # a NaN counts as the largest, as in torch
    rows[3] = float("-inf")  # everything masked: index 0
    allowed = torch.zeros(1000, dtype=torch.bool)
    allowed[[5, 900]] = True
    for row in rows:  # each a view into `rows`
        for params, mask in ((SamplingParams(temperature=0.0), None),
                             (SamplingParams(temperature=0.0, logit_bias={int(row.nan_to_num().argmax()): -100.0}), None),
                             (SamplingParams(temperature=0.0), allowed)):
            sampler = Sampler(params, 1000)
            expected = sampler._adjust(row)
            expected = expected if mask is None else expected.masked_fill(~mask, float("-inf"))
            assert sampler.sample(row, mask) == int(torch.argmax(expected))


def test_same_seed_same_draws_and_other_seed_differs() -> None:
    assert _draws(SamplingParams(temperature=1.0, seed=7)) == _draws(SamplingParams(temperature=1.0, seed=7))
    assert _draws(SamplingParams(temperature=1.0, seed=7)) != _draws(SamplingParams(temperature=1.0, seed=8))


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0, -2.0])
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1), 5)
    assert {s.sample(logits) for _ in range(100)} == {0}
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=1), 5)
    assert {s.sample(logits) for _ in range(200)} == {0, 1}


def test_logit_bias_and_penalties_steer_choices() -> None:
    logits = torch.tensor([1.0, 0.9, 0.0])
    assert Sampler(SamplingParams(temperature=0.0, logit_bias={2: 100.0}), 3).sample(logits) == 2
    s = Sampler(SamplingParams(temperature=0.0, frequency_penalty=2.0), 3)
    assert [s.sample(logits) for _ in range(2)] == [0, 1]
