"""The folded, rotated decoder stack equals the original model's blocks (up to float error)."""

from pathlib import Path

import pytest
import torch

from cloaking.cloak import unseal_rotation
from cloaking.secretbox import KeySource
from tests.tiny_models import ARCHITECTURES
from veil.bundle import EDGE_SEALED_Q, read_edge_spec
from veil.model.decoder import DecoderStack
from veil.model.kv import Session


def _setup(tiny_bundles, key_file: Path, arch: str):
    ckpt, edge, core = tiny_bundles[arch]
    stack = DecoderStack.load(core, torch.device("cpu"))
    q = unseal_rotation((edge / EDGE_SEALED_Q).read_bytes(), KeySource(key_file=key_file),
                        read_edge_spec(edge).bundle_id).float()
    return ckpt.model, stack, q


def _session(stack: DecoderStack) -> Session:
    return stack.new_session(limit=512)


def _run(stack: DecoderStack, sess: Session, x: torch.Tensor, offset: int) -> torch.Tensor:
    out = stack.step(x, [sess.begin(offset, x.shape[0])])
    assert sess.length == offset + x.shape[0]
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_then_decode_matches_the_unsplit_model(arch: str, tiny_bundles, key_file: Path) -> None:
    model, stack, q = _setup(tiny_bundles, key_file, arch)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model.model(ids, output_hidden_states=True).hidden_states[-1][0]  # after the final norm
        x = model.model.embed_tokens(ids)[0] @ q.T  # what the edge sends: Q·x
    sess = _session(stack)
    outs = [_run(stack, sess, x[:20], 0)] + [_run(stack, sess, x[t : t + 1], t) for t in range(20, 24)]
    h = torch.cat(outs) @ q  # un-rotate: Qᵀ·h'
    got = model.model.norm(h)
    assert torch.allclose(got, ref, atol=2e-4, rtol=1e-4), (got - ref).abs().max()
    if arch == "mistral":
        assert stack.spec.sliding_windows[0] == 16  # the 24-token run crosses the window


def test_batched_sessions_equal_separate_runs(tiny_bundles, key_file: Path) -> None:
    model, stack, q = _setup(tiny_bundles, key_file, "qwen2")
    gen = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(9, 64, generator=gen), torch.randn(5, 64, generator=gen)
    sa, sb = _session(stack), _session(stack)
    alone_a = torch.cat([_run(stack, sa, xa[:8], 0), _run(stack, sa, xa[8:], 8)])
    alone_b = _run(stack, sb, xb, 0)
    ta, tb = _session(stack), _session(stack)
    _run(stack, ta, xa[:8], 0)
    # one forward holding a decode step of one session and a prefill of another
    both = stack.step(torch.cat([xa[8:], xb]), [ta.begin(8, 1), tb.begin(0, 5)])
    assert torch.allclose(both[:1], alone_a[8:], atol=1e-4, rtol=1e-4)
    assert torch.allclose(both[1:], alone_b, atol=1e-4, rtol=1e-4)


def test_rolling_back_an_offset_recomputes_from_there(tiny_bundles, key_file: Path) -> None:
    model, stack, q = _setup(tiny_bundles, key_file, "llama")
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    sess = _session(stack)
    first = _run(stack, sess, x, 0)
    _run(stack, sess, torch.randn(2, 64), 6)  # speculative tokens, then rejected
    again = _run(stack, sess, x[4:], 4)
    assert torch.allclose(again, first[4:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pooled", [True, False], ids=["pool", "own-cache"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_lone_decode_row_takes_the_short_path_with_the_same_result_bit_for_bit(arch: str, pooled: bool,
                                                                                  tiny_bundles, key_file: Path) -> None:
    """One decode row alone runs `_attend_one_row` (five torch calls a layer, not twenty); it must compute
    exactly what the general path does, for a session of the pool and one with its own cache, and give way to
    the masked path once a sliding window is shorter than the cache (Mistral's window is 16)."""
    _, stack, _ = _setup(tiny_bundles, key_file, arch)
    general = DecoderStack.load(tiny_bundles[arch][2], torch.device("cpu"))
    general._one_row = lambda seg: False  # type: ignore[method-assign]
    calls = []
    short = stack._attend_one_row

    def counted(*args):
        calls.append(args[2].end)
        return short(*args)

    stack._attend_one_row = counted  # type: ignore[method-assign]
    new = (lambda st: st.new_pool(1, 64).session()) if pooled else (lambda st: st.new_session(64))
    a, b = new(stack), new(general)
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(stack.step(x[:12], [a.begin(0, 12)]), general.step(x[:12], [b.begin(0, 12)]))
    for t in range(12, 24):
        assert torch.equal(stack.step(x[t : t + 1], [a.begin(t, 1)]), general.step(x[t : t + 1], [b.begin(t, 1)]))
    window = stack.spec.sliding_windows[0]
    layers = stack.spec.num_layers  # one call per layer and step
    assert calls == [end for end in range(13, 25) if window is None or end <= window for _ in range(layers)]
    assert calls
