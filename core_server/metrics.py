"""The core's Prometheus metrics, on a registry owned by the app (no module-level globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class CoreMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queued_steps = Gauge("veil_core_queued_steps", "Steps waiting for the runner", registry=r)
        self.active_sessions = Gauge("veil_core_active_sessions", "Sessions holding a KV cache", registry=r)
        self.step_seconds = Histogram(
            "veil_core_step_seconds", "Step latency from arrival to result", registry=r,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
        )
        self.tokens = Counter("veil_core_tokens_total", "Token positions processed", ["kind"], registry=r)
        self.rows_computed = Counter("veil_core_rows_computed_total", "Rows the engine ran through the blocks (a "
                                     "step's other rows came from the engine's prefix cache)", registry=r)
        self.batch_tokens = Histogram(
            "veil_core_batch_tokens", "Tokens per batched forward", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192),
        )
        self.errors = Counter("veil_core_errors_total", "Rejected or failed steps", ["code"], registry=r)
        self.handshakes = Counter("veil_core_handshakes_total", "Session handshakes by result", ["result"],
                                  registry=r)
        self.frames_refused = Counter("veil_core_frames_refused_total", "Sealed frames refused, by reason",
                                      ["reason"], registry=r)
        self.locker_writes = Counter("veil_core_locker_writes_total", "Snapshots written to the locker",
                                     ["result"], registry=r)
        self.locker_reads = Counter("veil_core_locker_reads_total", "Sessions resumed from the locker",
                                    ["result"], registry=r)
        self.ready = Gauge("veil_core_ready", "1 once the core bundle is loaded", registry=r)
        self.kv_pool_bytes = Gauge("veil_core_kv_pool_bytes", "The native engine's KV pool, planned at start (on a "
                                   "CPU committed as sessions first write their slots)", registry=r)
