"""The embedded default SmolLM2-135M-Instruct: loads offline from its safetensors cache, and
value-guided decoding with beta = 0 reproduces Hugging Face generate on it."""

import pytest
import torch

from tests.conftest import requires_smollm2

pytestmark = [pytest.mark.slow, requires_smollm2]


@pytest.fixture(scope="module")
def smollm2():
    from qvlm.loading import load_model

    return load_model("smollm2-135m-instruct")


def test_loads_with_chat_template_and_pad(smollm2):
    model, tok = smollm2
    assert model.config.hidden_size == 576 and tok.pad_token_id is not None
    assert tok.chat_template


def test_beta_zero_equals_hf_generate_on_smollm2(smollm2):
    from qvlm.decoding import DecodeConfig, generate, left_pad
    from qvlm.mdp import encode_prompt
    from qvlm.model import QVModel

    model, tok = smollm2
    prompts = ["Describe a rainy morning in one sentence.", "Say hi."]
    ids, mask = left_pad([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)
    heads = QVModel.from_trunk(model, head_hidden=64).heads
    for do_sample in (False, True):
        torch.manual_seed(11)
        ref = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=do_sample,
            top_k=0 if do_sample else None,
            pad_token_id=tok.pad_token_id,
        )
        ref = ref[:, ids.shape[1] :].tolist()
        ours = generate(
            model, tok, prompts, heads=heads, cfg=DecodeConfig(max_new_tokens=6, do_sample=do_sample, seed=11, beta=0.0)
        )
        assert [r[: len(o)] for r, o in zip(ref, ours.response_ids)] == ours.response_ids
        assert all(len(o) >= 1 for o in ours.response_ids)
