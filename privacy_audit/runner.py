"""The audit loop: for each setting, cloak (once per edge_layers k), trace every prompt, attack, score.

Order: load the public checkpoint, encode the prompts, compute the unprotected reference
replies; then per k a fresh `veil cloak --edge-layers k` into a temporary folder, and for
each setting with that k: trace -> attacks A..E (the core operator) -> metrics, then the wire
observers (attacks/wire.py): sealed always, unsealed with `insecure_transport` (for comparison
only). The true Q is read from the edge bundle only to score attack A's estimate; no attack sees it.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from cloaking.checkpoint import Checkpoint
from cloaking.cloak import cloak, eos_ids, unseal_rotation
from cloaking.secretbox import KeySource, create_key_file
from edge_proxy.edge_model import EdgeModel
from edge_proxy.outgoing import NoiseSpec
from privacy_audit import metrics
from privacy_audit.attacks import key_recovery, layer_match, lm_prior, nearest, reply, wire
from privacy_audit.knowledge import Knowledge, PublicModel
from privacy_audit.prompts import load_prompts
from privacy_audit.trace import Encoded, Reference, encode, reference_replies, trace_setting
from veil.bundle import EDGE_SEALED_Q, read_edge_spec
from veil.model.decoder import DecoderStack

MODEL_NAME = "audit"


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """One defense configuration: embedding noise ρ (σ = ρ·rms(E)), optional clip, edge-held layers k."""

    rho: float = 0.0
    edge_layers: int = 0
    clip_to_median: bool = False  # clip each embedding to the median embedding norm before the noise

    def __post_init__(self) -> None:
        assert self.rho >= 0 and self.edge_layers >= 0

    @property
    def name(self) -> str:
        parts = []
        if self.edge_layers:
            parts.append(f"edge k={self.edge_layers}")
        if self.rho:
            parts.append(f"noise ρ={self.rho:g}" + (" clip" if self.clip_to_median else ""))
        return " + ".join(parts) or "none"


FULL = [Setting(), *(Setting(rho=r) for r in (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)),
        *(Setting(edge_layers=k) for k in (1, 2, 4)), Setting(0.1, 2), Setting(0.5, 2)]
# --quick adds ρ=3, past the full grid, so that CI sees recovery itself fall (B ≈ 92%), not only utility
QUICK = [Setting(), Setting(rho=0.1), Setting(rho=1.0), Setting(rho=3.0), Setting(edge_layers=2)]
QUICK_PROMPTS = 12
WIRE_CURVE = (1, 4, 16, 64)  # requests seen under one Q for the unsealed observer's curve (plus all of them)
QUICK_WIRE_CURVE = (1, 4)
FULL_PROMPTS = 200  # of the 240 shipped: keeps the default run under 30 minutes on 2 cores


@dataclasses.dataclass(slots=True)
class AuditConfig:
    out: Path
    settings: list[Setting]
    prompts: int | None = FULL_PROMPTS  # None: every shipped prompt
    budget: float = 30.0  # seconds the operator spends generating text for D's inverter
    seed: int = 0
    max_new: int = 32
    beam: int = lm_prior.BEAM
    top_m: int = lm_prior.TOP_M
    insecure_transport: bool = False  # also measure the unsealed wire (for comparison only)
    wire_curve: tuple[int, ...] = WIRE_CURVE


@dataclasses.dataclass(slots=True)
class _Deployment:
    model: EdgeModel
    core: DecoderStack
    q_true: torch.Tensor  # scoring only


class Audit:
    """Holds what every setting shares: public model, encoded prompts, references, D's corpus."""

    def __init__(self, ckpt: Checkpoint, config: AuditConfig, progress: Callable[[str, int], None] | None = None):
        self.config, self.ckpt = config, ckpt
        self.public = PublicModel(ckpt)
        self.progress = progress or (lambda stage, n: None)
        self.encoded: list[Encoded] = [encode(ckpt.tokenizer, p) for p in load_prompts(config.prompts)]
        self.references: list[Reference] = []
        self._corpus: layer_match.Corpus | None = None

    # ---- shared pieces -------------------------------------------------------------------------
    def reference(self) -> None:
        stage = "reference: unprotected model"
        self.progress(stage, 0)
        eos = frozenset(int(e) for e in eos_ids(self.ckpt))  # the ids `veil cloak` writes into the edge bundle
        self.references = reference_replies(self.public.stack(), self.public.embed, self.public.logits, self.encoded,
                                            eos, self.config.max_new, on_batch=lambda n: self.progress(stage, n))

    def corpus(self) -> layer_match.Corpus:
        if self._corpus is None:
            self._corpus = layer_match.make_corpus(self.public, self.config.budget, self.config.seed)
        return self._corpus

    def noise_spec(self, s: Setting) -> NoiseSpec:
        return NoiseSpec(s.rho, self.public.median_embedding_norm if s.clip_to_median else None)

    def epsilon(self, s: Setting) -> tuple[float, float]:
        """(sensitivity Δ, per-token ε at δ = 1e-5)."""
        spec = self.noise_spec(s)
        delta = 2 * spec.clip if spec.clip is not None else self.public.max_embedding_distance
        return delta, metrics.gaussian_epsilon(delta, s.rho * self.public.embedding_rms)

    # ---- one setting -----------------------------------------------------------------------------
    def run_setting(self, s: Setting, dep: _Deployment) -> dict[str, Any]:
        cfg, public = self.config, self.public
        noise = self.noise_spec(s)
        started = time.perf_counter()
        self.progress(f"{s.name}: trace", 0)
        traces = trace_setting(dep.model, dep.core, self.encoded, noise, self.references, cfg.seed, cfg.max_new,
                               on_batch=lambda n: self.progress(f"{s.name}: trace", n))
        traced = time.perf_counter()
        op = Knowledge(public, dep.core, noise)
        obs = [t.observed for t in traces]
        q_err = key_recovery.rotation_error(key_recovery.recovered_rotation(op), dep.q_true)
        self.progress(f"{s.name}: attacks", 0)
        recovered: dict[str, list[list[int]]] = {"A_lookup": key_recovery.lookup(op, obs)}
        use_c = op.sigma > 0 and s.edge_layers == 0
        cands: list[nearest.Candidates] = []
        if s.edge_layers == 0:  # with edge layers the core sees h_k, not an embedding: D replaces B and C
            cands = nearest.candidates(op, obs, cfg.top_m if use_c else 1)
            recovered["B_l2"] = [c.ids[:, 0].tolist() for c in cands]
            recovered["B_cosine"] = [c.cosine.tolist() for c in cands]
        if use_c:
            recovered["C_lm_prior"] = lm_prior.decode(op, obs, beam=cfg.beam, top_m=cfg.top_m, cands=cands)
        if s.edge_layers:
            h, ids = layer_match.features(op, self.corpus(), cfg.seed)
            inverter = layer_match.train_inverter(h, ids, public)
            recovered["D_inverter"] = layer_match.invert(op, obs, inverter)
            recovered["D_layer_match"] = layer_match.layer_match(op, obs, inverter)
        replies = reply.read_back(op, obs)
        self.progress(f"{s.name}: attacks", len(self.encoded))
        attacked = time.perf_counter()
        self.progress(f"{s.name}: wire", 0)
        on_wire = wire.observe_setting(public, traces, noise, s.edge_layers, dep.model.spec.bundle_id, cfg.seed,
                                       insecure=cfg.insecure_transport, curve=cfg.wire_curve, q_true=dep.q_true)
        self.progress(f"{s.name}: wire", len(self.encoded))
        observed_wire = time.perf_counter()

        tok = self.ckpt.tokenizer
        attacks = {name: _as_dicts(metrics.privacy(r, self.encoded, tok, cfg.seed)) for name, r in recovered.items()}
        best = max(attacks, key=lambda a: attacks[a]["token_recovery"]["mean"])
        delta, eps = self.epsilon(s)
        return {
            "setting": {"name": s.name, "rho": s.rho, "edge_layers": s.edge_layers, "clip": noise.clip},
            "sigma": op.sigma,
            "sensitivity": delta,
            "epsilon": eps if math.isfinite(eps) else "inf",
            "rotation_error": q_err,
            "attacks": attacks,
            "best_attack": best,
            "reply": self._reply_scores(traces, replies),
            "wire": on_wire,
            "utility": _as_dicts(metrics.utility(traces, self.references, cfg.seed)),
            "latency": metrics.latency(traces),
            "seconds": {"trace": traced - started, "attacks": attacked - traced, "wire": observed_wire - attacked},
            "prompts": len(self.encoded),
        }


    def _reply_scores(self, traces: list, readback: list[list[int]]) -> dict[str, Any]:
        """E: the operator's read-back (final norm and head on the returned states)."""
        return {"E_readback": metrics.bootstrap(metrics.reply_recovery(readback, [t.reply_ids for t in traces]),
                                                self.config.seed).as_dict()}


def _as_dicts(d: dict[str, metrics.Estimate]) -> dict[str, dict[str, Any]]:
    return {k: v.as_dict() for k, v in d.items()}


def deploy(ckpt: Checkpoint, root: Path, k: int) -> _Deployment:
    """A fresh `veil cloak --edge-layers k` into `root`, loaded as the edge and the core would load it."""
    key = root / "bundle.key"
    if not key.exists():
        create_key_file(key)
    source = KeySource(key_file=key)
    edge, core = root / f"edge-k{k}", root / f"core-k{k}"
    cloak(ckpt, edge, core, source, MODEL_NAME, progress=False, edge_layers=k, force=True)
    spec = read_edge_spec(edge)
    q_true = unseal_rotation((edge / EDGE_SEALED_Q).read_bytes(), source, spec.bundle_id)
    return _Deployment(EdgeModel.load(edge, source), DecoderStack.load(core, torch.device("cpu")), q_true)


def run_audit(ckpt: Checkpoint, config: AuditConfig,
              progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Every setting of `config`; returns the results document (also what results.json holds)."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    audit = Audit(ckpt, config, progress)
    audit.reference()
    results: list[dict[str, Any]] = []
    by_k: dict[int, list[Setting]] = {}
    for s in config.settings:
        by_k.setdefault(s.edge_layers, []).append(s)
    with tempfile.TemporaryDirectory(prefix="veil-audit-") as tmp:
        for k, settings in sorted(by_k.items()):
            dep = deploy(ckpt, Path(tmp), k)
            for s in settings:
                results.append(audit.run_setting(s, dep))
            del dep
    order = {s.name: i for i, s in enumerate(config.settings)}
    results.sort(key=lambda r: order[r["setting"]["name"]])
    public = audit.public
    return {
        "model": getattr(ckpt.model.config, "_name_or_path", "") or "bundled SmolLM2-135M-Instruct",
        "prompts": len(audit.encoded),
        "max_new_tokens": config.max_new,
        "seed": config.seed,
        "inverter_budget_s": config.budget,
        "hidden_size": public.hidden_size,
        "embedding_rms": public.embedding_rms,
        "max_embedding_distance": public.max_embedding_distance,
        "delta": metrics.DELTA,
        "results": results,
        "insecure_transport": config.insecure_transport,
        "seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }


def sizes(config: AuditConfig, shipped: int) -> int:
    """Progress units of a run: reference, then trace, attacks and wire per setting, one unit per prompt each."""
    n = shipped if config.prompts is None else min(config.prompts, shipped)
    return n * (1 + 3 * len(config.settings))
