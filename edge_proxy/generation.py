"""One chat request's generation as one object: what to generate, how far it got, how it ended."""

from __future__ import annotations

import dataclasses
import enum
import time

from admin.guardrails import OutputGate
from edge_proxy.grammar import Constraint
from edge_proxy.logprobs import TokenLogprob
from edge_proxy.outgoing import NoiseSpec, SpanNoise
from edge_proxy.sampling import SamplingParams
from edge_proxy.spans.restore import PlaceholderRestorer


class Status(enum.Enum):
    WAITING = "waiting"  # prepared; nothing sent to the core yet
    RUNNING = "running"
    FINISHED = "finished"  # finish_reason says why
    FAILED = "failed"  # an error ended it
    CANCELLED = "cancelled"  # the client went away


@dataclasses.dataclass(slots=True)
class Generation:
    """Owned by the engine while it runs; the route reads it to answer and account."""

    request_id: str  # the client's x-request-id (or one made here): echoed and logged, never an identity
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stops: list[str] = dataclasses.field(default_factory=list)
    noise: NoiseSpec = NoiseSpec()
    span_noise: SpanNoise | None = None
    restorer: PlaceholderRestorer | None = None  # puts protected spans back into the reply
    output_gate: OutputGate | None = None  # output guardrails
    constraint: Constraint | None = None  # a grammar the reply must follow (structured output, tool calls)
    logprobs: int | None = None  # report each sampled token's log-probability with this many alternatives
    prompt_logprobs: int | None = None  # also the prompt tokens' (legacy completions with echo)
    status: Status = Status.WAITING
    output_ids: list[int] = dataclasses.field(default_factory=list)  # every sampled token, EOS included
    token_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # one per reply token (not EOS)
    prompt_token_logprobs: list[TokenLogprob | None] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # stop, length or content_filter
    blocked_rule: str | None = None  # the output rule behind content_filter
    started_at: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def room_left(self) -> bool:
        return self.completion_tokens < self.max_new_tokens

    def ttft_seconds(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    def elapsed_seconds(self) -> float:
        return (self.finished_at or time.perf_counter()) - self.started_at

    def add_token(self, token: int) -> None:
        assert self.status is Status.RUNNING
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.output_ids.append(token)

    def finish(self, reason: str) -> None:
        assert reason in ("stop", "length", "content_filter")
        self.status, self.finish_reason, self.finished_at = Status.FINISHED, reason, time.perf_counter()

    def abandon(self, cancelled: bool) -> None:
        """Ended by an error, or by the client leaving; a finished generation stays finished."""
        if self.status is not Status.FINISHED:
            self.status = Status.CANCELLED if cancelled else Status.FAILED
            self.finished_at = time.perf_counter()
