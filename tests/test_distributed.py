"""Data-parallel training: 2 CPU processes (gloo) take the same steps as 1 process at the same global
batch size, for ILQL and value regression, frozen and full trunk (issue 12, item 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qvlm.algos.ilql import ILQLConfig, train_ilql
from qvlm.algos.value import ValueConfig, train_value
from qvlm.errors import QVLMError
from qvlm.mdp import Sample
from qvlm.model import QVModel
from qvlm.train import distributed
from qvlm.train.loop import local_batch
from qvlm.trunk import TrunkConfig
from tests.helpers import free_port, spawn_processes, tiny_model

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

# 9 samples of different response lengths: with batch 4 the last batch of an epoch holds one sample,
# so rank 1 has an empty shard there (weight 0), and the ranks' token counts differ at every step
PROMPTS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr"]
SAMPLES = [Sample(p, p[::-1] * (1 + i % 3), float(i % 4) / 3 - 0.5) for i, p in enumerate(PROMPTS)]


def _run(algo: str, trunk: str, run_dir: str) -> None:
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(0)
    if algo == "ilql":
        qv = QVModel.from_trunk(model, TrunkConfig(trunk))
        cfg = ILQLConfig(steps=6, batch_size=4, max_length=32, progress=False, checkpoint_every=3, cql_scale=0.1)
        train_ilql(qv, tok, SAMPLES, cfg, run_dir=run_dir)
    else:
        qv = QVModel.from_trunk(model, TrunkConfig(trunk), with_q=True)
        cfg = ValueConfig(steps=6, batch_size=4, max_length=32, progress=False, target="mc")
        train_value(qv, tok, SAMPLES, cfg, run_dir=run_dir)


def _heads(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "heads.safetensors"))


@pytest.mark.parametrize("algo,trunk", [("ilql", "frozen"), ("value", "frozen"), ("ilql", "full")])
def test_two_processes_equal_one(tmp_path, algo, trunk):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(algo, trunk, str(one))
    spawn_processes(_run, algo, trunk, str(two))
    a, b = _heads(one), _heads(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    # rank 0 alone wrote the run: one metrics line per step, the same losses as one process
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_local_batch_weights_sum_to_one(monkeypatch):
    _, tok = tiny_model("llama", seed=0)
    from qvlm.mdp import encode_samples

    items = encode_samples(SAMPLES, tok, 32)
    idx = [0, 1, 2, 3]
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    weights, seen = [], []
    for r in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        batch, w = local_batch(items, idx, 4, tok.pad_token_id)
        weights.append(w)
        seen += batch.index.tolist() if torch.is_tensor(batch.index) else list(batch.index)
    tokens = [len(items[i].response_ids) for i in idx]
    assert sorted(seen) == idx
    assert weights == pytest.approx([(tokens[0] + tokens[2]) / sum(tokens), (tokens[1] + tokens[3]) / sum(tokens)])
    # an empty shard borrows the first sample with weight 0
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    batch, w = local_batch(items, [5], 4, tok.pad_token_id)
    assert w == 0.0 and len(batch.input_ids) == 1


def test_world_size_must_divide_the_batch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # a launcher's, before the group exists
    with pytest.raises(QVLMError, match="multiple of 3"):
        distributed.check_batch_size(4)
    distributed.check_batch_size(6)
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.check_batch_size(5)


def test_cli_under_torchrun_equals_one_process(tmp_path, tiny_dir):
    """`torchrun --nproc_per_node 2 -m qvlm train value` writes the heads a single process writes."""
    data = tmp_path / "samples.jsonl"
    rows = [{"prompt": s.prompt, "response": s.response, "reward": s.reward} for s in SAMPLES]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def args(out, batch_size=4):
        return ["train", "value", "--model", str(tiny_dir), "--data", str(data), "--steps", "4", "--batch-size",
                str(batch_size), "--max-length", "32", "--seed", "3", "--device", "cpu", "--out", str(tmp_path / out)]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    one = subprocess.run([sys.executable, "-m", "qvlm", *args("one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [*launch, str(free_port()), "-m", "qvlm", *args("two")], env=env, capture_output=True, text=True
    )
    assert two.returncode == 0, two.stderr
    a, b = _heads(tmp_path / "one"), _heads(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    # a world size that does not divide the batch: each process stops before loading the model with
    # exit 2 and one line (the launcher then reports the failed children in its own words)
    bad = subprocess.run(
        [*launch, str(free_port()), "-m", "qvlm", *args("bad", 3)], env=env, capture_output=True, text=True
    )
    assert bad.returncode != 0
    assert "qvlm train: error: batch size 3 does not divide over 2 processes" in bad.stderr
    assert "exitcode  : 2" in bad.stderr
    assert not [line for line in bad.stderr.splitlines() if line.strip().startswith("File") and "/qvlm/" in line]
