"""Tiny-model tests of qvlm.algos.ppo: KL to the reference before the first update, learning on a
rule-based reward, bit-for-bit resume, a NaN reward, the saved run, the a2c preset, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from qvlm.algos.actor_critic import ActorCritic, load_policy
from qvlm.algos.ppo import PPOConfig, iteration_prompts, make_targets, ppo_loss, train_ppo
from qvlm.configs import DecodeConfig, TrunkConfig
from qvlm.decoding.sampling import sample_rollout
from qvlm.errors import QVLMError
from qvlm.masked import masked_mean
from tests.helpers import tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROMPTS = ["hello", "abc", "the cat", "zz", "a dog", "why"]


def small_cfg(**kw) -> PPOConfig:
    base = dict(
        iterations=3,
        prompts_per_iter=3,
        responses_per_prompt=4,
        max_new_tokens=8,
        lr=1e-2,
        critic_lr=1e-2,
        ppo_epochs=4,  # the tests' own settings, not the user defaults (benchmarks/ppo_sweep.py chose those)
        kl_coef=0.05,
        chat=False,
        progress=False,
        checkpoint_every=1,
    )
    return PPOConfig(**{**base, **kw})


def build(trunk="lora", critic="shared", seed=0) -> tuple[ActorCritic, object]:
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(seed)
    return ActorCritic(model, TrunkConfig(trunk), critic=critic), tok


@pytest.mark.parametrize("trunk,critic", [("lora", "shared"), ("full", "separate")])
def test_kl_to_reference_is_zero_before_the_first_update(trunk, critic):
    ac, tok = build(trunk, critic)
    torch.manual_seed(1)
    rollout = sample_rollout(ac.policy, tok, PROMPTS[:3], ref_logprobs=False)
    rollout.rewards = torch.zeros(len(rollout))
    batch = make_targets(ac, rollout, 0.1, small_cfg())
    mask = rollout.response_mask.bool()
    # log pi_old (the decoding step, KV cache) and log pi_ref (teacher-forced, adapters off) agree to rounding
    assert (batch.old_logprobs - batch.ref_logprobs)[mask].abs().max() < 1e-5
    assert batch.kl.abs().max() < 1e-4
    # teacher-forced policy log-probs equal the reference's exactly (LoRA B = 0 adds exact zeros)
    out = ac.evaluate(rollout)
    assert torch.equal(out.logprobs[mask], batch.ref_logprobs[mask])


def test_reference_stays_the_base_after_updates():
    ac, tok = build()
    base_model, _ = tiny_model("llama", seed=0)
    train_ppo(ac, tok, PROMPTS, "count:e", small_cfg(iterations=2))
    torch.manual_seed(3)
    rollout = sample_rollout(ac.policy, tok, PROMPTS[:2], ref_logprobs=False)
    ref = ac.ref_logprobs(rollout)
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)
    # the base model's own log-probs of the sampled responses, without the adapters
    from qvlm.decoding.step import position_ids

    mask = torch.cat([rollout.prompt_mask, rollout.response_mask.long()], 1)
    logits = base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    P, T = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : P - 1 + T].float(), -1).gather(-1, rollout.response_ids[..., None])[
        ..., 0
    ]
    real = rollout.response_mask.bool()
    torch.testing.assert_close(ref[real], logp[real], atol=1e-5, rtol=1e-5)
    # ... while the policy moved away from it
    assert (ac.evaluate(rollout).logprobs - ref)[real].abs().max() > 1e-3


def test_reward_rises_on_a_rule_based_reward():
    ac, tok = build("full", "shared")
    cfg = small_cfg(iterations=8, prompts_per_iter=4, lr=3e-3, kl_coef=0.0, max_new_tokens=10)
    history = train_ppo(ac, tok, PROMPTS, lambda p, r: [float(x.count("e")) for x in r], cfg)
    rewards = [v for _, v in history["charts/reward"]]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.5, rewards
    for key in ("charts/kl", "charts/kl_coef", "charts/entropy", "charts/clipfrac", "charts/approx_kl",
                "losses/value", "charts/explained_variance", "charts/tokens_per_s"):  # fmt: skip
        assert len(history[key]) == 8


def _params(ac: ActorCritic) -> dict[str, torch.Tensor]:
    return {**ac.trainable_trunk_state(), **{"head." + k: v for k, v in ac.heads.state_dict().items()}}


@pytest.mark.parametrize("critic,kl_target", [("shared", 0.0), ("separate", 2.0)])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, critic, kl_target):
    cfg = small_cfg(iterations=4, checkpoint_every=2, kl_target=kl_target, kl_horizon=10.0)
    ac, tok = build(critic=critic)
    full = train_ppo(ac, tok, PROMPTS, "count:e", cfg, run_dir=tmp_path / "a")
    expected = _params(ac)

    class Kill(Exception):
        pass

    def kill_at_3(it, floats):
        if it == 2:  # after iteration 2 ran (its checkpoint is at 2): lose it, as a kill would
            raise Kill

    ac2, _ = build(critic=critic)
    with pytest.raises(Kill):
        train_ppo(ac2, tok, PROMPTS, "count:e", cfg, run_dir=tmp_path / "b", callbacks=[kill_at_3])
    torch.manual_seed(12345)  # a resumed process starts with other RNG states
    ac3, _ = build(critic=critic, seed=99)  # ... and another V head: all restored from the checkpoint
    resumed = train_ppo(ac3, tok, PROMPTS, "count:e", cfg, run_dir=tmp_path / "b", resume=True)
    got = _params(ac3)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    for key in ("charts/reward", "charts/kl", "charts/kl_coef", "losses/value", "losses/policy"):
        assert full[key] == resumed[key], key
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3]


def test_nan_reward_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    ac, tok = build()
    calls = []

    def flaky(prompts, responses):
        calls.append(1)
        return [float("nan") if len(calls) == 3 else 1.0 for _ in responses]

    with pytest.raises(QVLMError, match=r"iteration 2: .*nan.*checkpoint .*step-00000002.* intact"):
        train_ppo(ac, tok, PROMPTS, flaky, small_cfg(iterations=4), run_dir=tmp_path)
    assert (tmp_path / "checkpoint" / "step-00000002" / "trainer_state.pt").is_file()
    assert (tmp_path / "checkpoint" / "latest").read_text().strip() == "step-00000002"


def test_saved_run_loads_as_a_policy(tmp_path):
    ac, tok = build()
    train_ppo(ac, tok, PROMPTS, "count:e", small_cfg(iterations=2), run_dir=tmp_path)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "heads.safetensors").is_file()
    info = json.loads((tmp_path / "training.json").read_text())
    assert info["algorithm"] == "ppo" and info["config"]["iterations"] == 2
    base, _ = tiny_model("llama", seed=0)
    policy = load_policy(base, tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = ac.policy(input_ids=ids).logits
        torch.testing.assert_close(policy(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    # full trunk: the weights as safetensors
    ac2, _ = build("full")
    train_ppo(ac2, tok, PROMPTS, "count:e", small_cfg(iterations=1), run_dir=tmp_path / "full")
    policy2 = load_policy(tiny_model("llama", seed=0)[0], tmp_path / "full")
    with torch.no_grad():
        torch.testing.assert_close(policy2(input_ids=ids).logits, ac2.policy(input_ids=ids).logits)


def test_a2c_preset_and_critic_warmup(monkeypatch):
    """a2c: one unclipped actor-critic step per iteration on the whole rollout; warm-up: the critic
    trains alone (the policy's adapters stay put, the V head moves)."""
    import qvlm.algos.ppo as ppo

    cfg = small_cfg(algo="a2c", iterations=2, critic_warmup=1)
    assert (cfg.ppo_epochs, cfg.minibatch_size, cfg.value_clip) == (1, 12, 0.0)
    ac, tok = build()
    before = {k: v.clone() for k, v in ac.trainable_trunk_state().items()}
    v_before = {k: v.clone() for k, v in ac.heads.state_dict().items()}
    history = train_ppo(ac, tok, PROMPTS, "count:e", small_cfg(iterations=1, critic_warmup=1))
    # warm-up trains the critic only: the policy's adapters have not moved, the V head has
    assert all(torch.equal(before[k], v) for k, v in ac.trainable_trunk_state().items())
    assert any(not torch.equal(v_before[k], v) for k, v in ac.heads.state_dict().items())
    assert "losses/policy" not in history and "losses/value" in history
    steps = []
    real_step = ppo.optimizer_step
    monkeypatch.setattr(ppo, "optimizer_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    train_ppo(ac, tok, PROMPTS, "count:e", cfg)
    assert len(steps) == 2  # one step an iteration: every response of the rollout in one minibatch
    # no clipping: where the policy has moved far from pi_old, the a2c loss is the plain surrogate
    # -mean(A rho), while PPO's clips rho to [0.8, 1.2]
    rollout = sample_rollout(ac.policy, tok, PROMPTS[:2], cfg=DecodeConfig(max_new_tokens=4, num_return_sequences=2))
    rollout.rewards = torch.tensor([1.0, 0.0, 0.5, 0.2])
    batch = make_targets(ac, rollout, 0.0, cfg)
    batch.old_logprobs = batch.old_logprobs - 0.7 * rollout.response_mask  # rho = e^0.7 ~ 2.01 on every token
    mask = rollout.response_mask
    plain = -masked_mean(batch.advantages * ac.evaluate(rollout).logprobs.sub(batch.old_logprobs).exp(), mask)
    _, stats = ppo_loss(ac, batch, cfg, 0.0, critic_only=False)
    torch.testing.assert_close(stats["losses/policy"], plain.detach())
    _, clipped = ppo_loss(ac, batch, small_cfg(), 0.0, critic_only=False)
    assert float(stats["charts/clipfrac"]) == 0.0 and float(clipped["charts/clipfrac"]) > 0  # PPO clips (A > 0)
    assert float(clipped["losses/policy"]) > float(plain) + 1e-3  # clipping lowers the gain it credits


def test_bad_config_and_prompts():
    with pytest.raises(QVLMError, match="kl-coef is -1"):
        PPOConfig(kl_coef=-1)
    with pytest.raises(QVLMError, match="ppo-epochs is 0"):
        PPOConfig(ppo_epochs=0)
    ac, tok = build()
    with pytest.raises(QVLMError, match="no training prompts"):
        train_ppo(ac, tok, [], "count:e", small_cfg())


def test_iteration_prompts_cover_each_epoch_once():
    """Epoch e visits every prompt once, in the permutation of seed + e, across iteration boundaries
    too (6 prompts, 4 an iteration: iteration 1 holds the end of epoch 0 and the start of epoch 1)."""
    stream = [p for it in range(6) for p in iteration_prompts(PROMPTS, 4, 0, it)]  # 24 = 4 epochs
    epochs = [stream[e * 6 : (e + 1) * 6] for e in range(4)]
    assert all(sorted(epoch) == sorted(PROMPTS) for epoch in epochs)
    for e, epoch in enumerate(epochs):
        order = torch.randperm(6, generator=torch.Generator().manual_seed(0 + e)).tolist()
        assert epoch == [PROMPTS[i] for i in order]
    assert len({tuple(epoch) for epoch in epochs}) > 1  # each epoch draws its own order
    # any iteration is known without replaying the earlier ones (resume), and another seed reorders
    assert iteration_prompts(PROMPTS, 4, 0, 4) == stream[16:20]
    assert [iteration_prompts(PROMPTS, 4, 1, it) for it in range(3)] != [stream[i : i + 4] for i in (0, 4, 8)]


def test_k3_loss_mode_and_entropy_bonus():
    """kl_mode loss: the rewards carry no KL penalty and the loss adds kl_coef x k3 (masked mean of
    exp(d) - d - 1); ent_coef subtracts ent_coef x the entropy; both by hand on one batch."""
    ac, tok = build()
    history = train_ppo(
        ac, tok, PROMPTS, "count:e", small_cfg(iterations=2, kl_mode="loss", kl_coef=0.5, ent_coef=0.01)
    )
    k3 = [v for _, v in history["losses/k3"]]
    assert len(k3) == 2 and all(v >= 0 for v in k3)
    assert max(k3) > 0  # the policy moved from the reference (k3 is 0 only where they agree)
    rollout = sample_rollout(ac.policy, tok, PROMPTS[:2], cfg=DecodeConfig(max_new_tokens=4, num_return_sequences=2))
    rollout.rewards = torch.tensor([1.0, 0.0, 0.5, 0.2])
    mask = rollout.response_mask
    as_loss, in_reward = small_cfg(kl_mode="loss"), small_cfg(kl_mode="reward")
    batch = make_targets(ac, rollout, 0.5, as_loss)
    # no penalty in the reward: the targets equal those of a zero KL coefficient in reward mode
    torch.testing.assert_close(batch.returns, make_targets(ac, rollout, 0.0, in_reward).returns)
    assert not torch.allclose(batch.returns, make_targets(ac, rollout, 0.5, in_reward).returns)
    out = ac.evaluate(rollout)
    d = batch.ref_logprobs - out.logprobs
    k3_by_hand = masked_mean(torch.exp(d) - d - 1, mask)
    entropy = masked_mean(out.entropy, mask)
    base, _ = ppo_loss(ac, batch, as_loss, 0.0, critic_only=False)
    with_kl, stats = ppo_loss(ac, batch, as_loss, 0.5, critic_only=False)
    torch.testing.assert_close(stats["losses/k3"], k3_by_hand.detach())
    torch.testing.assert_close(with_kl - base, 0.5 * k3_by_hand, atol=1e-6, rtol=1e-5)
    with_ent, stats = ppo_loss(ac, batch, small_cfg(kl_mode="loss", ent_coef=0.01), 0.0, critic_only=False)
    torch.testing.assert_close(with_ent - base, -0.01 * entropy, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats["charts/entropy"], entropy.detach())


def test_critic_init_from_a_value_run(tmp_path):
    from qvlm.heads import HeadsConfig, QVHeads, save_heads

    ac, _ = build()
    torch.manual_seed(5)
    value_heads = QVHeads(HeadsConfig(hidden_size=32, vocab_size=36, with_q=True, num_q_heads=1))
    save_heads(value_heads, tmp_path / "value")
    ac.init_critic_from(tmp_path / "value")
    for k, v in value_heads.v_head.state_dict().items():
        assert torch.equal(ac.heads.v_head.state_dict()[k], v)
    save_heads(QVHeads(HeadsConfig(hidden_size=32, vocab_size=36, head_hidden=8, with_q=False)), tmp_path / "narrow")
    with pytest.raises(QVLMError, match="pass the --model and --head-hidden"):
        ac.init_critic_from(tmp_path / "narrow")
