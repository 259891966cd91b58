"""The shipped prompt set: reproducible from its generator, large enough, canaries planted verbatim."""

from privacy_audit.prompts import DATA_FILE, build_prompts, load_prompts, to_json


def test_shipped_file_is_what_the_generator_writes() -> None:
    assert DATA_FILE.read_text() == "".join(to_json(p) + "\n" for p in build_prompts())


def test_at_least_200_prompts_with_canaries_in_their_text() -> None:
    prompts = load_prompts()
    assert len(prompts) >= 200
    assert len({p.id for p in prompts}) == len(prompts)
    for p in prompts:
        text = " ".join(m["content"] for m in p.messages)
        assert p.messages[-1]["role"] == "user"
        assert p.canaries and all(c in text for c in p.canaries)
    kinds = [c for p in prompts for c in p.canaries]
    assert any("@" in c for c in kinds) and any(c.isdigit() for c in kinds) and any(" " in c for c in kinds)
    assert len({p.messages[0]["content"] for p in prompts}) == len(prompts)


def test_limit_takes_the_first_prompts() -> None:
    assert [p.id for p in load_prompts(5)] == [p.id for p in load_prompts()[:5]]
