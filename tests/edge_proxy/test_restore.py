"""Restoring placeholders in a streamed reply: exact output, minimal hold-back, any chunking, honest counts."""

from __future__ import annotations

import logging
import random
import re

import pytest

from edge_proxy.detokenize import StopMatcher
from edge_proxy.spans.restore import PLACEHOLDER, PlaceholderRestorer, placeholder

MAPPING = {"<EMAIL_1>": "dana@acme.io", "<PERSON_1>": "Dana Whitfield", "<A_1>": "<B_2>", "<B_2>": "bee",
           "<LT_1>": "a<"}


def _run(pieces: list[str], mapping: dict[str, str] = MAPPING) -> tuple[str, int, int, list[str]]:
    """-> (whole output, restored, mangled, what each feed returned)."""
    r = PlaceholderRestorer(mapping)
    outs = [r.feed(p) for p in pieces]
    return "".join(outs) + r.flush(), r.restored, r.mangled, outs


def _reference(text: str, mapping: dict[str, str], end: bool = True) -> str:
    """Whole-text restoration; at the end of a stream a trailing fragment (2+ characters) of a known
    placeholder is dropped."""
    cut = text.rfind("<")
    tail = text[cut:] if cut >= 0 else ""
    if end and len(tail) > 1 and not PLACEHOLDER.fullmatch(tail) and any(k.startswith(tail) for k in mapping):
        text = text[:cut]
    return PLACEHOLDER.sub(lambda m: mapping.get(m.group(), m.group()), text)


def test_placeholder_builds_the_grammar_and_refuses_anything_else() -> None:
    assert placeholder("EMAIL", 1) == "<EMAIL_1>"
    assert placeholder("X", 999_999) == "<X_999999>"
    assert placeholder("A" + "9" * 23, 12) == "<A" + "9" * 23 + "_12>"
    for label, n in [("email", 1), ("E_X", 1), ("", 1), ("1A", 1), ("A" * 25, 1), ("EMAIL", 0), ("EMAIL", -1),
                     ("EMAIL", 1_000_000), ("EMAIL", True), ("EMAIL", "1"), ("EMAIL", 1.0)]:
        with pytest.raises(ValueError, match="placeholder needs"):
            placeholder(label, n)  # type: ignore[arg-type]
    assert [m.group() for m in PLACEHOLDER.finditer("<A_1><B_02> <c_1> <ID_10><X__1>")] == ["<A_1>", "<ID_10>"]
    assert PLACEHOLDER.fullmatch("<EMAIL_1>").groups() == ("EMAIL", "1")


def test_mapping_keys_must_be_placeholders() -> None:
    with pytest.raises(ValueError, match="mapping key") as err:
        PlaceholderRestorer({"dana@acme.io": "x"})
    assert "dana" not in str(err.value)


def test_a_whole_reply_is_restored() -> None:
    out, restored, mangled, _ = _run(["Email <PERSON_1> at <EMAIL_1>, or <EMAIL_1> again."])
    assert out == "Email Dana Whitfield at dana@acme.io, or dana@acme.io again."
    assert (restored, mangled) == (3, 0)


def test_only_the_shortest_possible_tail_is_held_back() -> None:
    r = PlaceholderRestorer(MAPPING)
    assert r.feed("Hi <EM") == "Hi "
    assert r.feed("AIL") == ""
    assert r.feed("_") == ""
    assert r.feed("1") == ""
    assert r.feed("> ok <") == "dana@acme.io ok "
    assert r.feed("PERSON_1>!") == "Dana Whitfield!"
    assert r.flush() == "" and (r.restored, r.mangled) == (2, 0)


@pytest.mark.parametrize("piece, emitted, held", [
    ("a < b", "a < b", ""), ("x<y", "x<y", ""), ("<EMAIL x", "<EMAIL x", ""), ("<<EMAIL_1", "<", ""),
    ("<<<<", "<<<", "<"), ("<email_1", "<email_1", ""), ("<EMAIL_0", "<EMAIL_0", ""), ("<EMAIL__", "<EMAIL__", ""),
    ("<EMAIL_1x", "<EMAIL_1x", ""), ("<1", "<1", ""), ("<_", "<_", ""), ("a <", "a ", "<"),
    ("<" + "A" * 24 + "_" + "9" * 6, "", "<" + "A" * 24 + "_" + "9" * 6),
    ("<" + "A" * 24 + "_" + "9" * 7, "<" + "A" * 24 + "_" + "9" * 7, ""),
    ("<" + "A" * 25, "<" + "A" * 25, ""),
])
def test_a_lt_that_cannot_start_a_placeholder_is_released_at_once(piece: str, emitted: str, held: str) -> None:
    r = PlaceholderRestorer(MAPPING)
    assert r.feed(piece) == emitted
    assert r.flush() == held


SPLIT_TEXT = "Hi <PERSON_1>, a < b and x<y; <<EMAIL_1> then <A_1><B_2><EMAIL_1>. <LT_1>B_9 <EMAIL_7> <EM x"
SPLIT_OUT = "Hi Dana Whitfield, a < b and x<y; <dana@acme.io then <B_2>beedana@acme.io. a<B_9 <EMAIL_7> <EM x"


def test_every_split_point_gives_the_same_text_and_counts() -> None:
    assert _run([SPLIT_TEXT]) == (SPLIT_OUT, 6, 1, [SPLIT_OUT[:-len(" <EM x")] + " <EM x"])
    for i in range(len(SPLIT_TEXT) + 1):
        for j in range(i, len(SPLIT_TEXT) + 1):
            out, restored, mangled, _ = _run([SPLIT_TEXT[:i], SPLIT_TEXT[i:j], SPLIT_TEXT[j:]])
            assert (out, restored, mangled) == (SPLIT_OUT, 6, 1), (i, j)
    out, restored, mangled, outs = _run(list(SPLIT_TEXT))
    assert (out, restored, mangled) == (SPLIT_OUT, 6, 1)
    assert all("<EMAIL_1" not in o and "<PERSON" not in o and "_1>" not in o for o in outs)


def test_adjacent_placeholders_split_char_by_char_never_leak_a_fragment() -> None:
    r = PlaceholderRestorer(MAPPING)
    outs = [r.feed(c) for c in "<A_1><B_2>"]
    assert outs == [""] * 4 + ["<B_2>"] + [""] * 4 + ["bee"]
    assert r.flush() == "" and (r.restored, r.mangled) == (2, 0)


def test_values_are_never_rescanned() -> None:
    r = PlaceholderRestorer(MAPPING)
    assert r.feed("<A_1>") == "<B_2>"  # a value that looks like a placeholder stays as it is
    assert r.feed("<LT_1>") == "a<"  # a value ending in `<` is not held back
    assert r.feed("B") == "B"
    assert r.flush() == "" and (r.restored, r.mangled) == (2, 0)


@pytest.mark.parametrize("text, mangled", [
    ("<EMAIL_7>", 1), ("<PHONE_1>", 1), ("EMAIL_1", 1), ("say EMAIL_1.", 1), ("EMAIL_1> and", 1), ("<EMAIL_1", 1),
    ("<EMAIL_1 is it", 1), ("(PERSON_1)", 1), ("EMAIL_1EMAIL_1", 0), ("XEMAIL_1", 0), ("EMAIL_12", 0),
    ("email_1", 0), ("PHONE_1", 0), ("<EMAIL_1>", 0), ("<EMAIL_", 1), ("EMAIL_1<EMAIL_1>", 1),
    ("EMAIL_1<EMAIL_1>x", 1), ("PERSON_12", 0), ("PERSON_1é", 0),
    ("<EMAIL_7> EMAIL_1 <EMAIL_1", 3),
])
def test_mangled_placeholders_are_emitted_unchanged_and_counted_once(text: str, mangled: int) -> None:
    restored = text.count("<EMAIL_1>")
    expected = _reference(text, MAPPING)
    assert _run([text])[:3] == (expected, restored, mangled)
    assert _run(list(text))[:3] == (expected, restored, mangled)


def test_a_cut_off_placeholder_is_counted_only_at_the_end_of_the_stream() -> None:
    r = PlaceholderRestorer(MAPPING)
    assert r.feed("write <EMAIL_1") == "write " and r.mangled == 0
    assert r.flush() == "" and r.mangled == 1, "a fragment cut off by the token limit is dropped, never shown"
    r = PlaceholderRestorer(MAPPING)
    assert r.feed("write <EMA") == "write " and r.flush() == "" and r.mangled == 1
    r = PlaceholderRestorer(MAPPING)
    assert r.feed("a <") == "a " and r.flush() == "<" and r.mangled == 0, "a lone '<' is just text"


def test_an_empty_mapping_passes_everything_through() -> None:
    text = "a < b <EMAIL_1> EMAIL_1 <X"
    out, restored, mangled, outs = _run(list(text), {})
    assert (out, restored, mangled) == (text, 0, 1)
    assert outs[-1] == "" and "".join(outs) == text[:-2]


ALPHABET = ["<EMAIL_1>", "<PERSON_1>", "<A_1>", "<LT_1>", "<EMAIL_7>", "<PHONE_1>", "<", "<EM", "EMAIL_1", "PERSON",
            "_", "1", "0", ">", " ", "x", "é", "\n", "<<"]


def test_any_chunking_equals_feeding_whole() -> None:
    rng = random.Random(20240611)
    for _ in range(300):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 25)))
        whole = _run([text])
        assert whole[0] == _reference(text, MAPPING)
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(len(text) + 1, 8))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        chunked = _run(pieces)
        assert chunked[:3] == whole[:3], (text, pieces)


OPEN_TAIL = re.compile(r"<(?:[A-Z][A-Z0-9]{0,23}(?:_(?:[1-9][0-9]{0,5})?)?)?\Z")  # the spec's hold-back rule, restated


def test_each_feed_emits_all_but_the_open_tail() -> None:
    rng = random.Random(7)
    for _ in range(100):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 20)))
        r, emitted = PlaceholderRestorer(MAPPING), ""
        for i in range(1, len(text) + 1):
            emitted += r.feed(text[i - 1])
            tail = OPEN_TAIL.search(text[:i])
            assert emitted == _reference(text[: tail.start() if tail else i], MAPPING, end=False), (text, i)


def test_stop_string_inside_a_restored_value_stops_there() -> None:
    restorer, stop = PlaceholderRestorer(MAPPING), StopMatcher(["@"])
    out = []
    for piece in ["<EM", "AIL", "_1> is her", " address"]:  # detokenizer -> restorer -> stop matcher, as generate.py
        text, stopped = stop.feed(restorer.feed(piece))
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "dana" and stopped


def test_stop_string_in_a_placeholder_does_not_fire_on_the_placeholder() -> None:
    restorer, stop = PlaceholderRestorer(MAPPING), StopMatcher(["_1", "EMAIL"])
    pieces = ["Mail <EMA", "IL_1", "> now"]
    results = [stop.feed(restorer.feed(p)) for p in pieces]
    assert "".join(t for t, _ in results) + stop.feed(restorer.flush())[0] + stop.flush() == "Mail dana@acme.io now"
    assert not any(s for _, s in results)


def test_nothing_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _run(list(SPLIT_TEXT))
    assert caplog.records == []
