"""Online soft Q-learning for a language model: the soft Bellman loss by hand, and `qvlm train softq`
on a tiny model (the loss falls, the guided reward rises, a resumed run equals an uninterrupted one)."""

import math

import pytest
import torch

from qvlm.losses import soft_bellman_targets, soft_q_loss, soft_value

LOG_HALF = math.log(0.5)


def test_soft_bellman_target_by_hand():
    # one step: pi_ref(.|s') = (0.5, 0.5), Qbar(s', .) = (1, 0), alpha 1: V(s') = log(0.5 e + 0.5) = 0.6201145
    next_q = torch.tensor([[[1.0, 0.0]]])
    ref = torch.full((1, 1, 2), LOG_HALF)
    y = soft_bellman_targets(torch.zeros(1, 1), next_q, ref, torch.zeros(1, 1), gamma=0.9, alpha=1.0)
    assert y.item() == pytest.approx(0.9 * 0.6201145, abs=1e-6)  # 0.5581031
    # done: nothing is bootstrapped, the target is the reward
    y = soft_bellman_targets(torch.ones(1, 1), next_q, ref, torch.ones(1, 1), gamma=0.9, alpha=1.0)
    assert y.item() == pytest.approx(1.0)
    # alpha 0.5 with Qbar = (1, 0): 0.5 log((e^2 + 1) / 2) = 0.7168904 (DESIGN.md's Monte-Carlo example)
    y = soft_bellman_targets(torch.zeros(1, 1), next_q, ref, torch.zeros(1, 1), gamma=1.0, alpha=0.5)
    assert y.item() == pytest.approx(0.7168904, abs=1e-6)


def test_soft_bellman_target_limits_in_alpha():
    next_q = torch.tensor([[[1.0, 0.0, 0.4]]])
    ref = torch.log(torch.tensor([[[0.2, 0.5, 0.3]]]))
    zero = torch.zeros(1, 1)
    # alpha -> 0: the max over actions (Q-learning); alpha -> inf: the mean under pi_ref
    assert soft_bellman_targets(zero, next_q, ref, zero, 1.0, 1e-3).item() == pytest.approx(1.0, abs=2e-3)
    assert soft_bellman_targets(zero, next_q, ref, zero, 1.0, 1e4).item() == pytest.approx(0.32, abs=1e-3)


def test_soft_q_loss_by_hand():
    # two steps of one response: s_1 -> s_2 (not done), s_2 -> end (done, reward 1); a padded third step
    q_taken = torch.tensor([[0.5, 0.8, 9.0]])
    next_q = torch.tensor([[[1.0, 0.0], [5.0, 5.0], [0.0, 0.0]]])
    ref = torch.full((1, 3, 2), LOG_HALF)
    rewards, done = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = soft_q_loss(q_taken, next_q, ref, rewards, done, mask, gamma=1.0, alpha=1.0)
    # targets (0.6201145, 1.0): errors (-0.1201145, -0.2): mean of squares over the 2 real steps
    assert loss.item() == pytest.approx((0.1201145**2 + 0.2**2) / 2, abs=1e-6)
    assert stats["target_mean"].item() == pytest.approx((0.6201145 + 1.0) / 2, abs=1e-6)
    assert stats["q_mean"].item() == pytest.approx(0.65)
    assert not stats["loss"].requires_grad
    # gradients reach Q of the taken actions only, never the target
    q = q_taken.clone().requires_grad_(True)
    target_q = next_q.clone().requires_grad_(True)
    soft_q_loss(q, target_q, ref, rewards, done, mask, 1.0, 1.0)[0].backward()
    assert q.grad[0, 2] == 0 and target_q.grad is None
    assert soft_value(next_q[0, :1], ref[0, :1], 1.0).item() == pytest.approx(0.6201145, abs=1e-6)


# ---------------------------------------------------------------- qvlm train softq on a tiny model

from qvlm.algos.rounds import round_prompts  # noqa: E402
from qvlm.algos.softq import train_softq  # noqa: E402
from qvlm.configs import DecodeConfig, SoftQConfig  # noqa: E402
from qvlm.decoding import generate  # noqa: E402
from qvlm.errors import QVLMError  # noqa: E402
from qvlm.model import QVModel  # noqa: E402
from qvlm.rewards import get_reward, score  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402

PROMPTS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]
REWARD = "count:e"  # rule-based toy reward: how often the response writes "e"


@pytest.fixture(autouse=True)
def one_thread():
    from qvlm.exact.learners import single_thread

    with single_thread():  # a tiny model: a second thread only adds synchronisation on a busy machine
        yield


def small_config(**overrides):
    base = dict(
        alpha=0.1,
        rounds=8,
        prompts_per_round=8,
        samples_per_prompt=4,
        max_new_tokens=8,
        steps_per_round=20,
        batch_size=16,
        lr=1e-2,
        max_length=32,
        progress=False,
    )
    return SoftQConfig(**{**base, **overrides})


def fresh_model():
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(0)
    return QVModel.from_trunk(model, num_q_heads=1, q_head="tied"), tok


def guided_reward(qv, tok, beta, seed=123):
    prompts = PROMPTS * 4
    cfg = DecodeConfig(max_new_tokens=8, seed=seed, beta=beta, batch_size=64)
    res = generate(qv.trunk, tok, prompts, heads=qv.heads, cfg=cfg)
    return sum(score(get_reward(REWARD), prompts, res.texts)) / len(prompts)


def test_round_prompts_cycle_through_the_list():
    assert round_prompts(["a", "b", "c", "d", "e"], 0, 2) == ["a", "b"]
    assert round_prompts(["a", "b", "c", "d", "e"], 2, 2) == ["e", "a"]


def test_the_soft_bellman_error_falls_on_one_round():
    qv, tok = fresh_model()
    history = train_softq(qv, tok, PROMPTS, get_reward(REWARD), small_config(rounds=1, steps_per_round=30))
    q = [v for _, v in history["losses/q"]]
    assert sum(q[-5:]) / 5 < 0.5 * sum(q[:5]) / 5, q


def test_online_soft_q_learning_raises_the_guided_reward():
    qv, tok = fresh_model()
    history = train_softq(qv, tok, PROMPTS, get_reward(REWARD), small_config())
    per_round = [v for _, v in history["charts/guided_reward"]]
    assert len(per_round) == 8 and history["charts/replay_size"][-1][1] == 8 * 32  # the replay keeps every round
    # round 0 samples the base policy (Q starts at 0); later rounds sample the improving guided policy
    assert per_round[-1] > per_round[0], per_round
    base, guided = guided_reward(qv, tok, 0.0), guided_reward(qv, tok, 1 / 0.1)
    # the base writes "e" about 0.2 times per response; measured on tiny models of seeds 0, 1, 2 and two
    # evaluation seeds, the guided policy writes it 1.6 to 8 times
    assert guided > base + 1.0, (base, guided)
    assert history["charts/kl"][-1][1] > history["charts/kl"][0][1]  # it moved away from pi_ref to get there


def test_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = small_config(rounds=3, steps_per_round=6)
    qv, tok = fresh_model()
    train_softq(qv, tok, PROMPTS, get_reward(REWARD), cfg, run_dir=tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_after_round_1(r, charts):
        if r == 1:
            raise Stop

    broken, tok = fresh_model()
    with pytest.raises(Stop):
        train_softq(
            broken, tok, PROMPTS, get_reward(REWARD), cfg, run_dir=tmp_path / "cut", callbacks=[stop_after_round_1]
        )
    resumed, tok = fresh_model()
    history = train_softq(resumed, tok, PROMPTS, get_reward(REWARD), cfg, run_dir=tmp_path / "cut", resume=True)
    for key, value in qv.heads.state_dict().items():
        assert torch.equal(value, resumed.heads.state_dict()[key]), key
    whole = (tmp_path / "whole" / "replay.jsonl").read_text()
    assert whole == (tmp_path / "cut" / "replay.jsonl").read_text() and len(whole.splitlines()) == 3 * 32
    assert [s for s, _ in history["losses/q"]] == list(range(18))  # logged steps 0..17, none twice
    assert (tmp_path / "cut" / "heads.safetensors").is_file() and (tmp_path / "cut" / "metrics.jsonl").is_file()
    # other prompts cannot resume this run
    other, tok = fresh_model()
    with pytest.raises(QVLMError, match="other prompts"):
        train_softq(other, tok, PROMPTS[:4], get_reward(REWARD), cfg, run_dir=tmp_path / "cut", resume=True)


def test_cli_trains_resumes_and_refuses_bad_input(tmp_path, tiny_dir, capsys):
    from qvlm.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ab\ncd\nef\n")
    out = tmp_path / "run"
    argv = ["train", "softq", "--model", str(tiny_dir), "--prompts", str(prompts), "--reward", "count:e"]
    argv += ["--out", str(out), "--rounds", "2", "--prompts-per-round", "2", "--samples-per-prompt", "2"]
    argv += ["--steps-per-round", "3", "--max-new-tokens", "4", "--max-length", "32", "--no-progress"]
    assert main(argv) == 0
    assert "guided reward per round" in capsys.readouterr().out
    for name in ("heads.safetensors", "heads_config.json", "training.json", "replay.jsonl", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert len((out / "replay.jsonl").read_text().splitlines()) == 2 * 2 * 2
    assert main(argv) == 2  # the run exists: --resume or a new --out
    assert "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0  # already complete: resumes to the same end
    assert main(argv[:-1] + ["--alpha", "0", "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "alpha" in err and err.count("\n") == 1

    # the heads decode with `qvlm eval`, beside best-of-N with its estimated KL and the frontier block
    import json

    metrics = tmp_path / "metrics.json"
    evaluate = ["eval", "--model", str(tiny_dir), "--heads", str(out), "--prompts", str(prompts)]
    evaluate += ["--reward", "count:e", "--betas", "0,10", "--best-of", "1,2,4", "--max-new-tokens", "6"]
    assert main(evaluate + ["--seed", "0", "--json", str(metrics)]) == 0
    result = json.loads(metrics.read_text())
    assert set(result["methods"]) == {"base", "guided_beta_10", "best_of_2", "best_of_4"}
    assert result["methods"]["best_of_4"]["kl_kind"] == "estimate" and result["methods"]["best_of_4"]["cost"] == 4.0
    assert result["methods"]["best_of_4"]["kl_to_base"] <= math.log(4) - 0.75 + 1e-9
    frontier = result["frontier"]
    assert [p["n"] for p in frontier["best_of_n"]] == [1, 2, 4] and [p["beta"] for p in frontier["guided"]] == [0, 10]
    assert main(evaluate[:-2] + ["--best-of", "0,2"]) == 2 and "--best-of" in capsys.readouterr().err


def test_a_nan_reward_stops_naming_the_round_and_the_checkpoint_kept(tmp_path):
    """Issue 25: as PPO's, soft Q's stop on a bad reward names the round and the checkpoint left intact."""
    calls = []

    def flaky(prompts, responses):
        calls.append(1)
        return [float("nan") if len(calls) == 2 else 1.0 for _ in responses]

    model, tok = fresh_model()
    with pytest.raises(QVLMError) as err:
        train_softq(model, tok, PROMPTS, flaky, small_config(rounds=3, steps_per_round=2), run_dir=tmp_path)
    message = str(err.value)
    assert message.startswith("round 1: ") and "rewards must be finite" in message
    assert f"the last checkpoint ({tmp_path / 'checkpoint' / 'step-00000002'}) is intact" in message
