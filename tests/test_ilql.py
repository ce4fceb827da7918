"""ILQL and the prefix scorer on a tiny model: losses fall, guided decoding raises the reward,
and an interrupted run resumed from its checkpoint ends with the same heads."""

import json

import pytest
import torch

from qvlm.algos.ilql import ILQLConfig, ilql_loss, train_ilql
from qvlm.algos.value import ValueConfig, train_value
from qvlm.decoding import DecodeConfig, generate
from qvlm.errors import QVLMError
from qvlm.mdp import Sample, collate, encode_samples
from qvlm.model import QVModel
from qvlm.rewards import get_reward, score
from qvlm.train.checkpoint import latest_checkpoint
from qvlm.trunk import TrunkConfig
from tests.helpers import tiny_model

PROMPTS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]
REWARD = "count:e"  # toy reward: how often the response writes the token "e"


def offline_data(model, tok, n_per_prompt=16, seed=0):
    prompts = PROMPTS * n_per_prompt
    res = generate(model, tok, prompts, cfg=DecodeConfig(max_new_tokens=10, seed=seed, batch_size=64))
    rewards = score(get_reward(REWARD), prompts, res.texts)
    return [Sample(p, t, r, finished=f) for p, t, r, f in zip(prompts, res.texts, rewards, res.finished)]


def mean_reward(model, tok, heads, beta, seed=123):
    prompts = PROMPTS * 8
    res = generate(
        model, tok, prompts, heads=heads, cfg=DecodeConfig(max_new_tokens=10, seed=seed, beta=beta, batch_size=64)
    )
    rewards = score(get_reward(REWARD), prompts, res.texts)
    return sum(rewards) / len(rewards)


def test_ilql_learns_toy_reward():
    model, tok = tiny_model("llama", seed=0)
    samples = offline_data(model, tok)
    qv = QVModel.from_trunk(model)
    # Q heads start neutral (zero last layer), so they need a dozen epochs to move the decoding
    history = train_ilql(qv, tok, samples, ILQLConfig(epochs=12, lr=3e-3, batch_size=16, max_length=32, progress=False))
    q_losses = [v for _, v in history["losses/q"]]
    assert sum(q_losses[-5:]) / 5 < 0.5 * sum(q_losses[:5]) / 5  # the TD error falls
    base = mean_reward(model, tok, qv.heads, beta=0.0)
    guided = mean_reward(model, tok, qv.heads, beta=8.0)
    # the base model writes "e" about 0.3 times per response; guidance must add at least 0.3
    assert guided > base + 0.3, (base, guided)


def run_training(tmp_path, cfg, callbacks=(), resume=False):
    model, tok = tiny_model("llama", seed=0)
    samples = [Sample(p, p[::-1] + "xy", float(i % 3)) for i, p in enumerate(PROMPTS * 3)]
    torch.manual_seed(0)
    qv = QVModel.from_trunk(model)
    train_ilql(qv, tok, samples, cfg, run_dir=tmp_path, resume=resume, callbacks=callbacks)
    return qv


def test_resume_after_interrupt_matches_uninterrupted(tmp_path):
    cfg = ILQLConfig(steps=12, batch_size=4, max_length=32, checkpoint_every=5, progress=False)
    full = run_training(tmp_path / "full", cfg)

    def interrupt(step, stats):
        if step == 6:  # after the checkpoint at step 5, mid-way to the next
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(tmp_path / "cut", cfg, callbacks=[interrupt])
    assert json.loads((latest_checkpoint(tmp_path / "cut") / "config.json").read_text())["steps"] == 12
    resumed = run_training(tmp_path / "cut", cfg, resume=True)
    for (name, a), b in zip(full.heads.state_dict().items(), resumed.heads.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(12))  # the log has each step once


def test_resume_refuses_other_config(tmp_path):
    cfg = ILQLConfig(steps=3, batch_size=4, max_length=32, progress=False)
    run_training(tmp_path, cfg)
    with pytest.raises(QVLMError, match="tau differ"):
        run_training(tmp_path, ILQLConfig(steps=3, batch_size=4, max_length=32, tau=0.9, progress=False), resume=True)


def test_ilql_loss_terms_and_target_detached(tiny):
    model, tok = tiny
    qv = QVModel.from_trunk(model, TrunkConfig("full"))
    batch = collate(
        encode_samples([Sample("ab", "cd", 1.0), Sample("ef", "g", 0.0, finished=False)], tok, 32), tok.pad_token_id
    )
    loss, stats = ilql_loss(qv, batch, ILQLConfig())
    loss.backward()
    assert {"losses/q", "losses/v", "losses/cql", "losses/awac"} <= set(stats)
    assert all(p.grad is None for p in qv.heads.target_q_heads.parameters())
    assert any(p.grad is not None for p in qv.trunk.parameters())  # full mode trains the trunk (AWAC)


def test_value_regression_learns_mc_returns():
    model, tok = tiny_model("llama", seed=0)
    # reward 1 when the response starts with "a", so V(s_1) must separate the two prompts' data
    samples = [Sample("ab", "aaa", 1.0)] * 8 + [Sample("cd", "bbb", 0.0)] * 8
    qv = QVModel.from_trunk(model, with_q=False)
    train_value(qv, tok, samples, ValueConfig(epochs=40, batch_size=8, max_length=32, lr=3e-3, progress=False))
    batch = collate(encode_samples([samples[0], samples[-1]], tok, 32), tok.pad_token_id)
    with torch.no_grad():
        v = qv.heads.values(qv.features(batch)[0])
    assert v[0, -1] > 0.8 and abs(v[1, -1]) < 0.2  # V of the last state before EOS ~ its return


def test_q_target_next_v_by_hand(tiny):
    """q_target=next_v regresses Q(s_t, a_t) on r_t + V(s_{t+1}); the done step on r_t alone."""
    from qvlm.algos.value import value_loss

    model, tok = tiny
    qv = QVModel.from_trunk(model, q_head="tied")
    with torch.no_grad():  # V = 0.5 everywhere; Q heads stay at zero (neutral start)
        for p in qv.heads.v_head.parameters():
            p.zero_()
        qv.heads.v_head.net[2].bias.fill_(0.5)
    # response "cd" + EOS: 3 steps, reward 1 on the last (done) step
    batch = collate(encode_samples([Sample("ab", "cd", 1.0)], tok, 32), tok.pad_token_id)
    _, stats = value_loss(qv, batch, ValueConfig(q_target="next_v"))
    # targets (0 + 0.5, 0 + 0.5, 1): mean squared error of Q = 0 -> (0.25 + 0.25 + 1) / 3 = 0.5
    assert float(stats["losses/q"]) == pytest.approx(0.5)
    _, stats = value_loss(qv, batch, ValueConfig(q_target="return"))
    assert float(stats["losses/q"]) == pytest.approx(1.0)  # the Monte-Carlo return is 1 at every step
    with pytest.raises(QVLMError, match="--q-target is 'bogus'"):
        ValueConfig(q_target="bogus")


def test_ilql_without_cql_equals_full_loss_minus_cql(tiny):
    """cql_scale = 0 skips the vocabulary-sized Q; the other terms are unchanged."""
    model, tok = tiny
    qv = QVModel.from_trunk(model, q_head="tied")
    with torch.no_grad():
        for p in qv.heads.parameters():
            p.normal_(0.0, 0.5)
    batch = collate(
        encode_samples([Sample("ab", "cd", 1.0), Sample("ef", "g", 0.0, finished=False)], tok, 32), tok.pad_token_id
    )
    full_loss, full = ilql_loss(qv, batch, ILQLConfig(cql_scale=0.1))
    loss, stats = ilql_loss(qv, batch, ILQLConfig(cql_scale=0.0))
    assert float(stats["losses/q"]) == pytest.approx(float(full["losses/q"]), rel=1e-5)
    assert float(stats["losses/v"]) == pytest.approx(float(full["losses/v"]), rel=1e-5)
    assert loss.item() == pytest.approx(full_loss.item() - 0.1 * float(full["losses/cql"]), rel=1e-5)
    assert "losses/cql" not in stats
