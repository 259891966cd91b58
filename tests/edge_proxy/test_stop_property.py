"""Stop strings, as properties: however a reply is cut into pieces, the matcher emits exactly the reply up to
the first stop string completed, and never a part of a stop."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_proxy.detokenize import StopMatcher

ALPHABET = "ab\n"  # a small alphabet makes overlaps and false starts common
texts = st.text(alphabet=ALPHABET, max_size=60)
stops = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=6), max_size=4)


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """The reply up to the first stop string completed, the longest of those ending on that character."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[:end - max(map(len, done))], True
    return text, False


def pieces(text: str, cuts: list[int]) -> list[str]:
    at = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(at, at[1:])]


@settings(max_examples=400, deadline=None)
@given(text=texts, stop_list=stops, cuts=st.lists(st.integers(0, 60), max_size=12))
def test_any_chunking_emits_the_reply_up_to_the_first_stop(text: str, stop_list: list[str], cuts: list[int]) -> None:
    m = StopMatcher(stop_list)
    out, hit = [], False
    for piece in pieces(text, cuts):
        emitted, hit = m.feed(piece)
        out.append(emitted)
        assert not any(s and s in "".join(out) for s in stop_list), "a stop string was emitted"
        if hit:
            break
    if not hit:
        out.append(m.flush())
    assert ("".join(out), hit) == reference(text, stop_list)


@settings(max_examples=200, deadline=None)
@given(text=texts, stop_list=stops)
def test_what_is_held_back_could_still_begin_a_stop(text: str, stop_list: list[str]) -> None:
    m = StopMatcher(stop_list)
    emitted, hit = m.feed(text)
    if not hit and m.pending:
        assert any(s.startswith(m.pending) for s in stop_list if len(s) > len(m.pending))


def test_the_longest_stop_over_a_long_near_miss_holds_back_exactly_its_prefix() -> None:
    """Every tail of a's is a prefix of this stop: the worst case for the old prefix-by-prefix hold-back,
    which was quadratic in the stop's length on every piece."""
    stop = "a" * 255 + "b"
    m = StopMatcher([stop] * 4)
    emitted = "".join(m.feed("a" * 7)[0] for _ in range(3000))
    assert len(emitted) == 21_000 - 255 and m.pending == "a" * 255
    assert m.feed("b") == ("", True)
