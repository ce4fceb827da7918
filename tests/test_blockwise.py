"""V-guided blockwise decoding and per-token value maps."""

import math

import pytest
import torch

from qvlm.configs import DecodeConfig
from qvlm.decoding import generate
from qvlm.decoding.best_of_n import best_of_n_kl_bound
from qvlm.decoding.blockwise import blockwise_generate
from qvlm.eval.valuemap import value_maps
from qvlm.model import QVModel

PROMPTS = ["ab", "cd", "ef"]


def test_best_of_n_kl_bound_by_hand():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)  # 0.636294


def test_one_candidate_is_plain_sampling(tiny):
    model, tok = tiny
    heads = QVModel.from_trunk(model, with_q=False).heads
    cfg = DecodeConfig(max_new_tokens=10, seed=0)
    assert (
        blockwise_generate(model, tok, PROMPTS, heads, candidates=1, block_size=3, cfg=cfg).response_ids
        == generate(model, tok, PROMPTS, cfg=cfg).response_ids
    )


def test_blockwise_with_a_trained_prefix_scorer_raises_the_reward():
    from qvlm.algos.value import train_value
    from qvlm.configs import ValueConfig
    from qvlm.rewards import get_reward, score
    from tests.helpers import tiny_model
    from tests.test_ilql import PROMPTS as TOY_PROMPTS
    from tests.test_ilql import REWARD, offline_data

    model, tok = tiny_model("llama", seed=0)
    qv = QVModel.from_trunk(model, with_q=False)
    train_value(
        qv, tok, offline_data(model, tok), ValueConfig(epochs=10, lr=3e-3, batch_size=16, max_length=32, progress=False)
    )
    prompts = TOY_PROMPTS * 8
    cfg = DecodeConfig(max_new_tokens=10, seed=5, batch_size=64)
    guided = blockwise_generate(model, tok, prompts, qv.heads, candidates=8, block_size=1, cfg=cfg)
    plain = generate(model, tok, prompts, cfg=cfg)
    mean = lambda res: sum(score(get_reward(REWARD), prompts, res.texts)) / len(prompts)  # noqa: E731
    assert mean(guided) > mean(plain) + 0.3, (mean(plain), mean(guided))
    # each response records a best-of-K KL estimate per block: the bound where the K values differ,
    # less where they tie, so never above the bound times the blocks it used
    for kl, ids in zip(guided.kl, guided.response_ids):
        assert 0.0 <= kl <= best_of_n_kl_bound(8) * len(ids) + 1e-9
    assert max(guided.kl) > 0


def test_blockwise_kl_is_zero_when_the_candidates_are_equal(tiny):
    # greedy decoding makes the K candidates of a block identical: their values tie, selection is a no-op
    model, tok = tiny
    heads = QVModel.from_trunk(model, with_q=False).heads
    cfg = DecodeConfig(max_new_tokens=8, seed=0, do_sample=False)
    res = blockwise_generate(model, tok, PROMPTS, heads, candidates=4, block_size=2, cfg=cfg)
    assert res.kl == [0.0] * len(PROMPTS)


def test_value_maps_align_tokens_values_advantages(tiny):
    model, tok = tiny
    qv = QVModel.from_trunk(model)
    maps = value_maps(qv, tok, ["ab", "cd"], ["xyz", "q"])
    assert [m["tokens"] for m in maps] == [["x", "y", "z", "<eos>"], ["q", "<eos>"]]
    for m in maps:
        assert len(m["values"]) == len(m["advantages"]) == len(m["tokens"])
    # advantage of the first token by hand: min over twin Q of the taken action minus V
    from qvlm.mdp import Sample, collate, encode_samples

    batch = collate(encode_samples([Sample("ab", "xyz", 0.0)], tok, 32), tok.pad_token_id)
    with torch.no_grad():
        h, _ = qv.features(batch)
        q = torch.stack(qv.heads.q_values(h)).min(0).values[0, 0, batch.actions[0, 0]]
        v = qv.heads.values(h)[0, 0]
    assert maps[0]["advantages"][0] == pytest.approx(float(q - v), abs=1e-6)
