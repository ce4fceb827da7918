"""Every reward form behind ``get_reward``: built-ins, weighted sums, Python functions (file and module),
token rewards, reference rewards (match, bleu, chrf, rougeL), hf: classifiers; and their errors."""

import json
import math
import sys

import pytest
import torch

from qvlm.cli import main
from qvlm.errors import QVLMError
from qvlm.rewards import (
    as_sequence_reward,
    get_reward,
    needs_reference,
    read_references,
    response_tokens,
    score,
    score_tokens,
)
from qvlm.rewards.combine import split_terms
from qvlm.rewards.hf import parse_hf_spec
from qvlm.rewards.reference import match_rewards

USER_REWARDS = """
from qvlm.rewards import token_level

def n_words(prompts, responses):
    return [len(r.split()) for r in responses]

@token_level
def is_a(prompts, tokens):
    return [[float(t == "a") for t in row] for row in tokens]

def one_arg(responses):
    return [0.0 for _ in responses]

def too_few(prompts, responses):
    return [1.0]

def lists(prompts, responses):
    return [[1.0] for _ in responses]

def nan(prompts, responses):
    return [float("nan") for _ in responses]

@token_level
def short_rows(prompts, tokens):
    return [[0.0] for _ in tokens]

def broken_import_is_not_here(prompts, responses):
    return [0.0 for _ in responses]
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_builtins_and_weighted_sum():
    prompts, responses = ["p", "p"], ["good good", "abc"]
    assert score(get_reward("length"), prompts, responses) == [0.09, 0.03]
    assert score(get_reward("count:good"), prompts, responses) == [2.0, 0.0]
    both = score(get_reward("count:good+0.5*length"), prompts, responses)
    assert both == pytest.approx([2.045, 0.015])
    assert score(get_reward("count:good+-2*count:abc"), prompts, responses) == [2.0, -2.0]
    vader = score(get_reward("vader"), prompts, ["I love this", "I hate this"])
    assert vader[0] > 0.3 and vader[1] < -0.3
    assert score(get_reward("vader-negative"), prompts, ["I love this"] * 2)[0] == pytest.approx(-vader[0])


def test_split_terms():
    assert split_terms("vader+0.2*length") == [(1.0, "vader"), (0.2, "length")]
    assert split_terms("-1e-1 * length") == [(-0.1, "length")]
    assert split_terms("hf:runs/rm:positive") == [(1.0, "hf:runs/rm:positive")]
    with pytest.raises(QVLMError, match="empty term"):
        split_terms("vader+")


def test_python_file_and_module_rewards(user_file, monkeypatch):
    fn = get_reward(f"{user_file}:n_words")
    assert score(fn, ["p", "p"], ["a b c", "d"]) == [3.0, 1.0]
    monkeypatch.syspath_prepend(str(user_file.parent))
    sys.modules.pop("my_rewards", None)
    mod = get_reward("my_rewards:n_words")
    assert score(mod, ["p"], ["x y"]) == [2.0]
    mixed = get_reward(f"my_rewards:n_words+0.5*{user_file}:n_words")
    assert score(mixed, ["p"], ["x y"]) == [3.0]


def test_token_reward_from_a_file(user_file, tiny):
    _, tok = tiny
    fn = get_reward(f"{user_file}:is_a")
    tokens = response_tokens(tok, [tok("aba", add_special_tokens=False)["input_ids"]])
    assert tokens == [["a", "b", "a"]]
    assert score_tokens(fn, ["p"], tokens) == [[1.0, 0.0, 1.0]]
    assert as_sequence_reward(fn, tok)(["p"], ["aba"]) == [2.0]
    with pytest.raises(QVLMError, match="per-token rewards"):
        score(fn, ["p"], ["aba"])
    # a sequence term in a sum with a token term lands on the last token
    total = get_reward(f"{user_file}:is_a+10*length")
    assert score_tokens(total, ["p"], tokens) == [[1.0, 0.0, pytest.approx(1.3)]]


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing", "has no function 'missing'; it defines"),
        ("one_arg", r"one_arg\(responses\) cannot be called as one_arg\(prompts, responses\)"),
    ],
)
def test_python_reward_load_errors(user_file, name, message):
    with pytest.raises(QVLMError, match=message):
        get_reward(f"{user_file}:{name}")


@pytest.mark.parametrize(
    "name, message",
    [
        ("too_few", "returned 1 values for 2 responses"),
        ("lists", "returned a list for response 0"),
        ("nan", "rewards must be finite"),
    ],
)
def test_python_reward_return_errors(user_file, name, message):
    with pytest.raises(QVLMError, match=message):
        score(get_reward(f"{user_file}:{name}"), ["p", "q"], ["a", "b"])


def test_token_reward_shape_error(user_file):
    with pytest.raises(QVLMError, match="returned 1 values for response 0, which has 2 tokens"):
        score_tokens(get_reward(f"{user_file}:short_rows"), ["p"], [["a", "b"]])


def test_python_reward_missing_file_and_module(tmp_path):
    with pytest.raises(QVLMError, match="no such file"):
        get_reward(f"{tmp_path}/nope.py:f")
    with pytest.raises(QVLMError, match="no module 'no_such_module_qvlm'"):
        get_reward("no_such_module_qvlm.sub:f")
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(QVLMError, match="raised RuntimeError: boom"):
        get_reward(f"{bad}:f")
    with pytest.raises(QVLMError, match="unknown reward"):
        get_reward("no-such-reward")


def test_match_rewards_by_hand():
    assert match_rewards(["t", "h", "e", "x"], ["t", "h", "a"]) == [1.0, 1.0, 0.0, 0.0]
    assert match_rewards([], ["a"]) == []


def test_reference_rewards(tmp_path, tiny):
    _, tok = tiny
    refs = {"p": "the cat sat on the mat", "q": "a b c d"}
    prompts = ["p", "p"]
    bleu = score(get_reward("bleu", references=refs), prompts, ["the cat sat on the mat", "the dog ran"])
    assert bleu[0] == pytest.approx(1.0) and 0 <= bleu[1] < 0.5
    chrf = score(get_reward("chrf", references=refs), prompts, ["the cat sat on the mat", "xyz"])
    assert chrf[0] == pytest.approx(1.0) and chrf[1] < 0.2
    # ROUGE-L of "a c d e" against "a b c d": LCS "a c d" = 3 of 4 either way, F = 0.75
    assert score(get_reward("rougeL", references=refs), ["q"], ["a c d e"]) == [pytest.approx(0.75)]
    match = get_reward("match", references=refs, tokenizer=tok)
    tokens = response_tokens(tok, [tok("the dog", add_special_tokens=False)["input_ids"]])
    assert score_tokens(match, ["p"], tokens) == [[1, 1, 1, 1, 0, 0, 0]]
    with pytest.raises(QVLMError, match="no reference for the prompt 'zz'"):
        score(get_reward("bleu", references=refs), ["zz"], ["a"])
    with pytest.raises(QVLMError, match="compares each response with a reference"):
        get_reward("chrf")
    with pytest.raises(QVLMError, match="needs the policy's tokenizer"):
        get_reward("match", references=refs)
    assert needs_reference("vader+0.5*bleu") and not needs_reference("vader")


def test_read_references(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a", "reference": "x"}\n\n{"prompt": "b", "reference": "y"}\n')
    assert read_references(good) == {"a": "x", "b": "y"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "reference": "x"}\n{"prompt": "b"}\n')
    with pytest.raises(QVLMError, match=r'bad.jsonl:2: no "reference" field'):
        read_references(bad)
    txt = tmp_path / "p.txt"
    txt.write_text("a\n")
    with pytest.raises(QVLMError, match="give a .jsonl prompts file"):
        read_references(txt)


def _tiny_classifier(path, num_labels, seed=0):
    from transformers import AutoModelForSequenceClassification

    from tests.helpers import char_tokenizer, tiny_llama_config

    tok = char_tokenizer()
    config = tiny_llama_config(len(tok))
    config.num_labels = num_labels
    config.id2label = {i: name for i, name in enumerate(["neg", "pos", "neutral"][:num_labels])}
    config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def test_hf_classifier_reward(tmp_path):
    model, tok = _tiny_classifier(tmp_path / "clf", 3)
    texts = ["good day", "bad", "a much longer response here"]
    with torch.no_grad():
        logits = torch.cat([model(**tok([t], return_tensors="pt")).logits for t in texts])  # one at a time: no pad
    prob = score(get_reward(f"hf:{tmp_path / 'clf'}:pos"), ["p"] * 3, texts)
    assert prob == pytest.approx(logits.softmax(-1)[:, 1].tolist(), abs=1e-5)
    logit = score(get_reward(f"hf:{tmp_path / 'clf'}:2:logit"), ["p"] * 3, texts)
    assert logit == pytest.approx(logits[:, 2].tolist(), abs=1e-5)
    with pytest.raises(QVLMError, match="has 3 labels"):
        get_reward(f"hf:{tmp_path / 'clf'}")
    with pytest.raises(QVLMError, match="no label 'maybe'"):
        get_reward(f"hf:{tmp_path / 'clf'}:maybe")


def test_hf_classifier_errors(tmp_path):
    _tiny_classifier(tmp_path / "clf", 1)
    (tmp_path / "clf" / "model.safetensors").unlink()
    with pytest.raises(QVLMError, match="has no weights"):
        get_reward(f"hf:{tmp_path / 'clf'}")
    with pytest.raises(QVLMError, match="is not a directory"):
        get_reward(f"hf:{tmp_path / 'nothing'}")
    assert parse_hf_spec("hf:runs/rm") == ("runs/rm", None, "prob")
    assert parse_hf_spec("hf:runs/clf:pos:logit") == ("runs/clf", "pos", "logit")


def test_cli_sample_with_token_reward_and_missing_reference(tmp_path, tiny_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ab", "reference": "abcabc"}\n{"prompt": "cd", "reference": "cdcd"}\n')
    out = tmp_path / "samples.jsonl"
    args = ["sample", "--model", tiny_dir, "--prompts", prompts, "--n", "2", "--max-new-tokens", "6", "--out", out]
    assert main([str(a) for a in args] + ["--reward", "match+0.5*bleu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert len(row["token_rewards"]) == len(row["response_ids"]) and row["reward"] == 0.0
        assert all(math.isfinite(v) for v in row["token_rewards"])
    from transformers import AutoTokenizer

    from qvlm.jsonl import read_samples
    from qvlm.mdp import encode_samples

    encoded = encode_samples(read_samples(out), AutoTokenizer.from_pretrained(tiny_dir), 64)  # trainers take them
    assert len(encoded) == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ab", "reference": "x"}\n{"prompt": "cd"}\n')
    args[args.index(prompts)] = bad
    assert main([str(a) for a in args] + ["--reward", "bleu"]) == 2
    assert 'bad.jsonl:2: no "reference" field' in capsys.readouterr().err
    assert main([str(a) for a in args] + ["--reward", f"{tmp_path}/none.py:f"]) == 2
    assert "no such file" in capsys.readouterr().err
    _tiny_classifier(tmp_path / "clf", 1)
    (tmp_path / "clf" / "model.safetensors").unlink()
    assert main([str(a) for a in args] + ["--reward", f"vader+hf:{tmp_path / 'clf'}"]) == 2
    assert "has no weights (model.safetensors)" in capsys.readouterr().err


def test_check_reward_fails_early_without_loading(tmp_path, user_file):
    from qvlm.rewards import check_reward

    check_reward(f"vader+0.5*bleu+count:x+{user_file}:n_words")  # fine: nothing raised
    with pytest.raises(QVLMError, match="unknown reward 'sentiment'"):
        check_reward("vader+sentiment")
    with pytest.raises(QVLMError, match="has no function 'nope'"):
        check_reward(f"{user_file}:nope")
    with pytest.raises(QVLMError, match="is not a directory"):
        check_reward(f"hf:{tmp_path / 'missing'}:pos")
