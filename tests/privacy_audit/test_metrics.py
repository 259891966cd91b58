"""Scores and intervals on hand-made inputs."""

import math

import pytest

from privacy_audit.metrics import (
    bootstrap,
    canary_hits,
    exact_prompt,
    gaussian_epsilon,
    reply_recovery,
    token_recovery,
    wilson,
)
from privacy_audit.prompts import Prompt
from privacy_audit.trace import Encoded


def _enc(ids: list[int], private: list[bool], canaries: list[str] | None = None) -> Encoded:
    return Encoded(Prompt("x", [{"role": "user", "content": "c"}], canaries or []), ids, private)


def test_wilson_matches_the_textbook_values() -> None:
    e = wilson(8, 10)
    assert e.mean == 0.8 and e.lo == pytest.approx(0.4902, abs=1e-4) and e.hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(10, 10).hi == 1.0 and wilson(10, 10).lo < 1.0
    assert wilson(0, 12).lo == 0.0 and wilson(0, 12).hi > 0.0


def test_bootstrap_interval_brackets_the_mean_and_is_deterministic() -> None:
    values = [0.1, 0.5, 0.9, 0.7, 0.3, 0.6]
    e = bootstrap(values, seed=3)
    assert e.lo <= e.mean <= e.hi and e.n == 6
    assert e == bootstrap(values, seed=3)
    assert bootstrap([1.0] * 5).lo == 1.0


def test_token_recovery_scores_content_positions_only() -> None:
    enc = [_enc([1, 2, 3, 4], [False, True, True, False])]
    assert token_recovery([[9, 2, 0, 9]], enc) == [0.5]
    assert exact_prompt([[9, 2, 3, 9]], enc) == [True]
    assert exact_prompt([[1, 2]], enc) == [False]  # a short recovery misses the rest


def test_canaries_count_only_as_exact_strings() -> None:
    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(i) for i in ids)

    enc = [_enc([ord(c) for c in "Dana 448213"], [True] * 11, ["Dana", "448213"])]
    assert canary_hits([[ord(c) for c in "Dana 448213"]], enc, Tok()) == [1.0]
    assert canary_hits([[ord(c) for c in "Dana 448203"]], enc, Tok()) == [0.5]


def test_reply_recovery_and_epsilon_formula() -> None:
    assert reply_recovery([[1, 2, 3]], [[1, 2, 4]]) == [pytest.approx(2 / 3)]
    assert gaussian_epsilon(2.0, 0.5, 1e-5) == pytest.approx(2.0 * math.sqrt(2 * math.log(1.25e5)) / 0.5)
    assert gaussian_epsilon(1.0, 0.0) == math.inf
