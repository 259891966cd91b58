"""Log-probabilities of sampled tokens, as OpenAI reports them: log-softmax of the model's own logits.

They are the raw model distribution at that position, before temperature, penalties, logit_bias or a
grammar's mask, so they compare directly with the unsplit model's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; legacy completions allow 5


@dataclasses.dataclass(slots=True, frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens at this position, best first


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """[V] logits -> the log-probability of `token` and the `top` best (float32, exact for the head's output)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logp, top)
        best = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logp[token]), best)


def prompt_logprobs(logits: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob | None]:
    """[n, V] logits of a prompt's rows -> each prompt token's log-probability given the ones before it
    (None for the first, which nothing predicts)."""
    assert logits.shape[0] == len(ids)
    out: list[TokenLogprob | None] = [None]
    for i in range(1, len(ids)):
        out.append(token_logprob(logits[i - 1], ids[i], top))
    return out


def _text(token_bytes: bytes) -> str:
    return token_bytes.decode("utf-8", errors="replace")


def chat_entry(lp: TokenLogprob, token_bytes: Callable[[int], bytes]) -> dict[str, Any]:
    """One entry of a chat choice's `logprobs.content`."""
    raw = token_bytes(lp.token)
    return {"token": _text(raw), "logprob": lp.logprob, "bytes": list(raw),
            "top_logprobs": [{"token": _text(b), "logprob": v, "bytes": list(b)}
                             for b, v in ((token_bytes(t), v) for t, v in lp.top)]}


def chat_logprobs(entries: list[TokenLogprob], token_bytes: Callable[[int], bytes]) -> dict[str, Any]:
    return {"content": [chat_entry(lp, token_bytes) for lp in entries], "refusal": None}


def completion_logprobs(entries: list[TokenLogprob | None], token_bytes: Callable[[int], bytes],
                        token_ids: list[int], text_offset: int) -> dict[str, Any]:
    """A legacy completion choice's `logprobs`: parallel lists over the tokens, with character offsets."""
    tokens, values, tops, offsets = [], [], [], []
    at = text_offset
    for token, lp in zip(token_ids, entries):
        text = _text(token_bytes(token))
        tokens.append(text)
        offsets.append(at)
        at += len(text)
        values.append(None if lp is None else lp.logprob)
        tops.append(None if lp is None else {_text(token_bytes(t)): v for t, v in lp.top})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
