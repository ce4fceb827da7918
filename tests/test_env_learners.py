"""Learners on multi-turn environment episodes (issue 24, deliverable 3): ILQL and Monte-Carlo values
offline from episode JSONL, PPO online with GAE across turns, value-guided decoding inside the
environment loop, V per turn.

The acceptance cases by hand: no loss reads an environment token (every position a loss must not read
is NaN, so any read, masked or not, fails); TD targets, Monte-Carlo returns and GAE across the turns of
a 2-turn episode through the trainers' own code (a V head that reads out the position it is applied
at, so the targets name the positions read); resume bit for bit on episode data; single-turn batches
read what they read before."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qvlm.algos.actor_critic import ActorCritic
from qvlm.algos.ilql import ilql_loss, train_ilql
from qvlm.algos.ppo import ppo_loss
from qvlm.algos.ppo_env import (
    iteration_seeds,
    kl_penalised_step_rewards,
    make_env_targets,
    train_ppo_env,
)
from qvlm.algos.value import train_value, value_loss
from qvlm.cli import main
from qvlm.configs import ILQLConfig, PPOConfig, TrunkConfig, ValueConfig
from qvlm.envs.episodes import read_episodes, write_episodes
from qvlm.envs.rollout import run_lm, run_scripted
from qvlm.envs.tokens import action_ids, action_spans, collate_episodes, encode_episode
from qvlm.envs.values import episode_turn_values
from qvlm.errors import QVLMError
from qvlm.mdp import Sample, TokenBatch, collate, encode_samples, value_positions
from qvlm.model import QVModel, load_qv_model
from tests.helpers import char_tokenizer, tiny_llama_config

pytestmark = pytest.mark.usefixtures("one_thread")

# a role letter and a colon per message, <eos> closing each (tests/test_env_tokens.py)
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}s:hi<eos>{% endif %}"
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)
CHARS = " abcdefghijklmnopqrstuvwxyz0123456789:.,#"


def make_tok():
    t = char_tokenizer(CHARS)
    t.chat_template = TEMPLATE
    return t


def make_model(tok, seed=0):
    config = tiny_llama_config(len(tok))
    config.max_position_embeddings = 1024  # whole conversations of guess-the-number, one token a character
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval()


@pytest.fixture
def tok():
    return make_tok()


def two_turns(tok, terminated=True):
    """o0 "go", a1 "5", o1 "up", a2 "7" (o2 "no" when truncated); rewards -0.1, 0.9 (docs/envs.md)."""
    observations = ["go", "up"] + ([] if terminated else ["no"])
    return encode_episode(tok, observations, [action_ids(tok, "5"), action_ids(tok, "7")], [-0.1, 0.9], terminated)


def episode_batch(tok, *episodes):
    return collate_episodes(list(episodes), tok.pad_token_id)


# ---------------------------------------------------------------- positions


def test_value_positions_by_hand():
    states, nxt = torch.tensor([[11, 12, 20, 21]]), torch.tensor([[12, 20, 21, 22]])
    assert value_positions(states, nxt, torch.ones(1, 4)).tolist() == [[11, 12, 20, 21, 22]]
    states, nxt, mask = torch.tensor([[4, 5, 0]]), torch.tensor([[5, 6, 1]]), torch.tensor([[1.0, 1, 0]])
    assert value_positions(states, nxt, mask).tolist() == [[4, 5, 6, 0]]


def test_episode_token_batch_carries_the_next_state_positions(tok):
    batch = episode_batch(tok, two_turns(tok), two_turns(tok, terminated=False)).token_batch()
    assert batch.next_positions.tolist() == [[12, 20, 21, 22], [12, 20, 21, 29]]
    assert batch.index.tolist() == [0, 1]
    # single-turn data: no next_state_positions, one past each state as before
    single = collate(encode_samples([Sample("ab", "cd", 1.0)], tok, 32, chat=False), tok.pad_token_id)
    assert type(single) is TokenBatch and torch.equal(single.next_positions, single.state_positions + 1)


def single_turn_reading(batch):
    """The same episodes as a plain TokenBatch: s_{t+1} one past each state (the single-turn rule)."""
    return TokenBatch(**{k: v for k, v in vars(batch).items() if k != "next_state_positions"})


# ---------------------------------------------------------------- a V head that reads out the position


def position_hidden(trunk, poison_rows=None):
    """Make the trunk's last hidden state at position p the vector (p, 0, ..., 0); with ``poison_rows``
    (one set of allowed positions per row), NaN at every other position. Returns the hook handle."""

    def hook(module, inputs, out):
        B, L, H = out.shape
        h = torch.zeros_like(out)
        h[..., 0] = torch.arange(L, dtype=out.dtype)
        if poison_rows is not None:
            for b, allowed in enumerate(poison_rows):
                bad = torch.tensor([p not in allowed for p in range(L)])
                h[b, bad] = float("nan")
        return h

    return trunk.base_model.norm.register_forward_hook(hook)


def position_value_head(heads, scale=0.01):
    """``V(h) = scale * h[0]`` for ``h[0] >= 0``: with :func:`position_hidden`, ``V = scale * position``."""
    with torch.no_grad():
        first, last = heads.v_head.net[0], heads.v_head.net[2]
        for p in (first.weight, first.bias, last.weight, last.bias):
            p.zero_()
        first.weight[0, 0] = 1.0
        last.weight[0, 0] = scale


def captured(monkeypatch, module, name, arg):
    """Record argument ``arg`` of every call of ``module.name``."""
    seen, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(args[arg].detach().clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def qv_on_positions(tok, with_q=True):
    qv = QVModel.from_trunk(make_model(tok), TrunkConfig("frozen"), with_q=with_q)
    position_value_head(qv.heads)
    position_hidden(qv.trunk)
    return qv


def test_td_targets_across_turns_through_ilql(tok, monkeypatch):
    import qvlm.algos.ilql as ilql

    qv = qv_on_positions(tok)
    seen = captured(monkeypatch, ilql, "ilql_q_loss", 1)
    batch = episode_batch(tok, two_turns(tok), two_turns(tok, terminated=False)).token_batch()
    ilql_loss(qv, batch, ILQLConfig(gamma=0.9, cql_scale=0.0))
    # V(s_{t+1}) at 12, 20 (the end of the environment's reply, not 14), 21, then 22 (terminal: unused) or,
    # truncated after the reply "no" (23-29), 29: r + 0.9 V
    assert seen[0].tolist() == [
        pytest.approx([0.108, -0.1 + 0.18, 0.189, 0.9], abs=1e-6),
        pytest.approx([0.108, -0.1 + 0.18, 0.189, 0.9 + 0.9 * 0.29], abs=1e-6),
    ]
    # the cached features (a frozen trunk's second pass) read the same positions
    ilql_loss(qv, batch, ILQLConfig(gamma=0.9, cql_scale=0.0))
    assert len(qv.feature_cache) == 2 and torch.equal(seen[1], seen[0])
    # the single-turn reading of s_{T+1} (one past the last state) would bootstrap the truncated episode
    # from V at 22, the agent's <eos>, before the environment's reply
    qv.clear_cache()
    ilql_loss(qv, single_turn_reading(batch), ILQLConfig(gamma=0.9, cql_scale=0.0))
    assert seen[2].tolist()[1][3] == pytest.approx(0.9 + 0.9 * 0.22, abs=1e-6)


def test_monte_carlo_and_td_targets_across_turns_through_value(tok, monkeypatch):
    import qvlm.algos.value as value

    qv = qv_on_positions(tok, with_q=False)
    seen = captured(monkeypatch, value, "value_regression_loss", 1)
    terminated = episode_batch(tok, two_turns(tok)).token_batch()
    value_loss(qv, terminated, ValueConfig(target="mc", gamma=0.9))
    assert seen[-1].tolist()[0] == pytest.approx([0.5661, 0.629, 0.81, 0.9], abs=1e-6)  # docs/envs.md
    # truncated after a2 with the reply "no" (positions 23-29): G_5 = V at 29 = 0.29
    truncated = episode_batch(tok, two_turns(tok, terminated=False)).token_batch()
    value_loss(qv, truncated, ValueConfig(target="mc", gamma=0.9))
    assert seen[-1].tolist()[0] == pytest.approx([0.756369, 0.84041, 1.0449, 1.161], abs=1e-6)
    value_loss(qv, terminated, ValueConfig(target="td", gamma=0.9))
    assert seen[-1].tolist()[0] == pytest.approx([0.108, 0.08, 0.189, 0.9], abs=1e-6)


def test_gae_across_turns_through_ppo_env_targets(tok):
    ac = ActorCritic(make_model(tok), TrunkConfig("lora"))
    position_value_head(ac.heads)
    position_hidden(ac.policy)
    batch = episode_batch(tok, two_turns(tok))
    cfg = PPOConfig(gamma=0.9, lam=0.95, whiten=False, chat=False)
    targets = make_env_targets(ac, batch, torch.zeros(1, 4), kl_coef=0.0, cfg=cfg)
    # V(s_1..s_4) = V at 11, 12, 20, 21 = (0.11, 0.12, 0.20, 0.21); deltas (-0.002, -0.04, -0.011, 0.69);
    # A_t = delta_t + 0.855 A_{t+1}
    assert targets.old_values.tolist()[0] == pytest.approx([0.11, 0.12, 0.20, 0.21], abs=1e-6)
    expected = [0.38702692375, 0.45500225, 0.57895, 0.69]
    assert targets.advantages.tolist()[0] == pytest.approx(expected, abs=1e-6)
    assert targets.returns.tolist()[0] == pytest.approx([a + v for a, v in zip(expected, [0.11, 0.12, 0.2, 0.21])])


def test_rloo_over_the_episodes_of_one_seed_through_ppo_env_targets(tok):
    """Critic-free: two episodes of one seed with returns 0.8 and -0.2 (no KL): RLOO's advantage is each
    one's return minus the other's, on every action token; no V head runs."""
    ac = ActorCritic(make_model(tok), TrunkConfig("lora"))
    a = two_turns(tok)
    b = encode_episode(tok, ["go", "up"], [action_ids(tok, "5"), action_ids(tok, "7")], [-0.1, -0.1], True)
    cfg = PPOConfig(advantage="rloo", responses_per_prompt=2, chat=False)
    targets = make_env_targets(ac, episode_batch(tok, a, b), torch.zeros(2, 4), kl_coef=0.0, cfg=cfg)
    assert targets.advantages.tolist() == [pytest.approx([1.0] * 4), pytest.approx([-1.0] * 4)]
    assert not targets.old_values.any() and not targets.returns.any()


def test_kl_penalised_step_rewards_by_hand():
    rewards = torch.tensor([[0.0, -0.1, 0.0, 0.9, 0.0]])
    logprobs, ref = torch.tensor([[0.5, 0.0, -1.0, 2.0, 7.0]]), torch.zeros(1, 5)
    out = kl_penalised_step_rewards(rewards, logprobs, ref, torch.tensor([[1.0, 1, 1, 1, 0]]), 0.1)
    assert out.tolist()[0] == pytest.approx([-0.05, -0.1, 0.1, 0.7, 0.0])


# ---------------------------------------------------------------- no loss reads an environment token


def readable(e) -> set[int]:
    """The positions a learner may read in episode ``e``: each action token's state, the sequence's
    last position (s_{T+1}) and 0 (where padded steps point)."""
    return {p - 1 for p, m in enumerate(e.action_mask) if m} | {len(e.token_ids) - 1, 0}


def poisoned_episodes(tok):
    a, b = two_turns(tok), two_turns(tok, terminated=False)
    return [a, b], [readable(a), readable(b)]


def assert_finite_loss_and_grads(loss, params):
    assert torch.isfinite(loss), loss
    loss.backward()
    for p in params:
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize(
    "learner",
    ["ilql", "ilql-lora-awac", "value-mc", "value-td_lambda-q-next_v"],
)
def test_no_offline_loss_reads_an_environment_token(tok, learner):
    episodes, allowed = poisoned_episodes(tok)
    mode = "lora" if "lora" in learner else "frozen"
    qv = QVModel.from_trunk(make_model(tok), TrunkConfig(mode), with_q=learner != "value-mc").train()
    position_hidden(qv.trunk, allowed)
    batch = episode_batch(tok, *episodes).token_batch()
    if learner.startswith("ilql"):
        loss, stats = ilql_loss(qv, batch, ILQLConfig(cql_scale=0.1, awac_scale=1.0))
        assert ("losses/awac" in stats) == (mode == "lora")
    else:
        target, _, q_target = (learner.split("-") + ["", ""])[1:4]
        cfg = ValueConfig(target=target, q_target=q_target or "return")
        loss, stats = value_loss(qv, batch, cfg)
    assert all(torch.isfinite(v) for v in stats.values())
    assert_finite_loss_and_grads(loss, qv.parameters())
    # the control: reading V(s_{t+1}) one past each state (the single-turn rule) touches the agent's
    # <eos> before the environment's reply, a position no learner may read: the loss is NaN
    qv.clear_cache()
    batch = single_turn_reading(batch)
    wrong = ilql_loss(qv, batch, ILQLConfig())[0] if learner.startswith("ilql") else value_loss(qv, batch, cfg)[0]
    assert torch.isnan(wrong)


@pytest.mark.parametrize("kl_mode,critic", [("reward", "shared"), ("loss", "separate")])
def test_no_ppo_loss_or_kl_reads_an_environment_token(tok, kl_mode, critic):
    episodes, allowed = poisoned_episodes(tok)
    ac = ActorCritic(make_model(tok), TrunkConfig("lora"), critic=critic)
    for trunk in (ac.policy, ac.critic_trunk) if critic == "separate" else (ac.policy,):
        position_hidden(trunk, allowed)
    batch = episode_batch(tok, *episodes)
    cfg = PPOConfig(kl_mode=kl_mode, ent_coef=0.01, chat=False)
    old = torch.randn(batch.actions.shape) * batch.response_mask
    targets = make_env_targets(ac, batch, old, kl_coef=0.1, cfg=cfg)
    for name in ("ref_logprobs", "old_values", "advantages", "returns", "kl"):
        assert torch.isfinite(getattr(targets, name)).all(), name
    loss, stats = ppo_loss(ac, targets, cfg, kl_coef=0.1, critic_only=False)
    assert ("losses/k3" in stats) == (kl_mode == "loss")
    assert_finite_loss_and_grads(loss, ac.parameters())


# ---------------------------------------------------------------- offline training on episode files


def scripted_episodes(tok, n=6, env="GuessTheNumber-v0"):
    return run_scripted(env, range(n), "noisy", 0.5, tokenizer=tok)


def ilql_run(tok, episodes, cfg, run_dir, resume=False, callbacks=(), seed=0):
    torch.manual_seed(seed)
    qv = QVModel.from_trunk(make_model(tok), TrunkConfig("frozen"))
    train_ilql(qv, tok, episodes, cfg, run_dir=run_dir, resume=resume, callbacks=callbacks)
    return qv


def test_ilql_on_episodes_resumes_bit_for_bit(tok, tmp_path):
    episodes = scripted_episodes(tok)
    cfg = ILQLConfig(steps=6, batch_size=4, max_length=512, checkpoint_every=2, gamma=0.95, progress=False)
    full = ilql_run(tok, episodes, cfg, tmp_path / "full")

    class Kill(Exception):
        pass

    def kill(step, floats):
        if step == 2:  # step 3 ran, its checkpoint (at 4) not yet written: resume at 2
            raise Kill

    with pytest.raises(Kill):
        ilql_run(tok, episodes, cfg, tmp_path / "cut", callbacks=[kill])
    resumed = ilql_run(tok, episodes, cfg, tmp_path / "cut", resume=True, seed=7)
    for (k, a), b in zip(full.heads.state_dict().items(), resumed.heads.state_dict().values()):
        assert torch.equal(a, b), k
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()
    info = json.loads((tmp_path / "full" / "training.json").read_text())
    assert info["episodes"] == 6
    # other episodes (one reward changed) are other data
    other = scripted_episodes(tok)
    other[0].turns[0].reward += 1.0
    with pytest.raises(QVLMError, match="other data"):
        ilql_run(tok, other, cfg, tmp_path / "cut", resume=True)


def test_monte_carlo_values_learn_the_returns_of_episodes(tok):
    """The scripted maze player's return-to-go is a function of the conversation so far (the start is
    shown), so V can fit it: the loss falls by two orders of magnitude."""
    episodes = run_scripted("Maze-v0", range(8), "scripted", tokenizer=tok)
    qv = QVModel.from_trunk(make_model(tok), TrunkConfig("frozen"), with_q=False)
    cfg = ValueConfig(target="mc", epochs=60, lr=1e-2, batch_size=8, max_length=1024, progress=False)
    losses = [v for _, v in train_value(qv, tok, episodes, cfg)["losses/v"]]
    assert losses[-1] < 0.02 * losses[0], losses


def test_episode_data_errors_are_one_line(tok):
    episodes = scripted_episodes(tok, n=2)
    qv = QVModel.from_trunk(make_model(tok), TrunkConfig("frozen"))
    with pytest.raises(QVLMError, match=r"episode 1: the episode has \d+ tokens, over --max-length 64"):
        train_ilql(qv, tok, episodes, ILQLConfig(max_length=64, progress=False))
    with pytest.raises(QVLMError, match="mixes samples and episodes"):
        train_ilql(qv, tok, [Sample("ab", "cd", 1.0)] + episodes, ILQLConfig(max_length=512, progress=False))
    episodes[0].token_ids[3] = 10_000
    with pytest.raises(QVLMError, match="token id 10000 is outside this model's vocabulary"):
        train_ilql(qv, tok, episodes, ILQLConfig(max_length=512, progress=False))


def test_cli_trains_ilql_and_value_on_an_episode_file(tmp_path, capsys):
    from qvlm.loading import save_model

    tok = make_tok()
    save_model(make_model(tok), tok, tmp_path / "m")
    data = tmp_path / "eps.jsonl"
    assert main(["sample", "--env", "GuessTheNumber-v0", "--policy", "noisy", "--episodes", "4",
                 "--model", str(tmp_path / "m"), "--out", str(data)]) == 0  # fmt: skip
    common = ["--model", str(tmp_path / "m"), "--episodes", str(data), "--max-length", "512", "--steps", "2"]
    assert main(["train", "ilql", *common, "--out", str(tmp_path / "ilql"), "--checkpoint-every", "1"]) == 0
    assert "trained ilql on 4 episodes" in capsys.readouterr().out
    assert main(["train", "value", *common, "--with-q", "--out", str(tmp_path / "mc")]) == 0
    assert (tmp_path / "mc" / "heads.safetensors").is_file()
    # V per turn of an episode under the trained heads
    assert main(["inspect", "--model", str(tmp_path / "m"), "--heads", str(tmp_path / "ilql"),
                 "--episodes", str(data), "--episode", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    episode = read_episodes(data)[1]
    assert f"seed {episode.seed}" in out and out.count("\n  turn ") == len(episode.turns)
    # --data and --episodes together, or an episode file that is not one: one line each
    with pytest.raises(SystemExit):
        main(["train", "ilql", *common, "--data", str(data), "--out", str(tmp_path / "x")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"env": "qvlm/Maze-v0", "turns": []}\n')
    assert main(["train", "ilql", "--model", str(tmp_path / "m"), "--episodes", str(bad),
                 "--out", str(tmp_path / "y")]) == 2  # fmt: skip
    assert 'bad.jsonl:1: field "turns" is empty' in capsys.readouterr().err


# ---------------------------------------------------------------- value-guided decoding inside the environment loop


def test_guidance_with_heads_trained_on_episodes_plays_in_the_environment(tok, tmp_path):
    from qvlm.configs import DecodeConfig

    episodes = scripted_episodes(tok, n=4)
    ilql_run(tok, episodes, ILQLConfig(steps=2, batch_size=4, max_length=512, progress=False), tmp_path)
    model = make_model(tok)
    qv = load_qv_model(model, tmp_path)
    seeds = [100, 101]
    cfg = DecodeConfig(max_new_tokens=4, chat=True)
    base = run_lm(model, tok, "GuessTheNumber-v0", seeds, cfg)
    same = run_lm(model, tok, "GuessTheNumber-v0", seeds, cfg, heads=qv.heads)  # beta 0: the base model
    assert [e.token_ids for e in same] == [e.token_ids for e in base]
    # the trained heads' Q with a large bonus on "7": every turn's first token becomes "7"
    seven = tok.convert_tokens_to_ids("7")
    with torch.no_grad():
        for head in qv.heads.q_heads:
            head.net[2].bias[seven] += 100.0
    guided = run_lm(model, tok, "GuessTheNumber-v0", seeds, DecodeConfig(max_new_tokens=4, chat=True, beta=1.0),
                    heads=qv.heads)  # fmt: skip
    for e in guided:
        starts = [e.token_ids[p] for p, m in enumerate(e.action_mask) if m and not e.action_mask[p - 1]]
        assert starts == [seven] * len(e.turns)


def test_turn_level_guidance_keeps_the_reply_with_the_highest_q(tok):
    """Q heads that pay 100 for ending a turn (EOS) and nothing else: of K replies of at most 3 tokens,
    the one kept ends its turn whenever any candidate did. The random tiny model writes EOS about once in
    45 tokens, so 1 candidate ends few turns and 8 end many; the kept reply is always one of the
    candidates the base model sampled (its tokens are the base model's: no token-level change)."""
    from qvlm.configs import DecodeConfig

    model = make_model(tok)
    qv = QVModel.from_trunk(model, TrunkConfig("frozen"))
    with torch.no_grad():
        for head in qv.heads.q_heads:
            head.net[2].bias[tok.eos_token_id] = 100.0
    cfg = DecodeConfig(max_new_tokens=3, chat=True)
    seeds = list(range(6))

    def ended(episodes):
        return sum(e.token_ids[end - 1] == tok.eos_token_id for e in episodes for _, end in action_spans(e.action_mask))

    one = run_lm(model, tok, "GuessTheNumber-v0", seeds, cfg, heads=qv.heads, candidates=1)
    eight = run_lm(model, tok, "GuessTheNumber-v0", seeds, cfg, heads=qv.heads, candidates=8)
    assert ended(one) <= 6 and ended(eight) >= 3 * max(ended(one), 4), (ended(one), ended(eight))
    with pytest.raises(QVLMError, match="pass heads with Q heads"):
        run_lm(model, tok, "GuessTheNumber-v0", seeds, cfg, candidates=2)


def test_cli_samples_guided_episodes(tmp_path, capsys):
    from qvlm.loading import save_model

    tok = make_tok()
    save_model(make_model(tok), tok, tmp_path / "m")
    data = tmp_path / "eps.jsonl"
    model = ["--model", str(tmp_path / "m")]
    assert main(["sample", "--env", "GuessTheNumber-v0", "--policy", "noisy", "--episodes", "4", *model,
                 "--out", str(data)]) == 0  # fmt: skip
    assert main(["train", "ilql", *model, "--episodes", str(data), "--max-length", "512", "--steps", "1",
                 "--out", str(tmp_path / "ilql")]) == 0  # fmt: skip
    sample = ["sample", "--env", "GuessTheNumber-v0", "--episodes", "2", "--max-new-tokens", "3", *model]
    capsys.readouterr()
    assert main([*sample, "--heads", str(tmp_path / "ilql"), "--beta", "2", "--candidates", "2",
                 "--out", str(tmp_path / "g.jsonl")]) == 0  # fmt: skip
    assert "(guided(beta=2, candidates=2))" in capsys.readouterr().out
    assert [e.policy for e in read_episodes(tmp_path / "g.jsonl")] == ["guided(beta=2, candidates=2)"] * 2
    assert main([*sample, "--beta", "2", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "pass --heads DIR" in capsys.readouterr().err
    assert (
        main([*sample, "--heads", str(tmp_path / "ilql"), "--policy", "noisy", "--out", str(tmp_path / "x.jsonl")]) == 2
    )
    assert "drop --policy noisy" in capsys.readouterr().err


def test_v_per_turn_reads_each_turns_state(tok):
    qv = qv_on_positions(tok)
    e = two_turns(tok)
    from qvlm.envs.episodes import Episode, Turn

    episode = Episode("qvlm/GuessTheNumber-v0", 3, [Turn("go", "5", -0.1), Turn("up", "7", 0.9)], "", True, False,
                      token_ids=e.token_ids, action_mask=e.action_mask)  # fmt: skip
    rows = episode_turn_values(qv, tok, episode, gamma=0.9)
    # V before each turn's first action token (positions 11 and 20); Q - V of the turn's tokens
    assert [r["value"] for r in rows] == pytest.approx([0.11, 0.20])
    assert [r["return_to_go"] for r in rows] == pytest.approx([0.5661, 0.81])
    assert [r["reward"] for r in rows] == [-0.1, 0.9]


# ---------------------------------------------------------------- PPO in an environment


def small_env_cfg(**overrides):
    settings = dict(iterations=3, prompts_per_iter=2, responses_per_prompt=2, max_new_tokens=4, ppo_epochs=2,
                    minibatch_size=3, lr=3e-3, critic_lr=3e-3, critic_warmup=1, kl_coef=0.1, kl_target=1.0,
                    kl_horizon=10.0, chat=True, progress=False, checkpoint_every=1, gamma=0.95)  # fmt: skip
    settings.update(overrides)
    return PPOConfig(**settings)


def build_ac(tok, seed=0):
    torch.manual_seed(seed)
    return ActorCritic(make_model(tok), TrunkConfig("lora"))


def _params(ac):
    return {**ac.trainable_trunk_state(), **{"head." + k: v for k, v in ac.heads.state_dict().items()}}


def test_iteration_seeds_never_repeat():
    assert iteration_seeds(10, 3, 0) == [10, 11, 12] and iteration_seeds(10, 3, 2) == [16, 17, 18]


def test_ppo_in_an_environment_resumes_bit_for_bit(tok, tmp_path):
    cfg = small_env_cfg()
    env = ("GuessTheNumber-v0", {"max_turns": 3})
    ac = build_ac(tok)
    full = train_ppo_env(ac, tok, env[0], cfg, env[1], run_dir=tmp_path / "a")
    expected = _params(ac)
    assert [len(full[k]) for k in ("charts/return", "losses/value", "losses/policy")] == [3, 3, 2]  # warm-up: critic

    class Kill(Exception):
        pass

    def kill(it, floats):
        if it == 1:
            raise Kill

    with pytest.raises(Kill):
        train_ppo_env(build_ac(tok), tok, env[0], cfg, env[1], run_dir=tmp_path / "b", callbacks=[kill])
    torch.manual_seed(12345)
    ac3 = build_ac(tok, seed=99)
    resumed = train_ppo_env(ac3, tok, env[0], cfg, env[1], run_dir=tmp_path / "b", resume=True)
    got = _params(ac3)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    for key in ("charts/return", "charts/kl", "losses/value", "losses/policy"):
        assert full[key] == resumed[key], key
    info = json.loads((tmp_path / "a" / "training.json").read_text())
    assert info["train_seeds"] == [0, 5] and info["env"] == "qvlm/GuessTheNumber-v0"
    # another environment is other data
    with pytest.raises(QVLMError, match="other data"):
        train_ppo_env(build_ac(tok), tok, "Maze-v0", cfg, run_dir=tmp_path / "b", resume=True)


def test_ppo_in_an_environment_learns_to_write_a_valid_guess(tok):
    """Guess-the-number with n = 3, one turn and one token: the random tiny model writes one of the
    digits 1-3 about 3 times in 45 (an invalid reply costs 0.2, a valid one -0.1 and wins 1 a third of
    the time). PPO (full trunk) drives the rate of invalid replies from about 0.9 to near 0."""
    torch.manual_seed(0)
    ac = ActorCritic(make_model(tok), TrunkConfig("full"))
    cfg = small_env_cfg(iterations=15, prompts_per_iter=8, minibatch_size=8, lr=1e-2, critic_warmup=0, kl_coef=0.0,
                        kl_target=0.0, max_new_tokens=1, checkpoint_every=0, ppo_epochs=4)  # fmt: skip
    history = train_ppo_env(ac, tok, "GuessTheNumber-v0", cfg, {"n": 3, "max_turns": 1})
    invalid = [v for _, v in history["charts/invalid_actions"]]
    assert sum(invalid[:3]) / 3 > 0.7 and sum(invalid[-3:]) / 3 < 0.2, invalid
    returns = [v for _, v in history["charts/return"]]
    assert sum(returns[-5:]) / 5 > sum(returns[:5]) / 5 + 0.1, returns


@pytest.mark.parametrize("advantage", ["grpo", "gae-fast"])
def test_ppo_in_an_environment_with_grpo_or_fast_rollouts(tok, advantage):
    """--advantage grpo groups the episodes of one seed; --fast rollouts sample the standard path's tokens."""
    cfg = small_env_cfg(iterations=2, critic_warmup=0, checkpoint_every=0)
    if advantage == "grpo":
        history = train_ppo_env(build_ac(tok), tok, "GuessTheNumber-v0", dataclasses.replace(cfg, advantage="grpo"),
                                {"max_turns": 2})  # fmt: skip
        assert "losses/value" not in history and len(history["losses/policy"]) == 2
        return
    from qvlm.algos.ppo_env import rollout_episodes
    from qvlm.configs import DecodeConfig

    ac = build_ac(tok)
    plain, fast = (
        rollout_episodes(ac, tok, "GuessTheNumber-v0", [3, 4], DecodeConfig(max_new_tokens=4, fast=f), cfg)
        for f in (False, True)
    )
    assert [e.token_ids for e in plain[0]] == [e.token_ids for e in fast[0]]
    assert torch.allclose(plain[2], fast[2], atol=1e-4)


def test_cli_ppo_env_and_its_errors(tmp_path, capsys):
    from qvlm.loading import save_model

    tok = make_tok()
    save_model(make_model(tok), tok, tmp_path / "m")
    args = ["train", "ppo", "--model", str(tmp_path / "m"), "--env", "GuessTheNumber-v0", "--env-arg", "max_turns=2",
            "--iterations", "1", "--prompts-per-iter", "2", "--responses-per-prompt", "1", "--max-new-tokens", "3",
            "--minibatch-size", "2"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert "trained ppo for 1 iterations in GuessTheNumber-v0 (seeds 0 to 1)" in capsys.readouterr().out
    assert (tmp_path / "run" / "adapter").is_dir()
    assert main([*args, "--reward", "vader", "--out", str(tmp_path / "x")]) == 2
    assert "drop --prompts and --reward" in capsys.readouterr().err
    assert main([*args[:4], "--out", str(tmp_path / "x")]) == 2
    assert "give --prompts FILE and --reward NAME (single-turn), or --env NAME" in capsys.readouterr().err
    args[5] = "Nope-v0"
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    assert "unknown environment 'Nope-v0'" in capsys.readouterr().err


def test_episodes_written_and_read_keep_what_learners_need(tok, tmp_path):
    episodes = scripted_episodes(tok, n=3, env="Maze-v0")
    write_episodes(tmp_path / "e.jsonl", episodes)
    back = read_episodes(tmp_path / "e.jsonl")
    assert [e.tokens() for e in back] == [e.tokens() for e in episodes]


# ---------------------------------------------------------------- the benchmark's protocol, smoke setting


def test_env_learners_benchmark_smoke(tmp_path, capsys, monkeypatch):
    """benchmarks/env_learners.py --smoke on one task: every method scored on the same held-out seeds
    (never trained on), the JSON and the table written, V per turn of one episode reported."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "env_learners.py"
    spec = importlib.util.spec_from_file_location("env_learners", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "env_learners", bench)  # its dataclass looks itself up there
    spec.loader.exec_module(bench)
    out = tmp_path / "smoke.json"
    result = bench.main(["--smoke", "--tasks", "guess", "--json", str(out)])
    assert json.loads(out.read_text())["tasks"]["guess"]["aggregate"].keys() == set(bench.METHODS)
    task = result["tasks"]["guess"]
    assert (task["optimal_return"], task["random_return"]) == pytest.approx((0.63, -0.264908109375))
    run = task["per_seed"][0]
    assert all(len(m["returns"]) == 4 for m in run["methods"].values())
    assert run["data"]["episodes"] == 4 + 12 and len(run["methods"]["ppo"]["train_returns"]) == 2
    guided = run["methods"]["guidance"]  # by the heads that did better on validation
    assert guided["validation"].keys() == {"ilql", "mc"} and guided["heads"] == max(
        guided["validation"], key=guided["validation"].get
    )
    assert len(run["report"]["turns"]) >= 1
    # training and validation seeds lie below the held-out ones
    seeds = [bench.train_seeds(0, role, 1000)[-1] for role in bench.ROLE]
    assert max(seeds) < 100_000_000 <= bench.eval_seeds(1)[0]
    printed = capsys.readouterr().out
    assert "| ilql (beta 1) |" in printed and "V before" in printed and " heads) |" in printed


def test_env_learners_merge_combines_seeds_run_apart(tmp_path, monkeypatch):
    """--merge: runs of one protocol with different --seeds become one table (means over all seeds,
    CIs over the pooled episodes); a protocol difference or a repeated seed is an error."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "env_learners.py"
    spec = importlib.util.spec_from_file_location("env_learners", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "env_learners", bench)
    spec.loader.exec_module(bench)

    def run(seed, returns, **protocol):
        row = {"returns": returns, "optimal_return": 1.0, "random_return": 0.0, "invalid_rate": 0.5}
        row["normalised"] = 100.0 * sum(returns) / len(returns)
        task = {"env": "GuessTheNumber-v0", "optimal_return": 1.0, "random_return": 0.0}
        task["per_seed"] = [{"seed": seed, "methods": {"base": row}}]
        return {
            "protocol": {"seeds": str(seed), "eval_episodes": 2, **protocol},
            "tasks": {"guess": task},
            "seconds": 5.0,
        }

    files = []
    for seed, returns in ((0, [0.0, 1.0]), (1, [1.0, 1.0])):
        files.append(tmp_path / f"s{seed}.json")
        files[-1].write_text(json.dumps(run(seed, returns)))
    out = tmp_path / "all.json"
    result = bench.main(["--merge", *map(str, files), "--json", str(out)])
    base = json.loads(out.read_text())["tasks"]["guess"]["aggregate"]["base"]
    assert result["protocol"]["seeds"] == "0,1" and result["seconds"] == 10.0
    assert base["normalised_per_seed"] == [50.0, 100.0] and base["normalised_mean_over_seeds"] == 75.0
    assert base["episodes"] == 4 and base["mean_return"] == pytest.approx(0.75)
    with pytest.raises(SystemExit, match="seed"):
        bench.merge([run(0, [1.0]), run(0, [0.0])])
    with pytest.raises(SystemExit, match="eval_episodes"):
        bench.merge([run(0, [1.0]), run(1, [0.0], eval_episodes=3)])
    (tmp_path / "bad.json").write_text("{not json")
    for bad in (tmp_path / "missing.json", tmp_path / "bad.json"):
        with pytest.raises(SystemExit, match=f"--merge {bad}: not a readable JSON result file"):
            bench.main(["--merge", str(files[0]), str(bad), "--json", str(out)])
    assert json.loads(out.read_text())["protocol"]["seeds"] == "0,1"  # the earlier output is untouched


def test_env_unseen_q_smoke(tmp_path, monkeypatch):
    """benchmarks/env_unseen_q.py --smoke: MC heads trained as env_learners.py trains them, first-turn
    candidates with their Q and validity, the summary counted from the rows."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "env_unseen_q.py"
    spec = importlib.util.spec_from_file_location("env_unseen_q", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setitem(sys.modules, "env_learners", None)  # the script replaces it; restored after the test
    out = script.main(["--smoke", "--episodes", "2", "--candidates", "3", "--json", str(tmp_path / "q.json")])
    rows, summary = out["rows"], out["summary"]
    assert len(rows) == 6 and summary["candidates"] == 6
    assert summary["q_exactly_zero"] == sum(r["q"] == 0.0 for r in rows)
    assert summary["valid_q"] == sorted((r["q"] for r in rows if r["valid"]), reverse=True)
    assert json.loads((tmp_path / "q.json").read_text())["summary"] == summary
