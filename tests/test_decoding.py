"""Value-guided decoding: equivalence with Hugging Face generate at beta = 0, guidance maths."""

import pytest
import torch
from transformers import LogitsProcessorList

from qvlm.decoding import DecodeConfig, ValueGuidanceLogitsProcessor, generate, left_pad
from qvlm.errors import QVLMError
from qvlm.mdp import encode_prompt
from qvlm.model import QVModel
from tests.helpers import tiny_model

PROMPTS = ["hello there", "a b", "the quick brown fox", "zz"]


def hf_generate(model, tok, prompts, seed, **kw):
    ids, mask = left_pad([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=mask, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
    return out[:, ids.shape[1] :].tolist()


def strip(rows, eos, pad):
    out = []
    for r in rows:
        keep = []
        for t in r:
            keep.append(t)
            if t == eos:
                break
        while keep and keep[-1] == pad and pad != eos:
            keep.pop()
        out.append(keep)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_equals_hf_generate(arch):
    model, tok = tiny_model(arch, seed=1)
    ref = hf_generate(model, tok, PROMPTS, 0, max_new_tokens=16, do_sample=False)
    ours = generate(model, tok, PROMPTS, cfg=DecodeConfig(max_new_tokens=16, do_sample=False))
    assert ours.response_ids == strip(ref, tok.eos_token_id, tok.pad_token_id)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("warp", [dict(), dict(temperature=0.7, top_k=5), dict(top_p=0.8)])
def test_seeded_sampling_equals_hf_generate(arch, warp):
    model, tok = tiny_model(arch, seed=2)
    kw = dict(top_k=0) | warp
    ref = hf_generate(model, tok, PROMPTS, 7, max_new_tokens=16, do_sample=True, **kw)
    ours = generate(model, tok, PROMPTS, cfg=DecodeConfig(max_new_tokens=16, seed=7, **kw))
    assert ours.response_ids == strip(ref, tok.eos_token_id, tok.pad_token_id)
    assert any(len(r) > 1 for r in ours.response_ids)


def test_beta_zero_with_heads_is_base_and_kl_zero(tiny):
    model, tok = tiny
    heads = QVModel.from_trunk(model).heads
    a = generate(model, tok, PROMPTS, heads=heads, cfg=DecodeConfig(max_new_tokens=10, seed=3), track_kl=True)
    b = generate(model, tok, PROMPTS, cfg=DecodeConfig(max_new_tokens=10, seed=3))
    assert a.response_ids == b.response_ids
    assert max(a.kl) < 1e-5


@pytest.mark.parametrize(
    "kind, beta, top_k",
    [("mean", 1.5, 0), ("qsharp", 3.0, 5)],  # Q - V heads; Q#'s distributional heads (Q*_alpha at alpha 1/beta)
)
def test_processor_inside_generate_equals_own_loop(tiny, kind, beta, top_k):
    model, tok = tiny
    heads = QVModel.from_trunk(model, **({"bins": 5} if kind == "qsharp" else {})).heads
    with torch.no_grad():  # Q heads start neutral (zero last layer): give them random strong weights
        for p in heads.parameters():
            p.normal_(0.0, 1.0)
    proc = ValueGuidanceLogitsProcessor(heads, beta=beta, guidance_top_k=top_k)
    with proc.attach(model):
        ref = hf_generate(
            model,
            tok,
            PROMPTS,
            5,
            max_new_tokens=12,
            do_sample=True,
            top_k=0,
            logits_processor=LogitsProcessorList([proc]),
        )
    cfg = DecodeConfig(max_new_tokens=12, seed=5, beta=beta, guidance_top_k=top_k)
    ours = generate(model, tok, PROMPTS, heads=heads, cfg=cfg)
    base = generate(model, tok, PROMPTS, cfg=DecodeConfig(max_new_tokens=12, seed=5))
    assert ours.response_ids == strip(ref, tok.eos_token_id, tok.pad_token_id)
    assert ours.response_ids != base.response_ids  # guidance changed something


def test_guided_distribution_is_ref_times_exp_beta_advantage(tiny):
    """One step by hand: softmax(logits + beta A) == pi_ref * exp(beta A) / Z."""
    model, tok = tiny
    heads = QVModel.from_trunk(model).heads
    ids = torch.tensor([encode_prompt(tok, "ab")])
    with torch.no_grad():
        h = model.base_model(ids).last_hidden_state[:, -1]
        logits = model.get_output_embeddings()(h)
        adv = heads.advantages(h)
    beta = 2.0
    guided = torch.softmax(logits + beta * adv, -1)
    manual = torch.softmax(logits, -1) * torch.exp(beta * adv)
    torch.testing.assert_close(guided, manual / manual.sum(-1, keepdim=True))


def test_each_row_stops_at_its_own_eos():
    model, tok = tiny_model("llama", seed=0)
    with torch.no_grad():  # bias the LM head toward EOS so some rows stop early
        model.get_output_embeddings().weight[tok.eos_token_id] *= 8
    res = generate(model, tok, PROMPTS * 2, cfg=DecodeConfig(max_new_tokens=20, seed=0))
    lengths = [len(r) for r in res.response_ids]
    assert any(res.finished) and len(set(lengths)) > 1
    for ids, fin in zip(res.response_ids, res.finished):
        assert (ids[-1] == tok.eos_token_id) == fin
        assert tok.eos_token_id not in ids[:-1]


def test_decoding_errors(tiny):
    model, tok = tiny
    with pytest.raises(QVLMError, match="no heads were given"):
        generate(model, tok, ["ab"], cfg=DecodeConfig(beta=1.0))
    with pytest.raises(QVLMError, match="exceeds the model's context"):
        generate(model, tok, ["a" * 300], cfg=DecodeConfig(max_new_tokens=4))
    with pytest.raises(QVLMError, match="empty prompt"):
        generate(model, tok, ["  "])
    with pytest.raises(QVLMError, match="temperature"):
        DecodeConfig(temperature=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prefill_equals_hf_num_return_sequences(arch):
    """Prefilling a prompt once for its n responses draws what HF generate draws for n copies."""
    model, tok = tiny_model(arch, seed=2)
    ref = hf_generate(model, tok, PROMPTS, 11, max_new_tokens=12, do_sample=True, top_k=0, num_return_sequences=3)
    ours = generate(
        model, tok, PROMPTS, cfg=DecodeConfig(max_new_tokens=12, seed=11, num_return_sequences=3, batch_size=12)
    )
    assert len(ours.response_ids) == 3 * len(PROMPTS)
    assert ours.prompt_ids[3] == ours.prompt_ids[5] == encode_prompt(tok, PROMPTS[1])
    assert ours.response_ids == strip(ref, tok.eos_token_id, tok.pad_token_id)


def test_return_hidden_equals_training_features(tiny):
    """The hidden states kept while decoding are the features a full forward pass gives."""
    from qvlm.mdp import EncodedSample, collate

    model, tok = tiny
    res = generate(
        model, tok, PROMPTS, cfg=DecodeConfig(max_new_tokens=8, seed=4, num_return_sequences=2), return_hidden=True
    )
    qv = QVModel.from_trunk(model)
    for i in range(len(res.response_ids)):
        item = EncodedSample(
            res.prompt_ids[i],
            res.response_ids[i],
            [0.0] * len(res.response_ids[i]),
            res.finished[i],
            not res.finished[i],
        )
        h, h_next = qv.features(collate([item], tok.pad_token_id))
        n = len(item.response_ids)
        assert res.hidden[i].shape == (n + 1, h.shape[-1])
        torch.testing.assert_close(res.hidden[i][:n], h[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(res.hidden[i][1:], h_next[0], atol=1e-4, rtol=1e-4)


def test_top_k_guidance_computes_q_on_candidates_only(tiny):
    """guided_scores with top_k equals full-vocabulary guidance restricted to the top k tokens."""
    from qvlm.decoding import guide, guided_scores

    model, tok = tiny
    heads = QVModel.from_trunk(model, q_head="tied").heads
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 1.0)
    h = torch.randn(3, model.config.hidden_size)
    logits = torch.randn(3, model.config.vocab_size)
    full = guide(logits, heads.advantages(h), 2.0, top_k=5)
    torch.testing.assert_close(guided_scores(logits, heads, h, 2.0, top_k=5), full)
    changed = (guided_scores(logits, heads, h, 2.0, top_k=5) != logits).sum(-1)
    assert changed.tolist() == [5, 5, 5]
    V, H = model.config.vocab_size, model.config.hidden_size
    assert heads.decode_macs_per_token() - heads.decode_macs_per_token(5) == 2 * (V - 5) * (H + 1)  # twin heads


def test_primed_features_train_without_the_trunk(tiny):
    """Samples decoded with return_hidden (exact response_ids) train a frozen-trunk learner with
    no trunk pass at all."""
    from qvlm.algos.value import train_value
    from qvlm.configs import ValueConfig
    from qvlm.mdp import Sample

    model, tok = tiny
    prompts = ["ab", "ba", "abc"]
    res = generate(
        model, tok, prompts, cfg=DecodeConfig(max_new_tokens=6, seed=1, num_return_sequences=2), return_hidden=True
    )
    samples = [
        Sample(prompts[i // 2], t, float(len(t)), finished=f, terminal=not f, response_ids=ids[:-1] if f else ids)
        for i, (t, f, ids) in enumerate(zip(res.texts, res.finished, res.response_ids))
    ]
    qv = QVModel.from_trunk(model)
    ids = [p + r for p, r in zip(res.prompt_ids, res.response_ids)]
    assert qv.prime_features(tok, samples, res.hidden, ids, max_length=64) == len(samples)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        train_value(qv, tok, samples, ValueConfig(epochs=1, batch_size=2, progress=False))
    finally:
        hook.remove()
    assert calls == []


def test_centre_on_candidates_by_hand():
    """Weights softmax(0, log 3) = (1/4, 3/4); advantages (1, -1) have mean -1/2 -> (1.5, -0.5)."""
    import math

    from qvlm.decoding import centre_on_candidates, guide

    logits = torch.tensor([[0.0, math.log(3.0), -5.0]])
    idx = torch.tensor([[1, 0]])
    adv = torch.tensor([[-1.0, 1.0]])  # advantage of token 1, then of token 0
    torch.testing.assert_close(centre_on_candidates(logits, idx, adv), torch.tensor([[-0.5, 1.5]]))
    # guided with top_k = 2: the candidates move apart, the third token keeps its logit, and the
    # candidates' total probability relative to it is unchanged to first order in beta
    full_adv = torch.tensor([[1.0, -1.0, 7.0]])
    out = guide(logits, full_adv, beta=2.0, top_k=2)
    torch.testing.assert_close(out, torch.tensor([[3.0, math.log(3.0) - 1.0, -5.0]]))


def test_uncentred_ablation_adds_raw_advantages(tiny):
    """centre=False (DecodeConfig.centre_candidates) adds beta * (Q - V) to the candidates as they are."""
    from qvlm.decoding import guided_scores

    model, _ = tiny
    heads = QVModel.from_trunk(model, q_head="tied").heads
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 1.0)
    h, logits = torch.randn(2, model.config.hidden_size), torch.randn(2, model.config.vocab_size)
    idx = torch.topk(logits, 4, dim=-1).indices
    expected = logits.scatter_add(-1, idx, 3.0 * heads.advantages(h, idx))
    torch.testing.assert_close(guided_scores(logits, heads, h, 3.0, top_k=4, centre=False), expected)
