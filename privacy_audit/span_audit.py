"""Span protection, measured: detector recall, canary recovery by the audit's attacks, and task utility.

The operator's protect rules are configured as a deployment would configure them: one rule with
the built-in entity recognizers, one terms rule with the customer list a CRM exports, one
pattern rule for the account, invoice, order, ticket and reference formats. Each mode runs the
span prompts (`span_canaries.py`) through a fresh `veil cloak` deployment in-process, as
`trace.py` runs the main audit, and attacks what the core receives:

* `none`: the prompts as written (no protect rules);
* `placeholder`: `protect()` replaces each detected span by `<LABEL_N>`; replies are restored
  by `PlaceholderRestorer` fed the streamed text, as the edge feeds it;
* `noise`: the same rules with protection=noise; the span's token positions
  (`render_with_positions`) get σ = ρ·rms(E), ρ = privacy.span_noise_rho.

Scores. Recall: a canary is found when detected spans cover every occurrence of it entirely.
Recovery: a canary is recovered when its exact string appears in the decoded prompt an attack
recovers (A lookup; for noise also B nearest and C LM prior, which pin the positions without
span noise: a clean vector sits exactly on an embedding row), over all canaries and over the
found ones.
Utility: on TASK prompts (whose correct answer repeats every canary), the share of
(prompt, canary) pairs whose value appears in the greedy reply as the client gets it, against
the unprotected model's share; `mangled` counts placeholders the model damaged or invented in
those replies. Only TASK prompts generate a reply: the attacks read prompt positions only.
Canaries are the unit (Wilson intervals); they cluster by prompt, so the intervals are somewhat
narrower than they should be.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from admin.guardrails import DEFAULT_ENTITIES, GuardrailRule
from cloaking.checkpoint import Checkpoint
from edge_proxy.chat_template import render_with_positions
from edge_proxy.outgoing import NoiseSpec, OutgoingStates, SpanNoise
from edge_proxy.reply_text import ReplyText
from edge_proxy.spans.detect import SpanDetector
from edge_proxy.spans.protect import ProtectedPrompt, protect
from edge_proxy.spans.restore import PlaceholderRestorer
from privacy_audit import metrics, runner
from privacy_audit.attacks import key_recovery, lm_prior, nearest
from privacy_audit.knowledge import Knowledge, PublicModel
from privacy_audit.prompts import Prompt
from privacy_audit.span_canaries import CUSTOMERS, ID_PATTERN, TYPES, SpanPrompt, load_span_prompts
from privacy_audit.trace import BATCH, Encoded, Trace, edge_logits, encode, run_batch

MODES = ("none", "placeholder", "noise")
QUICK_SPAN_PROMPTS = 24
MAX_NEW_TOKENS = 48
SPAN_NOISE_RHO = 3.0  # privacy.span_noise_rho's default
ATTACK_LABELS = {"A_lookup": "A lookup", "B_l2": "B L2", "B_cosine": "B cos", "C_lm_prior": "C LM prior"}


@dataclasses.dataclass(slots=True)
class SpanConfig:
    prompts: int | None = None  # None: every shipped span prompt
    seed: int = 0
    max_new: int = MAX_NEW_TOKENS
    span_rho: float = SPAN_NOISE_RHO
    modes: tuple[str, ...] = MODES
    beam: int = lm_prior.BEAM
    top_m: int = lm_prior.TOP_M
    ner_model: str = ""  # privacy.ner_model; PERSON is found only when a spaCy pipeline is installed

    @classmethod
    def quick(cls, **kw: Any) -> "SpanConfig":
        return cls(prompts=QUICK_SPAN_PROMPTS, **kw)


def audit_rules(protection: str) -> list[GuardrailRule]:
    """The operator's protect rules for the audit, every one with the given protection."""
    return [
        GuardrailRule(id="pii", action="protect", entities=list(DEFAULT_ENTITIES), protection=protection,
                      description="built-in recognizers"),
        GuardrailRule(id="customers", action="protect", terms=list(CUSTOMERS), label="PERSON", protection=protection,
                      description="customer names exported from the CRM"),
        GuardrailRule(id="ids", action="protect", pattern=ID_PATTERN, label="ID", protection=protection,
                      description="account, invoice, order, ticket and reference numbers"),
    ]


# ---- detection -------------------------------------------------------------------------------------------


def found_canaries(prompt: SpanPrompt, protected: ProtectedPrompt) -> list[bool]:
    """Per canary: every occurrence of its value lies entirely inside one detected span."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for i, s in protected.spans:
        spans.setdefault(i, []).append((s.start, s.end))
    out = []
    for c in prompt.canaries:
        occurrences = [(i, at) for i, m in enumerate(prompt.messages) for at in _find_all(m["content"], c.value)]
        out.append(bool(occurrences) and all(any(a <= at and at + len(c.value) <= b for a, b in spans.get(i, []))
                                             for i, at in occurrences))
    return out


def _find_all(text: str, value: str) -> list[int]:
    out, at = [], text.find(value)
    while at >= 0:
        out.append(at)
        at = text.find(value, at + 1)
    return out


def recall(prompts: Sequence[SpanPrompt], found: Sequence[Sequence[bool]]) -> dict[str, Any]:
    """Detector recall overall and per canary type, with Wilson intervals."""
    by_type: dict[str, list[bool]] = {}
    for p, f in zip(prompts, found):
        for c, hit in zip(p.canaries, f):
            by_type.setdefault(c.type, []).append(hit)
    every = [h for hits in by_type.values() for h in hits]
    return {"overall": metrics.wilson(sum(every), len(every)).as_dict(),
            "by_type": {t: metrics.wilson(sum(by_type[t]), len(by_type[t])).as_dict() for t in TYPES if t in by_type}}


# ---- one mode through the pipeline -------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Request:
    encoded: Encoded
    mapping: dict[str, str]
    positions: frozenset[int]  # prompt positions sent under span noise


def _requests(tokenizer: Any, prompts: Sequence[SpanPrompt], protected: Sequence[ProtectedPrompt | None]
              ) -> list[_Request]:
    out = []
    for p, pp in zip(prompts, protected):
        values = [c.value for c in p.canaries]
        messages = p.messages if pp is None else pp.messages
        enc = encode(tokenizer, Prompt(p.id, messages, values))
        positions: frozenset[int] = frozenset()
        if pp is not None and pp.noisy:
            ids, positions = render_with_positions(tokenizer, pp.messages, pp.noisy)
            assert ids == enc.ids
        out.append(_Request(enc, dict(pp.mapping) if pp is not None else {}, positions))
    return out


def _trace(dep: Any, requests: Sequence[_Request], lengths: Sequence[int], rho: float, seed: int,
           on_batch: Callable[[int], None]) -> list[Trace]:
    """Greedy generation of lengths[i] tokens at most for request i, span noise at its marked positions
    (cf. trace.trace_setting). Requests of one length run in lockstep batches."""
    traces: list[Trace | None] = [None] * len(requests)
    for length in sorted(set(lengths)):
        group = [i for i, n in enumerate(lengths) if n == length]
        for start in range(0, len(group), BATCH):
            chunk = group[start:start + BATCH]

            def make(j: int, chunk: Sequence[int] = chunk) -> OutgoingStates:
                i = chunk[j]
                gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
                positions = requests[i].positions
                span = SpanNoise(positions, rho) if positions else None
                return OutgoingStates(dep.model, NoiseSpec(), gen, span_noise=span)

            out = run_batch(dep.core, make, edge_logits(dep.model), [requests[i].encoded for i in chunk],
                            dep.model.eos_ids, None, length)
            for i, t in zip(chunk, out):
                traces[i] = t
            on_batch(len(chunk))
    assert all(t is not None for t in traces)
    return traces  # type: ignore[return-value]


def _pin_clean_positions(cands: list[nearest.Candidates], sigma: float) -> list[nearest.Candidates]:
    """The operator sees which positions carry span noise: a clean embedding sits on a vocabulary row
    (distance ~0), a noised one about sqrt(d)·σ away. Clean positions keep only their exact token."""
    out = []
    for c in cands:
        clean = c.sqdist[:, 0] < 0.01 * sigma * sigma
        sq = c.sqdist.clone()
        sq[clean, 1:] = 1e6 * sigma * sigma
        out.append(nearest.Candidates(c.ids, sq, c.cosine))
    return out


def attack(op: Knowledge, observed: list, noised: bool, beam: int, top_m: int) -> dict[str, list[list[int]]]:
    """Recovered prompt ids by attack: A always; with span noise also B (L2, cosine) and C."""
    recovered = {"A_lookup": key_recovery.lookup(op, observed)}
    if noised:
        cands = _pin_clean_positions(nearest.candidates(op, observed, top_m), op.sigma)
        recovered["B_l2"] = [c.ids[:, 0].tolist() for c in cands]
        recovered["B_cosine"] = [c.cosine.tolist() for c in cands]
        recovered["C_lm_prior"] = lm_prior.decode(op, observed, beam=beam, top_m=top_m, cands=cands)
    return recovered


def canary_recovery(recovered: Sequence[Sequence[int]], prompts: Sequence[SpanPrompt], tokenizer: Any
                    ) -> list[list[bool]]:
    """Per prompt, per canary: its exact string appears in the decoded recovered prompt."""
    out = []
    for ids, p in zip(recovered, prompts):
        text = tokenizer.decode(list(ids), skip_special_tokens=False)
        out.append([c.value in text for c in p.canaries])
    return out


def client_reply(tokenizer: Any, prompt_ids: list[int], reply_ids: Sequence[int], eos_ids: frozenset[int],
                 restorer: PlaceholderRestorer | None) -> str:
    """The reply text as the client gets it, through the edge's own pipeline (edge_proxy/reply_text.py)."""
    reply = ReplyText(tokenizer, prompt_ids, [], restorer)
    pieces = []
    for token in reply_ids:
        if token in eos_ids:
            break
        pieces.append(reply.push(token)[0])
    pieces.append(reply.finish()[0])
    return "".join(pieces)


def _rate(hits: Sequence[Sequence[bool]], mask: Sequence[Sequence[bool]] | None = None) -> dict[str, Any]:
    flat = [h for i, row in enumerate(hits) for j, h in enumerate(row) if mask is None or mask[i][j]]
    return metrics.wilson(sum(flat), len(flat)).as_dict()


def _by_type(prompts: Sequence[SpanPrompt], hits: Sequence[Sequence[bool]],
             mask: Sequence[Sequence[bool]] | None = None) -> dict[str, dict[str, Any]]:
    """_rate per canary type (types with no canary under the mask left out)."""
    out = {}
    for t in TYPES:
        typed = [[c.type == t and (mask is None or mask[i][j]) for j, c in enumerate(p.canaries)]
                 for i, p in enumerate(prompts)]
        if any(any(row) for row in typed):
            out[t] = _rate(hits, typed)
    return out


def run_mode(mode: str, prompts: Sequence[SpanPrompt], found: Sequence[Sequence[bool]], dep: Any,
             public: PublicModel, config: SpanConfig, progress: Callable[[str, int], None]) -> dict[str, Any]:
    tok = public.tokenizer
    started = time.perf_counter()
    protected: list[ProtectedPrompt | None] = [None] * len(prompts)
    if mode != "none":
        detector = SpanDetector(audit_rules(mode), config.ner_model)
        protected = [protect(detector, p.messages) for p in prompts]
    requests = _requests(tok, prompts, protected)
    stage = f"spans {mode}: trace"
    progress(stage, 0)
    # only TASK prompts need a reply (utility is scored on them); the attacks read the prompt positions
    lengths = [config.max_new if p.task else 1 for p in prompts]
    traces = _trace(dep, requests, lengths, config.span_rho, config.seed, lambda n: progress(stage, n))
    traced = time.perf_counter()

    noised = any(r.positions for r in requests)
    op = Knowledge(public, dep.core, NoiseSpec(config.span_rho if noised else 0.0))
    recovered = attack(op, [t.observed for t in traces], noised, config.beam, config.top_m)
    progress(f"spans {mode}: attacks", len(prompts))
    attacked = time.perf_counter()

    attacks: dict[str, Any] = {}
    hits_by_attack = {}
    for name, ids in recovered.items():
        hits = canary_recovery(ids, prompts, tok)
        hits_by_attack[name] = hits
        attacks[name] = {"all": _rate(hits), "found": _rate(hits, found),
                         "token_recovery": metrics.bootstrap(metrics.token_recovery(ids, [r.encoded for r in requests]),
                                                             config.seed).as_dict()}
    best = max(attacks, key=lambda a: (attacks[a]["found"]["mean"] if attacks[a]["found"]["n"] else -1.0,
                                       attacks[a]["all"]["mean"]))
    # any attack: a canary counts when one of them gets it (an upper bound on what one operator guess gets)
    either = [[any(hits_by_attack[a][i][j] for a in hits_by_attack) for j in range(len(p.canaries))]
              for i, p in enumerate(prompts)]

    restored = mangled = 0
    replies: list[list[bool]] = []
    for p, r, t in zip(prompts, requests, traces):
        if not p.task:
            replies.append([False] * len(p.canaries))
            continue
        restorer = PlaceholderRestorer(r.mapping) if r.mapping else None
        text = client_reply(tok, r.encoded.ids, t.reply_ids, dep.model.eos_ids, restorer)
        if restorer is not None:
            restored, mangled = restored + restorer.restored, mangled + restorer.mangled
        replies.append([c.value in text for c in p.canaries])
    task = [[p.task] * len(p.canaries) for p in prompts]
    return {
        "mode": mode,
        "prompts": len(prompts),
        "noised_positions": sum(len(r.positions) for r in requests),
        "placeholders": sum(len(r.mapping) for r in requests),
        "attacks": attacks,
        "best_attack": best,
        "recovery": {"all": attacks[best]["all"], "found": attacks[best]["found"],
                     "found_by_type": _by_type(prompts, hits_by_attack[best], found)},
        "recovery_any_attack": {"all": _rate(either), "found": _rate(either, found)},
        "utility": _rate(replies, task),
        "utility_by_type": _by_type(prompts, replies, task),
        "restored": restored,
        "mangled": mangled,
        "seconds": {"trace": traced - started, "attacks": attacked - traced},
    }


# ---- the section ---------------------------------------------------------------------------------------------


def _deployment(ckpt: Checkpoint, root: Path) -> Any:
    """A fresh `veil cloak` (no edge-held layers) into `root`, as the main audit deploys one."""
    return runner.deploy(ckpt, root, 0)


def sizes(config: SpanConfig, shipped: int) -> int:
    """Progress units: trace and attacks per mode, one per prompt each."""
    n = shipped if config.prompts is None else min(config.prompts, shipped)
    return 2 * n * len(config.modes)


def run_span_audit(ckpt: Checkpoint, config: SpanConfig | None = None,
                   progress: Callable[[str, int], None] | None = None, public: PublicModel | None = None,
                   prompts: Sequence[SpanPrompt] | None = None) -> dict[str, Any]:
    """Every mode of `config` on the span prompts; returns the JSON-safe `span_protection` section.

    `public` may pass the main audit's PublicModel to reuse its stacks and lookup table.
    """
    config = config or SpanConfig()
    progress = progress or (lambda stage, n: None)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    prompts = list(prompts if prompts is not None else load_span_prompts(config.prompts))
    public = public or PublicModel(ckpt)
    detector = SpanDetector(audit_rules("placeholder"), config.ner_model)
    detected = [protect(detector, p.messages) for p in prompts]
    found = [found_canaries(p, pp) for p, pp in zip(prompts, detected)]
    modes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="veil-span-audit-") as tmp:
        dep = _deployment(ckpt, Path(tmp))
        for mode in config.modes:
            modes[mode] = run_mode(mode, prompts, found, dep, public, config, progress)
        del dep
    base = modes.get("none", {}).get("utility", {}).get("mean")
    for m in modes.values():
        u = m["utility"]["mean"]
        m["utility_ratio"] = u / base if base and u == u else None
    canaries = [c for p in prompts for c in p.canaries]
    return _json_safe({
        "prompts": len(prompts),
        "task_prompts": sum(p.task for p in prompts),
        "canaries": len(canaries),
        "task_canaries": sum(len(p.canaries) for p in prompts if p.task),
        "types": {t: sum(c.type == t for c in canaries) for t in TYPES},
        "max_new_tokens": config.max_new,
        "span_rho": config.span_rho,
        "seed": config.seed,
        "rules": [{"id": r.id, "entities": r.entities, "terms": len(r.terms), "pattern": r.pattern, "label": r.label}
                  for r in audit_rules("placeholder")],
        "unavailable_entities": detector.unavailable,
        "recall": recall(prompts, found),
        "missed": sum(not f for row in found for f in row),
        "modes": modes,
        "seconds": time.perf_counter() - started,
    })


def _json_safe(x: Any) -> Any:
    """NaN (an empty rate) -> None, so the section is strict JSON as it stands."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


# ---- markdown ------------------------------------------------------------------------------------------------


def _pct(e: dict[str, Any] | None) -> str:
    if not e or not e.get("n") or e["mean"] is None or e["mean"] != e["mean"]:
        return "—"
    return f"{100 * e['mean']:.1f} [{100 * e['lo']:.1f}, {100 * e['hi']:.1f}]"


def span_markdown(section: dict[str, Any]) -> str:
    """The span-protection part of results.md."""
    rec, modes = section["recall"], section["modes"]
    lines = [
        "## Span protection",
        "",
        f"{section['prompts']} prompts ({section['task_prompts']} TASK prompts) with {section['canaries']} planted "
        f"sensitive values; protect rules: built-in entities, a {section['rules'][1]['terms']}-name customer list, "
        f"an ID pattern. Noise mode: ρ = {section['span_rho']:g} on the spans' tokens. Greedy replies to the TASK "
        f"prompts, {section['max_new_tokens']} tokens at most. Percentages over canaries with 95% Wilson intervals.",
        "",
        "| mode | best attack | recovered, all canaries % | recovered, found canaries % | task utility % | "
        "vs unprotected | mangled placeholders |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, m in modes.items():
        ratio = "—" if m.get("utility_ratio") is None else f"{m['utility_ratio']:.2f}"
        mangled = str(m["mangled"]) if mode == "placeholder" else "—"
        lines.append(f"| {mode} | {ATTACK_LABELS.get(m['best_attack'], m['best_attack'])} | "
                     f"{_pct(m['recovery']['all'])} | {_pct(m['recovery']['found'])} | {_pct(m['utility'])} | "
                     f"{ratio} | {mangled} |")
    lines += [
        "",
        "### By type: detector recall (misses reach the core in clear), recovery of found canaries, utility (%)",
        "",
        "| type | canaries | recall | " + " | ".join(f"recovered, {m}" for m in modes) + " | "
        + " | ".join(f"utility, {m}" for m in modes) + " |",
        "|---" * (3 + 2 * len(modes)) + "|",
    ]
    for t, e in rec["by_type"].items():
        cells = [_pct(m["recovery"]["found_by_type"].get(t)) for m in modes.values()]
        cells += [_pct(m["utility_by_type"].get(t)) for m in modes.values()]
        lines.append(f"| {t} | {e['n']} | {_pct(e)} | " + " | ".join(cells) + " |")
    cells = [_pct(m["recovery"]["found"]) for m in modes.values()] + [_pct(m["utility"]) for m in modes.values()]
    lines.append(f"| **all** | {rec['overall']['n']} | {_pct(rec['overall'])} | " + " | ".join(cells) + " |")
    if section.get("unavailable_entities"):
        lines += ["", f"Entity types with no recognizer installed here: {', '.join(section['unavailable_entities'])} "
                      "(names are found by the customer-list rule only)."]
    lines += [
        "",
        "A canary is found when detected spans cover it entirely; recovered when its exact string is in the "
        "prompt an attack decodes (A lookup; with noise also B nearest neighbour and C LM prior, the best "
        "shown). Task utility: on prompts whose answer must repeat the values, the share of values in the "
        "reply the client gets (placeholders restored), against the unprotected model's share.",
        "",
    ]
    return "\n".join(lines)
