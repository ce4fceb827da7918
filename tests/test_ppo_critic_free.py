"""``qvlm train ppo --advantage rloo|grpo`` (issue 23): critic-free advantages on PPO's loop, and PPO
rollouts on the fast decoding path (``PPOConfig.fast``).

- the advantages a step uses are RLOO's (GRPO's) of the rollout's KL-penalised rewards, by hand on one
  batch, unwhitened; the V head is never run and never trained; no value loss, no critic group;
- a run learns on the toy reward ``count:e``;
- a killed-and-resumed run equals the uninterrupted one bit for bit; 2 gloo processes equal 1;
- the config refuses fewer than 2 responses per prompt and the settings that would build or train a
  critic, with a clear message (the CLI: exit 2, one line);
- a LoRA PPO run samples the same first-iteration tokens on the fast path as on the standard one.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import qvlm.algos.ppo as ppo
from qvlm.algos.actor_critic import ActorCritic
from qvlm.algos.ppo import PPOConfig, train_ppo
from qvlm.cli import main
from qvlm.configs import TrunkConfig
from qvlm.errors import QVLMError
from qvlm.online import grpo_advantages, kl_penalised_rewards, rloo_advantages
from tests.helpers import Killed, spawn_processes, tiny_model, tiny_ppo_weights, train_tiny_ppo

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["hello", "abc", "the cat", "zz", "a dog", "why"]


def small_cfg(**kw) -> PPOConfig:
    base = dict(iterations=2, prompts_per_iter=3, responses_per_prompt=4, max_new_tokens=8, lr=1e-2, ppo_epochs=4,
                kl_coef=0.3, chat=False, progress=False, checkpoint_every=1, advantage="rloo")  # fmt: skip
    return PPOConfig(**{**base, **kw})


def build(trunk: str = "lora", seed: int = 0) -> tuple[ActorCritic, object]:
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(seed)
    return ActorCritic(model, TrunkConfig(trunk)), tok


def record_batches(monkeypatch) -> list:
    """The batches :func:`qvlm.algos.ppo.optimise` is given (what the steps use), as they come in."""
    seen, real = [], ppo.optimise

    def spy(ac, optimizer, batch, cfg, *args, **kwargs):
        seen.append((batch, len(optimizer.param_groups)))
        return real(ac, optimizer, batch, cfg, *args, **kwargs)

    monkeypatch.setattr(ppo, "optimise", spy)
    return seen


def never_run_the_v_head(ac: ActorCritic) -> dict[str, torch.Tensor]:
    """Make any use of the V head fail; returns its weights now, to compare after training."""

    def refuse(*args, **kwargs):
        raise AssertionError("the V head ran in a critic-free run")

    ac.heads.values = refuse
    return {k: v.clone() for k, v in ac.heads.state_dict().items()}


def test_rloo_advantages_of_a_step_by_hand(monkeypatch):
    """The advantages the first step optimises: for response i of a prompt with k responses,
    R_i = reward_i - kl_coef * sum_t (log pi_old - log pi_ref), A_i = R_i - mean_{j != i} R_j on each
    of its real tokens, 0 on padding, not whitened; computed here row by row in plain Python."""
    ac, tok = build()
    v_head = never_run_the_v_head(ac)
    seen = record_batches(monkeypatch)
    cfg = small_cfg(iterations=2)
    history = train_ppo(ac, tok, PROMPTS, "count:e", cfg)
    assert [groups for _, groups in seen] == [1, 1]  # no critic_lr group
    k, beta = cfg.responses_per_prompt, cfg.kl_coef
    for batch, _ in seen:
        r, mask = batch.rollout, batch.rollout.response_mask
        returns = []
        for b in range(len(r)):
            real = [t for t in range(mask.shape[1]) if mask[b, t] > 0]
            k1 = sum(float(batch.old_logprobs[b, t]) - float(batch.ref_logprobs[b, t]) for t in real)
            returns.append(float(r.rewards[b]) - beta * k1)
        for b in range(len(r)):
            g = b // k
            others = [returns[j] for j in range(g * k, (g + 1) * k) if j != b]
            want = returns[b] - sum(others) / (k - 1)
            got = batch.advantages[b]
            assert torch.allclose(got[mask[b] > 0], torch.full_like(got[mask[b] > 0], want), atol=1e-5), b
            assert torch.all(got[mask[b] == 0] == 0)
        # the same as the library's estimator on the rollout's penalised rewards
        penalised = kl_penalised_rewards(r.rewards, batch.old_logprobs, batch.ref_logprobs, mask, beta)
        torch.testing.assert_close(batch.advantages, rloo_advantages(penalised, mask, k))
        assert len({round(x, 6) for x in returns}) > 1  # not all ties: the advantages are not all 0
    # the second iteration's policy has moved off the reference: the KL penalty is in its returns
    batch = seen[1][0]
    k1_sums = ((batch.old_logprobs - batch.ref_logprobs) * batch.rollout.response_mask).sum(-1)
    assert float(k1_sums.abs().max()) * beta > 1e-3
    # no value loss, no explained variance; the V head untouched; values and value targets zero
    assert "losses/value" not in history and "charts/explained_variance" not in history
    assert "losses/policy" in history
    assert all(torch.equal(v_head[key], v) for key, v in ac.heads.state_dict().items())
    assert torch.all(batch.old_values == 0) and torch.all(batch.returns == 0)


def test_grpo_advantages_of_a_step_and_no_whitening(monkeypatch):
    """GRPO: (R_i - mean R) / (std R + 1e-4) per prompt (unbiased std), on the same penalised returns;
    a second whitening over the batch would move the advantages of tied groups off 0: none here."""
    ac, tok = build()
    never_run_the_v_head(ac)
    seen = record_batches(monkeypatch)
    cfg = small_cfg(iterations=1, advantage="grpo", kl_coef=0.0)
    train_ppo(ac, tok, PROMPTS, "count:e", cfg)
    batch = seen[0][0]
    r, mask = batch.rollout, batch.rollout.response_mask
    penalised = kl_penalised_rewards(r.rewards, batch.old_logprobs, batch.ref_logprobs, mask, 0.0)
    torch.testing.assert_close(batch.advantages, grpo_advantages(penalised, mask, 4))
    # by hand on the first prompt's 4 responses (kl_coef 0: the returns are the rewards)
    x = [float(v) for v in r.rewards[:4]]
    mean = sum(x) / 4
    std = (sum((v - mean) ** 2 for v in x) / 3) ** 0.5
    for b in range(4):
        want = (x[b] - mean) / (std + 1e-4)
        assert float(batch.advantages[b, 0]) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_reward_rises_on_count_e(advantage):
    ac, tok = build("full")
    cfg = small_cfg(iterations=8, prompts_per_iter=4, lr=3e-3, kl_coef=0.0, max_new_tokens=10, advantage=advantage)
    history = train_ppo(ac, tok, PROMPTS, "count:e", cfg)
    rewards = [v for _, v in history["charts/reward"]]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.5, rewards


def _params(ac: ActorCritic) -> dict[str, torch.Tensor]:
    return {**ac.trainable_trunk_state(), **{"head." + k: v for k, v in ac.heads.state_dict().items()}}


@pytest.mark.parametrize("advantage,kl_target", [("rloo", 0.0), ("grpo", 2.0)])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path, advantage, kl_target):
    cfg = small_cfg(iterations=4, checkpoint_every=2, advantage=advantage, kl_target=kl_target, kl_horizon=10.0)
    ac, tok = build()
    full = train_ppo(ac, tok, PROMPTS, "count:e", cfg, run_dir=tmp_path / "a")
    expected = _params(ac)

    def kill_after_iteration_2(it, floats):
        if it == 2:  # iteration 2 ran, its checkpoint (at 2) is older: lose it, as a kill would
            raise Killed

    ac2, _ = build()
    with pytest.raises(Killed):
        train_ppo(ac2, tok, PROMPTS, "count:e", cfg, run_dir=tmp_path / "b", callbacks=[kill_after_iteration_2])
    torch.manual_seed(12345)  # other RNG states and another V head: all restored from the checkpoint
    ac3, _ = build(seed=99)
    resumed = train_ppo(ac3, tok, PROMPTS, "count:e", cfg, run_dir=tmp_path / "b", resume=True)
    got = _params(ac3)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    for key in ("charts/reward", "charts/kl", "charts/kl_coef", "losses/policy", "charts/grad_norm"):
        assert full[key] == resumed[key], key
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3]
    # the final run directory: a policy that loads, its training.json naming the estimator
    info = json.loads((tmp_path / "a" / "training.json").read_text())
    assert info["config"]["advantage"] == advantage


def _run_rloo(run_dir: str, resume: bool = False, kill: bool = False) -> None:
    train_tiny_ppo(run_dir, resume, kill, advantage="rloo", critic_warmup=0)


def test_two_processes_equal_one(tmp_path):
    """RLOO in 2 gloo processes (killed after iteration 1, then resumed) trains the weights 1 process
    trains: each process holds whole prompts, so whole groups."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run_rloo(str(one))
    spawn_processes(_run_rloo, str(two), False, True)
    spawn_processes(_run_rloo, str(two), True, False)
    a, b = tiny_ppo_weights(one), tiny_ppo_weights(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in m2] == [0, 1, 2]
    for x, y in zip(m1, m2):
        assert y["charts/reward"] == x["charts/reward"]
        assert y["charts/response_length"] == x["charts/response_length"]
        for key in ("charts/kl", "charts/kl_coef", "losses/policy", "charts/grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
        assert "losses/value" not in y


def test_config_refusals():
    with pytest.raises(QVLMError) as err:
        PPOConfig(advantage="rloo", responses_per_prompt=1)
    assert str(err.value) == (
        "--responses-per-prompt is 1; it must be at least 2 with --advantage rloo: its baseline is the other "
        "responses to the same prompt (or use --advantage gae)"
    )
    with pytest.raises(QVLMError, match="--advantage grpo: its baseline"):
        PPOConfig(advantage="grpo", responses_per_prompt=1)
    with pytest.raises(QVLMError, match="--advantage is 'vtrace'; it must be one of gae, rloo, grpo"):
        PPOConfig(advantage="vtrace")
    with pytest.raises(QVLMError, match="--critic separate builds a second copy .* uses no critic; drop --critic"):
        PPOConfig(advantage="rloo", critic="separate")
    with pytest.raises(QVLMError, match="--critic-init runs/value loads a V head"):
        PPOConfig(advantage="grpo", critic_init="runs/value")
    with pytest.raises(QVLMError, match="--critic-warmup 2 trains a critic alone first"):
        PPOConfig(advantage="rloo", critic_warmup=2)
    with pytest.raises(QVLMError, match="--fast decodes from packed copies of whole weights"):
        PPOConfig(fast=True, trunk=TrunkConfig("full", fsdp=True))
    with pytest.raises(QVLMError, match="--fast decodes from packed copies"):
        PPOConfig(fast=True, trunk=TrunkConfig("full"), deepspeed="zero2")
    PPOConfig(responses_per_prompt=1)  # GAE needs no group
    PPOConfig(advantage="rloo", algo="a2c", responses_per_prompt=2)  # one unclipped step: REINFORCE + RLOO


def test_cli_refuses_one_response_per_prompt(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("hello\n")
    args = ["train", "ppo", "--model", str(tmp_path / "no-such-model"), "--prompts", str(tmp_path / "p.txt"),
            "--reward", "count:e", "--out", str(tmp_path / "r"), "--advantage", "rloo",
            "--responses-per-prompt", "1"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "qvlm train: error: --responses-per-prompt is 1; it must be at least 2 with --advantage rloo: its "
        "baseline is the other responses to the same prompt (or use --advantage gae)"
    ]


def test_fast_rollouts_of_a_lora_policy_sample_the_standard_tokens(monkeypatch):
    """The first iteration of a LoRA PPO run, float32, same seed: fast=True samples the tokens (and
    records the log-probs, to rounding) that fast=False does. The adapters are given random nonzero
    weights first (peft starts B at 0, which would make the policy the base model)."""
    shards = []
    real = ppo.sample_shard

    def spy(ac, tokenizer, batch_prompts, decode, seed, iteration):
        rollout, prompts = real(ac, tokenizer, batch_prompts, decode, seed, iteration)
        shards.append((decode.fast, iteration, rollout))
        return rollout, prompts

    monkeypatch.setattr(ppo, "sample_shard", spy)
    for fast in (False, True):
        ac, tok = build()
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in ac.policy.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        train_ppo(ac, tok, PROMPTS, "count:e", small_cfg(iterations=1, advantage="gae", max_new_tokens=12, fast=fast))
    (slow_fast, _, slow), (fast_fast, _, fast) = shards
    assert (slow_fast, fast_fast) == (False, True)
    assert fast.response_lists() == slow.response_lists()
    mask = slow.response_mask.bool()
    torch.testing.assert_close(fast.logprobs[mask], slow.logprobs[mask], atol=1e-5, rtol=0)
    assert sum(len(x) for x in slow.response_lists()) > len(slow)  # responses of more than one token
    # the adapters matter: the base model (adapters off) samples other tokens for the same seeds
    with ac.reference_mode():
        base = real(ac, tok, ppo.iteration_prompts(PROMPTS, 3, 0, 0), _decode(12), 0, 0)[0]
    assert base.response_lists() != slow.response_lists()


def _decode(max_new_tokens: int):
    from qvlm.configs import DecodeConfig

    return DecodeConfig(max_new_tokens=max_new_tokens, num_return_sequences=4, batch_size=64, chat=False)


def test_fast_rollouts_of_a_full_trunk_follow_its_updates():
    """A full trunk's weights change every iteration: the fast step's packed copies must follow them.
    After an iteration of training with fast=True (its packed weights built from the initial model),
    the fast path samples what the standard path samples from the updated model."""
    ac, tok = build("full")
    before = ac.policy.model.layers[0].mlp.up_proj.weight.detach().clone()
    cfg = small_cfg(iterations=1, advantage="gae", lr=3e-3, max_new_tokens=12, fast=True)
    train_ppo(ac, tok, PROMPTS, "count:e", cfg)
    assert float((ac.policy.model.layers[0].mlp.up_proj.weight - before).abs().max()) > 1e-3
    prompts = ppo.iteration_prompts(PROMPTS, 3, 0, 1)
    decode = _decode(12)
    fast = ppo.sample_shard(ac, tok, prompts, dataclasses.replace(decode, fast=True), 0, 1)[0]
    slow = ppo.sample_shard(ac, tok, prompts, decode, 0, 1)[0]
    assert fast.response_lists() == slow.response_lists()
    mask = slow.response_mask.bool()
    torch.testing.assert_close(fast.logprobs[mask], slow.logprobs[mask], atol=1e-5, rtol=0)
    # and the initial model, as the stale packed copies hold it, samples other tokens
    stale, _ = tiny_model("llama", seed=0)
    old = ppo.sample_shard(ActorCritic(stale, TrunkConfig("full")), tok, prompts, decode, 0, 1)[0]
    assert old.response_lists() != slow.response_lists()
