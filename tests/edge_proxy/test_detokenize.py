import pytest

from edge_proxy.detokenize import IncrementalDetokenizer, StopMatcher


@pytest.mark.parametrize("text", ["Hello 👋 world 🌍!", "日本語のテキスト、中文也可以。", "mixed: café ñ 😀😀 end"])
def test_streamed_pieces_are_whole_characters_and_join_to_the_text(smol, text: str) -> None:
    tok = smol.tokenizer
    prompt = tok("Say something:", add_special_tokens=False)["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    assert len(ids) > len([p for p in pieces if p]), "multi-token characters were held back, not split"


def test_stop_string_split_across_pieces_is_never_emitted() -> None:
    m = StopMatcher(["END", "\n\n"])
    out = []
    for piece in ["Hello E", "N", "D and more"]:
        text, stopped = m.feed(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello " and stopped


def test_false_start_of_a_stop_string_is_released() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("a ST") == ("a ", False)
    assert m.feed("ART") == ("START", False)
    assert m.feed(" S") == (" ", False)
    assert m.flush() == "S"


def test_earliest_stop_wins_and_no_stops_pass_through() -> None:
    m = StopMatcher(["b", "a"])
    assert m.feed("xxabc") == ("xx", True)
    assert StopMatcher([]).feed("anything") == ("anything", False)


def test_a_character_cut_off_by_the_token_limit_is_dropped(smol) -> None:
    tok = smol.tokenizer
    ids = tok("ab 🐉", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, [])
    pieces = [detok.push(i) for i in ids[:-1]] + [detok.flush()]  # the dragon's last byte never comes
    assert "".join(pieces) == "ab " or "".join(pieces) == "ab"
