"""FSDP2 (``fully_shard``) on the CPU with gloo, full-trunk training (issue 12, item 1).

- the building block: 2 processes that shard the trunk (:func:`qvlm.train.distributed.fully_shard_trunk`)
  and replicate the heads take the steps one process takes, to 1e-5, through qvlm's own batch sharding,
  loss and optimiser step (gradient clipping on, across sharded and replicated gradients);
- the trainers with ``--fsdp``: ILQL (AWAC on, so the LM logits come from the sharded model's forward)
  and PPO ``--trunk full``, 2 sharded processes killed mid-run and resumed from their gathered
  checkpoints, against 1 process without FSDP: every weight agrees to 1e-5;
- the reward model with ``--fsdp``: a mean-pooled BERT classifier (its pooling runs as a forward of the
  root unit), 2 sharded processes killed and resumed, against 1 process: the saved classifier directory
  agrees to 1e-5 and scores through ``hf:`` as the one-process run's does;
- unsupported combinations (LoRA or frozen trunk, one process) refused before the model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qvlm.algos import reward_model as rm
from qvlm.algos.ilql import ILQLConfig, train_ilql
from qvlm.algos.ppo import PPOConfig
from qvlm.algos.value import ValueConfig, value_loss
from qvlm.cli import main
from qvlm.configs import RewardModelConfig
from qvlm.errors import QVLMError
from qvlm.mdp import Sample, encode_samples
from qvlm.model import QVModel
from qvlm.rewards import get_reward
from qvlm.train.checkpoint import latest_checkpoint
from qvlm.train.distributed import fully_shard_trunk, is_dtensor
from qvlm.train.loop import batch_indices, local_batch
from qvlm.train.optim import make_optimizer, optimizer_step
from qvlm.trunk import TrunkConfig
from tests.helpers import (
    Killed,
    assert_same_full_ppo_run,
    save_tiny_backbone,
    separable_prefs,
    spawn_processes,
    tiny_model,
    train_tiny_ppo,
)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

# 9 samples, batches of 4: the last batch of the epoch holds one sample (rank 1: an empty share, weight 0)
PROMPTS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr"]
PPO_PROMPTS = ["hello", "abc", "the cat", "zz", "a dog", "why"]  # prompts of different lengths
SAMPLES = [Sample(p, p[::-1] * (1 + i % 3), float(i % 4) / 3 - 0.5) for i, p in enumerate(PROMPTS)]


def _train(shard: bool) -> dict[str, torch.Tensor]:
    """Value regression on a full trunk for 4 steps; the full weights afterwards."""
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(0)
    qv = QVModel.from_trunk(model, TrunkConfig("full"))
    if shard:
        fully_shard_trunk(qv.trunk)
        layer = qv.trunk.base_model.layers[0].mlp.up_proj.weight
        assert is_dtensor(layer) and layer.to_local().shape[0] == layer.shape[0] // 2
    # a trunk learning rate high enough to move it, clipping that binds (the norms are about 5)
    cfg = ValueConfig(batch_size=4, max_length=32, target="mc", lr=1e-2, trunk_lr=1e-3, grad_clip=1.0)
    items = encode_samples(SAMPLES, tok, cfg.max_length)
    optimizer = make_optimizer(qv, cfg.lr, cfg.trunk_lr, cfg.weight_decay)
    qv.train()
    for _, idx in batch_indices(len(items), cfg.batch_size, cfg.seed, 0, 4):
        batch, weight = local_batch(items, idx, cfg.batch_size, tok.pad_token_id)
        loss, _ = value_loss(qv, batch, cfg)
        optimizer_step(loss * weight, optimizer, cfg.grad_clip)
    return {k: (v.full_tensor() if is_dtensor(v) else v).detach().clone() for k, v in qv.state_dict().items()}


def _sharded(out: str) -> None:
    torch.distributed.init_process_group("gloo")
    state = _train(shard=True)
    if torch.distributed.get_rank() == 0:
        torch.save(state, out)


def test_fsdp_full_trunk_two_processes_equal_one(tmp_path):
    torch.set_num_threads(1)
    expected = _train(shard=False)
    spawn_processes(_sharded, str(tmp_path / "state.pt"))
    got = torch.load(tmp_path / "state.pt")
    assert got.keys() == expected.keys()
    before, _ = tiny_model("llama", seed=0)
    moved = expected["trunk.model.layers.0.mlp.up_proj.weight"] - before.model.layers[0].mlp.up_proj.weight
    assert float(moved.abs().max()) > 1e-3  # the trunk trained, so equal weights are not untouched ones
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=0, msg=k)
    # the tied LM head followed the sharded embedding
    torch.testing.assert_close(got["trunk.lm_head.weight"], got["trunk.model.embed_tokens.weight"], atol=0, rtol=0)


# ---------------------------------------------------------------- ILQL, full trunk, --fsdp


def _ilql(run_dir: str, fsdp: bool, resume: bool = False, kill: bool = False) -> None:
    """ILQL (AWAC on: the LM logits come from the sharded trunk's pass) for 6 steps, checkpoints
    every 2; ``kill`` stops it after step 3 (a checkpoint at step 2)."""
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(1 if resume else 0)  # a resumed run restores the heads from its checkpoint
    qv = QVModel.from_trunk(model, TrunkConfig("full", fsdp=fsdp))
    cfg = ILQLConfig(steps=6, batch_size=4, max_length=32, progress=False, checkpoint_every=2, trunk_lr=1e-3)
    try:
        train_ilql(qv, tok, SAMPLES, cfg, run_dir=run_dir, resume=resume,
                   callbacks=[_kill_after_step_3] if kill else [])  # fmt: skip
    except Killed:
        pass


def _kill_after_step_3(step: int, floats: dict) -> None:
    if step == 3:
        raise Killed


def test_fsdp_ilql_full_trunk_two_processes_equal_one(tmp_path):
    """ILQL --trunk full --fsdp in 2 processes, killed and resumed, against 1 process without FSDP:
    the heads (target Q heads included) and every trunk weight agree to 1e-5."""
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    _ilql(str(one), fsdp=False)
    spawn_processes(_ilql, str(two), True, False, True)
    assert not (two / "heads.safetensors").exists()
    spawn_processes(_ilql, str(two), True, True, False)
    for name in ("heads.safetensors", "trunk.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert a.keys() == b.keys(), name
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    before, _ = tiny_model("llama", seed=0)
    moved = a["model.layers.0.mlp.up_proj.weight"] - before.model.layers[0].mlp.up_proj.weight
    assert float(moved.abs().max()) > 1e-3  # the trunk trained


# ---------------------------------------------------------------- PPO, full trunk, --fsdp


def _ppo(run_dir: str, fsdp: bool, resume: bool = False, kill: bool = False) -> None:
    # tests.helpers.tiny_ppo_config (8 rows, minibatches split unequally, a critic warm-up iteration, the
    # adaptive KL controller), with every policy weight training
    train_tiny_ppo(run_dir, resume, kill, trunk="full", lr=1e-3, fsdp=fsdp)


def test_fsdp_ppo_full_trunk_two_processes_equal_one(tmp_path):
    """PPO --trunk full --fsdp in 2 processes, killed after iteration 1 and resumed from its
    (gathered) checkpoint, against 1 process without FSDP: every weight of the policy (LM head
    included) and of the V head agrees to 1e-5, the same tokens were sampled."""
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    _ppo(str(one), fsdp=False)
    spawn_processes(_ppo, str(two), True, False, True)
    assert not (two / "policy.safetensors").exists()
    ckpt = load_file(str(two / "checkpoint" / "step-00000002" / "trainable.safetensors"))
    assert ckpt["policy.model.layers.0.mlp.up_proj.weight"].shape == (64, 32)  # full tensors, not shards
    spawn_processes(_ppo, str(two), True, True, False)
    assert_same_full_ppo_run(one, two)


# ---------------------------------------------------------------- reward model, --fsdp


def _rm(run_dir: str, data: str, backbone: str, fsdp: bool, resume: bool = False, kill: bool = False) -> None:
    """A mean-pooled classifier on the tiny BERT for 8 steps (21 training texts in batches of 4: the
    epoch's last batch holds one text, so rank 1 has an empty share), checkpoints every 3; ``kill``
    stops it at step 5 (the checkpoint of step 3 stays)."""
    cfg = RewardModelConfig(backbone=backbone, lr=1e-2, batch_size=4, steps=8, held_out=0.2, pooling="mean",
                            progress=False, checkpoint_every=3, fsdp=fsdp)  # fmt: skip
    real_step, calls = rm.optimizer_step, []

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise Killed
        return real_step(*args, **kwargs)

    rm.optimizer_step = dying_step if kill else real_step
    try:
        rm.train_reward_model(rm.read_rm_data(data), cfg, run_dir, resume=resume, device="cpu", log=lambda line: None)
    except Killed:
        pass
    finally:
        rm.optimizer_step = real_step


def _rm_killed_and_resumed(run_dir: str, data: str, backbone: str) -> None:
    """--fsdp killed at step 5, then resumed in the same processes (one start of 2 processes, not two:
    the model, optimiser and schedule are built afresh and loaded from the gathered checkpoint of step 3)."""
    _rm(run_dir, data, backbone, True, kill=True)
    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == "step-00000003" and not (Path(run_dir) / "model.safetensors").exists()
    assert torch.load(ckpt / "trainer_state.pt", weights_only=True)["optimizer_by_name"]  # written from shards
    weights = load_file(str(ckpt / "trainable.safetensors"))
    assert weights["bert.encoder.layer.0.intermediate.dense.weight"].shape == (64, 32)  # full tensors, not shards
    _rm(run_dir, data, backbone, True, resume=True)


def test_fsdp_reward_model_two_processes_equal_one(tmp_path):
    """qvlm train rm --fsdp in 2 processes, killed at step 5 and resumed from the (gathered) checkpoint
    of step 3, against 1 process without FSDP: the saved directory holds the same config and the same
    weights to 1e-5, and scores through hf:PATH as the one-process run's does."""
    backbone = str(save_tiny_backbone(tmp_path / "bert", "bert"))
    texts = [{"text": r[k], "label": k} for r in separable_prefs(13) for k in ("chosen", "rejected")]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in texts))
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    _rm(str(one), str(data), backbone, fsdp=False)
    spawn_processes(_rm_killed_and_resumed, str(two), str(data), backbone)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys() and "classifier.weight" in a
    for k in a:
        # softmax ignores the score q.b_k that a key bias adds to every key alike: its gradient is 0 but
        # for rounding, which Adam scales up to steps of the learning rate's size, in any two runs alike
        if not k.endswith("attention.self.key.bias"):
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    before = load_file(str(tmp_path / "bert" / "model.safetensors"))
    moved = a["bert.encoder.layer.0.intermediate.dense.weight"] - before["encoder.layer.0.intermediate.dense.weight"]
    assert float(moved.abs().max()) > 1e-3  # the backbone trained, so equal weights are not untouched ones
    assert json.loads((two / "config.json").read_text()) == json.loads((one / "config.json").read_text())
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 8
    texts = ["abc", "nopq", "gfedcba"]
    got, expected = get_reward(f"hf:{two}:chosen")(texts, texts), get_reward(f"hf:{one}:chosen")(texts, texts)
    assert got == pytest.approx(expected, abs=1e-5)


def test_fsdp_refuses_lora_and_one_process(tmp_path, capsys):
    with pytest.raises(QVLMError, match="--fsdp shards a trunk that trains every weight, not --trunk lora"):
        PPOConfig(trunk=TrunkConfig("lora", fsdp=True))
    (tmp_path / "p.txt").write_text("hello\n")
    args = ["train", "ppo", "--model", str(tmp_path / "no-such-model"), "--prompts", str(tmp_path / "p.txt"),
            "--reward", "count:e", "--out", str(tmp_path / "r"), "--trunk", "full", "--fsdp"]  # fmt: skip
    assert main(args) == 2  # one process: refused before the model loads
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fsdp shards the weights over several processes, but this is one" in err[0]
    assert main(args[:-3] + ["--fsdp"]) == 2  # --trunk lora (the default)
    assert "not --trunk lora" in capsys.readouterr().err
    # offline trainers: the default frozen trunk, and one process, refused before the model loads
    (tmp_path / "s.jsonl").write_text(json.dumps({"prompt": "a", "response": "b", "reward": 1.0}) + "\n")
    value = ["train", "value", "--model", str(tmp_path / "no-such-model"), "--data", str(tmp_path / "s.jsonl"),
             "--out", str(tmp_path / "v"), "--fsdp"]  # fmt: skip
    assert main(value) == 2
    assert "not --trunk frozen" in capsys.readouterr().err
    assert main(value + ["--trunk", "full"]) == 2
    assert "but this is one" in capsys.readouterr().err
    # the reward model: one process, refused before the data and the backbone load
    rm_args = ["train", "rm", "--data", str(tmp_path / "no-such.jsonl"), "--out", str(tmp_path / "rm"), "--fsdp"]
    assert main(rm_args) == 2
    assert "but this is one" in capsys.readouterr().err
    with pytest.raises(QVLMError, match="but this is one"):
        rm.train_reward_model(rm.RMData("preference"), RewardModelConfig(fsdp=True), tmp_path / "rm")
