"""The wire observers on the bundled model: sealed frames show no row and no token; the unsealed wire
(`--insecure-transport`, for comparison only) is read by the chat template's known plaintext.

Small on purpose: 8 prompts, 12-token replies, one k = 0 deployment (the session's bundles).
Every assertion sets a sealed or defended number against an unsealed or undefended one from
the same traces, so a broken seal, a broken search or a weaker attack fails it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch

from cloaking.cloak import unseal_rotation
from cloaking.secretbox import KeySource
from edge_proxy.edge_model import EdgeModel
from edge_proxy.outgoing import NoiseSpec
from privacy_audit import metrics, report, wire_capture
from privacy_audit.attacks import norm_match, template, wire
from privacy_audit.cli import add_parser, config_from_args
from privacy_audit.knowledge import PublicModel, WireKnowledge
from privacy_audit.prompts import load_prompts
from privacy_audit.trace import Trace, encode, reference_replies, trace_setting
from veil.bundle import EDGE_SEALED_Q, read_edge_spec
from veil.model.decoder import DecoderStack

pytestmark = pytest.mark.slow

PROMPTS, MAX_NEW = 8, 12


@pytest.fixture(scope="module")
def setup(smol, smol_bundles: tuple[Path, Path], key_file: Path) -> dict[str, Any]:
    edge_dir, core_dir = smol_bundles
    source = KeySource(key_file=key_file)
    spec = read_edge_spec(edge_dir)
    model = EdgeModel.load(edge_dir, source)
    core = DecoderStack.load(core_dir, torch.device("cpu"))
    public = PublicModel(smol)
    encoded = [encode(smol.tokenizer, p) for p in load_prompts(PROMPTS)]
    refs = reference_replies(public.stack(), public.embed, public.logits, encoded, model.eos_ids, MAX_NEW)
    cache: dict[float, list[Trace]] = {}

    def traces(rho: float) -> list[Trace]:
        if rho not in cache:
            cache[rho] = trace_setting(model, core, encoded, NoiseSpec(rho), refs, seed=0, max_new=MAX_NEW)
        return cache[rho]

    q_true = unseal_rotation((edge_dir / EDGE_SEALED_Q).read_bytes(), source, spec.bundle_id)
    return {"public": public, "traces": traces, "bundle": spec.bundle_id, "q": q_true, "encoded": encoded}


def _recovery(prompts: list[list[int]], setup: dict[str, Any]) -> metrics.Estimate:
    return metrics.bootstrap(metrics.token_recovery(prompts, setup["encoded"]))


def test_sealed_frames_carry_no_row_bytes_and_are_real_channel_frames(setup) -> None:
    traces = setup["traces"](0.0)
    obs = [t.observed for t in traces]
    ends = wire_capture.Endpoints(setup["bundle"])
    sealed = wire_capture.record(obs, ends, sealed=True)  # each frame is opened by the other end as it is made
    plain = wire_capture.record(obs, ends, sealed=False)
    rows = torch.cat([torch.cat([o.received, o.returned]) for o in obs])
    hidden, clear = wire_capture.search(sealed, rows), wire_capture.search(plain, rows)
    assert clear["windows"] > 10_000 and clear["windows_found"] == clear["windows"], "the search finds clear rows"
    assert clear["whole_rows_found"] == clear["whole_rows_checked"] > 0
    assert hidden["windows_found"] == 0 and hidden["whole_rows_found"] == 0
    assert wire_capture.entropy_bits_per_byte(sealed) > 7.99 > wire_capture.entropy_bits_per_byte(plain)
    # what sealing leaves visible: the first frame's size gives the prompt length, the frame count the reply's
    meta = wire_capture.metadata(sealed, [o.prompt_len for o in obs], [len(t.reply_ids) for t in traces], 576)
    assert meta["prompt_length_exact"] == meta["reply_length_exact"] == len(obs)
    assert 0 < meta["first_frame_header_bytes"][1] < meta["row_bytes"]
    assert len(meta["decode_frame_bytes"]) == 1 and len(meta["hello_bytes"]) == 1
    # the sealed observer parses the right number of rows, but not their values
    views = wire_capture.observe(sealed, 576, sealed=True)
    assert [v.received.shape[0] for v in views] == [o.received.shape[0] for o in obs]
    assert not any(torch.equal(v.received, o.received) for v, o in zip(views, obs))


def test_attacks_on_the_sealed_stream_are_at_chance_where_unsealed_they_read_everything(setup) -> None:
    traces = setup["traces"](0.0)
    rows = wire.observe_setting(setup["public"], traces, NoiseSpec(0.0), 0, setup["bundle"], insecure=True,
                                q_true=setup["q"])
    ceiling = rows["chance"]
    for attack in ("F_norm", "T_template"):
        sealed = rows["sealed"]["attacks"][attack]["token_recovery"]
        unsealed = rows["insecure"]["attacks"][attack]["token_recovery"]
        assert sealed["mean"] <= ceiling["hi"] and sealed["mean"] < 0.02, attack
        assert unsealed["lo"] >= 0.95 and unsealed["lo"] > sealed["hi"], attack
        assert rows["sealed"]["reply"][attack]["mean"] < 0.02 <= 0.95 <= rows["insecure"]["reply"][attack]["mean"]
    # without noise the template's known plaintext, the bootstrap and the returned states give Q on a wide span
    # (all of d = 576 once about 600 distinct tokens and states were seen: the quick audit's 12 requests)
    assert rows["insecure"]["rank"] > 200 and rows["insecure"]["rotation_error"] < 1e-3
    assert rows["insecure"]["attacks"]["T_template"]["canary"]["mean"] == 1.0


def test_template_attack_reads_a_request_from_one_request_seen(setup) -> None:
    traces = setup["traces"](0.0)
    op = WireKnowledge(setup["public"], NoiseSpec(0.0), 0)
    result = template.attack(op, [t.observed for t in traces], learn=1)
    assert result.learned_from == 1 and 21 <= result.ranks[0] < result.rank
    assert _recovery(result.prompts, setup).mean >= 0.99


def test_template_attack_beats_norm_matching_and_chance_under_noise(setup) -> None:
    rho = 0.5
    traces = setup["traces"](rho)
    op = WireKnowledge(setup["public"], NoiseSpec(rho), 0)
    obs = [t.observed for t in traces]
    t_all = _recovery(template.attack(op, obs).prompts, setup)
    f = _recovery(norm_match.prompts(op, obs), setup)
    chance = wire.chance(setup["encoded"])
    assert f.mean < 0.05, "noise defeats norm matching alone"
    assert t_all.lo > max(f.hi, chance["hi"]) and t_all.mean >= 0.5
    # anchors averaged over more requests under the same Q recover more than one request's
    t_one = _recovery(template.attack(op, obs, learn=1).prompts, setup)
    assert t_all.lo > t_one.hi


def test_template_tokens_are_the_shared_prefix_and_suffix(smol) -> None:
    prefix, suffix = template.template_tokens(smol.tokenizer)
    text = smol.tokenizer.decode(prefix)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>user\n") and len(prefix) == 24
    assert smol.tokenizer.decode(suffix) == "<|im_end|>\n<|im_start|>assistant\n"
    for e in [encode(smol.tokenizer, p) for p in load_prompts(PROMPTS)]:
        assert e.ids[:len(prefix)] == prefix and e.ids[-len(suffix):] == suffix
        assert not any(e.private[:len(prefix)]) and not any(e.private[-len(suffix):])


def test_cli_flag_is_for_comparison_only_and_reaches_the_config(capsys) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["audit-privacy", "--help"])
    assert "for comparison only" in " ".join(capsys.readouterr().out.split())
    base = ["audit-privacy", "--quick", "--out", "x"]
    assert not config_from_args(parser.parse_args(base)).insecure_transport
    assert config_from_args(parser.parse_args(base + ["--insecure-transport"])).insecure_transport


def test_report_names_sealed_and_unsealed_rows(setup) -> None:
    traces = setup["traces"](0.0)
    rows = wire.observe_setting(setup["public"], traces, NoiseSpec(0.0), 0, setup["bundle"], insecure=True,
                                curve=[2])
    doc = {"results": [{"setting": {"name": "none"}, "wire": rows}], "hidden_size": 576}
    text = "\n".join(report.wire_markdown(doc))
    assert "sealed: T template" in text and "unsealed: T template" in text and "N = 2" in text
    assert [p["requests"] for p in rows["insecure"]["curve"]] == [2, PROMPTS]
    del rows["insecure"]
    text = "\n".join(report.wire_markdown(doc))
    assert "sealed: T template" in text and "unsealed: T template" not in text
