"""A peft LoRA policy on the fast decoding path (issue 23, item 4): the same logits, tokens and
recorded log-probs as the standard path, the adapters' updates seen at the next step built, the
reference (adapters disabled) decoded from the same model, and clear refusals for what it cannot do.

The adapters get random weights (std ``LORA_STD``) (peft starts B at zero, which would make LoRA a no-op
and every test here pass without it): the tests also check that the adapters change the tokens.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from qvlm.decoding import DecodeConfig, DecodeStep, generate, left_pad, sample_rollout
from qvlm.decoding.fast import FastDecodeStep
from qvlm.errors import QVLMError
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["hello there", "a b", "the quick brown fox", "zz"]
SEQS = [[2, 5, 6, 7, 8, 9, 10, 11], [2, 12], [2, 13, 14, 15]]
LORA_STD = 0.2


def lora_policy(seed: int = 1, dtype: torch.dtype = torch.float32, **config):
    """(peft model, the Hugging Face model holding the adapters, tokenizer): ActorCritic's layout
    (``target_modules="all-linear"``, no dropout), adapters given random nonzero weights."""
    model, tok = tiny_model("llama", seed=seed)
    model.to(dtype)
    kw = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM") | config
    peft_model = get_peft_model(model, LoraConfig(**kw))
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, LORA_STD)
    return peft_model, peft_model.base_model.model, tok


def assert_steps_agree(model, atol=1e-5, repeat=1, steps=6):
    """FastDecodeStep's logits equal DecodeStep's through a prefill, ``steps`` steps and a select."""
    ids, mask = left_pad(SEQS, 0)
    slow, fast = DecodeStep(model), FastDecodeStep(model, max_new_tokens=2)
    with torch.no_grad():
        a, b = slow.prefill(ids, mask, repeat=repeat), fast.prefill(ids, mask, repeat=repeat)
        torch.testing.assert_close(b.logits, a.logits, atol=atol, rtol=0)
        logits = a.logits
        for t in range(steps):
            tokens = torch.distributions.Categorical(logits=logits).sample()
            a, b = slow.step(tokens), fast.step(tokens)
            torch.testing.assert_close(b.logits, a.logits, atol=atol, rtol=0)
            torch.testing.assert_close(b.hidden.float(), a.hidden.float(), atol=atol, rtol=0)
            logits = a.logits
            if t == 2:
                rows = torch.arange(logits.shape[0]).flip(0).repeat_interleave(2)
                slow.select(rows)
                fast.select(rows)
                logits = logits[rows]
    return a.logits


@pytest.mark.parametrize("repeat", [1, 3])
def test_lora_logits_equal_decode_step(repeat):
    _, policy, _ = lora_policy()
    assert_steps_agree(policy, repeat=repeat)


def test_seeded_sampling_of_a_lora_policy_equals_the_standard_path():
    peft_model, policy, tok = lora_policy(seed=2)
    cfg = dict(max_new_tokens=16, seed=7, top_k=0)
    slow = generate(policy, tok, PROMPTS, cfg=DecodeConfig(**cfg))
    fast = generate(policy, tok, PROMPTS, cfg=DecodeConfig(**cfg, fast=True))
    assert fast.response_ids == slow.response_ids
    assert sum(len(r) for r in fast.response_ids) > len(PROMPTS)
    with peft_model.disable_adapter():  # the adapters matter: the base model writes other tokens
        assert generate(policy, tok, PROMPTS, cfg=DecodeConfig(**cfg)).response_ids != fast.response_ids


def test_rollout_tokens_and_logprobs_agree_with_the_standard_path():
    """PPO's rollout: responses per prompt sharing a prefill, each row on its own seeded stream."""
    _, policy, tok = lora_policy(seed=3)
    cfg = dict(max_new_tokens=12, num_return_sequences=3, batch_size=6, top_k=0)
    seeds = list(range(100, 100 + 3 * len(PROMPTS)))
    record = dict(logprobs=True, ref_logprobs=True, row_seeds=seeds)
    slow = sample_rollout(policy, tok, PROMPTS, cfg=DecodeConfig(**cfg), **record)
    fast = sample_rollout(policy, tok, PROMPTS, cfg=DecodeConfig(**cfg, fast=True), **record)
    assert torch.equal(fast.response_ids, slow.response_ids)
    assert torch.equal(fast.response_mask, slow.response_mask)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.ref_logprobs, slow.ref_logprobs, atol=1e-5, rtol=0)
    assert fast.response_mask.sum() > 3 * len(PROMPTS)


def test_reference_mode_decodes_the_base_model():
    peft_model, policy, tok = lora_policy(seed=4)
    base, _ = tiny_model("llama", seed=4)
    cfg = dict(max_new_tokens=12, seed=5, top_k=0)
    with peft_model.disable_adapter():
        fast = generate(policy, tok, PROMPTS, cfg=DecodeConfig(**cfg, fast=True))
        assert_steps_agree(policy)
    assert fast.response_ids == generate(base, tok, PROMPTS, cfg=DecodeConfig(**cfg)).response_ids
    assert fast.response_ids != generate(policy, tok, PROMPTS, cfg=DecodeConfig(**cfg, fast=True)).response_ids


def test_an_optimiser_step_is_seen_without_rebuilding_the_base_weights():
    _, policy, _ = lora_policy(seed=5)
    ids, mask = left_pad(SEQS, 0)
    first = FastDecodeStep(policy)
    with torch.no_grad():
        before = first.prefill(ids, mask).logits
    adapters = [p for n, p in policy.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(adapters, lr=0.05)
    logits = policy(input_ids=ids, attention_mask=mask).logits
    logits[:, -1, 3].sum().backward()
    opt.step()
    second = FastDecodeStep(policy)
    assert second.layers is first.layers  # the packed base weights are reused
    with torch.no_grad():
        after = second.prefill(ids, mask).logits
        torch.testing.assert_close(after, DecodeStep(policy).prefill(ids, mask).logits, atol=1e-5, rtol=0)
    assert (after - before).abs().max() > 1e-2  # the step moved the policy, and the fast path saw it


def test_merged_adapters_decode_from_the_merged_weights():
    peft_model, policy, _ = lora_policy(seed=6)
    assert_steps_agree(policy)  # builds (and caches) the fused base weights unmerged
    peft_model.merge_adapter()  # writes the base weights through .data: no version counter moves
    assert_steps_agree(policy)  # rebuilt from the merged base weights, no low-rank term on top
    assert all(not d for d in FastDecodeStep(policy).lora)
    with peft_model.disable_adapter(), pytest.raises(QVLMError, match="merged into the weights and disabled"):
        FastDecodeStep(policy)


def test_two_active_adapters_add_up():
    peft_model, policy, _ = lora_policy(seed=7)
    peft_model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".second." in name:
                p.normal_(0.0, LORA_STD)
    peft_model.base_model.set_adapter(["default", "second"])
    assert_steps_agree(policy)


def test_bfloat16_policy_with_float32_adapters():
    """peft keeps the adapters in float32 on a bfloat16 model; the fast step follows its arithmetic."""
    _, policy, tok = lora_policy(seed=8, dtype=torch.bfloat16)
    dtypes = {p.dtype for n, p in policy.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32}
    # bfloat16 rounding (2^-8 relative) in the packed and the plain kernels alike, over 2 layers
    assert_steps_agree(policy, atol=0.05)
    cfg = dict(max_new_tokens=8, do_sample=False)
    slow = generate(policy, tok, PROMPTS, cfg=DecodeConfig(**cfg))
    assert generate(policy, tok, PROMPTS, cfg=DecodeConfig(**cfg, fast=True)).response_ids == slow.response_ids


def test_dora_is_refused():
    _, policy, tok = lora_policy(use_dora=True)
    with pytest.raises(QVLMError, match="LoRA variant"):
        generate(policy, tok, PROMPTS, cfg=DecodeConfig(max_new_tokens=2, fast=True))


def test_active_dropout_is_refused_and_eval_mode_decodes():
    _, policy, tok = lora_policy(lora_dropout=0.1)
    policy.train()
    with pytest.raises(QVLMError, match="dropout 0.1 in training mode.*model.eval"):
        FastDecodeStep(policy)
    policy.eval()
    assert_steps_agree(policy)


def test_lora_on_the_lm_head_is_refused():
    _, policy, _ = lora_policy(target_modules=["q_proj", "lm_head"])
    with pytest.raises(QVLMError, match="plain embedding and LM head"):
        FastDecodeStep(policy)
