"""Text environments (issue 24): dynamics and rewards by hand, exact optimal and random returns,
scripted players, registration, Gymnasium conformance, bad names and unparseable actions."""

import random
from fractions import Fraction

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import qvlm.envs as envs
from qvlm.envs.checks import check_text_env
from qvlm.envs.guess import GuessPolicy, GuessTheNumberEnv, guess_optimal_return, guess_random_return, guess_values
from qvlm.envs.maze import (
    DEFAULT_LAYOUT,
    MazeEnv,
    MazePolicy,
    bfs_distances,
    maze_optimal_return,
    maze_random_return,
    maze_values,
    parse_layout,
)
from qvlm.envs.rollout import run_episode, run_scripted
from qvlm.envs.single_turn import PromptEnv
from qvlm.envs.textarena import OFFLINE_GAMES, gym_id, textarena_available
from qvlm.errors import QVLMError

needs_textarena = pytest.mark.skipif(not textarena_available(), reason="textarena is not installed")


# guess-the-number ---------------------------------------------------------------------------------


def test_guess_dynamics_and_rewards_by_hand():
    env = GuessTheNumberEnv(n=20, max_turns=6, turn_cost=0.1, bonus=1.0, invalid_penalty=0.1)
    obs, info = env.reset(seed=0, options={"secret": 7})
    assert "1 to 20" in obs and info == {"turn": 0, "guesses_left": 6}
    obs, r, term, trunc, info = env.step("My guess is 10.")
    assert (obs, r, term, trunc, info["reply"], info["invalid_action"]) == ("lower", -0.1, False, False, "lower", False)
    obs, r, term, trunc, info = env.step("5")
    assert (obs, r, term) == ("higher", -0.1, False)
    obs, r, term, trunc, info = env.step("no idea")  # no number: cost + penalty, the turn is used
    assert obs.startswith("invalid") and r == pytest.approx(-0.2) and not term
    assert info["invalid_action"] is True and info["reason"] == "no number in the reply" and info["turn"] == 3
    obs, r, term, trunc, info = env.step("21")  # out of range
    assert info["invalid_action"] and "outside 1..20" in info["reason"] and r == pytest.approx(-0.2)
    obs, r, term, trunc, info = env.step("7")
    assert (obs, r, term, trunc, info["outcome"]) == ("correct", pytest.approx(0.9), True, False, "correct")
    with pytest.raises(QVLMError, match="outside an episode"):
        env.step("7")


def test_guess_turn_limit_terminates_and_odd_actions_never_raise():
    env = GuessTheNumberEnv(n=10, max_turns=3)
    env.reset(options={"secret": 4})
    for action in (None, "9" * 5000, "-3"):  # not a string, more digits than int() takes, negative
        obs, r, term, _, info = env.step(action)
        assert info["invalid_action"] is True
    assert term and info["outcome"] == "out_of_guesses" and obs.endswith("No guesses left; the number was 4.")
    with pytest.raises(QVLMError, match="reset"):
        GuessTheNumberEnv().step("1")
    with pytest.raises(QVLMError, match="secret"):
        env.reset(options={"secret": 11})
    with pytest.raises(QVLMError, match="n >= 1"):
        GuessTheNumberEnv(n=0)


def test_guess_optimal_return_by_hand():
    # one candidate: guess it, 1 - 0.1; two and one turn: half the time 1 - 0.1, else -0.1
    assert guess_optimal_return(1, 1) == pytest.approx(0.9)
    assert guess_optimal_return(2, 1) == pytest.approx(0.4)
    # three and one turn: 1/3 - 0.1; three and two turns: guess 2, then the last guess is right
    assert guess_optimal_return(3, 1) == pytest.approx(1 / 3 - 0.1)
    assert guess_optimal_return(3, 2) == pytest.approx(1 / 3 * 0.9 + 2 / 3 * 0.8)
    values, best = guess_values(3, 2, 0.1, 1.0)
    assert values[2][3] == Fraction(5, 6) and best[2][3] == 2
    # n = 20: binary search finds 1 number in 1 guess, 2 in 2, 4 in 3, 8 in 4 and 5 in 5 guesses:
    # 74 guesses over the 20 secrets, 1 - 0.1 * 74 / 20 = 0.63 (the default settings)
    assert guess_values(20, 6, 0.1, 1.0)[0][6][20] == Fraction(63, 100)
    assert guess_optimal_return() == 0.63
    # 3 guesses cannot cover 20: 1 + 2 + 4 = 7 found, 13 missed: (0.9 + 2 * 0.8 + 4 * 0.7 - 13 * 0.3) / 20
    assert guess_optimal_return(20, 3) == pytest.approx((0.9 + 1.6 + 2.8 - 3.9) / 20)


def _brute_force_guess(candidates: frozenset, k: int, n: int, c: Fraction, b: Fraction) -> Fraction:
    """Optimal value over every guess in 1..n (repeats and hopeless ones included), on any set of
    candidates: no interval argument."""
    if k == 0 or not candidates:
        return Fraction(0)
    top = None
    for g in range(1, n + 1):
        low = frozenset(x for x in candidates if x < g)
        high = frozenset(x for x in candidates if x > g)
        v = -c + (b if g in candidates else 0) / len(candidates)
        for rest in (low, high):
            v += len(rest) * _brute_force_guess(rest, k - 1, n, c, b) / len(candidates)
        top = v if top is None else max(top, v)
    return top


@pytest.mark.parametrize("n,k", [(1, 1), (2, 2), (4, 2), (5, 3), (6, 2), (7, 3)])
def test_guess_optimum_equals_brute_force(n, k):
    c, b = Fraction(1, 10), Fraction(1)
    assert guess_values(n, k, 0.1, 1.0)[0][k][n] == _brute_force_guess(frozenset(range(1, n + 1)), k, n, c, b)


def test_guess_random_return_by_hand():
    # n = 2, 2 turns: right at once 1/2 (0.9), at the second try 1/4 (0.8), never 1/4 (-0.2)
    assert guess_random_return(2, 2) == pytest.approx(0.45 + 0.2 - 0.05)
    p = 1 / 20
    by_hand = sum((1 - p) ** (t - 1) * p * (1 - 0.1 * t) for t in range(1, 7)) - (1 - p) ** 6 * 0.6
    assert guess_random_return() == pytest.approx(by_hand, abs=1e-12)
    assert guess_random_return() == pytest.approx(-0.264908109375, abs=1e-12)


@pytest.mark.parametrize("n,k", [(20, 6), (20, 3), (9, 2)])
def test_scripted_guess_policy_is_exactly_optimal_over_all_secrets(n, k):
    env = GuessTheNumberEnv(n=n, max_turns=k)
    policy = GuessPolicy.for_env(env)
    total = 0.0
    for secret in range(1, n + 1):
        obs, info = env.reset(options={"secret": secret})
        policy.reset(obs, info, np.random.default_rng(0))
        done = False
        while not done:
            obs, r, done, _, info = env.step(policy.act(obs, info))
            total += r
    assert total / n == pytest.approx(guess_optimal_return(n, k), abs=1e-12)


def test_noisy_policy_mixes_quality():
    optimal = np.mean([e.total_return for e in run_scripted("GuessTheNumber-v0", range(300))])
    noisy = np.mean([e.total_return for e in run_scripted("GuessTheNumber-v0", range(300), "noisy", 0.5)])
    rand = np.mean([e.total_return for e in run_scripted("GuessTheNumber-v0", range(300), "random")])
    assert guess_random_return() - 0.1 < rand < noisy < optimal
    with pytest.raises(QVLMError, match="epsilon"):
        GuessPolicy(20, 6, 0.1, 1.0, epsilon=1.5)


# maze ---------------------------------------------------------------------------------------------


def test_maze_dynamics_and_rewards_by_hand():
    env = MazeEnv(layout=".G\n.#", max_turns=4, turn_cost=0.05, bonus=1.0, invalid_penalty=0.05)
    obs, info = env.reset(options={"start": (1, 0)})
    assert obs.endswith(".G\nA#") and info["position"] == (1, 0)
    obs, r, term, _, info = env.step("left")  # off the grid: stays
    assert (obs, r, term, info["position"]) == ("left: blocked\n.G\nA#", -0.05, False, (1, 0))
    obs, r, term, _, info = env.step("I jump")  # no move word
    assert info["invalid_action"] and r == pytest.approx(-0.1) and obs.startswith("invalid") and not term
    obs, r, term, _, info = env.step("Let's go UP.")
    assert (obs, r, term) == ("AG\n.#", -0.05, False)
    obs, r, term, _, info = env.step("right")
    assert (obs, r, term, info["outcome"]) == ("You reached G.", pytest.approx(0.95), True, "goal")


def test_maze_out_of_moves_and_bad_layouts():
    env = MazeEnv(layout="..G", max_turns=2)
    env.reset(options={"start": (0, 0)})
    env.step("left")
    obs, r, term, trunc, info = env.step("left")
    assert term and not trunc and info["outcome"] == "out_of_moves" and obs.endswith("No moves left.")
    for layout, needle in (("..\n.", "equal"), ("..", "goals"), ("G.x", "unknown character"), ("G", "no open cell")):
        with pytest.raises(QVLMError, match=needle):
            MazeEnv(layout=layout)
    with pytest.raises(QVLMError, match="open cell"):
        env.reset(options={"start": (0, 2)})


def test_maze_bfs_and_exact_returns_by_hand():
    rows, goal = parse_layout(DEFAULT_LAYOUT)
    dist = bfs_distances(rows, goal)
    assert goal == (0, 4) and dist[(1, 4)] == 1 and dist[(0, 0)] == 8 and dist[(4, 0)] == 8 and dist[(2, 3)] == 3
    assert max(dist.values()) == 10 and len(dist) == 18  # 17 starts and the goal
    # "..G": starts at distance 2 and 1
    assert maze_optimal_return("..G", 5, 0.05, 1.0) == pytest.approx((0.9 + 0.95) / 2)
    assert maze_optimal_return("..G", 1, 0.05, 1.0) == pytest.approx((-0.05 + 0.95) / 2)  # one start too far
    # ".G", random: one turn, 1/4 to reach G (0.95), 3/4 to bump (-0.05): 0.2; two turns:
    # 1/4 * 0.95 + 3/4 * (-0.05 + 0.2) = 0.35
    assert maze_random_return(".G", 1, 0.05, 1.0) == pytest.approx(0.2)
    assert maze_random_return(".G", 2, 0.05, 1.0) == pytest.approx(0.35)
    # the default: 1 - 0.05 * (sum of the 17 starts' distances = 97) / 17
    assert sum(d for c, d in dist.items() if c != goal) == 97
    assert maze_optimal_return() == pytest.approx(1 - 0.05 * 97 / 17, abs=1e-12)


@pytest.mark.parametrize("max_turns", [3, 8, 12])
def test_maze_bfs_optimum_equals_dynamic_programming(max_turns):
    values = maze_values(DEFAULT_LAYOUT, max_turns, 0.05, 1.0, "optimal")
    assert float(sum(values.values()) / len(values)) == pytest.approx(maze_optimal_return(max_turns=max_turns))


def test_scripted_maze_policy_is_exactly_optimal_over_all_starts():
    env = MazeEnv()
    policy = MazePolicy.for_env(env)
    total = 0.0
    for start in env.starts:
        obs, info = env.reset(options={"start": start})
        policy.reset(obs, info, np.random.default_rng(0))
        done = False
        while not done:
            obs, r, done, _, info = env.step(policy.act(obs, info))
            total += r
    assert total / len(env.starts) == pytest.approx(maze_optimal_return(), abs=1e-12)


# single-turn tasks --------------------------------------------------------------------------------


def test_prompt_env_is_one_step_with_any_reward():
    env = PromptEnv(
        ["hi there", "bye"], reward=lambda prompts, responses: [len(r) + len(p) for p, r in zip(prompts, responses)]
    )
    obs, info = env.reset(options={"index": 1})
    assert (obs, info) == ("bye", {"index": 1})
    obs, r, term, trunc, info = env.step("abcd")
    assert (obs, r, term, trunc, info["invalid_action"]) == ("", 7.0, True, False, False)
    named = PromptEnv(["a prompt"], reward="length")
    named.reset(seed=0)
    assert named.step("x" * 50)[1] == 0.5
    with pytest.raises(QVLMError, match="non-empty"):
        PromptEnv([])
    with pytest.raises(QVLMError, match="unknown reward"):
        PromptEnv(["a"], reward="nope")
    with pytest.raises(QVLMError, match="index"):
        env.reset(options={"index": 2})


def test_prompt_env_with_a_reference_reward_reads_the_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "say hi", "reference": "hi there"}\n')
    env = PromptEnv(str(path), reward="chrf")
    env.reset(seed=0)
    assert env.step("hi there")[1] == pytest.approx(1.0)


def test_prompt_env_reads_the_shipped_prompts():
    env = envs.make("Prompts-v0", reward="length")
    obs, info = env.reset(seed=3)
    assert obs == env.unwrapped.prompts[info["index"]] and len(env.unwrapped.prompts) > 100


# registry, bad names, conformance -----------------------------------------------------------------


def test_gymnasium_make_and_clear_errors():
    for name in envs.ENV_NAMES:
        kwargs = {"reward": "length"} if "Prompts" in name else {}
        env = gymnasium.make(name, **kwargs)
        assert isinstance(env.unwrapped, envs.TextEnv)
    assert isinstance(envs.make("GuessTheNumber-v0", n=30).unwrapped, GuessTheNumberEnv)
    with pytest.raises(QVLMError, match="unknown environment 'qvlm/Chess-v0'.*qvlm/GuessTheNumber-v0"):
        envs.make("qvlm/Chess-v0")
    with pytest.raises(QVLMError, match="refused its arguments"):
        envs.make("Maze-v0", size=9)


@pytest.mark.parametrize("name", ["qvlm/GuessTheNumber-v0", "qvlm/Maze-v0", "qvlm/Prompts-v0"])
def test_gymnasium_env_checker_and_text_contract(name):
    kwargs = {"reward": "length"} if "Prompts" in name else {}
    env = gymnasium.make(name, **kwargs)
    check_env(env.unwrapped, skip_render_check=True)  # spaces, seeding, determinism, returned data
    check_text_env(env)  # whole episodes replayed, unparseable actions, the end of the episode
    check_text_env(env.unwrapped)
    obs, _ = env.reset(seed=5)
    assert obs in env.observation_space and "up, or 7" in env.action_space


def test_seeds_fix_episodes_and_vary_them():
    def secrets(seeds):
        env = GuessTheNumberEnv()
        return [env.reset(seed=s) and env.secret for s in seeds]

    assert secrets(range(20)) == secrets(range(20))
    assert len(set(secrets(range(20)))) > 5
    a = run_scripted("Maze-v0", [4, 4, 5], "noisy", 0.5)
    assert a[0] == a[1] and a[0].to_json()["turns"] == a[1].to_json()["turns"]


def test_a_policy_never_ending_an_episode_is_cut():
    class Stubborn:
        def reset(self, observation, info, rng):
            pass

        def act(self, observation, info):
            return "right"

    env = MazeEnv(layout="G..", max_turns=100)
    episode = run_episode(env, Stubborn(), seed=0, max_turns=5)
    assert len(episode.turns) == 5 and episode.truncated and not episode.terminated


# TextArena ----------------------------------------------------------------------------------------


@needs_textarena
def test_textarena_guess_the_number_offline():
    env = envs.make("TextArena-GuessTheNumber-v0")
    before = random.getstate()
    obs, info = env.reset(seed=3)
    assert "Guess The Number" in obs and info["game"] == "GuessTheNumber-v0"
    assert random.getstate() == before  # the game's random state is its own
    obs, r, term, trunc, info = env.step("I will guess nothing")  # first invalid move: a warning, a retry
    assert info["invalid_action"] and not term and r == 0.0 and "invalid move" in obs
    obs, r, term, trunc, info = env.step("[10]")
    assert not info["invalid_action"] and ("higher" in obs or "lower" in obs or term)
    episode = run_scripted("TextArena-GuessTheNumber-v0", [3, 4], "scripted")
    assert [e.total_return for e in episode] == [1.0, 1.0] and all(e.terminated for e in episode)


@needs_textarena
def test_textarena_two_invalid_moves_end_the_game_with_its_penalty():
    env = envs.make("TextArena-GuessTheNumber-v0")
    env.reset(seed=0)
    env.step("nothing")
    obs, r, term, trunc, info = env.step("still nothing")
    assert term and info["invalid_action"] and r == 0.0  # the game's own penalty: its completion, 0 here


@needs_textarena
@pytest.mark.parametrize("game", OFFLINE_GAMES)
def test_textarena_games_conform(game):
    env = envs.make(gym_id(game))
    check_text_env(env, max_steps=100)
    obs_a, _ = env.reset(seed=11)
    obs_b, _ = env.reset(seed=11)
    assert obs_a == obs_b and obs_a in env.observation_space


@needs_textarena
def test_textarena_game_that_raises_ends_the_episode_instead_of_the_rollout():
    from qvlm.envs.textarena import TextArenaEnv

    env = TextArenaEnv("Countdown-v0")  # 0.7.4 raises a TypeError inside the game on an invalid move
    env.reset(seed=0)
    obs, r, term, trunc, info = env.step("???")
    assert term and r == -1.0 and info["error"].startswith("TypeError")


@needs_textarena
def test_textarena_gymnasium_env_checker():
    env = gymnasium.make("qvlm/TextArena-Mastermind-v0")
    check_env(env.unwrapped, skip_render_check=True)


def test_textarena_missing_or_unknown_game_is_a_clear_error(monkeypatch):
    import qvlm.envs.textarena as ta_mod

    monkeypatch.setattr(ta_mod, "textarena_available", lambda: False)
    with pytest.raises(QVLMError, match=r"pip install 'qvlm\[textarena\]'"):
        ta_mod.TextArenaEnv("GuessTheNumber-v0")
    if textarena_available():
        monkeypatch.undo()
        with pytest.raises(QVLMError, match="no game 'Nope-v0'"):
            ta_mod.TextArenaEnv("Nope-v0")
