"""`veil audit-privacy --quick` on the bundled model: the attacks are real, and defenses move the numbers
in the right direction. Directions are asserted with the audit's own 95% intervals, never fixed numbers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from privacy_audit import report
from privacy_audit.cli import add_parser, config_from_args, parse_setting
from privacy_audit.runner import QUICK, Setting, run_audit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(smol, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `--quick` audit (12 prompts; none, ρ 0.1, 1, 3, k=2), shared by every test here."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path_factory.mktemp("audit")
    config = config_from_args(parser.parse_args(["audit-privacy", "--quick", "--out", str(out)]))
    doc = run_audit(smol, config)
    report.write(doc, out)
    return {"doc": doc, "out": out, "by_name": {r["setting"]["name"]: r for r in doc["results"]}}


def _noise_levels(quick: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [r for r in quick["doc"]["results"] if r["setting"]["edge_layers"] == 0]
    return sorted(rows, key=lambda r: r["setting"]["rho"])


def test_quick_covers_the_ci_grid(quick) -> None:
    assert [r["setting"]["name"] for r in quick["doc"]["results"]] == [s.name for s in QUICK]
    assert quick["doc"]["prompts"] == 12


def test_without_defense_key_recovery_lookup_and_reply_readback_are_near_total(quick) -> None:
    r = quick["by_name"]["none"]
    assert r["rotation_error"] < 1e-6, "Procrustes recovers Q to float error"
    assert r["attacks"]["A_lookup"]["token_recovery"]["mean"] >= 0.95
    assert r["attacks"]["B_l2"]["token_recovery"]["mean"] >= 0.95
    assert r["reply"]["E_readback"]["mean"] >= 0.95
    assert r["attacks"]["A_lookup"]["canary"]["mean"] >= 0.95


def test_the_sealed_wire_shows_no_row_and_no_token_in_any_setting(quick) -> None:
    """Sealed rows are always measured; the unsealed ones only with --insecure-transport (test_wire.py)."""
    for r in quick["doc"]["results"]:
        w, name = r["wire"], r["setting"]["name"]
        assert "insecure" not in w, name
        sealed = w["sealed"]
        assert sealed["bytes"]["windows"] > 100_000 and sealed["bytes"]["windows_found"] == 0, name
        for attack, scores in sealed["attacks"].items():
            assert scores["token_recovery"]["mean"] <= w["chance"]["hi"], (name, attack)
            assert scores["token_recovery"]["mean"] < r["attacks"][r["best_attack"]]["token_recovery"]["lo"], name
        assert sealed["metadata"]["prompt_length_exact"] == quick["doc"]["prompts"], "frame sizes show it"


def test_lm_prior_decoding_recovers_at_least_nearest_neighbour_at_every_noise_level(quick) -> None:
    noisy = [r for r in _noise_levels(quick) if r["setting"]["rho"] > 0]
    assert len(noisy) >= 2
    for r in noisy:
        b, c = r["attacks"]["B_l2"]["token_recovery"], r["attacks"]["C_lm_prior"]["token_recovery"]
        assert c["hi"] >= b["mean"] and c["mean"] >= b["lo"], r["setting"]["name"]


def test_more_noise_lowers_recovery_and_agreement(quick) -> None:
    levels = _noise_levels(quick)
    for lo_noise, hi_noise in zip(levels, levels[1:]):
        for attack in ("A_lookup", "B_l2"):
            less, more = lo_noise["attacks"][attack]["token_recovery"], hi_noise["attacks"][attack]["token_recovery"]
            assert more["mean"] <= less["hi"], (attack, hi_noise["setting"]["name"])
        less, more = lo_noise["utility"]["top1_agreement"], hi_noise["utility"]["top1_agreement"]
        assert more["mean"] <= less["hi"], hi_noise["setting"]["name"]
    first, last = levels[0], levels[-1]  # no noise against the strongest: strictly lower, intervals apart
    for attack in ("A_lookup", "B_l2"):
        assert last["attacks"][attack]["token_recovery"]["hi"] < first["attacks"][attack]["token_recovery"]["lo"]
    best = lambda r: r["attacks"][r["best_attack"]]["token_recovery"]  # noqa: E731
    assert best(last)["hi"] < best(first)["lo"]
    assert last["utility"]["top1_agreement"]["hi"] < first["utility"]["top1_agreement"]["lo"]
    assert last["utility"]["loglik_gap"]["lo"] > first["utility"]["loglik_gap"]["hi"]


def test_edge_layers_defeat_the_plain_table_lookup_but_not_layer_matching(quick) -> None:
    none, edge = quick["by_name"]["none"], quick["by_name"]["edge k=2"]
    assert edge["attacks"]["A_lookup"]["token_recovery"]["hi"] < none["attacks"]["A_lookup"]["token_recovery"]["lo"]
    assert edge["rotation_error"] < 1e-6, "Q still falls out of the first core block"
    match = edge["attacks"]["D_layer_match"]["token_recovery"]
    assert match["lo"] > edge["attacks"]["A_lookup"]["token_recovery"]["hi"]
    assert edge["reply"]["E_readback"]["mean"] >= 0.95, "replies stay readable whatever the edge holds"


def test_without_noise_utility_is_the_unprotected_models(quick) -> None:
    for name in ("none", "edge k=2"):
        u = quick["by_name"][name]["utility"]
        assert u["top1_agreement"]["mean"] >= 0.95 and u["greedy_exact"]["mean"] >= 0.9, name


def test_epsilon_is_reported_even_where_vacuous(quick) -> None:
    levels = _noise_levels(quick)
    assert levels[0]["epsilon"] == "inf"
    eps = [r["epsilon"] for r in levels[1:]]
    assert all(e > 0 for e in eps) and eps == sorted(eps, reverse=True)


def test_outputs_table_json_and_plot(quick) -> None:
    out: Path = quick["out"]
    doc = json.loads((out / "results.json").read_text())
    assert [r["setting"]["name"] for r in doc["results"]] == [s.name for s in QUICK]
    table = (out / "results.md").read_text()
    assert all(s.name in table for s in QUICK) and "C LM prior" in table and "sealed: T template" in table
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_setting_grammar() -> None:
    assert parse_setting("none") == Setting()
    assert parse_setting("k=2+rho=0.1") == Setting(0.1, 2)
    assert parse_setting("rho=1+clip") == Setting(1.0, 0, True)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_setting("sigma=2")
