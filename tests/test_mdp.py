"""Samples and token batches: validation messages and the DESIGN.md index conventions."""

import pytest

from qvlm.errors import QVLMError
from qvlm.jsonl import read_prompts, read_samples, write_samples
from qvlm.mdp import Sample, collate, encode_samples


def write(tmp_path, lines, name="s.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_read_samples_roundtrip(tmp_path):
    samples = [Sample("hi", "there", 0.5), Sample("a", "b", -1.0, token_rewards=[0.25], finished=False)]
    write_samples(tmp_path / "s.jsonl", samples)
    back = read_samples(tmp_path / "s.jsonl")
    assert back[0].reward == 0.5 and back[0].finished
    assert back[1].token_rewards == [0.25] and not back[1].finished


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"prompt": "a", "response": "b"', "line 2: not valid JSON"),
        ('{"response": "b", "reward": 1}', 'missing field "prompt"'),
        ('{"prompt": "a", "response": "b", "reward": "high"}', 'field "reward" must be a number'),
        ('{"prompt": "a", "response": "b", "reward": NaN}', "must be finite"),
        ('{"prompt": "  ", "response": "b", "reward": 1}', 'field "prompt" is empty'),
        ('{"prompt": "a", "response": "b"}', 'missing field "reward"'),
        ('{"prompt": "a", "response": "b", "reward": 1, "token_rewards": [1, "x"]}', "token_rewards[1]"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "a", "response": "b", "reward": 1, "finished": false, "terminal": "yes"}', 'field "terminal"'),
        ('{"prompt": "a", "response": "b", "reward": 1, "response_ids": [1, -2]}', 'field "response_ids"'),
    ],
)
def test_bad_sample_lines_name_line_and_field(tmp_path, line, needle):
    p = write(tmp_path, ['{"prompt": "ok", "response": "fine", "reward": 0}', line])
    with pytest.raises(QVLMError) as err:
        read_samples(p)
    msg = str(err.value)
    assert needle.replace("line 2: ", "") in msg
    assert f"{p}:2" in msg


def test_read_prompts_txt_and_jsonl(tmp_path):
    assert read_prompts(write(tmp_path, ["one", "", "two"], "p.txt")) == ["one", "two"]
    assert read_prompts(write(tmp_path, ['{"prompt": "x"}'], "p.jsonl")) == ["x"]
    with pytest.raises(QVLMError, match="p2.jsonl:1"):
        read_prompts(write(tmp_path, ['{"text": "x"}'], "p2.jsonl"))


def test_batch_positions_rewards_done(tiny):
    _, tok = tiny
    # char tokenizer: prompt "ab" -> [bos, a, b] (m = 3); response "cd" + eos (T = 3)
    s = [Sample("ab", "cd", 1.0, token_rewards=[0.5, 0.0]), Sample("abcd", "e", 2.0, finished=False)]
    batch = collate(encode_samples(s, tok, max_length=32), tok.pad_token_id)
    # DESIGN.md: Q(s_t) is read at position m + t - 2 (0-based): t = 1 -> 2
    assert batch.state_positions[0].tolist() == [2, 3, 4]
    assert batch.actions[0].tolist() == tok("cd", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert batch.input_ids[0, 3:6].tolist() == batch.actions[0].tolist()  # action y_t sits at m + t - 1
    assert batch.rewards[0].tolist() == [0.5, 0.0, 1.0]  # token reward + scalar on the last step (EOS)
    assert batch.done[0].tolist() == [0, 0, 1]
    # row 2: m = 5, one step, not finished -> truncated, not done, padded to T = 3
    assert batch.state_positions[1, 0].item() == 4
    assert batch.response_mask[1].tolist() == [1, 0, 0]
    assert batch.done[1].tolist() == [0, 0, 0] and bool(batch.truncated[1])
    assert batch.rewards[1].tolist() == [2.0, 0, 0]


def test_fixed_horizon_sample_is_done_at_its_last_token_without_eos(tiny, tmp_path):
    """terminal: the horizon ended the episode; no EOS is appended and nothing bootstraps."""
    _, tok = tiny
    s = [Sample("ab", "cde", 1.0, finished=False, terminal=True), Sample("ab", "cde", 1.0, finished=False)]
    write_samples(tmp_path / "s.jsonl", s)
    back = read_samples(tmp_path / "s.jsonl")
    assert back[0].terminal and not back[1].terminal
    assert "terminal" not in (tmp_path / "s.jsonl").read_text().splitlines()[1]
    batch = collate(encode_samples(back, tok, max_length=32), tok.pad_token_id)
    assert batch.actions[0].tolist() == batch.actions[1].tolist() == tok("cde", add_special_tokens=False)["input_ids"]
    assert batch.done[0].tolist() == [0, 0, 1] and not bool(batch.truncated[0])
    assert batch.done[1].tolist() == [0, 0, 0] and bool(batch.truncated[1])
    assert batch.rewards[0].tolist() == [0, 0, 1.0]


def test_response_ids_are_the_actions_when_given(tiny, tmp_path):
    """Exact sampled tokens win over a re-tokenisation; ids that decode to other text are refused."""
    _, tok = tiny
    ids = tok("cde", add_special_tokens=False)["input_ids"]
    write_samples(tmp_path / "s.jsonl", [Sample("ab", "cde", 1.0, response_ids=ids)])
    back = read_samples(tmp_path / "s.jsonl")
    assert back[0].response_ids == ids
    enc = encode_samples(back, tok, 32)[0]
    assert enc.response_ids == ids + [tok.eos_token_id]
    with pytest.raises(QVLMError, match="do not decode to the response"):
        encode_samples([Sample("ab", "cde", 1.0, response_ids=ids[::-1])], tok, 32)


def test_length_limit_truncates_not_terminates(tiny):
    _, tok = tiny
    enc = encode_samples([Sample("ab", "cdefgh", 1.0)], tok, max_length=6)[0]
    assert len(enc.prompt_ids) + len(enc.response_ids) == 6
    assert enc.truncated and not enc.terminated
    assert enc.rewards[-1] == 1.0  # the score goes on the last kept step


def test_prompt_longer_than_limit_is_a_clear_error(tiny):
    _, tok = tiny
    with pytest.raises(QVLMError, match="no room for a response"):
        encode_samples([Sample("a" * 40, "b", 1.0)], tok, max_length=20)


def test_token_rewards_length_mismatch(tiny):
    _, tok = tiny
    with pytest.raises(QVLMError, match="token_rewards has 1 values but the response has 2"):
        encode_samples([Sample("ab", "cd", 1.0, token_rewards=[1.0])], tok, max_length=32)
