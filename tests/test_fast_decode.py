"""The fast decoding path (issue 12, item 3): FastDecodeStep equals DecodeStep to rounding, and
decoding on it writes the same tokens as the standard path and as Hugging Face generate."""

import pytest
import torch

from qvlm.cli import main
from qvlm.decoding import DecodeConfig, DecodeStep, blockwise_generate, generate, guided_scores, left_pad
from qvlm.decoding.fast import FastDecodeStep, FastHeads, Matmul, check_supported
from qvlm.errors import QVLMError
from qvlm.mdp import encode_prompt
from qvlm.model import QVModel
from tests.helpers import tiny_model

PROMPTS = ["hello there", "a b", "the quick brown fox", "zz"]
# left-padded prompts of three lengths (ids: 2 = <bos>, then characters)
SEQS = [[2, 5, 6, 7, 8, 9, 10, 11], [2, 12], [2, 13, 14, 15]]


def strong_heads(model, q_head="mlp", seed=0):
    """Heads with random weights of size 1 (fresh Q heads start neutral: zero last layer)."""
    heads = QVModel.from_trunk(model, q_head=q_head).heads
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 1.0)
    return heads


def hf_tokens(model, tok, prompts, seed, **kw):
    ids, mask = left_pad([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=mask, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
    rows = []
    for r in out[:, ids.shape[1] :].tolist():
        keep = []
        for t in r:
            keep.append(t)
            if t == tok.eos_token_id:
                break
        while keep and keep[-1] == tok.pad_token_id:
            keep.pop()
        rows.append(keep)
    return rows


@pytest.mark.parametrize("repeat", [1, 3])
def test_logits_equal_decode_step(repeat):
    model, _ = tiny_model("llama", seed=1)
    ids, mask = left_pad(SEQS, 0)
    # max_new_tokens=2: the cache grows (by a copy) during the 8 steps
    slow, fast = DecodeStep(model), FastDecodeStep(model, max_new_tokens=2)
    with torch.no_grad():
        a, b = slow.prefill(ids, mask, repeat=repeat), fast.prefill(ids, mask, repeat=repeat)
        torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.hidden, a.hidden, atol=1e-5, rtol=0)
        logits = a.logits
        for t in range(8):
            tokens = torch.distributions.Categorical(logits=logits).sample()
            a, b = slow.step(tokens), fast.step(tokens)
            logits = a.logits
            torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(b.hidden, a.hidden, atol=1e-5, rtol=0)
            if t == 3:  # blockwise decoding keeps and repeats rows mid-sequence
                rows = torch.arange(a.logits.shape[0]).flip(0).repeat_interleave(2)
                slow.select(rows)
                fast.select(rows)
                logits = logits[rows]


@pytest.mark.parametrize("rows", [1, 8])
def test_matmul_equals_linear(rows):
    """Both kernels (F.linear below MIN_PACKED_ROWS, oneDNN-packed above) compute x W^T + b."""
    torch.manual_seed(0)
    w, b, x = torch.randn(40, 24), torch.randn(40), torch.randn(rows, 3, 24)
    torch.testing.assert_close(Matmul(w, b)(x), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_greedy_equals_standard_path_and_hf_generate():
    model, tok = tiny_model("llama", seed=1)
    cfg = DecodeConfig(max_new_tokens=16, do_sample=False)
    fast = generate(model, tok, PROMPTS, cfg=DecodeConfig(max_new_tokens=16, do_sample=False, fast=True))
    assert fast.response_ids == generate(model, tok, PROMPTS, cfg=cfg).response_ids
    assert fast.response_ids == hf_tokens(model, tok, PROMPTS, 0, max_new_tokens=16, do_sample=False)


@pytest.mark.parametrize("warp", [dict(), dict(temperature=0.7, top_k=5), dict(top_p=0.8)])
def test_seeded_sampling_equals_standard_path_and_hf_generate(warp):
    model, tok = tiny_model("llama", seed=2)
    kw = dict(top_k=0) | warp
    ref = hf_tokens(model, tok, PROMPTS, 7, max_new_tokens=16, do_sample=True, **kw)
    slow = generate(model, tok, PROMPTS, cfg=DecodeConfig(max_new_tokens=16, seed=7, **kw))
    fast = generate(model, tok, PROMPTS, cfg=DecodeConfig(max_new_tokens=16, seed=7, fast=True, **kw))
    assert fast.response_ids == slow.response_ids == ref
    assert any(len(r) > 1 for r in fast.response_ids)


def test_shared_prefill_equals_standard_path():
    model, tok = tiny_model("llama", seed=3)
    cfg = dict(max_new_tokens=12, seed=4, num_return_sequences=3, batch_size=6)
    slow = generate(model, tok, PROMPTS, cfg=DecodeConfig(**cfg), track_kl=True)
    fast = generate(model, tok, PROMPTS, cfg=DecodeConfig(**cfg, fast=True), track_kl=True)
    assert fast.response_ids == slow.response_ids
    torch.testing.assert_close(
        torch.tensor(fast.base_logprobs[0]), torch.tensor(slow.base_logprobs[0]), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("q_head", ["mlp", "tied"])
def test_fast_heads_give_the_same_advantages(q_head):
    model, _ = tiny_model("llama", seed=0)
    heads = strong_heads(model, q_head)
    h = torch.randn(8, model.config.hidden_size)
    logits = torch.randn(8, model.config.vocab_size)
    fast = FastHeads(heads)
    torch.testing.assert_close(fast.advantages(h), heads.advantages(h), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.values(h), heads.values(h))
    for top_k in (0, 5):  # the same guided_scores on either
        torch.testing.assert_close(
            guided_scores(logits, fast, h, 1.5, top_k), guided_scores(logits, heads, h, 1.5, top_k), atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("guidance", [dict(), dict(guidance_top_k=5), dict(guidance_top_k=5, centre_candidates=False)])
@pytest.mark.parametrize("q_head", ["mlp", "tied"])
def test_guided_sampling_equals_standard_guided_path(guidance, q_head):
    model, tok = tiny_model("llama", seed=4)
    heads = strong_heads(model, q_head, seed=1)
    cfg = dict(max_new_tokens=14, seed=11, beta=1.5, top_k=0, **guidance)
    slow = generate(model, tok, PROMPTS, heads=heads, cfg=DecodeConfig(**cfg), track_kl=True)
    fast = generate(model, tok, PROMPTS, heads=heads, cfg=DecodeConfig(**cfg, fast=True), track_kl=True)
    assert fast.response_ids == slow.response_ids
    assert fast.kl == pytest.approx(slow.kl, abs=1e-4)
    assert max(slow.kl) > 0.01  # the guidance did something


def test_unsupported_architecture_is_a_clear_error():
    model, tok = tiny_model("gpt2", seed=0)
    with pytest.raises(QVLMError, match="Llama-style.*'gpt2'.*without --fast"):
        check_supported(model)
    with pytest.raises(QVLMError, match="Llama-style"):
        generate(model, tok, PROMPTS, cfg=DecodeConfig(max_new_tokens=4, fast=True))


def test_generate_cli_fast(tiny_dir, tmp_path):
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--model", str(tiny_dir), "--prompt", "hi", "--prompt", "ab", "--max-new-tokens", "6"]
    assert main([*args, "--seed", "0", "--out", str(out)]) == 0
    fast = tmp_path / "fast.jsonl"
    assert main([*args, "--seed", "0", "--fast", "--out", str(fast)]) == 0
    assert fast.read_text() == out.read_text()


def test_fused_weights_are_reused_and_rebuilt_when_the_weights_change():
    model, _ = tiny_model("llama", seed=1)
    ids, mask = left_pad(SEQS, 0)
    first = FastDecodeStep(model)
    assert FastDecodeStep(model).layers is first.layers  # built once per model
    with torch.no_grad():  # an optimiser step changes weights in place
        model.base_model.layers[0].mlp.up_proj.weight.mul_(2.0)
    fast = FastDecodeStep(model)
    assert fast.layers is not first.layers
    with torch.no_grad():
        torch.testing.assert_close(
            fast.prefill(ids, mask).logits, DecodeStep(model).prefill(ids, mask).logits, atol=1e-5, rtol=0
        )


def test_blockwise_on_the_fast_step_equals_the_standard_step():
    """Blockwise decoding keeps and repeats rows with select(rows) at every block end."""
    model, tok = tiny_model("llama", seed=5)
    heads = strong_heads(model, seed=2)
    cfg = dict(max_new_tokens=10, seed=3, top_k=0)
    run = dict(candidates=3, block_size=2)
    slow = blockwise_generate(model, tok, PROMPTS, heads, cfg=DecodeConfig(**cfg), **run)
    fast = blockwise_generate(model, tok, PROMPTS, heads, cfg=DecodeConfig(**cfg, fast=True), **run)
    assert fast.response_ids == slow.response_ids


def dist_heads(model, design, seed=0):
    """Q#'s distributional heads (5 atoms on [-1, 1]) with random weights of size 1."""
    heads = QVModel.from_trunk(model, bins=5, support=(-1.0, 1.0), dist_head=design).heads
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 1.0)
    return heads


@pytest.mark.parametrize("design", ["bilinear", "tilt"])
def test_q_sharp_heads_guide_the_fast_path_as_the_standard_one(design):
    """Q*_alpha guidance (alpha = 1/beta) from distributional heads: the fast path samples the standard
    path's tokens, with the KL to rounding, at two betas from the one set of heads."""
    model, tok = tiny_model("llama", seed=4)
    heads = dist_heads(model, design, seed=1)
    kls = []
    for beta in (0.5, 4.0):
        cfg = dict(max_new_tokens=12, seed=11, beta=beta, top_k=0, guidance_top_k=5)
        slow = generate(model, tok, PROMPTS, heads=heads, cfg=DecodeConfig(**cfg), track_kl=True)
        fast = generate(model, tok, PROMPTS, heads=heads, cfg=DecodeConfig(**cfg, fast=True), track_kl=True)
        assert fast.response_ids == slow.response_ids
        assert fast.kl == pytest.approx(slow.kl, abs=1e-4)
        kls.append(max(slow.kl))
    assert kls[1] > kls[0] > 0.0  # the guidance did something, more at the larger beta
