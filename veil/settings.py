"""Typed settings: defaults, then a YAML file, then `VEIL_<SECTION>_<FIELD>` env vars.

This is the only module that reads `os.environ` for configuration.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from veil.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "veil.yaml"


def default_home() -> str:
    return str(Path.home() / ".local" / "share" / "veil")


@dataclasses.dataclass(slots=True)
class ModelSettings:
    checkpoint: str = ""  # HF folder or .gguf file; empty = the bundled SmolLM2 GGUF
    name: str = "smollm2-135m-instruct"  # model id the edge serves


@dataclasses.dataclass(slots=True)
class BundleSettings:
    edge_dir: str = ""  # empty = <home>/bundles/<model name>/edge
    core_dir: str = ""  # empty = <home>/bundles/<model name>/core
    key_file: str = ""  # 32-byte key that seals Q at rest; empty = <home>/bundle.key
    passphrase: str = ""  # alternative to key_file (scrypt); set via VEIL_BUNDLE_PASSPHRASE


MAX_SPECULATIVE_TOKENS = 16  # more drafts than this cost more core time than they can win on a decode step
MAX_BATCH_GROUPS = 8  # more groups than this leave each forward too few rows to pay for reading the weights


@dataclasses.dataclass(slots=True)
class EdgeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    core_url: str = "http://127.0.0.1:8001"
    core_public_key: str = ""  # the pinned core key: its fingerprint (SHA256:...) or public key (x25519:... or PEM)
    identity_key_file: str = ""  # this edge's X25519 key, made 0600 on first start; empty = <home>/edge.key
    post_quantum: bool = False  # hybrid MLKEM768-X25519 KEM for each session's handshake
    core_timeout_seconds: float = 60.0
    default_max_tokens: int = 0  # 0 = up to the context limit
    max_request_bytes: int = 4 * 1024 * 1024
    threads: int = 0  # torch threads for embedding/LM head; 0 = torch default
    max_sessions: int = 64  # core sessions this edge may hold at once: its quota at the core (allowed_edges.yaml)
    max_concurrent_per_key: int = 0  # concurrent generations per key unless the key sets its own; 0 = no cap
    key_session_share: float = 0.5  # most of max_sessions one key takes while another key wants some
    admission_wait_seconds: float = 30.0  # how long a request waits for a free session before a 503
    speculative_tokens: int = 0  # draft tokens per decode step, looked up in the request's own tokens; 0 = off
    # (same reply in fewer steps; the core learns how many drafts each step kept: see README "Speculative decoding")
    quantize: str = "none"  # none | int8: the LM head (and any blocks the edge runs) as int8 weights, as core.quantize


@dataclasses.dataclass(slots=True)
class CoreSettings:
    host: str = "127.0.0.1"
    port: int = 8001
    bundle: str = ""  # core bundle dir; empty = bundle.core_dir
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    quantize: str = "none"  # none | int8: the native engine's blocks as int8 weights with per-row 8-bit activations
    # (a float32 CPU core only; see veil/model/int8.py)
    cuda_graphs: bool = True  # native engine on CUDA: decode steps replay CUDA graphs (one per batch and key bucket)
    engine: str = "native"  # native (Veil's own loop) | vllm (vLLM in the core's process; needs vLLM installed)
    python: str = ""  # interpreter `veil up` runs the core with (the vllm engine's own venv); empty = this one
    tensor_parallel_size: int = 1  # vllm engine: GPUs one model is split over
    vllm_block_size: int = 0  # vllm engine: KV block rows (a decode step recomputes up to one block); 0 = 32 on CPU,
    # vLLM's default on GPU
    max_sessions: int = 64
    max_tokens_per_session: int = 8192
    session_idle_seconds: int = 300
    max_batch_tokens: int = 8192
    prefill_chunk_tokens: int = 512  # a longer step runs in chunks of this many rows beside other decodes; 0 = whole
    batch_wait_ms: float = 0.0  # hold a batch back this long at most for sessions of the last batch; 0 = never
    batch_groups: int = 1  # a forward takes at most 1/N of the live sessions: 2 where the edge shares the CPU
    max_step_bytes: int = 64 * 1024 * 1024
    max_result_rows: int = 64  # rows one step may ask back (`want`); 413 beyond
    max_queued_steps: int = 1024  # steps waiting for the runner; 503 queue_full (Retry-After) beyond
    kv_budget_bytes: int = 0  # worst-case KV memory of all sessions; 0 = 90% of what the device has free
    threads: int = 0  # torch intra-op threads; 0 = torch default
    identity_key_file: str = ""  # PEM PKCS#8 X25519 key (`veil core keygen`); empty = <home>/core.key
    previous_identity_key_file: str = ""  # during a key rotation: the old key, still accepted
    allowed_edges: str = ""  # YAML file of enrolled edges and their session quotas; empty = <home>/allowed_edges.yaml
    locker_after_seconds: float = 30.0  # a session idle this long goes to the locker (when one is configured)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # Prometheus /metrics on its own address; 0 = not served


@dataclasses.dataclass(slots=True)
class LockerSettings:
    redis_url: str = ""  # VEIL_LOCKER_REDIS_URL; empty = no locker (idle sessions expire, the edge re-prefills)
    redis_password_file: str = ""  # file holding the Redis password (the chart mounts it from a Secret)
    ttl_seconds: int = 3600  # a snapshot no replica resumes within this is gone
    max_snapshot_bytes: int = 512 * 1024 * 1024  # larger sessions are not lockered (a miss costs a re-prefill)


@dataclasses.dataclass(slots=True)
class AuthSettings:
    enabled: bool = False  # off only for a single local user on loopback
    admin_key: str = ""  # bootstrap admin key (VEIL_ADMIN_KEY); also the credential `veil admin` sends
    allow_unauthenticated_public: bool = False  # force auth off on a non-loopback address
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_jwks_url: str = ""
    jwt_public_key_file: str = ""
    jwt_default_rpm: int = 0  # 0 = unlimited
    jwt_default_tpm: int = 0


@dataclasses.dataclass(slots=True)
class PolicySettings:
    store: str = ""  # encrypted policy store file (VEIL_POLICY_STORE); empty = <home>/policy.store
    passphrase: str = ""  # unlocks the store (VEIL_POLICY_PASSPHRASE); set it in the environment only
    audit_log: str = ""  # empty = <home>/audit.log


@dataclasses.dataclass(slots=True)
class RedisSettings:
    url: str = ""  # VEIL_REDIS_URL; empty = in-process rate limiter (single edge)
    fail_open: bool = False  # when Redis is unreachable: admit (true) or answer 503 (false)


@dataclasses.dataclass(slots=True)
class AdminClientSettings:
    edge_url: str = "http://127.0.0.1:8000"  # where `veil admin` sends its requests (VEIL_EDGE_URL)
    api_key: str = ""  # the client key `veil chat` sends as its OpenAI API key (VEIL_API_KEY)


@dataclasses.dataclass(slots=True)
class PrivacySettings:
    noise_rho: float = 0.0  # Gaussian noise on each embedding, sigma = rho * rms(embedding matrix); per key too
    noise_clip: float = 0.0  # L2 clip of each embedding before the noise; 0 = no clipping
    span_noise_rho: float = 3.0  # noise on spans of protect rules with protection=noise (sigma = rho * rms)
    ner_model: str = ""  # spaCy pipeline (package or folder) for PERSON; empty = an installed en_core_web_*


@dataclasses.dataclass(slots=True)
class LogSettings:
    level: str = "info"


@dataclasses.dataclass(slots=True)
class Settings:
    home: str = dataclasses.field(default_factory=default_home)
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    bundle: BundleSettings = dataclasses.field(default_factory=BundleSettings)
    edge: EdgeSettings = dataclasses.field(default_factory=EdgeSettings)
    core: CoreSettings = dataclasses.field(default_factory=CoreSettings)
    auth: AuthSettings = dataclasses.field(default_factory=AuthSettings)
    policy: PolicySettings = dataclasses.field(default_factory=PolicySettings)
    redis: RedisSettings = dataclasses.field(default_factory=RedisSettings)
    locker: LockerSettings = dataclasses.field(default_factory=LockerSettings)
    admin: AdminClientSettings = dataclasses.field(default_factory=AdminClientSettings)
    privacy: PrivacySettings = dataclasses.field(default_factory=PrivacySettings)
    log: LogSettings = dataclasses.field(default_factory=LogSettings)

    def __post_init__(self) -> None:
        for port in (self.edge.port, self.core.port, self.core.metrics_port):
            if not 0 <= port <= 65535:
                raise ConfigError(f"port {port} is out of range 0..65535")
        e = self.edge
        if e.max_sessions < 1 or e.max_concurrent_per_key < 0 or not 0 < e.key_session_share <= 1 \
                or e.admission_wait_seconds < 0:
            raise ConfigError("edge.max_sessions must be >= 1, edge.max_concurrent_per_key >= 0, "
                              "edge.key_session_share in (0, 1] and edge.admission_wait_seconds >= 0")
        if not 0 <= e.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"edge.speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}]")
        if e.quantize not in ("none", "int8"):
            raise ConfigError("edge.quantize must be none or int8")
        if self.core.max_sessions < 1 or self.core.max_tokens_per_session < 1:
            raise ConfigError("core.max_sessions and core.max_tokens_per_session must be >= 1")
        if self.core.max_result_rows < 1 or self.core.max_queued_steps < 1 or self.core.kv_budget_bytes < 0 \
                or self.core.prefill_chunk_tokens < 0 or not 0 <= self.core.batch_wait_ms <= 1000:
            raise ConfigError("core.max_result_rows and core.max_queued_steps must be >= 1, "
                              "core.kv_budget_bytes and core.prefill_chunk_tokens >= 0, "
                              "and core.batch_wait_ms in [0, 1000]")
        if not 1 <= self.core.batch_groups <= MAX_BATCH_GROUPS:
            raise ConfigError(f"core.batch_groups must be in [1, {MAX_BATCH_GROUPS}]")
        if self.core.locker_after_seconds <= 0 or self.locker.ttl_seconds < 1 or self.locker.max_snapshot_bytes < 1:
            raise ConfigError("core.locker_after_seconds, locker.ttl_seconds and locker.max_snapshot_bytes must be > 0")
        if self.core.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("core.device must be one of auto, cpu, cuda")
        if self.core.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError("core.dtype must be one of auto, float32, bfloat16, float16")
        if self.core.quantize not in ("none", "int8"):
            raise ConfigError("core.quantize must be none or int8")
        if self.core.quantize != "none" and (self.core.engine != "native" or self.core.device == "cuda"
                                             or self.core.dtype not in ("auto", "float32")):
            raise ConfigError("core.quantize int8 runs on the native engine on a CPU with core.dtype float32 (or auto)")
        if self.core.engine not in ("native", "vllm"):
            raise ConfigError("core.engine must be native or vllm")
        if self.core.tensor_parallel_size < 1 or self.core.vllm_block_size < 0:
            raise ConfigError("core.tensor_parallel_size must be >= 1 and core.vllm_block_size >= 0")
        if self.privacy.noise_rho < 0 or self.privacy.noise_clip < 0:
            raise ConfigError("privacy.noise_rho and privacy.noise_clip must be >= 0")
        if self.privacy.span_noise_rho <= 0:
            raise ConfigError("privacy.span_noise_rho must be > 0")

    # Derived paths live here so every command agrees on them.
    def model_home(self) -> Path:
        return Path(self.home) / "bundles" / self.model.name

    def edge_bundle_dir(self) -> Path:
        return Path(self.bundle.edge_dir) if self.bundle.edge_dir else self.model_home() / "edge"

    def core_bundle_dir(self) -> Path:
        if self.core.bundle:
            return Path(self.core.bundle)
        return Path(self.bundle.core_dir) if self.bundle.core_dir else self.model_home() / "core"

    def policy_store_path(self) -> Path:
        return Path(self.policy.store) if self.policy.store else Path(self.home) / "policy.store"

    def audit_log_path(self) -> Path:
        return Path(self.policy.audit_log) if self.policy.audit_log else Path(self.home) / "audit.log"

    def core_identity_path(self) -> Path:
        return Path(self.core.identity_key_file) if self.core.identity_key_file else Path(self.home) / "core.key"

    def edge_identity_path(self) -> Path:
        return Path(self.edge.identity_key_file) if self.edge.identity_key_file else Path(self.home) / "edge.key"

    def allowed_edges_path(self) -> Path:
        return Path(self.core.allowed_edges) if self.core.allowed_edges else Path(self.home) / "allowed_edges.yaml"

    def key_file_path(self) -> Path:
        return Path(self.bundle.key_file) if self.bundle.key_file else Path(self.home) / "bundle.key"


def _coerce(value: str, kind: Any, name: str) -> Any:
    try:
        if kind is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return kind(value)
    except ValueError:
        raise ConfigError(f"{name} must be a {kind.__name__}") from None


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(obj: Any, values: Mapping[str, Any], where: str) -> None:
    hints = _section_types(type(obj))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown setting {where}{key}")
        kind = hints[key]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}{key} must be a mapping")
            _apply(getattr(obj, key), value, f"{where}{key}.")
            continue
        if isinstance(kind, types.UnionType):
            kind = str
        if isinstance(value, str) and kind is not str:
            value = _coerce(value, kind, f"{where}{key}")
        elif kind is float and isinstance(value, int):
            value = float(value)
        elif not isinstance(value, kind):
            raise ConfigError(f"{where}{key} must be a {kind.__name__}")
        setattr(obj, key, value)


# Short names the deployment docs use; the canonical VEIL_<SECTION>_<FIELD> name wins if both are set.
ENV_ALIASES = {
    "VEIL_CORE_URL": ("edge", "core_url"),
    "VEIL_ADMIN_KEY": ("auth", "admin_key"),
    "VEIL_POLICY_STORE": ("policy", "store"),
    "VEIL_REDIS_URL": ("redis", "url"),
    "VEIL_EDGE_URL": ("admin", "edge_url"),
    "VEIL_API_KEY": ("admin", "api_key"),
}


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Map VEIL_EDGE_PORT=9000 to {"edge": {"port": "9000"}} for every known field."""
    out: dict[str, Any] = {}
    for alias, (section, field) in ENV_ALIASES.items():
        if alias in environ:
            out.setdefault(section, {})[field] = environ[alias]
    for name, kind in _section_types(Settings).items():
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            for field in _section_types(kind):
                env = f"VEIL_{name}_{field}".upper()
                if env in environ:
                    out.setdefault(name, {})[field] = environ[env]
        else:
            env = f"VEIL_{name}".upper()
            if env in environ:
                out[name] = environ[env]
    return out


def load_settings(
    config_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from defaults, the YAML file, VEIL_* env vars, then explicit overrides."""
    environ = os.environ if environ is None else environ
    path = Path(config_path or environ.get("VEIL_CONFIG") or DEFAULT_CONFIG)
    settings = Settings()
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping")
        _apply(settings, data, "")
    elif config_path or environ.get("VEIL_CONFIG"):
        raise ConfigError(f"config file {path} does not exist")
    _apply(settings, _env_overrides(environ), "")
    if overrides:
        _apply(settings, overrides, "")
    settings.__post_init__()
    return settings
