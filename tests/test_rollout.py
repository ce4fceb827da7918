"""Rollouts as tensors: equivalence with Hugging Face generate, log-probs against a full forward
pass, masks and done (DESIGN.md), samples, and the decoding step's two modes."""

import pytest
import torch
from transformers import LogitsProcessorList

from qvlm.decoding import (
    DecodeConfig,
    DecodeStep,
    GenerationResult,
    ValueGuidanceLogitsProcessor,
    candidate_mass,
    generate,
    guided_scores,
    left_pad,
    sample_rollout,
    select_best_of_n,
    warpers,
)
from qvlm.errors import QVLMError
from qvlm.mdp import Sample, encode_prompt
from qvlm.model import QVModel
from qvlm.rollout import Rollout, done_mask, rollout_to_samples
from tests.helpers import tiny_model
from tests.test_decoding import PROMPTS, hf_generate, strip


def random_heads(model, seed=0, **kw):
    torch.manual_seed(seed)
    heads = QVModel.from_trunk(model, **kw).heads
    with torch.no_grad():  # Q heads start neutral (zero last layer): give them random strong weights
        for p in heads.parameters():
            p.normal_(0.0, 1.0)
    return heads


def eos_biased(arch="llama", seed=0):
    model, tok = tiny_model(arch, seed=seed)
    with torch.no_grad():  # some rows stop early, at different steps
        model.get_output_embeddings().weight[tok.eos_token_id] *= 8
    return model, tok


def full_forward(model, rollout, b):
    """One response's prompt + response through the model, no cache, no padding: hidden states
    and float32 logits at the positions that predict each response token, (T_b, H) and (T_b, V)."""
    prompt, response = rollout.prompt_lists()[b], rollout.response_lists()[b]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        h = model.base_model(ids).last_hidden_state[0]
        h = h[len(prompt) - 1 : len(prompt) - 1 + len(response)]
        return h, model.get_output_embeddings()(h).float()


def taken(logp, tokens):
    return logp.gather(-1, tokens[:, None]).squeeze(-1)


# ---- equivalence with Hugging Face generate at beta = 0 ----------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(do_sample=False),
        dict(do_sample=True, top_k=0),
        dict(do_sample=True, temperature=0.7, top_k=5),
        dict(do_sample=True, top_k=0, top_p=0.8),
    ],
)
@pytest.mark.parametrize("n", [1, 3])
def test_rollout_equals_hf_generate(arch, kw, n):
    model, tok = tiny_model(arch, seed=2)
    if kw["do_sample"]:
        ref = hf_generate(model, tok, PROMPTS, 11, max_new_tokens=12, num_return_sequences=n, **kw)
    else:  # HF refuses greedy with num_return_sequences > 1: its n copies are all the one greedy response
        ref = [row for row in hf_generate(model, tok, PROMPTS, 11, max_new_tokens=12, **kw) for _ in range(n)]
    cfg = DecodeConfig(
        max_new_tokens=12, seed=11, num_return_sequences=n, batch_size=12, **kw
    )  # one batch: one RNG stream
    rollout = sample_rollout(model, tok, PROMPTS, cfg=cfg)
    assert rollout.response_lists() == strip(ref, tok.eos_token_id, tok.pad_token_id)
    assert rollout.prompt_lists() == [encode_prompt(tok, p) for p in PROMPTS for _ in range(n)]


# ---- log-probs, values, masks and done -----------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logprobs_equal_a_full_forward_pass(arch):
    """At default settings (no warpers, beta 0) the sampling distribution is the base model: both
    log-probs are log_softmax of the logits at the positions that predict each response token."""
    model, tok = eos_biased(arch)
    rollout = sample_rollout(model, tok, PROMPTS, cfg=DecodeConfig(max_new_tokens=10, seed=3, batch_size=3))
    assert len(set(rollout.lengths.tolist())) > 1  # rows of different lengths, several batches padded together
    for b in range(len(rollout)):
        _, logits = full_forward(model, rollout, b)
        T = logits.shape[0]
        expected = taken(torch.log_softmax(logits, -1), rollout.response_ids[b, :T])
        torch.testing.assert_close(rollout.logprobs[b, :T], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(rollout.ref_logprobs[b, :T], expected, atol=1e-5, rtol=0)
        assert (rollout.logprobs[b, T:] == 0).all() and (rollout.ref_logprobs[b, T:] == 0).all()


def test_logprobs_are_under_the_warped_distribution():
    """With warpers, logprobs are under the distribution multinomial drew from (temperature, top-k),
    ref_logprobs under the raw base model."""
    model, tok = tiny_model("llama", seed=1)
    cfg = DecodeConfig(max_new_tokens=8, seed=4, temperature=0.7, top_k=5, num_return_sequences=2)
    rollout = sample_rollout(model, tok, PROMPTS, cfg=cfg)
    warp = warpers(cfg)
    for b in range(len(rollout)):
        _, logits = full_forward(model, rollout, b)
        T, y = logits.shape[0], rollout.response_ids[b, : logits.shape[0]]
        warped = torch.log_softmax(warp(None, logits.clone()), -1)
        torch.testing.assert_close(rollout.logprobs[b, :T], taken(warped, y), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            rollout.ref_logprobs[b, :T], taken(torch.log_softmax(logits, -1), y), atol=1e-5, rtol=0
        )
        assert (rollout.logprobs[b, :T] > rollout.ref_logprobs[b, :T]).all()  # top-5 of a 36-token vocabulary


@pytest.mark.parametrize("top_k", [0, 5])
@pytest.mark.parametrize("do_sample", [True, False])
def test_guided_logprobs_match_log_softmax_of_guided_scores(top_k, do_sample):
    model, tok = eos_biased("llama")
    heads = random_heads(model)
    cfg = DecodeConfig(max_new_tokens=8, seed=5, beta=1.5, guidance_top_k=top_k, do_sample=do_sample)
    rollout = sample_rollout(model, tok, PROMPTS, heads, cfg, values=True)
    for b in range(len(rollout)):
        h, logits = full_forward(model, rollout, b)
        T, y = logits.shape[0], rollout.response_ids[b, : logits.shape[0]]
        scores = guided_scores(logits, heads, h, 1.5, top_k)
        torch.testing.assert_close(rollout.logprobs[b, :T], taken(torch.log_softmax(scores, -1), y), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            rollout.ref_logprobs[b, :T], taken(torch.log_softmax(logits, -1), y), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            rollout.values[b, :T], heads.values(h), atol=1e-5, rtol=1e-5
        )  # |V| ~ 10 with N(0, 1) weights
        if not do_sample:  # greedy writes the argmax of the guided scores
            assert y.tolist() == scores.argmax(-1).tolist()


def test_done_mask_by_hand():
    """DESIGN.md: done_t = 1 where s_{t+1} is terminal: at the EOS step; with a fixed horizon also
    at the last step of a response the length limit cut."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    finished = torch.tensor([True, False, True])
    assert done_mask(mask, finished).tolist() == [[0, 1, 0], [0, 0, 0], [1, 0, 0]]
    assert done_mask(mask, finished, fixed_horizon=True).tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0]]


def test_masks_finished_and_done_of_a_rollout():
    model, tok = eos_biased("gpt2")
    rollout = sample_rollout(model, tok, PROMPTS * 2, cfg=DecodeConfig(max_new_tokens=12, seed=0))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert rollout.finished.any() and not rollout.finished.all()
    T = rollout.response_ids.shape[1]
    for b, (ids, n) in enumerate(zip(rollout.response_ids.tolist(), rollout.lengths.tolist())):
        assert rollout.response_mask[b].tolist() == [1.0] * n + [0.0] * (T - n)
        assert ids[n:] == [pad] * (T - n)
        assert (ids[n - 1] == eos) == bool(rollout.finished[b]) and eos not in ids[: n - 1]
        if not rollout.finished[b]:
            assert n == 12  # only the length limit ends a row without EOS
        done = rollout.done()[b].tolist()
        assert done == [0.0] * (n - 1) + [float(rollout.finished[b])] + [0.0] * (T - n)
        assert rollout.done(fixed_horizon=True)[b].tolist() == [0.0] * (n - 1) + [1.0] + [0.0] * (T - n)
    plen = rollout.prompt_mask.sum(-1).tolist()
    assert plen == [len(encode_prompt(tok, p)) for p in PROMPTS * 2]
    P = rollout.prompt_ids.shape[1]
    assert all(row[: P - m] == [pad] * (P - m) for row, m in zip(rollout.prompt_ids.tolist(), plen))


def test_hidden_is_zero_past_each_rows_end_and_matches_generate():
    model, tok = eos_biased("llama")
    cfg = DecodeConfig(max_new_tokens=8, seed=4, num_return_sequences=2)
    rollout = sample_rollout(model, tok, PROMPTS, cfg=cfg, return_hidden=True)
    res = generate(model, tok, PROMPTS, cfg=cfg, return_hidden=True)
    assert rollout.hidden.shape[:2] == (len(rollout), rollout.response_ids.shape[1] + 1)
    for b, n in enumerate(rollout.lengths.tolist()):
        assert torch.equal(rollout.hidden[b, : n + 1], res.hidden[b])
        assert (rollout.hidden[b, n + 1 :] == 0).all()


def test_step_without_cache_gives_the_cached_logits():
    """The no-cache mode (whole sequence each step) and the KV-cached step agree, through a shared
    prefill (repeat) and a row selection."""
    for arch in ("llama", "gpt2"):
        model, tok = tiny_model(arch, seed=3)
        ids, mask = left_pad([encode_prompt(tok, p) for p in PROMPTS[:3]], tok.pad_token_id)
        cached, full = DecodeStep(model), DecodeStep(model, use_cache=False)
        a, b = cached.prefill(ids, mask, repeat=2), full.prefill(ids, mask, repeat=2)
        torch.manual_seed(0)
        for t in range(5):
            torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=0)
            if t == 2:
                rows = torch.tensor([5, 5, 0, 1, 3, 2])
                cached.select(rows), full.select(rows)
                a, b = cached.logits(a.hidden[rows]), full.logits(b.hidden[rows])
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            tokens = torch.randint(4, len(tok), (6,))
            a, b = cached.step(tokens), full.step(tokens)
        assert a.cache is cached.cache and b.cache is None
        assert cached.step(tokens, logits=False).logits is None


# ---- top-k mass, samples, concatenation ----------------------------------------------------------


def test_candidate_mass_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]])
    torch.testing.assert_close(candidate_mass(logits, probs, 2), torch.tensor([0.3, 0.7]))


def test_topk_mass_of_base_sampling_and_of_greedy():
    """At beta 0 the mass is the base model's own on its top k (checked against a full forward
    pass); greedy is a point mass on the argmax, always among the top k: mass 1."""
    model, tok = eos_biased("llama")
    cfg = DecodeConfig(max_new_tokens=8, seed=2, guidance_top_k=3)
    res = generate(model, tok, PROMPTS, cfg=cfg, track_kl=True)
    rollout = sample_rollout(model, tok, PROMPTS, cfg=cfg, track_kl=True)
    assert res.topk_mass == rollout.topk_mass.tolist()
    for b in range(len(rollout)):
        _, logits = full_forward(model, rollout, b)
        expected = candidate_mass(logits, torch.softmax(logits, -1), 3).mean()
        assert res.topk_mass[b] == pytest.approx(float(expected), abs=1e-5)
    greedy = generate(
        model, tok, PROMPTS, cfg=DecodeConfig(max_new_tokens=8, do_sample=False, guidance_top_k=3), track_kl=True
    )
    assert greedy.topk_mass == pytest.approx([1.0] * len(PROMPTS))
    assert generate(model, tok, PROMPTS, cfg=cfg).topk_mass == []  # only with track_kl
    assert generate(model, tok, PROMPTS, cfg=DecodeConfig(max_new_tokens=4), track_kl=True).topk_mass == []


def test_centred_guidance_never_takes_mass_from_the_candidates():
    """By Jensen (zero base-weighted mean advantage), centred top-k guidance can only raise the
    candidates' total mass; uncentred guidance with Q below V lowers it."""
    model, tok = tiny_model("llama", seed=0)
    heads = random_heads(model, q_head="tied")
    h, logits = torch.randn(64, model.config.hidden_size), 3 * torch.randn(64, model.config.vocab_size)
    base = candidate_mass(logits, torch.softmax(logits, -1), 5)
    for beta in (0.5, 4.0, 16.0):
        centred = candidate_mass(logits, torch.softmax(guided_scores(logits, heads, h, beta, 5), -1), 5)
        assert (centred >= base - 1e-6).all()
    with torch.no_grad():
        heads.v_head.net[-1].bias += 100.0  # V far above Q: uncentred advantages all negative
    raw = candidate_mass(logits, torch.softmax(guided_scores(logits, heads, h, 1.0, 5, centre=False), -1), 5)
    assert (raw < base).all()


def test_processor_centre_switch_equals_own_loop():
    model, tok = tiny_model("llama", seed=0)
    heads = random_heads(model)
    for centre in (True, False):
        proc = ValueGuidanceLogitsProcessor(heads, beta=1.5, guidance_top_k=4, centre_candidates=centre)
        with proc.attach(model):
            ref = hf_generate(
                model,
                tok,
                PROMPTS,
                5,
                max_new_tokens=10,
                do_sample=True,
                top_k=0,
                logits_processor=LogitsProcessorList([proc]),
            )
        cfg = DecodeConfig(max_new_tokens=10, seed=5, beta=1.5, guidance_top_k=4, centre_candidates=centre)
        assert generate(model, tok, PROMPTS, heads, cfg).response_ids == strip(ref, tok.eos_token_id, tok.pad_token_id)


@pytest.mark.parametrize("fixed_horizon", [False, True])
def test_rollout_to_samples_equals_the_inline_code(fixed_horizon):
    """What qvlm sample and the demo built inline, from a GenerationResult or a Rollout."""
    model, tok = eos_biased("llama")
    prompts, n = ["ab", "ba", "abc"], 2
    cfg = DecodeConfig(max_new_tokens=6, seed=1, num_return_sequences=n)
    res = generate(model, tok, prompts, cfg=cfg)
    assert any(res.finished) and not all(res.finished)
    repeated = [p for p in prompts for _ in range(n)]
    rewards = [float(i) for i in range(len(repeated))]
    inline = [
        Sample(p, text, r, finished=f, terminal=fixed_horizon and not f, response_ids=ids[:-1] if f else ids)
        for p, text, r, f, ids in zip(repeated, res.texts, rewards, res.finished, res.response_ids)
    ]
    assert rollout_to_samples(res, tok, prompts, rewards, fixed_horizon) == inline
    rollout = sample_rollout(model, tok, prompts, cfg=cfg)
    assert rollout_to_samples(rollout, tok, prompts, rewards, fixed_horizon) == inline
    assert rollout_to_samples(rollout, tok, repeated, rewards, fixed_horizon) == inline  # one prompt per response
    with pytest.raises(QVLMError, match="4 prompts"):
        rollout_to_samples(rollout, tok, prompts + ["x"], rewards)
    with pytest.raises(QVLMError, match="5 rewards"):
        rollout_to_samples(rollout, tok, prompts, rewards[:5])


def test_generation_result_from_rollout_keeps_every_field():
    model, tok = eos_biased("llama")
    cfg = DecodeConfig(max_new_tokens=6, seed=3, batch_size=2)
    rollout = sample_rollout(model, tok, PROMPTS, cfg=cfg, track_kl=True)
    res = GenerationResult.from_rollout(rollout, tok)
    assert res.response_ids == rollout.response_lists() and res.texts == rollout.texts(tok)
    assert res.finished == rollout.finished.tolist() and res.kl == rollout.kl.tolist()
    assert res.base_logprobs == [row[: len(r)] for row, r in zip(rollout.ref_logprobs.tolist(), res.response_ids)]
    assert res.texts == [
        tok.decode(r[:-1] if f else r, skip_special_tokens=True) for r, f in zip(res.response_ids, res.finished)
    ]


def small_rollout(prompt_rows, response_rows, finished, with_logprobs=True):
    P, T = max(map(len, prompt_rows)), max(map(len, response_rows))
    prompt_ids = torch.tensor([[0] * (P - len(p)) + p for p in prompt_rows])
    response_ids = torch.tensor([r + [0] * (T - len(r)) for r in response_rows])
    response_mask = torch.tensor([[1.0] * len(r) + [0.0] * (T - len(r)) for r in response_rows])
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=(torch.arange(P) >= P - torch.tensor([len(p) for p in prompt_rows])[:, None]).long(),
        response_ids=response_ids,
        response_mask=response_mask,
        finished=torch.tensor(finished),
        logprobs=-response_mask * 0.5 if with_logprobs else None,
        kl=torch.arange(len(response_rows), dtype=torch.float32),
    )


def test_rollout_cat_pads_prompts_left_and_responses_right():
    a = small_rollout([[5, 6], [7]], [[8, 1], [9]], [True, False])
    b = small_rollout([[4, 5, 6]], [[3, 3, 3]], [False])
    c = Rollout.cat([a, b])
    assert c.prompt_ids.tolist() == [[0, 5, 6], [0, 0, 7], [4, 5, 6]]
    assert c.prompt_mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert c.response_ids.tolist() == [[8, 1, 0], [9, 0, 0], [3, 3, 3]]
    assert c.response_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert c.logprobs.tolist() == [[-0.5, -0.5, 0], [-0.5, 0, 0], [-0.5, -0.5, -0.5]]
    assert c.finished.tolist() == [True, False, False] and c.kl.tolist() == [0.0, 1.0, 0.0]
    assert c.ref_logprobs is None and c.hidden is None
    assert c.prompt_lists() == [[5, 6], [7], [4, 5, 6]] and c.response_lists() == [[8, 1], [9], [3, 3, 3]]
    assert Rollout.cat([a]) is a
    with pytest.raises(QVLMError, match="logprobs"):
        Rollout.cat([a, small_rollout([[1]], [[2]], [True], with_logprobs=False)])


def test_rollout_to_device_moves_every_tensor():
    a = small_rollout([[5, 6]], [[8, 1]], [True])
    a.rewards = torch.tensor([1.5])
    moved = a.to("meta")
    assert moved.prompt_ids.device.type == moved.logprobs.device.type == moved.rewards.device.type == "meta"
    assert moved.ref_logprobs is None and a.prompt_ids.device.type == "cpu"
    if torch.cuda.is_available():
        back = a.to("cuda").to("cpu")
        assert torch.equal(back.response_ids, a.response_ids) and torch.equal(back.rewards, a.rewards)


def test_sample_rollout_errors():
    model, tok = tiny_model("llama", seed=0)
    with pytest.raises(QVLMError, match="no heads were given"):
        sample_rollout(model, tok, ["ab"], cfg=DecodeConfig(beta=1.0))
    with pytest.raises(QVLMError, match="values=True needs heads"):
        sample_rollout(model, tok, ["ab"], values=True)


# ---- best-of-N selection ---------------------------------------------------------------------------


def test_select_best_of_n_by_hand():
    rewards = [0.0, 3.0, 3.0, 1.0, 2.0, 5.0, 4.0, 9.0]
    assert select_best_of_n(rewards, group=4, k=3) == [1, 5]  # tie 3.0 / 3.0: the first; 9.0 is draw 4, not taken
    assert select_best_of_n(rewards, group=4, k=4) == [1, 7]
    assert select_best_of_n(rewards, group=4, k=1) == [0, 4]
    assert select_best_of_n(rewards, group=2, k=2) == [1, 2, 5, 7]
    with pytest.raises(QVLMError, match="1 <= k <= group"):
        select_best_of_n(rewards, group=4, k=5)
    with pytest.raises(QVLMError, match="whole number"):
        select_best_of_n(rewards, group=3, k=2)
