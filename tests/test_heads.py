"""Heads, Polyak sync, safetensors round trip, hidden size from configs, feature cache."""

import pytest
import torch

from qvlm.errors import QVLMError
from qvlm.heads import HeadsConfig, QVHeads, load_heads, polyak_update, save_heads
from qvlm.loading import hidden_size_of
from qvlm.mdp import Sample, collate, encode_samples
from qvlm.model import QVModel
from qvlm.trunk import TrunkConfig
from tests.helpers import tiny_gpt2_config, tiny_llama_config


def test_polyak_update_by_hand():
    p, tp = [torch.tensor([1.0, 2.0])], [torch.tensor([0.0, 4.0])]
    polyak_update(p, tp, 0.25)  # 0.75 * target + 0.25 * online
    assert tp[0].tolist() == [0.25, 3.5]


def test_heads_shapes_and_targets_frozen():
    heads = QVHeads(HeadsConfig(hidden_size=8, vocab_size=11, head_hidden=16))
    h = torch.randn(2, 5, 8)
    assert heads.values(h).shape == (2, 5)
    assert [q.shape for q in heads.q_values(h)] == [(2, 5, 11)] * 2
    assert not any(p.requires_grad for p in heads.target_q_heads.parameters())
    # targets start as copies: target min equals min of online heads
    online_min = torch.stack(heads.q_values(h)).min(0).values
    torch.testing.assert_close(heads.target_q_values(h), online_min)
    adv = heads.advantages(h)
    torch.testing.assert_close(adv, online_min - heads.values(h)[..., None])


def test_sync_targets_moves_toward_online():
    heads = QVHeads(HeadsConfig(hidden_size=4, vocab_size=3))
    with torch.no_grad():
        for p in heads.q_heads.parameters():
            p.add_(1.0)
    before = [t.clone() for t in heads.target_q_heads.parameters()]
    heads.sync_targets(1.0)  # alpha 1 copies
    for t, p, b in zip(heads.target_q_heads.parameters(), heads.q_heads.parameters(), before):
        torch.testing.assert_close(t, p)
        assert not torch.equal(t, b)


def test_save_load_roundtrip(tmp_path):
    heads = QVHeads(HeadsConfig(hidden_size=4, vocab_size=7, base_model="tiny"))
    save_heads(heads, tmp_path)
    back = load_heads(tmp_path)
    assert back.config == heads.config
    h = torch.randn(3, 4)
    torch.testing.assert_close(back.values(h), heads.values(h))
    assert not list(tmp_path.glob(".*tmp*"))


def test_load_heads_missing_is_clear(tmp_path):
    with pytest.raises(QVLMError, match="no heads here"):
        load_heads(tmp_path)


def test_hidden_size_read_from_llama_and_gpt2_configs():
    assert hidden_size_of(tiny_llama_config(10, hidden_size=24)) == 24
    assert hidden_size_of(tiny_gpt2_config(10, hidden_size=40)) == 40

    class NoHidden:
        pass

    with pytest.raises(QVLMError, match="cannot read the hidden size"):
        hidden_size_of(NoHidden())


def test_frozen_feature_cache_skips_trunk(tiny):
    model, tok = tiny
    qv = QVModel.from_trunk(model, TrunkConfig("frozen"))
    batch = collate(encode_samples([Sample("ab", "cd", 1.0), Sample("x", "yz", 0.0)], tok, 32), tok.pad_token_id)
    calls = []
    handle = qv.trunk.base_model.register_forward_hook(lambda *a: calls.append(1))
    h1, n1 = qv.features(batch)
    h2, n2 = qv.features(batch)
    handle.remove()
    assert len(calls) == 1  # the second epoch reads the cache
    torch.testing.assert_close(h1, h2)
    torch.testing.assert_close(n1, n2)
    # h_next[t] is h_states[t + 1] on real steps
    torch.testing.assert_close(n1[0, :2], h1[0, 1:3])


def test_lora_mode_trains_only_adapters(tiny):
    pytest.importorskip("peft")
    model, _ = tiny
    qv = QVModel.from_trunk(model, TrunkConfig("lora", lora_r=2))
    trainable = qv.trainable_trunk_state()
    assert trainable and all("lora" in k for k in trainable)


def test_unknown_trunk_mode():
    with pytest.raises(QVLMError, match="--trunk is 'half'; it must be one of frozen, lora, full"):
        TrunkConfig("half")


def test_feature_cache_misses_when_index_holds_other_tokens(tiny):
    model, tok = tiny
    qv = QVModel.from_trunk(model, TrunkConfig("frozen"))
    first = collate(encode_samples([Sample("ab", "cd", 1.0)], tok, 32), tok.pad_token_id)
    other = collate(encode_samples([Sample("xy", "zz", 0.0)], tok, 32), tok.pad_token_id)  # also index 0
    h1, _ = qv.features(first)
    h2, _ = qv.features(other)
    assert not torch.allclose(h1, h2)


def test_taken_equals_full_output_gathered():
    heads = QVHeads(HeadsConfig(hidden_size=8, vocab_size=13, head_hidden=5))
    h, actions = torch.randn(2, 4, 8), torch.randint(0, 13, (2, 4))
    full = heads.target_q_heads[0](h).gather(-1, actions[..., None]).squeeze(-1)
    torch.testing.assert_close(heads.target_q_heads[0].taken(h, actions), full)
    mins = torch.stack([q(h) for q in heads.target_q_heads]).min(0).values.gather(-1, actions[..., None]).squeeze(-1)
    torch.testing.assert_close(heads.target_q_taken(h, actions), mins)


def test_tied_q_head_is_embedding_dot_g_plus_bias():
    from qvlm.heads import TiedQHead

    head = TiedQHead(hidden_size=3, width=4, vocab_size=5)
    emb = torch.randn(5, 3)
    h = torch.randn(2, 3)
    torch.testing.assert_close(head(h, emb), torch.zeros(2, 5))  # starts neutral: g's last layer is 0
    with torch.no_grad():
        head.g.net[2].weight.normal_()
        head.bias.normal_()
    expected = head.g(h) @ emb.T + head.bias  # Q(s, a) = e_a . g(h) + b_a
    torch.testing.assert_close(head(h, emb), expected)
    actions = torch.tensor([[1, 4], [0, 2]])
    hh = torch.randn(2, 2, 3)
    torch.testing.assert_close(head.taken(hh, actions, emb), head(hh, emb).gather(-1, actions[..., None]).squeeze(-1))


def test_tied_heads_attach_to_model_and_reload(tiny, tmp_path):
    from qvlm.model import load_qv_model

    model, _ = tiny
    qv = QVModel.from_trunk(model, q_head="tied")
    emb = model.get_output_embeddings().weight
    assert qv.heads.unembedding is not None and qv.heads.unembedding.shape == emb.shape
    with torch.no_grad():
        for p in qv.heads.parameters():
            p.normal_()
    save_heads(qv.heads, tmp_path)
    assert not any("unembedding" in k for k in qv.heads.state_dict())  # the trunk's, not saved twice
    back = load_qv_model(model, tmp_path)
    h = torch.randn(3, model.config.hidden_size)
    torch.testing.assert_close(back.heads.advantages(h), qv.heads.advantages(h))
    with pytest.raises(QVLMError, match="needs the trunk's output embedding"):
        load_heads(tmp_path).q_values(h)


def test_q_heads_start_neutral():
    heads = QVHeads(HeadsConfig(hidden_size=4, vocab_size=6))
    adv = heads.advantages(torch.randn(2, 4))
    torch.testing.assert_close(adv, adv[:, :1].expand(-1, 6))  # same for every action: no guidance


def test_loaded_heads_take_the_trunk_dtype(tiny, tmp_path):
    from qvlm.model import load_qv_model

    model, _ = tiny
    qv = QVModel.from_trunk(model, q_head="tied", head_hidden=8)
    with torch.no_grad():
        for p in qv.heads.parameters():
            p.normal_(0, 0.1)
    save_heads(qv.heads, tmp_path)
    h = torch.randn(3, model.config.hidden_size)
    expected = qv.heads.advantages(h)
    back = load_qv_model(model.to(torch.bfloat16), tmp_path)  # saved in float32, loaded onto a bfloat16 trunk
    assert {p.dtype for p in back.heads.parameters()} == {torch.bfloat16}
    assert back.heads.unembedding.dtype == torch.bfloat16
    got = back.heads.advantages(h.to(torch.bfloat16)).float()
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)
