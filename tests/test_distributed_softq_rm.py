"""Soft Q-learning, Q# and reward-model training in several processes (issue 12, item 1; issue 22): 2 CPU
processes (gloo) end with the heads (soft Q, Q#) and the classifier (reward model) that 1 process trains at
the same global batch size, to 1e-5; soft Q and Q# are killed and resumed on the way."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qvlm.algos.qsharp import train_qsharp
from qvlm.algos.reward_model import read_rm_data, train_reward_model
from qvlm.algos.softq import train_softq
from qvlm.configs import QSharpConfig, RewardModelConfig, SoftQConfig, TrunkConfig
from qvlm.errors import QVLMError
from qvlm.loading import save_model
from qvlm.model import QVModel
from qvlm.rewards import get_reward
from tests.helpers import separable_prefs, spawn_processes, tiny_model

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

PROMPTS = ["hello", "abc", "the cat", "zz", "a dog", "why"]


class Kill(Exception):
    pass


def _kill_after_round_1(r: int, charts: dict) -> None:
    if r == 1:  # round 1 ran and was checkpointed: stop as a killed run would
        raise Kill


def _softq(run_dir: str, resume: bool = False, kill: bool = False) -> None:
    # 4 prompts x 2 samples a round, blocks of 4 samples per process; minibatches of 6 drawn from the
    # whole replay split unevenly between the processes that decoded them
    cfg = SoftQConfig(alpha=0.1, rounds=3, prompts_per_round=4, samples_per_prompt=2, max_new_tokens=6,
                      steps_per_round=4, batch_size=6, lr=3e-3, max_length=32, progress=False)  # fmt: skip
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(1 if resume else 0)  # a resumed run restores the heads from its checkpoint
    qv = QVModel.from_trunk(model, num_q_heads=1, q_head="tied")
    try:
        train_softq(qv, tok, PROMPTS, get_reward("count:e"), cfg, run_dir=run_dir, resume=resume,
                    callbacks=[_kill_after_round_1] if kill else [])  # fmt: skip
    except Kill:
        pass


def _qsharp(run_dir: str, resume: bool = False, kill: bool = False) -> None:
    # round 0 and 2 roll-in rounds of 4 prompts x 2 samples, minibatches of 6 from the whole replay set
    cfg = QSharpConfig(rounds=2, prompts_per_round=4, samples_per_prompt=2, max_new_tokens=6, steps_per_round=4,
                       batch_size=6, lr=1e-2, betas="2,8", max_length=32, progress=False)  # fmt: skip
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(1 if resume else 0)  # a resumed run restores the heads from its checkpoint
    qv = QVModel.from_trunk(model, TrunkConfig("frozen"), head_hidden=16, bins=7, support=(0.0, 6.0), dist_rank=4)
    try:
        train_qsharp(qv, tok, PROMPTS, "count:e", cfg, run_dir=run_dir, resume=resume,
                     callbacks=[_kill_after_round_1] if kill else [])  # fmt: skip
    except Kill:
        pass


def _rm(run_dir: str, data: str, backbone: str) -> None:
    # 22 training pairs in batches of 4: the last batch of an epoch holds 2 (one per process)
    cfg = RewardModelConfig(backbone=backbone, lr=1e-2, batch_size=4, epochs=2, held_out=0.2, progress=False,
                            checkpoint_every=3)  # fmt: skip
    train_reward_model(read_rm_data(data), cfg, run_dir, device="cpu", log=lambda line: None)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)


def test_softq_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    _softq(str(one))
    spawn_processes(_softq, str(two), False, True)
    assert not (two / "heads.safetensors").exists()
    spawn_processes(_softq, str(two), True, False)
    _assert_close(load_file(str(one / "heads.safetensors")), load_file(str(two / "heads.safetensors")))
    # the same responses were sampled, in the same order, and written once
    assert (two / "replay.jsonl").read_text() == (one / "replay.jsonl").read_text()
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(12))


def test_qsharp_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    _qsharp(str(one))
    spawn_processes(_qsharp, str(two), False, True)
    assert not (two / "heads.safetensors").exists()
    spawn_processes(_qsharp, str(two), True, False)
    _assert_close(load_file(str(one / "heads.safetensors")), load_file(str(two / "heads.safetensors")))
    # the same roll-ins, cuts and roll-outs, in the same order, written once; the same cost counted
    assert (two / "replay.jsonl").read_text() == (one / "replay.jsonl").read_text()
    spent = [json.loads((d / "training.json").read_text())["reward_calls"] for d in (one, two)]
    assert spent == [3 * 4 * 2] * 2


def test_reward_model_two_processes_equal_one(tmp_path):
    model, tok = tiny_model("llama", seed=0)
    save_model(model, tok, tmp_path / "backbone")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_prefs(28)))
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    _rm(str(one), str(data), str(tmp_path / "backbone"))
    spawn_processes(_rm, str(two), str(data), str(tmp_path / "backbone"))
    _assert_close(load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors")))
    a, b = json.loads((one / "eval.json").read_text()), json.loads((two / "eval.json").read_text())
    assert a["accuracy"] == b["accuracy"] and a["steps"] == b["steps"] == 12
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 12


def test_a_world_size_that_does_not_divide_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher's, before the group exists
    model, tok = tiny_model("llama", seed=0)
    qv = QVModel.from_trunk(model, num_q_heads=1, q_head="tied")
    cfg = SoftQConfig(prompts_per_round=3, progress=False)
    with pytest.raises(QVLMError, match="--prompts-per-round 3 does not divide over 2 processes"):
        train_softq(qv, tok, PROMPTS, get_reward("count:e"), cfg)
    dist = QVModel.from_trunk(model, TrunkConfig("frozen"), bins=5)
    with pytest.raises(QVLMError, match="--prompts-per-round 3 does not divide over 2 processes"):
        train_qsharp(dist, tok, PROMPTS, "count:e", QSharpConfig(prompts_per_round=3, progress=False))
    with pytest.raises(QVLMError, match="next_z runs in one process only"):  # its terms average over other steps
        train_qsharp(dist, tok, PROMPTS, "count:e", QSharpConfig(q_target="next_z", progress=False))
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_prefs(8)))
    with pytest.raises(QVLMError, match="batch size 3 does not divide over 2 processes"):
        train_reward_model(read_rm_data(data), RewardModelConfig(batch_size=3, progress=False), tmp_path / "rm")
