"""`qvlm train rm`: the Bradley-Terry and classification losses by hand, calibration bins, pooling under
left and right padding, a separable preference set learned to >= 95% held-out accuracy, save -> hf:
load with identical scores, resume, and bad input."""

import dataclasses
import hashlib
import json
import math

import pytest
import torch

from qvlm.algos import reward_model as rm
from qvlm.algos.reward_model import RMData, read_rm_data, train_reward_model
from qvlm.cli import main
from qvlm.configs import RewardModelConfig
from qvlm.errors import QVLMError
from qvlm.losses import bradley_terry_loss, classification_loss
from qvlm.report.calibration import calibration_bins, expected_calibration_error
from qvlm.rewards import get_reward, score
from tests.helpers import save_tiny_backbone, separable_prefs


def test_bradley_terry_loss_by_hand():
    # margins (1, 0, -1): -log sigmoid = (0.3132617, 0.6931472, 1.3132617), mean 0.7732235
    loss, stats = bradley_terry_loss(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.0, 0.5, 1.0]))
    assert loss.item() == pytest.approx(0.7732235, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx(1 / 3) and stats["margin"].item() == pytest.approx(0.0)


def test_classification_loss_by_hand():
    # logits (0, ln 3) -> p = (0.25, 0.75): label 1 costs -ln 0.75 = 0.2876821, label 0 costs ln 4 = 1.3862944
    logits = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]])
    loss, stats = classification_loss(logits, torch.tensor([1, 0]))
    assert loss.item() == pytest.approx((0.2876821 + 1.3862944) / 2, abs=1e-6)
    assert stats["accuracy"].item() == 0.5


def test_calibration_bins_and_ece():
    bins = calibration_bins([0.05, 0.15, 0.95, 0.91], [0, 1, 1, 0], n_bins=10)
    assert [(b["count"], b["frequency"]) for b in bins] == [(1, 0.0), (1, 1.0), (2, 0.5)]
    # ECE = 1/4 |0 - 0.05| + 1/4 |1 - 0.15| + 2/4 |0.5 - 0.93| = 0.0125 + 0.2125 + 0.215
    assert expected_calibration_error(bins) == pytest.approx(0.44)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_rm_data(tmp_path):
    prefs = read_rm_data(_write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2))
    assert prefs.kind == "preference" and prefs.chosen == ["a", "a"]
    clf = read_rm_data(_write(tmp_path / "c.jsonl", [{"text": "x", "label": 10}, {"text": "y", "label": 2}]))
    assert clf.label_names == ["2", "10"] and clf.labels == [1, 0]
    with pytest.raises(QVLMError, match=r"bad.jsonl:2: field \"rejected\" must be a string"):
        read_rm_data(_write(tmp_path / "bad.jsonl", [{"chosen": "a", "rejected": "b"}, {"chosen": "a"}]))
    with pytest.raises(QVLMError, match="a classifier needs at least two"):
        read_rm_data(_write(tmp_path / "one.jsonl", [{"text": "x", "label": "a"}] * 3))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    backbone = save_tiny_backbone(tmp / "llama", "llama")
    data = _write(tmp / "prefs.jsonl", separable_prefs(200))
    cfg = RewardModelConfig(
        backbone=str(backbone), lr=1e-2, batch_size=16, epochs=2, held_out=0.2, progress=False, checkpoint_every=5
    )
    result = train_reward_model(read_rm_data(data), cfg, tmp / "run", device="cpu", log=lambda s: None)
    return tmp, cfg, result


def test_bradley_terry_learns_a_separable_set(trained):
    tmp, _, result = trained
    assert result["kind"] == "preference" and result["n"] == 40
    assert result["accuracy"] >= 0.95
    saved = json.loads((tmp / "run" / "eval.json").read_text())
    assert saved["accuracy"] == result["accuracy"] and saved["calibration_bins"]
    assert (tmp / "run" / "calibration.svg").read_text().lstrip().startswith("<?xml")
    history = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 20 and history[-1]["losses/bt"] < history[0]["losses/bt"]


def test_saved_model_loads_through_hf_with_identical_scores(trained):
    tmp, _, _ = trained
    prompts, responses = ["xy", "zz", "x"], ["abc", "nopq", "gfedcba"]
    reward = get_reward(f"hf:{tmp / 'run'}")
    assert reward.pair
    data = RMData("preference", prompts=prompts, chosen=responses, rejected=responses)
    # the same scores from the model in memory the trainer would have: rebuild it from the checkpoint
    model, tokenizer = rm.load_backbone(tmp / "llama", data, torch.device("cpu"))
    from safetensors.torch import load_file

    saved = load_file(str(next((tmp / "run" / "checkpoint").glob("step-*")) / "trainable.safetensors"))
    assert set(saved) == {n for n, p in model.named_parameters()}  # a reward model trains every weight
    model.load_state_dict(saved, strict=False)
    model.eval()
    with torch.no_grad():
        expected = rm._scores(model, tokenizer, prompts, responses, 256)[:, 0].tolist()
    assert score(reward, prompts, responses) == expected  # bit for bit
    got = score(reward, prompts, responses)
    assert got[0] > got[1] and got[2] > got[1]  # chosen-like above rejected-like


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_is_right_under_either_padding_side(tmp_path, arch, side):
    """A batch of different lengths scores each text as it scores alone (no padding), whatever the
    tokenizer's padding side: a causal LM pools its last real token, the encoder its first. (GPT-2 and BERT
    have absolute positions, so left padding would shift them; Llama's rotary positions are relative.)"""
    from transformers import AutoTokenizer

    backbone = save_tiny_backbone(tmp_path / arch, arch)
    data = RMData("classification", texts=["a", "b"], labels=[0, 1], label_names=["0", "1"])
    model, _ = rm.load_backbone(backbone, data, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(backbone, padding_side=side)
    model.eval()
    texts = ["ab", "a much longer text", "xyz"]
    with torch.no_grad():
        alone = torch.cat([rm._scores(model, tokenizer, None, [t], 64) for t in texts])
        batched = rm._scores(model, tokenizer, None, texts, 64)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def _kill_and_resume(data, cfg, run, monkeypatch, kill_at: int = 8) -> None:
    """Train into ``run``, killed during optimiser step ``kill_at``, then resume to the end."""
    real_step, calls = rm.optimizer_step, []

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(rm, "optimizer_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(data, cfg, run, device="cpu", log=lambda s: None)
    monkeypatch.setattr(rm, "optimizer_step", real_step)
    train_reward_model(data, cfg, run, resume=True, device="cpu", log=lambda s: None)


def _same_weights(a_dir, b_dir) -> bool:
    from safetensors.torch import load_file

    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_reaches_the_uninterrupted_model(trained, tmp_path, monkeypatch):
    tmp, cfg, _ = trained
    _kill_and_resume(read_rm_data(tmp / "prefs.jsonl"), cfg, tmp_path / "run", monkeypatch)  # checkpoint 5 stays
    assert _same_weights(tmp / "run", tmp_path / "run")


def test_resume_under_the_linear_schedule_and_mean_pooling(trained, tmp_path, monkeypatch):
    """The schedule's position and the mean-pooled head come back from the checkpoint: killed during
    step 8 (the checkpoint of step 5 stays) and resumed, bit for bit the uninterrupted run."""
    tmp, cfg, _ = trained
    data = read_rm_data(tmp / "prefs.jsonl")
    cfg = dataclasses.replace(cfg, schedule="linear", warmup=0.3, pooling="mean")
    train_reward_model(data, cfg, tmp_path / "whole", device="cpu", log=lambda s: None)
    _kill_and_resume(data, cfg, tmp_path / "resumed", monkeypatch)
    assert _same_weights(tmp_path / "whole", tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["qvlm_pooling"] == "mean"


def test_cli_train_rm_bad_input(tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", [{"text": "x", "label": "a"}, {"chosen": "y"}])
    assert main(["train", "rm", "--data", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert 'bad.jsonl:2: expected {"text", "label"}' in capsys.readouterr().err
    good = _write(tmp_path / "good.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])
    assert main(["train", "rm", "--data", str(good), "--out", str(tmp_path / "o"), "--backbone", str(tmp_path)]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_preferences_on_the_response_alone(tmp_path):
    """with_prompt=False: the prompts are not read in training, the saved model scores responses alone
    (``qvlm_input`` "response"), so any prompt gives the same score; the fingerprint differs from the
    pair model's, and the default leaves a pair model's fingerprint as it was."""
    backbone = save_tiny_backbone(tmp_path / "llama", "llama")
    rows = separable_prefs(80)
    alone = RMData(
        "preference",
        prompts=[r["prompt"] for r in rows],
        chosen=[r["chosen"] for r in rows],
        rejected=[r["rejected"] for r in rows],
        with_prompt=False,
    )
    pair = RMData("preference", prompts=alone.prompts, chosen=alone.chosen, rejected=alone.rejected)
    assert alone.fingerprint() != pair.fingerprint()
    fields = {k: v for k, v in dataclasses.asdict(pair).items() if k != "with_prompt"}
    assert pair.fingerprint() == hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()
    cfg = RewardModelConfig(backbone=str(backbone), lr=1e-2, batch_size=16, epochs=2, held_out=0.2, progress=False)
    result = train_reward_model(alone, cfg, tmp_path / "run", device="cpu", log=lambda s: None)
    assert result["accuracy"] >= 0.95
    reward = get_reward(f"hf:{tmp_path / 'run'}")
    assert not reward.pair
    a = reward(["xy", "zzz"], ["abcde", "abcde"])
    assert a[0] == pytest.approx(a[1], abs=1e-5)
    assert reward(["x"], ["abcde"])[0] > reward(["x"], ["nopqrst"])[0]


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_mean_pooling_by_hand_under_either_padding_side(tmp_path, arch, side):
    """pooling="mean": the logits are the linear head on the mean of the last hidden states over the
    real tokens, computed here by hand text by text; a padded batch gives the same."""
    from transformers import AutoTokenizer

    from qvlm.rewards.hf import linear_head

    backbone = save_tiny_backbone(tmp_path / arch, arch)
    data = RMData("classification", texts=["a", "b"], labels=[0, 1], label_names=["0", "1"])
    model, _ = rm.load_backbone(backbone, data, torch.device("cpu"), pooling="mean")
    assert model.config.qvlm_pooling == "mean"
    tokenizer = AutoTokenizer.from_pretrained(backbone, padding_side=side)
    model.eval()
    texts = ["ab", "a much longer text", "xyz"]
    with torch.no_grad():
        by_hand = []
        for t in texts:
            ids = tokenizer(t, return_tensors="pt")["input_ids"]
            hidden = model.base_model(input_ids=ids)[0][0]  # (T, H), no padding
            by_hand.append(linear_head(model)(hidden.mean(0)))
        batched = rm._scores(model, tokenizer, None, texts, 64)
        default = rm.load_backbone(backbone, data, torch.device("cpu"))[0].eval()
        first_token = rm._scores(default, tokenizer, None, texts, 64)
    torch.testing.assert_close(batched, torch.stack(by_hand), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched, first_token)  # the same weights pool otherwise by default


def test_mean_pooled_reward_model_learns_saves_and_scores_the_same_through_hf(tmp_path):
    backbone = save_tiny_backbone(tmp_path / "bert", "bert")
    data = _write(tmp_path / "prefs.jsonl", separable_prefs(200))
    cfg = RewardModelConfig(
        backbone=str(backbone), lr=1e-2, batch_size=16, epochs=2, held_out=0.2, progress=False, pooling="mean"
    )
    result = train_reward_model(read_rm_data(data), cfg, tmp_path / "run", device="cpu", log=lambda s: None)
    assert result["accuracy"] >= 0.95
    assert json.loads((tmp_path / "run" / "config.json").read_text())["qvlm_pooling"] == "mean"
    reward = get_reward(f"hf:{tmp_path / 'run'}")
    prompts, responses = ["xy", "zz", "x"], ["abc", "nopq", "gfedcba"]
    model, tokenizer = rm.load_backbone(tmp_path / "run", read_rm_data(data), torch.device("cpu"), pooling="mean")
    model.eval()
    with torch.no_grad():
        expected = rm._scores(model, tokenizer, prompts, responses, 256)[:, 0].tolist()
    got = score(reward, prompts, responses)
    assert got == pytest.approx(expected, abs=1e-6)
    assert got[0] > got[1] and got[2] > got[1]


def test_mean_pooling_refuses_a_head_that_is_not_one_linear_layer(tmp_path):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from qvlm.rewards.hf import classifier_logits

    config = RobertaConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = RobertaForSequenceClassification(config)
    model.config.qvlm_pooling = "mean"
    ids = torch.tensor([[0, 5, 6, 2]])
    with pytest.raises(QVLMError, match="one linear layer"):
        classifier_logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with pytest.raises(QVLMError, match="--pooling is 'median'"):
        RewardModelConfig(pooling="median")


def test_linear_schedule_by_hand(tmp_path, monkeypatch):
    assert [rm.lr_factor(k, 10, "linear", 0.2) for k in (0, 1, 2, 3, 9)] == [0.5, 1.0, 1.0, 0.875, 0.125]
    assert rm.lr_factor(7, 10, "constant", 0.2) == 1.0
    assert rm.lr_factor(0, 10, "linear", 0.0) == 1.0  # no warm-up: decay from the first step
    # the trainer steps at those rates: record the learning rate each optimiser step uses
    backbone = save_tiny_backbone(tmp_path / "llama", "llama")
    data = read_rm_data(_write(tmp_path / "prefs.jsonl", separable_prefs(40)))
    cfg = RewardModelConfig(
        backbone=str(backbone),
        lr=1e-2,
        batch_size=8,
        steps=5,
        held_out=0.2,
        schedule="linear",
        warmup=0.4,
        progress=False,
    )
    real_step, rates = rm.optimizer_step, []

    def recording_step(loss, optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return real_step(loss, optimizer, *args, **kwargs)

    monkeypatch.setattr(rm, "optimizer_step", recording_step)
    train_reward_model(data, cfg, tmp_path / "run", device="cpu", log=lambda s: None)
    assert rates == pytest.approx([5e-3, 1e-2, 1e-2, 2 / 3 * 1e-2, 1 / 3 * 1e-2])  # ramp 2 steps, then 3/3, 2/3, 1/3
    with pytest.raises(QVLMError, match="--schedule is 'cosine'"):
        RewardModelConfig(schedule="cosine")
