"""A QVModel moves and casts as one piece (tied unembedding included); --device and --dtype on
the commands that run a model. CUDA tests skip without a GPU."""

import math

import pytest
import torch

from qvlm.algos.ilql import ILQLConfig, train_ilql
from qvlm.cli import main
from qvlm.decoding import DecodeConfig, generate
from qvlm.errors import QVLMError
from qvlm.heads import HeadsConfig, QVHeads
from qvlm.mdp import Sample
from qvlm.model import QVModel
from tests.helpers import tiny_model

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
PROMPTS = ["ab", "cd", "ef"]


def tensors_of(qv: QVModel) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, and the unembedding the heads read."""
    out = dict(qv.named_parameters())
    out.update(qv.named_buffers())
    out["heads.unembedding"] = qv.heads.unembedding
    return out


def shares_trunk_embedding(qv: QVModel) -> bool:
    """The heads read the trunk's output embedding itself (same storage), not a copy."""
    return qv.heads.unembedding.data_ptr() == qv.trunk.get_output_embeddings().weight.data_ptr()


def guided_decodes(qv: QVModel, tok) -> None:
    """Guided decoding over the whole vocabulary and over the top-k candidates runs and is finite."""
    for top_k in (0, 5):
        cfg = DecodeConfig(beta=2.0, guidance_top_k=top_k, max_new_tokens=5, seed=0)
        res = generate(qv.trunk, tok, PROMPTS, heads=qv.heads, cfg=cfg)
        assert len(res.texts) == len(PROMPTS)


def perturbed(qv: QVModel) -> QVModel:
    """Give the heads non-zero weights, so guidance really changes the scores."""
    with torch.no_grad():
        for p in qv.heads.parameters():
            p.normal_(0, 0.1)
    return qv


@pytest.mark.parametrize("q_head", ["tied", "mlp"])
def test_cast_to_bfloat16_casts_everything_and_still_decodes_and_trains(q_head):
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(0)
    qv = perturbed(QVModel.from_trunk(model, q_head=q_head, head_hidden=16))
    assert qv.to(torch.bfloat16) is qv
    wrong = {k: t.dtype for k, t in tensors_of(qv).items() if t is not None and t.dtype != torch.bfloat16}
    assert not wrong, wrong
    if q_head == "tied":
        assert shares_trunk_embedding(qv)  # nothing holds a stale float32 copy
    guided_decodes(qv, tok)
    samples = [Sample(p, p[::-1] + "xy", float(i % 2)) for i, p in enumerate(PROMPTS * 2)]
    before = [p.detach().clone() for p in qv.heads.parameters()]
    cfg = ILQLConfig(steps=1, batch_size=4, max_length=32, progress=False, cql_scale=0.1)
    history = train_ilql(qv, tok, samples, cfg)
    assert math.isfinite(history["losses/total"][0][1])
    assert any(not torch.equal(a, b) for a, b in zip(before, qv.heads.parameters()))  # the step moved the heads
    assert all(p.dtype == torch.bfloat16 for p in qv.heads.parameters())


def test_cast_back_re_reads_the_trunk_embedding():
    model, _ = tiny_model("llama", seed=0)
    qv = QVModel.from_trunk(model, q_head="tied", head_hidden=16)
    qv.to(torch.bfloat16).to(torch.float32)
    assert qv.heads.unembedding.dtype == torch.float32 and shares_trunk_embedding(qv)
    qv.half()  # every _apply path, not only .to()
    assert qv.heads.unembedding.dtype == torch.float16 and shares_trunk_embedding(qv)


def test_heads_moved_alone_cast_their_unembedding():
    heads = QVHeads(HeadsConfig(hidden_size=3, vocab_size=5, q_head="tied"))
    heads.attach_unembedding(torch.randn(5, 3))
    heads.to(torch.bfloat16)
    assert heads.unembedding.dtype == torch.bfloat16
    assert heads.q_values(torch.randn(2, 3, dtype=torch.bfloat16))[0].dtype == torch.bfloat16
    heads.attach_unembedding(None)
    assert heads.unembedding is None


def test_heads_follow_the_trunk_device_and_dtype():
    model, _ = tiny_model("llama", seed=0)
    model.to(torch.bfloat16)
    qv = QVModel.from_trunk(model, head_hidden=16)  # heads are built in float32, then cast
    assert {p.dtype for p in qv.heads.parameters()} == {torch.bfloat16}
    assert qv.device == torch.device("cpu")


def test_load_model_dtype(tiny_dir):
    from qvlm.loading import load_model

    model, _ = load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_cli_generate_in_bfloat16_with_heads(tmp_path, tiny_dir):
    from qvlm.heads import save_heads
    from qvlm.loading import load_model

    model, _ = load_model(str(tiny_dir))
    save_heads(perturbed(QVModel.from_trunk(model, q_head="tied", head_hidden=16)).heads, tmp_path / "run")
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--model", tiny_dir, "--heads", tmp_path / "run", "--prompt", "ab", "--beta", "2"]
    args += ["--max-new-tokens", "4", "--seed", "0", "--device", "cpu", "--dtype", "bfloat16", "--out", out]
    assert main([str(a) for a in args]) == 0
    assert len(out.read_text().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_gpu_exits_2_with_one_line(tiny_dir, capsys, device):
    code = main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--device", device])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "no CUDA GPU is visible" in err and "--device cpu" in err


@pytest.mark.parametrize(("device", "needle"), [("meta", "unsupported device"), ("gpu0", "unknown device")])
def test_unknown_device_exits_2(tiny_dir, capsys, device, needle):
    assert main(["inspect", "--model", str(tiny_dir), "--heads", ".", "--text", "x", "--device", device]) == 2
    assert needle in capsys.readouterr().err


def test_bad_dtype_is_a_usage_error(tiny_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--model", str(tiny_dir), "--prompts", "p.txt", "--dtype", "float64"])
    assert exc.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err


def test_resolve_dtype_names():
    from qvlm.loading import DTYPES, resolve_dtype

    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    assert list(DTYPES) == ["float32", "bfloat16", "float16"]
    with pytest.raises(QVLMError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")


@requires_cuda
def test_qv_model_moved_to_cuda_decodes_with_guidance():
    model, tok = tiny_model("llama", seed=0)
    qv = perturbed(QVModel.from_trunk(model, q_head="tied", head_hidden=16)).to("cuda")
    assert {t.device.type for t in tensors_of(qv).values()} == {"cuda"} and shares_trunk_embedding(qv)
    guided_decodes(qv, tok)


@requires_cuda
def test_load_model_on_cuda(tiny_dir):
    from qvlm.loading import load_model

    model, _ = load_model(str(tiny_dir), device="cuda", dtype="bfloat16")
    p = next(model.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.bfloat16
