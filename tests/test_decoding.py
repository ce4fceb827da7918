"""Value-guided decoding: equivalence with Hugging Face generate at beta = 0, guidance maths."""

import pytest
import torch
from transformers import LogitsProcessorList

from qvlm.decoding import DecodeConfig, ValueGuidanceLogitsProcessor, generate, left_pad
from qvlm.errors import QVLMError
from qvlm.mdp import encode_prompt
from qvlm.model import QVModel
from qvlm.models import tiny_model

PROMPTS = ["hello there", "a b", "the quick brown fox", "zz"]


def hf_generate(model, tok, prompts, seed, **kw):
    ids, mask = left_pad([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=mask, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
    return out[:, ids.shape[1]:].tolist()


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


def test_processor_inside_generate_equals_own_loop(tiny):
    model, tok = tiny
    heads = QVModel.from_trunk(model).heads
    with torch.no_grad():  # Q heads start neutral (zero last layer): give them random strong weights
        for p in heads.parameters():
            p.normal_(0.0, 1.0)
    proc = ValueGuidanceLogitsProcessor(heads, beta=1.5)
    with proc.attach(model):
        ref = hf_generate(model, tok, PROMPTS, 5, max_new_tokens=12, do_sample=True, top_k=0,
                          logits_processor=LogitsProcessorList([proc]))
    ours = generate(model, tok, PROMPTS, heads=heads, cfg=DecodeConfig(max_new_tokens=12, seed=5, beta=1.5))
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
