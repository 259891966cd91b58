"""Write an audit's results: results.json (everything), results.md (the frontier table), frontier.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

ATTACKS = [("A_lookup", "A lookup"), ("B_l2", "B L2"), ("B_cosine", "B cos"), ("C_lm_prior", "C LM prior"),
           ("D_layer_match", "D match"), ("D_inverter", "D inverter")]
WIRE_ATTACKS = [("F_norm", "F norm"), ("T_template", "T template")]


def _pct(e: dict[str, Any] | None) -> str:
    if e is None or e["mean"] != e["mean"]:
        return "—"
    return f"{100 * e['mean']:.1f} [{100 * e['lo']:.1f}, {100 * e['hi']:.1f}]"


def _num(e: dict[str, Any], digits: int = 2) -> str:
    return f"{e['mean']:.{digits}f} [{e['lo']:.{digits}f}, {e['hi']:.{digits}f}]"


def _eps(r: dict[str, Any]) -> str:
    eps = r["epsilon"]
    return "∞" if eps == "inf" else f"{eps:.0f}"


def markdown(doc: dict[str, Any]) -> str:
    rows = doc["results"]
    lines = [
        "# Veil privacy audit",
        "",
        f"{doc['prompts']} prompts with planted canaries, bundled model, {doc['max_new_tokens']}-token greedy "
        f"replies; {doc['seconds'] / 60:.1f} min on {doc['threads']} CPU threads (seed {doc['seed']}). "
        "Percentages are means over prompts with 95% intervals (bootstrap over prompts; Wilson for "
        "exact-prompt and greedy exact match). Token positions are scored where message content sits.",
        "",
        "## Privacy: position-exact prompt-token recovery by attack (%)",
        "",
        "| setting | σ | ε (δ=1e-5) | Q̂ error | " + " | ".join(label for _, label in ATTACKS) + " |",
        "|---" * (4 + len(ATTACKS)) + "|",
    ]
    for r in rows:
        cells = [_pct(r["attacks"].get(key, {}).get("token_recovery")) for key, _ in ATTACKS]
        lines.append(f"| {r['setting']['name']} | {r['sigma']:.3f} | {_eps(r)} | {r['rotation_error']:.1e} | "
                     + " | ".join(cells) + " |")
    lines += [
        "",
        "## Best attack, replies, utility and cost",
        "",
        "| setting | best attack | exact prompt % | canaries % | E: reply read back % | "
        "top-1 agreement % | greedy exact@32 % | log-lik gap (nats/token) | edge ms/token |",
        "|---" * 9 + "|",
    ]
    for r in rows:
        best = r["attacks"][r["best_attack"]]
        u = r["utility"]
        label = dict(ATTACKS)[r["best_attack"]]
        lines.append(f"| {r['setting']['name']} | {label} | {_pct(best['exact_prompt'])} | {_pct(best['canary'])} | "
                     f"{_pct(r['reply']['E_readback'])} | "
                     f"{_pct(u['top1_agreement'])} | {_pct(u['greedy_exact'])} | "
                     f"{_num(u['loglik_gap'])} | {r['latency']['decode_ms_per_token']:.2f} |")
    lines += [
        "",
        f"σ = ρ·rms(E), rms(E) = {doc['embedding_rms']:.4f}. ε = Δ·√(2·ln(1.25/δ))/σ per token, with Δ = the "
        f"largest distance between two embeddings ({doc['max_embedding_distance']:.3f}) or 2·clip when clipped; "
        "∞ means no noise. Edge-held layers are post-processing and leave ε unchanged. Q̂ error is "
        "‖Q̂ − Q‖/‖Q‖ of the Procrustes estimate. Edge ms/token is the time in OutgoingStates per "
        "generated token (embedding, noise, edge-held blocks). Attacks A-E are the core operator's: sealing "
        "does not change them, since the core decrypts what it computes on.",
        "",
    ]
    lines += wire_markdown(doc)
    if "span_protection" in doc:
        from privacy_audit.span_audit import span_markdown

        lines.append(span_markdown(doc["span_protection"]))
    return "\n".join(lines)


def _count(n: int, of: int) -> str:
    return f"{n}/{of}"


def wire_markdown(doc: dict[str, Any]) -> list[str]:
    """The wire observers' tables: sealed (always), unsealed (--insecure-transport, for comparison only)."""
    rows = [r for r in doc["results"] if "wire" in r]
    if not rows:
        return []
    insecure = any("insecure" in r["wire"] for r in rows)
    lines = [
        "## Wire observer, no keys: prompt-token recovery (%)",
        "",
        "An on-path observer (a TLS-terminating ingress, a packet capture) with the public model and "
        "the deployment's public policy, without the core bundle or Q. **sealed** is what Veil sends: "
        "the exact bytes of each session (HPKE hello, AES-256-GCM step frames) built with `veil.channel` from "
        "the traced plaintext frames. **unsealed** (`--insecure-transport`) is for comparison only: the "
        "plaintext `veil.wire` frames."
        + ("" if insecure else " This run did not measure it."),
        "",
    ]
    head = ["setting", "sealed: row bytes found", "sealed: F norm", "sealed: T template",
            "sealed: prompt length from frame size", "blind guess ceiling"]
    if insecure:
        head += ["unsealed: F norm", "unsealed: T template", "unsealed: T canaries", "unsealed: T exact prompt",
                 "unsealed: T reply", "unsealed: F reply", "Q̂ rank"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        w = r["wire"]
        sealed = w["sealed"]
        b, m = sealed["bytes"], sealed["metadata"]
        cells = [r["setting"]["name"], _count(b["windows_found"], b["windows"]),
                 _pct(sealed["attacks"].get("F_norm", {}).get("token_recovery")),
                 _pct(sealed["attacks"]["T_template"]["token_recovery"]),
                 _count(m["prompt_length_exact"], m["requests"]), _pct(w["chance"])]
        if insecure:
            u = w.get("insecure")
            if u is None:
                cells += ["—"] * 7
            else:
                t = u["attacks"]["T_template"]
                cells += [_pct(u["attacks"].get("F_norm", {}).get("token_recovery")), _pct(t["token_recovery"]),
                          _pct(t["canary"]), _pct(t["exact_prompt"]), _pct(u["reply"]["T_template"]),
                          _pct(u["reply"].get("F_norm")), f"{u['rank']}/{doc.get('hidden_size', 576)}"]
        lines.append("| " + " | ".join(cells) + " |")
    first = rows[0]["wire"]["sealed"]
    m = first["metadata"]
    lines += [
        "",
        "Row bytes found: 8-byte windows of every rotated input row and returned hidden row, searched for at "
        "every byte offset of the whole sealed recording (found/searched). F on the sealed stream reads the "
        "ciphertext as f32 rows; T runs its whole bootstrap on those rows. The blind guess ceiling is the most "
        "common content token guessed everywhere. What the sealed stream still shows: the number of frames "
        f"(one per generated token, so the reply length: {m['reply_length_exact']}/{m['requests']} exact) "
        f"and their sizes: the first frame's size gives the prompt length exactly "
        f"({m['prompt_length_exact']}/{m['requests']}; its header is {m['first_frame_header_bytes'][0]}-"
        f"{m['first_frame_header_bytes'][1]} bytes, under one {m['row_bytes']}-byte row), every later frame is "
        f"{', '.join(map(str, m['decode_frame_bytes']))} bytes and every answer "
        f"{', '.join(map(str, m['answer_frame_bytes']))}; hellos are {', '.join(map(str, m['hello_bytes']))} "
        f"bytes. Timing (when each frame goes) shows the pace of generation; it is not measured here. "
        f"Byte entropy of the sealed step frames: {first['entropy_bits_per_byte']:.3f} bits/byte.",
        "",
    ]
    curves = [(r["setting"]["name"], r["wire"]["insecure"]["curve"]) for r in rows
              if "insecure" in r["wire"] and r["wire"]["insecure"]["curve"]]
    if curves:
        ns = sorted({p["requests"] for _, c in curves for p in c})
        lines += [
            "### Unsealed: T template's token recovery (%) against requests seen under one Q",
            "",
            "Q̂ is learned (anchors and bootstrap) from the first N requests only, then every request of the "
            "run is read with it; the last column is all of them. Q̂ rank in brackets.",
            "",
            "| setting | " + " | ".join(f"N = {n}" for n in ns) + " |",
            "|---" * (1 + len(ns)) + "|",
        ]
        for name, c in curves:
            by = {p["requests"]: p for p in c}
            lines.append(f"| {name} | " + " | ".join(
                f"{_pct(by[n]['token_recovery'])} ({by[n]['rank']})" if n in by else "—" for n in ns) + " |")
        lines.append("")
    return lines


def frontier(doc: dict[str, Any], path: Path) -> None:
    """Privacy (best-attack token recovery) against utility (top-1 agreement), one point per setting.

    Settings often coincide (every noise level leaks ~100%), so points carry a number and a
    legend names them, rather than labels that overprint each other.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6), dpi=120)
    colors = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]  # a ListedColormap
    for i, r in enumerate(doc["results"]):
        u = r["utility"]["top1_agreement"]
        p = r["attacks"][r["best_attack"]]["token_recovery"]
        marker = "s" if r["setting"]["edge_layers"] > 0 else "o"
        x, y = 100 * u["mean"], 100 * p["mean"]
        ax.errorbar(x, y, xerr=[[x - 100 * u["lo"]], [100 * u["hi"] - x]],
                    yerr=[[y - 100 * p["lo"]], [100 * p["hi"] - y]], fmt=marker, color=colors[i % len(colors)],
                    capsize=3, alpha=0.85, label=f"{i + 1}: {r['setting']['name']}")
        ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(4, 4 + 7 * (i % 3)), fontsize=7)
    ax.set_xlabel("utility: teacher-forced top-1 agreement with the unprotected model (%)")
    ax.set_ylabel("leakage: prompt tokens recovered by the best attack (%)")
    ax.set_title(f"Veil privacy/utility frontier ({doc['prompts']} prompts; lower right is better)")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="setting (square: edge layers)",
              title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write(doc: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "frontier.png"}
    paths["json"].write_text(json.dumps(_json_safe(doc), indent=2, ensure_ascii=False) + "\n")
    paths["markdown"].write_text(markdown(doc))
    frontier(doc, paths["plot"])
    return paths
