"""A checked chat request to its Generations: prompt guardrails -> span protection -> chat template -> budget,
and the grammar its reply must follow.

The prompt is rendered once, from the messages the policy let through, and the token budget
is computed once from it; nothing here talks to the core. Each of the request's `n` choices is a
Generation of its own over the same prompt.
"""

from __future__ import annotations

import dataclasses

import anyio

from admin.principal import Principal
from edge_proxy import tools as tool_calls
from edge_proxy.chat_template import render_raw_with_positions, render_with_positions, supports_tools
from edge_proxy.edge_model import EdgeModel
from edge_proxy.gatekeeper import Gatekeeper
from edge_proxy.generate import Engine
from edge_proxy.generation import Generation
from edge_proxy.grammar import json_schema_grammar, lark_grammar, lark_json
from edge_proxy.outgoing import NoiseSpec, SpanNoise
from edge_proxy.schemas import ChatRequest
from edge_proxy.spans.protect import ProtectedPrompt
from edge_proxy.spans.restore import PlaceholderRestorer
from veil.settings import PrivacySettings


def reply_grammar(chat: ChatRequest) -> tuple[str, str] | None:
    """(grammar, the request field it comes from) for the reply, or None for free text."""
    if chat.tools is not None:
        answer = None if chat.output_schema is None else lark_json(chat.output_schema)
        return lark_grammar(tool_calls.grammar(chat.tools, answer)), "tools"
    if chat.output_schema is not None:
        return json_schema_grammar(chat.output_schema), "response_format"
    return None


async def prepare(gate: Gatekeeper, engine: Engine, model: EdgeModel, privacy: PrivacySettings,
                  principal: Principal, chat: ChatRequest, rid: str, started_at: float, *,
                  raw_prompt: str | None = None, prompt_logprobs: int | None = None) -> list[Generation]:
    """`raw_prompt` (legacy completions) is tokenized as it is, with no chat template; `prompt_logprobs` asks
    for the prompt tokens' log-probabilities too (with this many alternatives)."""
    def guard_protect_raw(text: str) -> tuple[ProtectedPrompt | None, list[int], frozenset[int]]:
        messages = [{"role": "user", "content": text}]
        messages = gate.guard_prompt(principal, messages, rid) or messages
        protected = gate.protect_prompt(principal, messages, rid)
        if protected is None:
            return None, *render_raw_with_positions(model.tokenizer, messages[0]["content"], [])
        return protected, *render_raw_with_positions(model.tokenizer, protected.messages[0]["content"],
                                                     protected.noisy)

    def guard_protect_render() -> tuple[ProtectedPrompt | None, list[int], frozenset[int]]:
        if raw_prompt is not None:
            return guard_protect_raw(raw_prompt)
        messages, definitions = chat.messages, None
        if chat.tools is not None:  # the model's own tool format when its template has one, else Veil's
            if supports_tools(model.tokenizer):
                definitions = [f.definition() for f in chat.tools.offered()]
            else:
                messages = tool_calls.with_preamble(messages, chat.tools)
        messages = gate.guard_prompt(principal, messages, rid) or messages
        protected = gate.protect_prompt(principal, messages, rid)
        if protected is None:
            return None, *render_with_positions(model.tokenizer, messages, [], definitions)
        return protected, *render_with_positions(model.tokenizer, protected.messages, protected.noisy, definitions)

    # guardrail regexes, span detection, tokenizing and compiling a grammar are CPU work on up to megabytes
    # of text: one hop off the event loop for all of them
    def build() -> tuple[ProtectedPrompt | None, list[int], frozenset[int], list[Generation]]:
        protected, prompt_ids, positions = guard_protect_render()
        grammar = reply_grammar(chat)
        max_new = engine.budget(len(prompt_ids), chat.max_tokens)
        gens = [_generation(chat, rid, started_at, prompt_ids, max_new, privacy, principal, protected, positions,
                            gate, model, grammar, i) for i in range(chat.n)]
        gens[0].prompt_logprobs = prompt_logprobs  # the prompt is prefilled once, for the first choice
        return protected, prompt_ids, positions, gens

    return (await anyio.to_thread.run_sync(build))[3]


def _generation(chat: ChatRequest, rid: str, started_at: float, prompt_ids: list[int], max_new: int,
                privacy: PrivacySettings, principal: Principal, protected: ProtectedPrompt | None,
                positions: frozenset[int], gate: Gatekeeper, model: EdgeModel,
                grammar: tuple[str, str] | None, index: int) -> Generation:
    sampling = chat.sampling
    if sampling.seed is not None and index:  # choices of a seeded request differ from each other, and repeat
        sampling = dataclasses.replace(sampling, seed=(sampling.seed + index) % (2**63))
    rho = privacy.noise_rho if principal.noise_rho is None else principal.noise_rho
    return Generation(
        request_id=rid,
        prompt_ids=prompt_ids,
        max_new_tokens=max_new,
        sampling=sampling,
        stops=chat.stop,
        noise=NoiseSpec(rho=rho, clip=privacy.noise_clip or None),
        span_noise=SpanNoise(positions, privacy.span_noise_rho) if positions else None,
        restorer=PlaceholderRestorer(protected.mapping) if protected is not None and protected.mapping else None,
        output_gate=gate.output_gate(),
        constraint=None if grammar is None else model.grammars.constraint(*grammar),
        logprobs=chat.logprobs,
        started_at=started_at,
    )

