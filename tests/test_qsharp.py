"""Q# on a language model (issue 22): the distributional heads and their guidance by hand, the roll-in /
roll-out split, the labelled steps, and the trainer on a tiny model (learning, resume bit for bit, one
set of heads decoding at every beta)."""

from __future__ import annotations

import math

import pytest
import torch

from qvlm.algos.qsharp import cut_points, label_mask, qsharp_loss, train_qsharp
from qvlm.configs import DecodeConfig, QSharpConfig, TrunkConfig
from qvlm.decoding import generate
from qvlm.decoding.guidance import guided_scores, soft_centre
from qvlm.decoding.sampling import sample_rollout
from qvlm.distributional import make_support, two_hot
from qvlm.errors import QVLMError
from qvlm.heads import DistHeads, HeadsConfig, load_heads
from qvlm.mdp import Sample, collate, encode_samples
from qvlm.model import QVModel, load_qv_model
from tests.helpers import Killed, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["hello", "abc", "the cat", "zz"]


def _fixed_heads(z_q: list[list[float]], z_v: list[float], support=(0.0, 0.5, 1.0)) -> DistHeads:
    """Distributional heads on a 2-token vocabulary whose Z(s, a) is ``z_q[a]`` and Z(s) is ``z_v`` (as
    probabilities) whatever the state: the state's logits carry Z(s, token 1), the rank-2 interaction
    adds token 0's difference through the identity embedding."""
    K = len(support)
    heads = DistHeads(HeadsConfig(hidden_size=2, vocab_size=2, head_hidden=2, bins=K, support_low=support[0],
                                  support_high=support[-1], dist_rank=2))  # fmt: skip
    log_q = torch.log(torch.tensor(z_q, dtype=torch.float64)).float()  # (2, K)
    with torch.no_grad():
        for p in heads.parameters():
            p.zero_()
        z = heads.z_head
        z.state.bias.copy_(log_q[1])  # c(h) = log Z(s, 1)
        z.proj.weight.copy_(torch.eye(2))  # P e_a = e_a
        g = torch.zeros(K, 2)
        g[:, 0] = log_q[0] - log_q[1]  # token 0 (e = (1, 0)) adds its difference
        z.inter.bias.copy_(g.flatten())
        heads.v_head.net[2].bias.copy_(torch.log(torch.tensor(z_v)))
    heads.attach_unembedding(torch.eye(2))
    return heads


def test_soft_centre_by_hand():
    """Logits (0, log 3): weights (1/4, 3/4); advantages (1, -1) at alpha 1 have soft value
    log(e/4 + 3/(4e)) = -0.0455415; the candidates keep their total mass; alpha -> inf is the mean."""
    logits = torch.tensor([[0.0, math.log(3.0)]])
    idx = torch.tensor([[0, 1]])
    adv = torch.tensor([[1.0, -1.0]])
    out = soft_centre(logits, idx, adv, 1.0)
    torch.testing.assert_close(out, torch.tensor([[1.0455415, -0.9544585]]))
    w = torch.tensor([0.25, 0.75])
    assert float((w * out[0].exp()).sum()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(soft_centre(logits, idx, adv, math.inf), torch.tensor([[1.5, -0.5]]))
    torch.testing.assert_close(soft_centre(logits, idx, adv, 1e6), torch.tensor([[1.5, -0.5]]), atol=1e-4, rtol=0)


def test_dist_heads_read_q_star_at_any_beta():
    """DESIGN.md: support (0, 0.5, 1), Z(s, a) = (0.5, 0.3, 0.2): Q*_alpha = 0.4306602 at alpha 1, 0.5136111 at
    0.5, 0.8400731 at 0.1, the mean 0.35 at beta 0; the advantage subtracts V*_alpha of Z(s)."""
    heads = _fixed_heads([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]], [0.6, 0.3, 0.1])
    h = torch.zeros(1, 2)
    v = {b: math.log(0.6 + 0.3 * math.exp(0.5 * b) + 0.1 * math.exp(b)) / b for b in (1.0, 2.0, 10.0)}
    for beta, q in ((1.0, 0.4306602), (2.0, 0.5136111), (10.0, 0.8400731)):
        adv = heads.advantages(h, torch.tensor([[0, 1]]), beta=beta)
        torch.testing.assert_close(adv, torch.full((1, 2), q - v[beta]), atol=1e-5, rtol=0)
    mean_adv = heads.advantages(h, torch.tensor([[0]]), beta=0)
    assert float(mean_adv) == pytest.approx(0.35 - (0.3 * 0.5 + 0.1 * 1.0), abs=1e-6)
    assert float(heads.values(h)[0]) == pytest.approx(0.25, abs=1e-6)  # the mean of Z(s)


def test_guidance_with_the_exact_return_distribution_samples_the_soft_optimum():
    """One step, two actions, pi_ref (0.5, 0.5), rewards (1, 0), alpha 1 (DESIGN.md): heads holding the
    exact Z (a point mass at each reward) guide log pi_ref at beta 1 to pi* = sigmoid(+-1), with no
    training, over the whole vocabulary and over the top 2 candidates alike."""
    eps = 1e-9
    heads = _fixed_heads([[eps, 1 - eps], [1 - eps, eps]], [0.5, 0.5], support=(0.0, 1.0))
    logits = torch.log(torch.tensor([[0.5, 0.5]]))
    for top_k in (0, 2):
        pi = torch.softmax(guided_scores(logits, heads, torch.zeros(1, 2), beta=1.0, top_k=top_k), dim=-1)
        torch.testing.assert_close(pi, torch.tensor([[0.7310586, 0.2689414]]), atol=1e-6, rtol=0)


def test_label_mask_and_cut_points():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    got = label_mask(mask, torch.tensor([1, 3]))
    torch.testing.assert_close(got, torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
    cuts = cut_points(0, 1, 500, 7)
    assert cuts == cut_points(0, 1, 500, 7) and cuts != cut_points(0, 2, 500, 7)  # keyed by (seed, round)
    assert min(cuts) == 0 and max(cuts) == 6  # uniform over the response


def test_rollin_rollout_split_labels_come_from_the_reference_continuation(tiny):
    """guide_steps: each response follows the guided policy for its first h tokens, then the base model:
    where the base model wrote, the sampling distribution is the base's (log-prob = ref log-prob); and the
    loss reads only those steps (a step before the cut carrying a huge return moves nothing)."""
    model, tok = tiny
    torch.manual_seed(0)
    qv = QVModel.from_trunk(model, TrunkConfig("frozen"), head_hidden=8, bins=5, support=(0.0, 4.0), dist_rank=4)
    with torch.no_grad():  # a strong, token-dependent tilt
        for p in qv.heads.z_head.inter.parameters():
            p.normal_(0.0, 3.0)
    cfg = DecodeConfig(max_new_tokens=6, beta=8.0, num_return_sequences=3, guidance_top_k=0, seed=0)
    cuts = [0, 2, 4, 6, 1, 3]
    out = sample_rollout(model, tok, PROMPTS[:2], qv.heads, cfg, guide_steps=cuts, row_seeds=list(range(6)))
    steps = torch.arange(6)[None]
    real = out.response_mask.bool()
    base = (steps >= torch.tensor(cuts)[:, None]) & real
    guided = (steps < torch.tensor(cuts)[:, None]) & real
    torch.testing.assert_close(out.logprobs[base], out.ref_logprobs[base], atol=1e-5, rtol=0)
    assert (out.logprobs[guided] - out.ref_logprobs[guided]).abs().max() > 1e-2
    # the loss on samples labelled from their cut: a return on steps before the cut changes nothing
    samples = [Sample("hello", "abcdef", 2.0, finished=False, terminal=True)] * 2
    batch = collate(encode_samples(samples, tok, 64), tok.pad_token_id)
    loss_a, stats = qsharp_loss(qv, batch, torch.tensor([0, 3]))
    assert float(stats["charts/labelled_steps"]) == 6 + 3
    heads, K = qv.heads, 5
    h, _ = qv.features(batch)
    target = two_hot(torch.full((2, 6), 2.0), make_support(0.0, 4.0, K))
    ce_q = -(target * torch.log_softmax(heads.q_logits_taken(h, batch.actions), -1)).sum(-1)
    ce_v = -(target * torch.log_softmax(heads.v_logits(h), -1)).sum(-1)
    mask = label_mask(batch.response_mask, torch.tensor([0, 3]))
    torch.testing.assert_close(loss_a, ((ce_q + ce_v) * mask).sum() / mask.sum())


def _train(run_dir, resume=False, kill=False, rounds=2, **overrides):
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(1 if resume else 0)  # a resume restores the heads from its checkpoint
    qv = QVModel.from_trunk(model, TrunkConfig("frozen"), head_hidden=16, bins=7, support=(0.0, 6.0), dist_rank=4)
    settings = dict(rounds=rounds, prompts_per_round=2, samples_per_prompt=3, max_new_tokens=6, steps_per_round=8,
                    batch_size=4, lr=1e-2, betas="2,8", progress=False)  # fmt: skip
    cfg = QSharpConfig(**{**settings, **overrides})

    def stop(r, _):
        if kill and r == 1:
            raise Killed

    try:
        history = train_qsharp(qv, tok, PROMPTS, "count:e", cfg, run_dir=run_dir, resume=resume, callbacks=[stop])
    except Killed:
        return None, qv
    return history, qv


def test_qsharp_trains_counts_its_cost_and_resumes_bit_for_bit(tmp_path):
    history, qv = _train(tmp_path / "whole")
    replay = [line for line in (tmp_path / "whole" / "replay.jsonl").read_text().splitlines()]
    assert len(replay) == 3 * 6 and history["charts/reward_calls"][-1][1] == 18  # rounds 0, 1, 2 decoded here
    losses = [v for _, v in history["losses/z_q"]]
    assert sum(losses[-4:]) < sum(losses[:4])  # the return distributions fit
    assert [v for _, v in history["charts/rollin_beta"]] == [0.0, 2.0, 8.0]  # the roll-in strengths in turn
    import json

    info = json.loads((tmp_path / "whole" / "training.json").read_text())
    assert info["reward_calls"] == 18 and info["decoded_tokens"] > 0 and info["algorithm"] == "qsharp"
    labels = [json.loads(line)["label_from"] for line in replay]
    assert labels[:6] == [0] * 6 and labels[6:12] == cut_points(0, 1, 6, 6)
    _train(tmp_path / "killed", kill=True)
    _, resumed = _train(tmp_path / "killed", resume=True)
    for k, v in qv.heads.state_dict().items():
        assert torch.equal(v, resumed.heads.state_dict()[k]), k
    # one set of heads decodes at every beta; the saved heads load as distributional heads
    loaded = load_heads(tmp_path / "whole")
    assert isinstance(loaded, DistHeads) and loaded.config.bins == 7
    model, tok = tiny_model("llama", seed=0)
    qv2 = load_qv_model(model, tmp_path / "whole")
    for beta in (0.5, 4.0, 32.0):
        res = generate(model, tok, PROMPTS[:2], qv2.heads, DecodeConfig(max_new_tokens=5, beta=beta, seed=0,
                       guidance_top_k=5), track_kl=True)  # fmt: skip
        assert len(res.texts) == 2 and all(k >= -1e-6 for k in res.kl)


def test_qsharp_refuses_mean_heads_and_incomplete_round_0(tiny):
    model, tok = tiny
    with pytest.raises(QVLMError, match="build the model with bins > 0"):
        train_qsharp(QVModel.from_trunk(model), tok, PROMPTS, "count:e", QSharpConfig(progress=False))
    qv = QVModel.from_trunk(model, bins=5, support=(0.0, 1.0))
    cut = [Sample("hello", "abc", 1.0, finished=False)]
    with pytest.raises(QVLMError, match="Q# labels complete returns"):
        train_qsharp(qv, tok, PROMPTS, "count:e", QSharpConfig(progress=False), initial=cut)
    with pytest.raises(QVLMError, match="--betas"):
        QSharpConfig(betas="")


def test_the_tilt_design_tilts_the_state_distribution_by_a_tied_scalar():
    """dist_head tilt: Z(s, a) = Z(s) exp(delta(s, a) z) / norm, delta = e_a . g(h) + b_a: at delta 0 the
    state's law; a token's bias b_a = log 2 on support (0, 1) with Z(s) = (1/2, 1/2) gives (1/3, 2/3)."""
    heads = DistHeads(HeadsConfig(hidden_size=2, vocab_size=2, head_hidden=2, bins=2, support_low=0.0,
                                  support_high=1.0, dist_head="tilt"))  # fmt: skip
    heads.attach_unembedding(torch.eye(2))
    with torch.no_grad():
        for p in heads.parameters():
            p.zero_()
        heads.z_head.bias[1] = math.log(2.0)
    probs = torch.softmax(heads.q_logits(torch.zeros(1, 2), torch.tensor([[0, 1]])), dim=-1)  # (1, 2, K)
    torch.testing.assert_close(probs[0], torch.tensor([[0.5, 0.5], [1 / 3, 2 / 3]]))
    # Q*_alpha at alpha 1 of (1/3, 2/3) on (0, 1): log(1/3 + 2e/3); V* of (1/2, 1/2): log((1 + e)/2)
    adv = heads.advantages(torch.zeros(1, 2), torch.tensor([[1]]), beta=1.0)
    assert float(adv) == pytest.approx(math.log(1 / 3 + 2 * math.e / 3) - math.log((1 + math.e) / 2), abs=1e-6)
    # Z(s) is held fixed inside Z(s, a): a loss on Z(s, a) moves delta only, never the state head
    h = torch.randn(3, 2)
    logp = torch.log_softmax(heads.q_logits_taken(h, torch.tensor([0, 1, 1])), dim=-1)
    (-logp[:, 0].sum()).backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in heads.v_head.parameters())
    assert float(heads.z_head.bias.grad.abs().sum()) > 0.0


def test_cli_trains_both_designs_decodes_and_refuses_bad_input(tmp_path, tiny_dir, capsys):
    """`qvlm train qsharp` end to end on a tiny model: the run's files, the reward calls it reports, the
    design it was asked for in heads_config.json, `qvlm eval` at two betas from the one run, and bad input as
    one line with exit code 2 before any model loads."""
    import json

    from qvlm.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ab\ncd\nef\n")
    base = ["train", "qsharp", "--model", str(tiny_dir), "--prompts", str(prompts), "--reward", "count:e"]
    base += ["--rounds", "1", "--prompts-per-round", "2", "--samples-per-prompt", "2", "--steps-per-round", "3"]
    base += ["--max-new-tokens", "4", "--max-length", "32", "--support-low", "0", "--support-high", "4"]
    base += ["--bins", "5", "--no-progress"]
    for design in ("bilinear", "tilt"):
        out = tmp_path / design
        assert main(base + ["--out", str(out), "--dist-head", design]) == 0
        assert "reward calls" in capsys.readouterr().out
        assert json.loads((out / "heads_config.json").read_text())["dist_head"] == design
        training = json.loads((out / "training.json").read_text())
        assert training["reward_calls"] == 2 * 2 * 2  # round 0 and round 1, 2 prompts x 2 samples each
        assert len((out / "replay.jsonl").read_text().splitlines()) == 8
    metrics = tmp_path / "metrics.json"
    evaluate = ["eval", "--model", str(tiny_dir), "--heads", str(tmp_path / "tilt"), "--prompts", str(prompts)]
    evaluate += ["--reward", "count:e", "--betas", "0,1,8", "--max-new-tokens", "4", "--json", str(metrics)]
    assert main(evaluate) == 0
    rows = json.loads(metrics.read_text())["methods"]
    assert set(rows) == {"base", "guided_beta_1", "guided_beta_8"} and rows["guided_beta_8"]["kl_to_base"] > 0
    with pytest.raises(SystemExit) as stop:  # argparse: a design that does not exist
        main(base + ["--out", str(tmp_path / "bad"), "--dist-head", "prefix"])
    assert stop.value.code == 2 and "--dist-head" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "bad"), "--support-low", "5"]) == 2  # an empty support
    err = capsys.readouterr().err
    assert "support" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
