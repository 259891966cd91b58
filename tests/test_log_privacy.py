"""No prompt text or reply text appears in the core's or the edge's logs."""

import openai
import pytest

from tests.conftest import SMOL_NAME

pytestmark = pytest.mark.slow


def test_logs_carry_no_prompt_or_reply(smol_servers) -> None:
    client = openai.OpenAI(base_url=smol_servers.base_url, api_key="unused", max_retries=0)
    secret = "Zanzibar-Quokka-7731"
    messages = [{"role": "user", "content": f"My code word is {secret}. Please repeat my code word."}]
    reply = client.chat.completions.create(model=SMOL_NAME, messages=messages, temperature=0, max_tokens=30)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=SMOL_NAME, messages=messages, temperature=0, max_tokens=30, stream=True) if c.choices)
    text = reply.choices[0].message.content
    assert text and streamed == text
    with pytest.raises(openai.BadRequestError):  # errors must not echo content either
        client.chat.completions.create(model=SMOL_NAME, messages=messages, temperature=9)
    logs = smol_servers.core.log() + smol_servers.edge.log()
    assert "rid=" in smol_servers.core.log() and "prompt_tokens=" in smol_servers.edge.log()
    for needle in [secret, "Zanzibar", "Quokka", "code word", text.strip()[:20]]:
        assert needle not in logs
    words = [w for w in text.split() if len(w) > 6 and w.isalpha()]
    assert all(w not in logs for w in words), "reply words must not reach the logs"
