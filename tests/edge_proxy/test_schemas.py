"""Chat request parsing at its bounds: every hostile body gives a ChatRequest or an OpenAI-shaped 400, never
another exception (which the edge would answer with a 500)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_proxy.schemas import MAX_LOGIT_BIAS, MAX_MESSAGES, MAX_STOP_CHARS, MAX_STOPS, parse_chat_request
from veil.errors import InvalidRequest

VOCAB = 49152
NUMERIC = ["temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "max_tokens",
           "max_completion_tokens", "n"]


def body(**extra) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


def refused(raw: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(raw, VOCAB)
    assert info.value.status_code == 400
    return info.value


def test_stop_strings_are_bounded_in_count_and_length() -> None:
    assert parse_chat_request(body(stop=["x" * MAX_STOP_CHARS] * MAX_STOPS), VOCAB).stop == ["x" * MAX_STOP_CHARS] * 4
    assert refused(body(stop=["a"] * (MAX_STOPS + 1))).param == "stop"
    assert refused(body(stop="x" * (MAX_STOP_CHARS + 1))).param == "stop"


def test_messages_parts_and_logit_bias_are_bounded() -> None:
    assert refused(body(messages=[{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1))).param == "messages"
    parts = [{"type": "text", "text": "x"}] * 2049
    assert refused(body(messages=[{"role": "user", "content": parts}])).param == "messages[0].content"
    many = {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}
    assert refused(body(logit_bias=many)).param == "logit_bias"
    assert len(parse_chat_request(body(logit_bias=dict(list(many.items())[:MAX_LOGIT_BIAS])), VOCAB)
               .sampling.logit_bias) == MAX_LOGIT_BIAS


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"model": ' + b"[" * 100_000, b"{" * 50_000])
def test_deep_nesting_is_a_400_not_a_crash(raw: bytes) -> None:
    assert refused(raw).code == "invalid_json"


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e308, -1e308, 10**400, -(10**400), 2**63,
                                   -(2**63) - 1, 0, -1, 0.5, True, "1", None, [], {}])
def test_numeric_parameters_at_their_extremes(name: str, value) -> None:
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], name: value}).encode()
    try:
        parse_chat_request(raw, VOCAB)
    except InvalidRequest as exc:
        assert exc.status_code == 400 and exc.param == name


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=500, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(NUMERIC + ["stop", "logit_bias", "messages", "stream",
                                                         "stream_options", "model", "response_format"]),
                              json_values, max_size=5))
def test_any_json_for_any_parameter_parses_or_is_a_400(fields: dict) -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    try:
        raw = json.dumps({**base, **fields}).encode()
    except ValueError:
        return
    try:
        parse_chat_request(raw, VOCAB)
    except InvalidRequest as exc:
        assert exc.status_code == 400


@settings(max_examples=300, deadline=None)
@given(message=st.dictionaries(st.sampled_from(["role", "content", "name"]), json_values, max_size=3))
def test_any_json_inside_a_message_parses_or_is_a_400(message: dict) -> None:
    """The fuzz campaign found `"role": {}` answered 500 (an unhashable role looked up in a set)."""
    try:
        parse_chat_request(json.dumps({"model": "m", "messages": [message]}).encode(), VOCAB)
    except InvalidRequest as exc:
        assert exc.status_code == 400


def test_a_role_of_the_wrong_type_is_a_400() -> None:
    for role in ({}, [None, None], 3, None):
        assert refused(json.dumps({"model": "m", "messages": [{"role": role, "content": "x"}]}).encode()).param \
            == "messages[0].role"
