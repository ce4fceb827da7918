"""The token-level adapter of multi-turn episodes (issue 24, DESIGN.md "multi-turn episodes"): masks,
reward positions and next-state indices by hand on a 2-turn example, returns and GAE across the turn
boundary, the episodes JSONL, rollouts with a tiny model, `qvlm sample --env`, and the scores."""

import json

import pytest
import torch

from qvlm.cli import main
from qvlm.configs import DecodeConfig
from qvlm.envs.episodes import Episode, Turn, read_episodes, write_episodes
from qvlm.envs.guess import guess_optimal_return, guess_random_return
from qvlm.envs.rollout import run_lm, run_scripted
from qvlm.envs.scores import estimate_random_return, normalised_score, score_summary
from qvlm.envs.tokens import (
    action_ids,
    action_spans,
    build_tokens,
    collate_episodes,
    encode_episode,
    next_state_positions,
    observation_ids,
    state_positions,
)
from qvlm.errors import QVLMError
from qvlm.mdp import Sample, encode_prompt, encode_samples
from qvlm.returns import gae, monte_carlo_returns
from tests.conftest import requires_smollm2
from tests.helpers import char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# a role letter and a colon per message, <eos> closing each; like SmolLM2's, a default system
# message when the conversation has none
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}s:hi<eos>{% endif %}"
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


@pytest.fixture
def tok():
    t = char_tokenizer(" abcdefghijklmnopqrstuvwxyz0123456789:")
    t.chat_template = TEMPLATE
    return t


def two_turns(tok, terminated=True):
    """o0 "go", a1 "5", o1 "up", a2 "7" (and o2 "no" when truncated); rewards -0.1 then 0.9."""
    observations = ["go", "up"] + ([] if terminated else ["no"])
    actions = [action_ids(tok, "5"), action_ids(tok, "7")]
    return encode_episode(tok, observations, actions, [-0.1, 0.9], terminated)


def test_two_turn_episode_by_hand(tok):
    e = two_turns(tok)
    # seg0 "s:hi<eos>u:go<eos>a:" (12 tokens: 0-11), a1 "5<eos>" (12-13), seg1 "u:up<eos>a:" (14-20:
    # the <eos> closing a1 is the agent's own, the system message is not repeated), a2 "7<eos>" (21-22)
    assert tok.convert_ids_to_tokens(e.token_ids) == (
        ["s", ":", "h", "i", "<eos>", "u", ":", "g", "o", "<eos>", "a", ":", "5", "<eos>"]
        + ["u", ":", "u", "p", "<eos>", "a", ":", "7", "<eos>"]
    )
    assert e.action_mask == [0] * 12 + [1, 1] + [0] * 7 + [1, 1]
    assert [(i, r) for i, r in enumerate(e.token_rewards) if r] == [(13, -0.1), (22, 0.9)]
    assert [i for i, d in enumerate(e.done) if d] == [22] and not e.truncated
    # V(s_t) before each action token; V(s_{t+1}) right before the next one: across the turn
    # boundary that is the last token of the environment's reply (20), not the token after a1 (14)
    assert state_positions(e.action_mask) == [11, 12, 20, 21]
    assert next_state_positions(e.action_mask) == [12, 20, 21, 22]
    assert action_spans(e.action_mask) == [(12, 14), (21, 23)]


def test_per_turn_segments_equal_the_template_of_the_whole_conversation(tok):
    e = two_turns(tok)
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "up"},
        {"role": "assistant", "content": "7"},
    ]
    whole = tok.apply_chat_template(messages, tokenize=False)
    assert tok(whole, add_special_tokens=False)["input_ids"] == e.token_ids


def test_truncated_episode_keeps_the_state_it_bootstraps_from(tok):
    e = two_turns(tok, terminated=False)
    assert len(e.token_ids) == 30 and e.action_mask[23:] == [0] * 7  # seg2 "u:no<eos>a:" at 23-29
    assert e.truncated and not any(e.done)
    assert next_state_positions(e.action_mask) == [12, 20, 21, 29]


def test_plain_fallback_without_a_chat_template():
    tok = char_tokenizer(" abcdefghijklmnopqrstuvwxyz0123456789:\n")
    assert observation_ids(tok, ["go"]) == encode_prompt(tok, "go", chat=False)  # <bos> g o
    assert tok.convert_ids_to_tokens(observation_ids(tok, ["go", "up"])) == ["\n", "u", "p", "\n"]
    e = encode_episode(tok, ["go", "up"], [action_ids(tok, "5"), action_ids(tok, "7")], [0.0, 1.0], True)
    assert e.action_mask == [0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1]


def test_build_tokens_by_hand_and_its_checks():
    e = build_tokens([[5, 6], [7]], [[1], [2, 3]], [-0.1, 1.0], terminated=True)
    assert (e.token_ids, e.action_mask) == ([5, 6, 1, 7, 2, 3], [0, 0, 1, 0, 1, 1])
    assert (e.token_rewards, e.done) == ([0, 0, -0.1, 0, 0, 1.0], [0, 0, 0, 0, 0, 1])
    for args, needle in (
        (([[5]], [[1], []], [0, 0], True), "needs 2 or 3"),
        (([[5], [6]], [[1], []], [0, 0], True), "action 2 has no tokens"),
        (([[]], [[1]], [0], True), "first observation has no tokens"),
        (([[5]], [], [], True), "at least one action"),
    ):
        with pytest.raises(QVLMError, match=needle):
            build_tokens(*args)
    assert next_state_positions([0, 0, 1, 1, 0, 0, 1]) == [2, 5, 6]
    with pytest.raises(QVLMError, match="first token is an action"):
        state_positions([1, 0])


def _values(e, at):
    """V over the sequence: the given values at the given positions, 0 elsewhere."""
    v = torch.zeros(len(e.token_ids))
    for pos, value in at.items():
        v[pos] = value
    return v


def test_returns_and_gae_across_the_turn_boundary(tok):
    """The 2-turn example, gamma 0.9 per action token, lambda 0.95. Steps are the 4 action tokens
    (5, <eos>, 7, <eos>) with rewards (0, -0.1, 0, 0.9), done (0, 0, 0, 1).

    MC: G4 = 0.9, G3 = 0.9 * 0.9 = 0.81, G2 = -0.1 + 0.9 * 0.81 = 0.629, G1 = 0.9 * 0.629 = 0.5661.
    V(s_1..s_4) = (0.5, 0.4, 0.6, 0.8) read at positions (11, 12, 20, 21); V(s_2) for step 1 is read
    at 12, V(s_3) for step 2 at 20 (across the boundary). TD errors: d1 = 0.9*0.4 - 0.5 = -0.14,
    d2 = -0.1 + 0.9*0.6 - 0.4 = 0.04, d3 = 0.9*0.8 - 0.6 = 0.12, d4 = 0.9 - 0.8 = 0.1 (done: no
    bootstrap, whatever V at 22 says). GAE, gamma lambda = 0.855: A4 = 0.1, A3 = 0.12 + 0.0855 =
    0.2055, A2 = 0.04 + 0.855 * 0.2055 = 0.2157025, A1 = -0.14 + 0.855 * 0.2157025 = 0.0444256375.
    """
    e = two_turns(tok)
    batch = collate_episodes([e], pad_token_id=0)
    assert batch.rewards.tolist() == [[0.0, pytest.approx(-0.1), 0.0, pytest.approx(0.9)]]
    assert batch.done.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    v = _values(e, {11: 0.5, 12: 0.4, 20: 0.6, 21: 0.8, 22: 123.0})
    values, next_values = v[batch.state_positions], v[batch.next_state_positions]  # (1, 4)
    assert next_values.tolist() == [pytest.approx([0.4, 0.6, 0.8, 123.0], abs=1e-6)]
    mc = monte_carlo_returns(batch.rewards, batch.done, 0.9, batch.response_mask)
    assert mc.tolist() == [pytest.approx([0.5661, 0.629, 0.81, 0.9], abs=1e-6)]
    adv, ret = gae(batch.rewards, values, next_values, batch.done, 0.9, 0.95, batch.response_mask)
    assert adv.tolist() == [pytest.approx([0.0444256375, 0.2157025, 0.2055, 0.1], abs=1e-6)]
    assert ret.tolist() == [pytest.approx([0.5444256375, 0.6157025, 0.8055, 0.9], abs=1e-6)]


def test_returns_and_gae_of_a_truncated_episode_bootstrap_from_the_last_state(tok):
    """Truncated after a2 with V(s_5) = 0.5 read at 29, the last token of the reply "no":
    MC G4 = 0.9 + 0.9 * 0.5 = 1.35, G3 = 1.215, G2 = -0.1 + 0.9 * 1.215 = 0.9935, G1 = 0.89415;
    d4 = 0.9 + 0.45 - 0.8 = 0.55, A3 = 0.12 + 0.855 * 0.55 = 0.59025, A2 = 0.04 + 0.855 * 0.59025 =
    0.54466375, A1 = -0.14 + 0.855 * 0.54466375 = 0.32568750625."""
    e = two_turns(tok, terminated=False)
    batch = collate_episodes([e], pad_token_id=0)
    assert batch.truncated.tolist() == [True] and batch.next_state_positions.tolist() == [[12, 20, 21, 29]]
    v = _values(e, {11: 0.5, 12: 0.4, 20: 0.6, 21: 0.8, 29: 0.5})
    values, next_values = v[batch.state_positions], v[batch.next_state_positions]
    mc = monte_carlo_returns(batch.rewards, batch.done, 0.9, batch.response_mask, last_value=next_values[:, -1])
    assert mc.tolist() == [pytest.approx([0.89415, 0.9935, 1.215, 1.35], abs=1e-6)]
    adv, _ = gae(batch.rewards, values, next_values, batch.done, 0.9, 0.95, batch.response_mask)
    assert adv.tolist() == [pytest.approx([0.32568750625, 0.54466375, 0.59025, 0.55], abs=1e-6)]


def test_collate_pads_episodes_of_different_lengths(tok):
    long, short = two_turns(tok), build_tokens([[9, 9]], [[4]], [2.0], terminated=True)
    batch = collate_episodes([long, short], pad_token_id=0)
    assert batch.input_ids.shape == (2, 23) and batch.actions.shape == (2, 4)
    assert batch.response_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch.rewards[1].tolist() == [2.0, 0, 0, 0] and batch.done[1].tolist() == [1.0, 0, 0, 0]
    assert batch.state_positions[1].tolist() == [1, 0, 0, 0] and batch.attention_mask[1].sum() == 3


def test_single_turn_episode_is_the_single_turn_sample_layout(tok):
    response = action_ids(tok, "fine")  # the agent's tokens, EOS written
    e = encode_episode(tok, ["how are you"], [response], [0.7], terminated=True)
    (enc,) = encode_samples([Sample("how are you", "fine", 0.7, response_ids=response[:-1])], tok, max_length=64)
    assert e.token_ids == enc.prompt_ids + enc.response_ids
    assert [r for r, m in zip(e.token_rewards, e.action_mask) if m] == enc.rewards


# episodes JSONL -----------------------------------------------------------------------------------


def _episode(tok):
    e = two_turns(tok)
    turns = [Turn("go", "5", -0.1), Turn("up", "7", 0.9)]
    return Episode(
        "qvlm/GuessTheNumber-v0", 3, turns, "correct", True, False, "scripted", {}, e.token_ids, e.action_mask
    )


def test_episodes_round_trip_and_rebuild_the_token_view(tmp_path, tok):
    path = tmp_path / "ep.jsonl"
    write_episodes(path, [_episode(tok)])
    line = json.loads(path.read_text())
    assert line["return"] == pytest.approx(0.8) and line["seed"] == 3 and line["env"] == "qvlm/GuessTheNumber-v0"
    (back,) = read_episodes(path)
    assert back == _episode(tok)
    assert back.tokens() == two_turns(tok)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda d: d.pop("turns"), 'missing field "turns"'),
        (lambda d: d.update(turns=[]), '"turns" is empty'),
        (lambda d: d["turns"][1].update(reward="x"), 'turn 2: field "reward" must be a finite number'),
        (lambda d: d.update(action_mask=d["action_mask"][:-1]), "token_ids has 23 entries but action_mask has 22"),
        (lambda d: d.update(action_mask=[0] * 23), "0 runs of action tokens but the episode has 2 turns"),
        (lambda d: d.update(action_mask=[2] * 23), "list of 0s and 1s"),
        (lambda d: d.update(token_ids=[-1] * 23), "token ids"),
        (lambda d: d.update({"return": 5.0}), "rewards sum to 0.8"),
        (lambda d: d.update(terminated="yes"), 'field "terminated" must be true or false'),
        (lambda d: d.update(truncated=True), "exactly one is true"),
        (lambda d: d.pop("token_ids"), 'missing field "token_ids"'),
    ],
)
def test_episode_reader_names_file_line_and_field(tmp_path, tok, edit, needle):
    good = _episode(tok).to_json()
    bad = json.loads(json.dumps(good))
    edit(bad)
    path = tmp_path / "ep.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(QVLMError, match=f"ep.jsonl:3.*{needle}"):
        read_episodes(path)


def test_episode_reader_refuses_non_json_and_empty_files(tmp_path):
    path = tmp_path / "ep.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(QVLMError, match="ep.jsonl:1: not valid JSON"):
        read_episodes(path)
    path.write_text("\n")
    with pytest.raises(QVLMError, match="no episodes"):
        read_episodes(path)
    with pytest.raises(QVLMError, match="no such file"):
        read_episodes(tmp_path / "missing.jsonl")


# rollouts -----------------------------------------------------------------------------------------

SHORT_MAZE = {"layout": "..G", "max_turns": 3}


def test_scripted_rollout_tokenises_each_action_as_the_agent_would_write_it(tok):
    (e,) = run_scripted("Maze-v0", [0], tokenizer=tok, env_kwargs=SHORT_MAZE)
    spans = action_spans(e.action_mask)
    assert len(spans) == len(e.turns) and e.terminated
    for (start, end), turn in zip(spans, e.turns):
        assert e.token_ids[start:end] == action_ids(tok, turn.action)  # text, then <eos>
    assert e.env == "qvlm/Maze-v0" and e.env_kwargs == SHORT_MAZE
    assert e.total_return == pytest.approx(1 - 0.05 * len(e.turns))  # a shortest path


def test_lm_rollout_keeps_the_exact_tokens_it_sampled(tiny):
    model, tok = tiny
    cfg = DecodeConfig(max_new_tokens=5, do_sample=False)
    episodes = run_lm(model, tok, "Maze-v0", [0, 1], cfg, env_kwargs=SHORT_MAZE)
    for e in episodes:
        assert len(e.turns) >= 1 and len(action_spans(e.action_mask)) == len(e.turns)
        ids = torch.tensor([e.token_ids])
        with torch.no_grad():
            greedy = model(ids).logits[0].argmax(-1)  # (L,): the token each position predicts
        # greedy decoding: every action token is the argmax given the stored sequence before it, so
        # the sequence is exactly what the model saw while it played (observations included)
        for p in state_positions(e.action_mask):
            assert greedy[p].item() == e.token_ids[p + 1]
        for (start, end), turn in zip(action_spans(e.action_mask), e.turns):
            part = e.token_ids[start:end]
            assert tok.decode([t for t in part if t != tok.eos_token_id], skip_special_tokens=True) == turn.action


def test_lm_rollout_episodes_do_not_depend_on_their_batch(tiny):
    model, tok = tiny
    cfg = DecodeConfig(max_new_tokens=4, seed=0)
    together = run_lm(model, tok, "Maze-v0", [0, 1, 2], cfg, env_kwargs=SHORT_MAZE, sample_seed=7)
    alone = run_lm(model, tok, "Maze-v0", [1], cfg, env_kwargs=SHORT_MAZE, sample_seed=7)
    assert together[1] == alone[0]
    other = run_lm(model, tok, "Maze-v0", [1], cfg, env_kwargs=SHORT_MAZE, sample_seed=8)
    assert other[0].token_ids != alone[0].token_ids


def test_lm_rollout_cuts_a_conversation_that_outgrows_the_context(tiny):
    model, tok = tiny  # a context of 256 tokens; the maze prompt alone is about 130
    (e,) = run_lm(model, tok, "Maze-v0", [0], DecodeConfig(max_new_tokens=40, seed=0), env_kwargs={"max_turns": 20})
    assert e.truncated and not e.terminated and 1 <= len(e.turns) < 20
    assert len(e.token_ids) + 40 > 256  # no room for another response


# qvlm sample --env --------------------------------------------------------------------------------


def test_cli_sample_env_scripted_and_base(tmp_path, tiny_dir, capsys):
    out = tmp_path / "ep.jsonl"
    args = ["sample", "--model", str(tiny_dir), "--env", "Maze-v0", "--episodes", "3", "--out", str(out)]
    assert main(args + ["--policy", "noisy", "--epsilon", "0.5", "--env-seed", "10"]) == 0
    episodes = read_episodes(out)
    assert [e.seed for e in episodes] == [10, 11, 12] and {e.policy for e in episodes} == {"noisy(epsilon=0.5)"}
    printed = capsys.readouterr().out
    assert "normalised" in printed and "optimal 0.7147, random -0.4778, exact" in printed
    base = args + ["--policy", "base", "--max-new-tokens", "4", "--env-arg", "layout=..G", "--env-arg", "max_turns=2"]
    assert main(base) == 0
    episodes = read_episodes(out)
    assert all(e.policy == "base" and e.env_kwargs == {"layout": "..G", "max_turns": 2} for e in episodes)


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--env", "Chess-v0"], "unknown environment 'Chess-v0'"),
        (["--env", "Maze-v0", "--prompts", "p.txt"], "one of them"),
        ([], "one of them"),
        (["--env", "Prompts-v0", "--policy", "scripted", "--env-arg", "reward=length"], "no scripted policy"),
        (["--env", "Maze-v0", "--env-arg", "size"], "give KEY=VALUE"),
        (["--env", "Maze-v0", "--episodes", "0"], "--episodes is 0"),
    ],
)
def test_cli_sample_env_bad_input_exits_2(tmp_path, tiny_dir, capsys, extra, needle):
    code = main(["sample", "--model", str(tiny_dir), "--out", str(tmp_path / "o.jsonl")] + extra)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


# scores -------------------------------------------------------------------------------------------


def test_normalised_scores_by_hand():
    assert normalised_score(0.3, -0.2, 0.8) == pytest.approx(50.0)
    assert normalised_score(guess_optimal_return(), guess_random_return(), guess_optimal_return()) == 100.0
    s = score_summary([1.0, 2.0, 3.0], random_return=0.0, optimal_return=4.0)
    half = 4.302653 / 3**0.5  # t(0.975, 2) * std 1 / sqrt(3)
    assert s["mean_return"] == 2.0 and s["ci95"] == pytest.approx(half, rel=1e-6)
    assert s["normalised"] == 50.0 and s["normalised_ci95"] == pytest.approx(25 * half, rel=1e-6)
    assert s["random_source"] == "exact" and "normalised" not in score_summary([1.0, 2.0])
    with pytest.raises(QVLMError, match="must exceed"):
        normalised_score(0.0, 1.0, 1.0)


def test_random_return_estimate_agrees_with_the_exact_one():
    mean, half = estimate_random_return("GuessTheNumber-v0", episodes=2000, seed=0)
    assert abs(mean - guess_random_return()) < half and half < 0.05


@pytest.mark.slow
@requires_smollm2
def test_smollm2_turns_equal_its_chat_template():
    from qvlm.loading import load_model

    _, tok = load_model("smollm2-135m-instruct")
    actions = [action_ids(tok, "10"), action_ids(tok, "15")]
    e = encode_episode(tok, ["Guess a number.", "higher"], actions, [-0.1, 0.9], True)
    texts = ["Guess a number.", "10", "higher", "15"]
    messages = [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * 2, texts)]
    whole = tok.apply_chat_template(messages, tokenize=False)
    assert e.token_ids == tok(whole, add_special_tokens=False)["input_ids"][: len(e.token_ids)]
    assert tok.decode(e.token_ids).count("You are a helpful AI assistant") == 1
