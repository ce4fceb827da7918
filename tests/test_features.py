"""The frozen-trunk feature cache (qvlm.features): hits only for the same tokens, padded batch reads,
shared by two models through one object, never part of a model's state; the features file."""

from __future__ import annotations

import os

import pytest
import torch

from qvlm.errors import QVLMError
from qvlm.features import FeatureCache, load_features, save_features
from qvlm.mdp import EncodedSample, Sample, collate, encode_samples
from qvlm.model import QVModel
from qvlm.trunk import TrunkConfig


def test_put_get_len_clear_and_token_check():
    cache = FeatureCache()
    feats = torch.arange(6.0).reshape(3, 2)
    cache.put(4, torch.tensor([1, 2, 3]), feats)
    assert len(cache) == 1
    assert torch.equal(cache.get(4, torch.tensor([1, 2, 3])), feats)
    assert cache.get(4, torch.tensor([1, 2, 9])) is None  # same index, other tokens: a miss
    assert cache.get(5, torch.tensor([1, 2, 3])) is None
    cache.clear()
    assert len(cache) == 0 and cache.get(4, torch.tensor([1, 2, 3])) is None


def _batch():
    # row 0: prompt (1, 2), response (3, 4): T_0 = 2, features of s_1..s_3 (3 rows)
    # row 1: prompt (5,), response (6,): T_1 = 1, features of s_1..s_2 (2 rows), padded to T + 1 = 3
    items = [EncodedSample([1, 2], [3, 4], [0.0, 1.0], True, False), EncodedSample([5], [6], [0.5], True, False)]
    return collate(items, pad_token_id=0, index=[7, 2])


def test_lookup_pads_each_row_and_misses_when_any_row_is_missing():
    batch = _batch()
    cache = FeatureCache()
    cache.put(7, torch.tensor([1, 2, 3, 4]), torch.tensor([[1.0], [2.0], [3.0]]))
    assert cache.lookup(batch) is None  # row 1 (index 2) is not cached
    cache.put(2, torch.tensor([5, 6]), torch.tensor([[8.0], [9.0]]))
    feats = cache.lookup(batch)  # (B, T + 1, H) = (2, 3, 1)
    torch.testing.assert_close(feats, torch.tensor([[[1.0], [2.0], [3.0]], [[8.0], [9.0], [0.0]]]))


def test_store_keeps_each_row_up_to_its_length():
    batch = _batch()
    feats = torch.arange(6.0).reshape(2, 3, 1)  # row 1's third entry is past its end
    cache = FeatureCache()
    cache.store(batch, feats)
    torch.testing.assert_close(cache.get(7, torch.tensor([1, 2, 3, 4])), torch.tensor([[0.0], [1.0], [2.0]]))
    torch.testing.assert_close(cache.get(2, torch.tensor([5, 6])), torch.tensor([[3.0], [4.0]]))
    torch.testing.assert_close(cache.lookup(batch), torch.tensor([[[0.0], [1.0], [2.0]], [[3.0], [4.0], [0.0]]]))


def test_prime_keeps_only_samples_that_retokenise_to_the_decoded_ids(tiny):
    _, tok = tiny
    samples = [Sample("ab", "cd", 1.0), Sample("ef", "gh", 0.0)]
    items = encode_samples(samples, tok, 32)
    ids = [e.prompt_ids + e.response_ids for e in items]
    hidden = [torch.randn(len(e.response_ids) + 1, 4) for e in items]
    cache = FeatureCache()
    assert cache.prime(tok, samples, hidden, [ids[0], ids[1][:-1] + [ids[1][-1] + 1]], max_length=32) == 1
    assert torch.equal(cache.get(0, torch.tensor(ids[0])), hidden[0])
    assert cache.get(1, torch.tensor(ids[1])) is None  # decoded as other ids: left to the trunk
    assert cache.prime(tok, samples, [h[:-1] for h in hidden], ids, max_length=32) == 0  # wrong length


def test_two_models_share_one_cache_and_the_trunk_runs_once(tiny):
    model, tok = tiny
    cache = FeatureCache()
    first = QVModel.from_trunk(model, TrunkConfig("frozen"), feature_cache=cache)
    second = QVModel.from_trunk(model, TrunkConfig("frozen"), with_q=False, feature_cache=cache)
    assert first.feature_cache is second.feature_cache is cache
    assert QVModel.from_trunk(model).feature_cache is not cache  # a frozen trunk gets its own otherwise
    batch = collate(encode_samples([Sample("ab", "cd", 1.0), Sample("x", "yz", 0.0)], tok, 32), tok.pad_token_id)
    calls = []
    handle = model.base_model.register_forward_hook(lambda *a: calls.append(1))
    h1, _ = first.features(batch)
    h2, _ = second.features(batch)
    handle.remove()
    assert len(calls) == 1 and len(cache) == 2
    torch.testing.assert_close(h1, h2)


def test_cache_is_not_model_state_and_does_not_move(tiny):
    model, tok = tiny
    qv = QVModel.from_trunk(model, TrunkConfig("frozen"))
    batch = collate(encode_samples([Sample("ab", "cd", 1.0)], tok, 32), tok.pad_token_id)
    qv.features(batch)
    cache = qv.feature_cache
    assert not any("cache" in k for k in qv.state_dict())
    qv.to(torch.float64)
    assert qv.feature_cache is cache and cache.get(0, batch.input_ids[0]).dtype == torch.float32
    qv.to(torch.float32)


def test_wrappers_and_trainable_trunks(tiny):
    model, _ = tiny
    with pytest.raises(QVLMError, match="only a frozen trunk caches features"):
        QVModel.from_trunk(model, TrunkConfig("full"), feature_cache=FeatureCache())
    full = QVModel.from_trunk(model, TrunkConfig("full"))
    assert full.feature_cache is None
    full.clear_cache()  # nothing to clear, no error
    with pytest.raises(QVLMError, match="only a frozen trunk"):
        full.prime_features(None, [], [], [], 32)
    cache = FeatureCache()
    a, b = QVModel.from_trunk(model, feature_cache=cache), QVModel.from_trunk(model, feature_cache=cache)
    a.feature_cache.put(0, torch.tensor([1]), torch.zeros(1, 2))
    assert b.feature_cache is a.feature_cache
    b.clear_cache()
    assert len(a.feature_cache) == 0


def test_features_file_round_trip_and_atomic(tmp_path, monkeypatch):
    path = tmp_path / "features.safetensors"
    ids, hidden = [[1, 2, 3], [4]], [torch.randn(2, 3), torch.randn(1, 3)]
    save_features(path, ids, hidden)
    got_ids, got_hidden = load_features(path)
    assert got_ids == ids
    for a, b in zip(got_hidden, hidden):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_features(path, [[9]], [torch.zeros(1, 3)])
    monkeypatch.undo()
    assert load_features(path)[0] == ids  # the old file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.safetensors"]  # no temporary left
