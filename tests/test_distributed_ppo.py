"""PPO in several processes (issue 12, items 1 and 2): 2 CPU processes (gloo) train the policy (LoRA)
and the V head that 1 process trains at the same global batch, and resume; the sampling streams
that make rollouts independent of the number of processes; a world size that does not divide the
prompts of an iteration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qvlm.algos.actor_critic import ActorCritic
from qvlm.algos.ppo import PPOConfig, train_ppo
from qvlm.cli import main
from qvlm.configs import DecodeConfig, TrunkConfig
from qvlm.decoding.sampling import sample_rollout, sample_rows, sampling_seeds
from qvlm.errors import QVLMError
from tests.helpers import TINY_PPO_PROMPTS, spawn_processes, tiny_model, tiny_ppo_weights, train_tiny_ppo

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

PROMPTS = TINY_PPO_PROMPTS


def _run(run_dir: str, resume: bool = False, kill: bool = False) -> None:
    train_tiny_ppo(run_dir, resume, kill)  # LoRA, lr 3e-3 (tests.helpers.tiny_ppo_config)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_the_policy_and_critic_one_process_trains(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    _run(str(one))
    # 2 processes: killed after iteration 1, then resumed from its checkpoint to the end
    spawn_processes(_run, str(two), False, True)
    assert not (two / "adapter").exists()
    spawn_processes(_run, str(two), True, False)
    a, b = tiny_ppo_weights(one), tiny_ppo_weights(two)
    assert a.keys() == b.keys() and any(k.startswith("adapter.") and "lora_B" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    # the policy moved (LoRA B starts at 0), so the comparison is not of untouched weights
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3
    # the same tokens were sampled (same rewards, KL), and rank 0 alone logged every iteration once
    m1, m2 = _metrics(one), _metrics(two)
    assert [x["step"] for x in m2] == [0, 1, 2]
    for x, y in zip(m1, m2):
        assert y["charts/reward"] == x["charts/reward"]
        assert y["charts/response_length"] == x["charts/response_length"]
        for key in ("charts/kl", "charts/kl_coef", "losses/value", "charts/grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
    assert "losses/policy" not in m2[0] and "losses/policy" in m2[1]  # the critic warm-up iteration


def test_sample_rows_draws_from_the_distribution_and_never_a_zero():
    probs = torch.tensor([[0.7, 0.3, 0.0]]).repeat(4000, 1)
    gens = [torch.Generator().manual_seed(s) for s in range(4000)]
    tokens = sample_rows(probs, gens)
    assert int((tokens == 2).sum()) == 0
    # binomial(4000, 0.7): standard deviation 29, so 0.7 +- 0.025 is more than 3 of them
    assert abs(float((tokens == 0).float().mean()) - 0.7) < 0.025


def test_a_row_samples_the_same_tokens_in_any_batch():
    """Per-row streams: a prompt's responses do not depend on the other prompts decoded with it,
    on the decoding batch size or on the prompts' padding."""
    model, tok = tiny_model("llama", seed=0)
    cfg = DecodeConfig(max_new_tokens=8, num_return_sequences=2, batch_size=8, chat=False)
    seeds = sampling_seeds(0, 3, range(8))
    ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS[:4]]
    together = sample_rollout(model, tok, ids, cfg=cfg, row_seeds=seeds).response_lists()
    torch.manual_seed(7)  # the global generator plays no part
    alone = sample_rollout(model, tok, ids[2:3], cfg=cfg, row_seeds=seeds[4:6], pad_to=12).response_lists()
    one_by_one = sample_rollout(
        model, tok, ids, cfg=DecodeConfig(max_new_tokens=8, num_return_sequences=2, batch_size=2, chat=False),
        row_seeds=seeds,
    ).response_lists()  # fmt: skip
    assert alone == together[4:6]
    assert one_by_one == together
    assert len({tuple(r) for r in together}) > 1  # the streams differ between rows
    assert sampling_seeds(0, 3, range(2)) != sampling_seeds(0, 4, range(2))  # and between iterations
    with pytest.raises(QVLMError, match="one per response"):
        sample_rollout(model, tok, ids, cfg=cfg, row_seeds=seeds[:3])


def test_prompts_per_iteration_must_divide_over_the_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher's, before the group exists
    model, tok = tiny_model("llama", seed=0)
    ac = ActorCritic(model, TrunkConfig("lora"))
    with pytest.raises(QVLMError, match="--prompts-per-iter 3 does not divide over 2 processes"):
        train_ppo(ac, tok, PROMPTS, "count:e", PPOConfig(prompts_per_iter=3, progress=False))
    # the CLI: exit 2 and one line, before the model loads
    (tmp_path / "p.txt").write_text("hello\n")
    args = ["train", "ppo", "--model", str(tmp_path / "no-such-model"), "--prompts", str(tmp_path / "p.txt"),
            "--reward", "count:e", "--out", str(tmp_path / "r"), "--prompts-per-iter", "3"]  # fmt: skip
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "qvlm train: error: --prompts-per-iter 3 does not divide over 2 processes; use a --prompts-per-iter that "
        "is a multiple of 2 (it is global: each process takes --prompts-per-iter / 2 prompts)"
    ]
