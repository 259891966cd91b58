import torch

from edge_proxy.sampling import Sampler, SamplingParams


def _draws(params: SamplingParams, n: int = 50) -> list[int]:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    s = Sampler(params, 1000)
    return [s.sample(logits) for _ in range(n)]


def test_greedy_is_argmax() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert Sampler(SamplingParams(temperature=0.0), 1000).sample(logits) == int(logits.argmax())


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
