"""The edge's Prometheus metrics, on a registry owned by the app. Labels never carry content."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 5)


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("veil_edge_requests_total", "Chat requests by outcome", ["status"], registry=r)
        self.prompt_tokens = Counter("veil_edge_prompt_tokens_total", "Prompt tokens", registry=r)
        self.completion_tokens = Counter("veil_edge_completion_tokens_total", "Generated tokens", registry=r)
        self.ttft = Histogram("veil_edge_time_to_first_token_seconds", "Request start to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.step_roundtrip = Histogram("veil_edge_step_roundtrip_seconds", "Edge->core->edge step time",
                                        registry=r, buckets=_FAST)
        self.core_compute = Histogram("veil_edge_core_compute_seconds", "Core compute time reported per step",
                                      registry=r, buckets=_FAST)
        self.auth_failures = Counter("veil_edge_auth_failures_total", "Rejected credentials by reason",
                                     ["reason"], registry=r)
        # no series is labelled by key id or JWT subject: who was refused is in the audit log, not in /metrics
        self.permission_denied = Counter("veil_edge_permission_denied_total", "403s by the scope that was missing",
                                         ["scope"], registry=r)
        self.rate_limited = Counter("veil_edge_rate_limited_total", "429s by limit (requests, tokens, concurrency)",
                                    ["limit"], registry=r)
        self.sessions_busy = Counter("veil_edge_sessions_busy_total",
                                     "503s: no core session of this edge freed within admission_wait_seconds",
                                     registry=r)
        self.sessions_held = Gauge("veil_edge_sessions_held", "Core sessions held by requests now", registry=r)
        self.sessions_waiting = Gauge("veil_edge_sessions_waiting", "Requests waiting for a core session",
                                      registry=r)
        self.policy_blocks = Counter("veil_edge_policy_blocks_total", "Guardrail blocks by rule", ["rule"], registry=r)
        self.protected_spans = Counter("veil_edge_protected_spans_total",
                                       "Prompt spans kept at the edge by protect rules, by placeholder type and mode",
                                       ["label", "protection"], registry=r)
        self.placeholders = Counter("veil_edge_placeholders_total",
                                    "Placeholders in replies: restored, or mangled by the model (never guessed)",
                                    ["outcome"], registry=r)
        self.core_resumes = Counter("veil_edge_core_resumes_total",
                                    "Core sessions re-opened on a fresh handshake (replica lost, idle, drained)",
                                    registry=r)
        self.reprefills = Counter("veil_edge_reprefills_total",
                                  "Sessions the core lost and the edge re-sent from its history (same rows)",
                                  registry=r)
        self.head = Histogram("veil_edge_head_seconds", "Final norm, LM head and sampling per tick (one GEMM for "
                              "every stream waiting for a token)", registry=r, buckets=_FAST)
        self.draft_tokens = Counter("veil_edge_draft_tokens_total",
                                    "Draft tokens sent to the core for verification, by whether the sampler kept them",
                                    ["outcome"], registry=r)
        self.head_batch_rows = Histogram("veil_edge_head_batch_rows", "Rows (a row per stream, more when it "
                                         "verifies drafts) served by one LM-head tick",
                                         registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
