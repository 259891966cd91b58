"""Property tests of placeholder restoration: however a reply is cut into pieces, the client gets the same
text and counts, every known placeholder comes back as its value, and no piece shows one or a fragment."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_proxy.spans.restore import PlaceholderRestorer

MAPPING = {"<EMAIL_1>": "dana@acme.io", "<PERSON_1>": "Dana <Whitfield>", "<PHONE_12>": "+1 555 0100"}
# model text: plain words, stray '<' and '>', known and unknown placeholders, and their fragments
atoms = st.sampled_from([" ", "a", "Hi", "<", ">", "_", "1", "<EMAIL_1>", "<PERSON_1>", "<PHONE_12>", "<EMAIL_7>",
                         "<EMAIL", "<EMAIL_", "<PHONE_1", "EMAIL_1", "<B_2>", "x<y", "\n", "é", "🙂"])


def _run(pieces: list[str]) -> tuple[str, int, int, list[str]]:
    r = PlaceholderRestorer(MAPPING)
    outs = [r.feed(p) for p in pieces] + [r.flush()]
    return "".join(outs), r.restored, r.mangled, outs


def _cut(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


@settings(max_examples=500, deadline=None)
@given(parts=st.lists(atoms, max_size=30), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_any_cut_gives_the_same_reply_and_counts(parts: list[str], cuts: list[int]) -> None:
    text = "".join(parts)
    whole = _run([text])
    split = _run(_cut(text, cuts))
    assert split[:3] == whole[:3]
    for piece in split[3]:  # placeholders never reach the client, whole or in part
        assert not any(key in piece for key in MAPPING)


@settings(max_examples=300, deadline=None)
@given(words=st.lists(st.sampled_from(["plain", " ", "text", ".", "<EMAIL_1>", "<PERSON_1>", "<PHONE_12>"]),
                      max_size=20), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_known_placeholders_come_back_as_their_values(words: list[str], cuts: list[int]) -> None:
    text = "".join(words)
    out, restored, mangled, _ = _run(_cut(text, cuts))
    expected = text
    for key, value in MAPPING.items():
        expected = expected.replace(key, value)
    assert out == expected and restored == sum(words.count(k) for k in MAPPING)
