"""qvlm.eval.policy: a policy's KL to the base model, teacher-forced, against the decoding loop's own
exact KL (where the base is the model that sampled), guided and not."""

from __future__ import annotations

import pytest
import torch

from qvlm.configs import DecodeConfig, TrunkConfig
from qvlm.decoding.sampling import generate
from qvlm.eval.policy import evaluate_policy_decoding
from qvlm.model import QVModel
from qvlm.rewards import get_reward
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("beta,top_k,temperature", [(0.0, 0, 1.0), (2.0, 0, 1.0), (1.5, 5, 0.8)])
def test_kl_to_base_matches_the_decoding_loop(beta, top_k, temperature):
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(0)
    qv = QVModel.from_trunk(model, TrunkConfig("frozen"), with_q=True, head_hidden=16)
    with torch.no_grad():  # non-zero Q heads, so guidance changes the distribution
        for p in qv.heads.parameters():
            p.add_(0.3 * torch.randn_like(p))
    prompts = ["hello", "the cat", "why"]
    cfg = DecodeConfig(max_new_tokens=8, beta=beta, top_k=top_k, temperature=temperature, seed=7, chat=False,
                       num_return_sequences=2)  # fmt: skip
    reward = get_reward("count:e")
    # the policy is the base itself: KL to base of the (guided) sampling distribution, both ways
    metrics, texts, rewards = evaluate_policy_decoding(model, model, tok, prompts, reward, qv.heads, cfg)
    ref = generate(model, tok, prompts, heads=qv.heads, cfg=cfg, track_kl=True)
    assert texts == ref.texts  # same seed, same samples
    assert metrics.kl_to_base == pytest.approx(sum(ref.kl) / len(ref.kl), abs=1e-4)
    if beta == 0 and temperature == 1.0:
        assert metrics.kl_to_base == pytest.approx(0.0, abs=1e-6)
    assert rewards == [float(t.count("e")) for t in texts]
