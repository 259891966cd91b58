"""A checked chat request to a Generation: prompt guardrails -> span protection -> chat template -> budget.

The prompt is rendered once, from the messages the policy let through, and the token budget
is computed once from it; nothing here talks to the core.
"""

from __future__ import annotations

import anyio

from admin.principal import Principal
from edge_proxy.chat_template import render_with_positions
from edge_proxy.edge_model import EdgeModel
from edge_proxy.gatekeeper import Gatekeeper
from edge_proxy.generate import Engine
from edge_proxy.generation import Generation
from edge_proxy.outgoing import NoiseSpec, SpanNoise
from edge_proxy.schemas import ChatRequest
from edge_proxy.spans.protect import ProtectedPrompt
from edge_proxy.spans.restore import PlaceholderRestorer
from veil.settings import PrivacySettings


async def prepare(gate: Gatekeeper, engine: Engine, model: EdgeModel, privacy: PrivacySettings,
                  principal: Principal, chat: ChatRequest, rid: str, started_at: float) -> Generation:
    def guard_protect_render() -> tuple[ProtectedPrompt | None, list[int], frozenset[int]]:
        messages = gate.guard_prompt(principal, chat.messages, rid) or chat.messages
        protected = gate.protect_prompt(principal, messages, rid)
        if protected is None:
            return None, *render_with_positions(model.tokenizer, messages, [])
        return protected, *render_with_positions(model.tokenizer, protected.messages, protected.noisy)

    # guardrail regexes, span detection and tokenizing are CPU work on up to megabytes of text:
    # one hop off the event loop for all three
    protected, prompt_ids, positions = await anyio.to_thread.run_sync(guard_protect_render)
    rho = privacy.noise_rho if principal.noise_rho is None else principal.noise_rho
    return Generation(
        request_id=rid,
        prompt_ids=prompt_ids,
        max_new_tokens=engine.budget(len(prompt_ids), chat.max_tokens),
        sampling=chat.sampling,
        stops=chat.stop,
        noise=NoiseSpec(rho=rho, clip=privacy.noise_clip or None),
        span_noise=SpanNoise(positions, privacy.span_noise_rho) if positions else None,
        restorer=PlaceholderRestorer(protected.mapping) if protected is not None and protected.mapping else None,
        output_gate=gate.output_gate(),
        started_at=started_at,
    )
