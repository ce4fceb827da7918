"""DeepSpeed ZeRO on the CPU with gloo: ``qvlm train ppo --trunk full --deepspeed`` (issue 12).

- PPO ``--trunk full`` in 2 ZeRO-2 processes (a critic warm-up iteration, the adaptive KL
  controller), killed after iteration 1 and resumed from the checkpoint (its AdamW moments gathered
  from the partitions), against 1 plain process: every weight agrees to 1e-5, the same tokens were
  sampled; ZeRO-1 without the kill;
- the DeepSpeed config checks, and one process refused before the model loads.

The runs are skipped where deepspeed is not installed (CI); on a CPU: ``pip install deepspeed`` (0.19.8
measured). The config checks (:mod:`qvlm.train.zero` without an engine) run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from qvlm.algos.ppo import PPOConfig
from qvlm.cli import main
from qvlm.errors import QVLMError
from qvlm.train.zero import accelerate_deepspeed, check_deepspeed, deepspeed_config
from tests.helpers import assert_same_full_ppo_run, spawn_processes, train_tiny_ppo

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks an accelerator (in the spawned processes too)
requires_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or not torch.distributed.is_available(),
    reason="deepspeed is not installed (or torch.distributed not built)",
)


def _ppo(run_dir: str, deepspeed: str, resume: bool = False, kill: bool = False) -> None:
    # as tests/test_distributed_fsdp.py: tests.helpers.tiny_ppo_config (8 rows, minibatches of 3 split
    # unequally, a critic warm-up iteration: the policy's ZeRO partition must not move, the adaptive KL
    # controller, clipping on), every policy weight training
    train_tiny_ppo(run_dir, resume, kill, trunk="full", lr=1e-3, deepspeed=deepspeed)


@requires_deepspeed
def test_deepspeed_zero2_ppo_two_processes_equal_one(tmp_path):
    """PPO --trunk full --deepspeed zero2 in 2 processes, killed after iteration 1 and resumed,
    against 1 plain process: every weight of the policy and of the V head agrees to 1e-5."""
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    _ppo(str(one), deepspeed="")
    spawn_processes(_ppo, str(two), "zero2", False, True)
    assert not (two / "policy.safetensors").exists()
    # the checkpoint holds a plain AdamW state: every parameter's full moments, the policy's included
    state = torch.load(two / "checkpoint" / "step-00000002" / "trainer_state.pt", weights_only=False)["optimizer"]
    plain = torch.load(one / "checkpoint" / "step-00000003" / "trainer_state.pt", weights_only=False)["optimizer"]
    assert state["state"].keys() == plain["state"].keys()
    assert [len(g["params"]) for g in state["param_groups"]] == [len(g["params"]) for g in plain["param_groups"]]
    spawn_processes(_ppo, str(two), "zero2", True, False)
    assert_same_full_ppo_run(one, two)


@requires_deepspeed
def test_deepspeed_zero1_ppo_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    _ppo(str(one), deepspeed="")
    spawn_processes(_ppo, str(two), "zero1")
    assert_same_full_ppo_run(one, two)


def test_deepspeed_config_checks(tmp_path, capsys):
    assert deepspeed_config("zero2", 1.0) == {
        "zero_optimization": {"stage": 2},
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
    }
    bad = {
        "stage 3": ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3"),
        "optimizer": ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, "remove 'optimizer'"),
        "bf16": ({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}, "remove 'bf16'"),
        "clip": ({"zero_optimization": {"stage": 1}, "gradient_clipping": 0.5}, "differs from --grad-clip 1.0"),
    }
    for name, (cfg, message) in bad.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        with pytest.raises(QVLMError, match=message):
            deepspeed_config(str(path), 1.0)
    with pytest.raises(QVLMError, match="--deepspeed partitions the optimiser of --trunk full"):
        PPOConfig(deepspeed="zero2")  # --trunk lora (the default)
    (tmp_path / "p.txt").write_text("hello\n")
    args = ["train", "ppo", "--model", str(tmp_path / "no-such-model"), "--prompts", str(tmp_path / "p.txt"),
            "--reward", "count:e", "--out", str(tmp_path / "r"), "--trunk", "full", "--deepspeed", "zero2"]  # fmt: skip
    assert main(args) == 2  # one process: refused before the model loads
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--deepspeed partitions the optimiser over several processes, but this is one" in err[0]


def test_accelerate_deepspeed_settings_and_the_missing_package(monkeypatch):
    """accelerate's environment names the ZeRO stage (or a config file); offloading is refused; several
    processes without the package get the install line (no deepspeed needed for any of it)."""
    for key in list(os.environ):
        if key.startswith("ACCELERATE_"):
            monkeypatch.delenv(key)
    assert accelerate_deepspeed() == ""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert accelerate_deepspeed() == "zero2"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    assert accelerate_deepspeed() == "zero1"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "/tmp/ds.json")
    assert accelerate_deepspeed() == "/tmp/ds.json"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(QVLMError, match="offload_optimizer to a device"):
        accelerate_deepspeed()
    check_deepspeed("")  # off: nothing to check
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(__import__("sys").modules, "deepspeed", None)  # as if not installed
    with pytest.raises(QVLMError, match=r"needs the deepspeed package \(pip install deepspeed\)"):
        check_deepspeed("zero2")
