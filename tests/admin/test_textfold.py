"""Folding for guardrails: NFKC, invisible characters gone, and every folded character mapped to whole
characters of the original, in order."""

from __future__ import annotations

import unicodedata

from hypothesis import example, given, settings
from hypothesis import strategies as st

from admin.textfold import fold

ODD = "aéｆＡ①ﬃ\u0301\u0308\u200b\u200d\u00ad\u202e\ufeff한글 \n"


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(ODD) | st.characters(), max_size=40))
@example("\u00ad")  # folds to nothing
def test_every_folded_character_maps_back_in_order(text: str) -> None:
    f = fold(text)
    assert len(f.starts) == len(f.ends) == len(f.text)
    assert all(0 <= s < e <= len(text) for s, e in zip(f.starts, f.ends))
    assert list(f.starts) == sorted(f.starts) and list(f.ends) == sorted(f.ends)
    assert not any(unicodedata.category(c) == "Cf" for c in f.text)
    for s, e in zip(f.starts, f.ends):  # each source range folds to what it produced
        assert fold(text[s:e]).text in f.text
    assert f.tail_start(0) == len(text)  # keeping nothing back releases the whole original
    if f.text:  # (a text of format characters only folds to nothing: then 0 kept is all of it)
        assert f.tail_start(len(f.text)) == 0


def test_fullwidth_ligatures_and_zero_widths() -> None:
    f = fold("ｐａ\u200bｓｓ ﬃ x")
    assert f.text == "pass ffi x"
    assert f.span(0, 4) == (0, 5)  # the zero-width space is inside the match
    assert f.span(5, 8) == (6, 7)  # three folded letters come from one ligature
    assert fold("e\u0301").text == "é" and fold("e\u0301").span(0, 1) == (0, 2)
