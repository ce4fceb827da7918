"""`qvlm demo` end to end on a tiny random model with a toy reward: every output file, the keys of
metrics.json, and resuming from the cached phases."""

import json

import pytest

from qvlm.apps.demo import compute_cost, resolve, run_demo
from qvlm.cli import main
from qvlm.configs import DemoConfig
from qvlm.errors import QVLMError

KEYS = {"reward_mean", "reward_ci95", "kl_to_base", "distinct_2", "perplexity", "cost"}


def small(tiny_dir, **kw):
    return DemoConfig(
        model=str(tiny_dir),
        reward="count:e",
        quick=True,
        train_prompts=6,
        eval_prompts=5,
        samples_per_prompt=2,
        max_new_tokens=6,
        ilql_epochs=1,
        value_epochs=1,
        betas="1,4",
        mc_betas="2",
        best_of=4,
        **kw,
    )


def test_demo_pipeline_outputs(tmp_path, tiny_dir):
    out = tmp_path / "demo"
    summary = run_demo(small(tiny_dir), out, log=lambda *_: None, progress=False)
    for name in (
        "samples.jsonl",
        "ilql/heads.safetensors",
        "value/heads.safetensors",
        "eval/draws.json",
        "metrics.json",
        "report.html",
        "value_maps.json",
        "demo_config.json",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    methods = metrics["methods"]
    assert {"base", "best_of_4", "ilql_beta_1", "ilql_beta_4", "mcq_beta_2", "cd_blockwise_k4"} <= set(methods)
    for name, m in methods.items():
        assert KEYS <= set(m), name
    assert methods["base"]["cost"] == 1.0 and methods["best_of_4"]["cost"] == 4.0
    assert methods["base"]["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert 1.0 < methods["ilql_beta_1"]["cost"] < methods["cd_blockwise_k4"]["cost"]
    assert methods["mcq_beta_2"]["cost"] == methods["ilql_beta_1"]["cost"]  # same head design
    html = (out / "report.html").read_text()
    assert "ilql_beta_4" in html and "data:image/png;base64," in html

    # a rerun resumes from every cached phase: same numbers, no new training
    mtime = (out / "ilql" / "heads.safetensors").stat().st_mtime
    logs = []
    again = run_demo(small(tiny_dir), out, log=logs.append, progress=False)
    assert again["methods"] == summary["methods"]
    assert (out / "ilql" / "heads.safetensors").stat().st_mtime == mtime
    assert any("cached" in line for line in logs)


def test_demo_refuses_other_settings_in_same_dir(tmp_path, tiny_dir):
    (tmp_path / "demo_config.json").write_text(json.dumps({"target": "negative"}))
    with pytest.raises(QVLMError, match="other settings"):
        run_demo(small(tiny_dir), tmp_path, log=lambda *_: None, progress=False)


def test_presets_fill_only_zero_fields():
    cfg = resolve(DemoConfig(quick=True, eval_prompts=7))
    assert cfg.eval_prompts == 7 and cfg.train_prompts > 0 and cfg.max_new_tokens > 0


def test_cost_counts_heads_over_trunk(tiny):
    model, _ = tiny
    n = sum(p.numel() for p in model.parameters())  # tied: the embedding counts once, as the LM head
    assert compute_cost(model, heads_macs=n) == pytest.approx(2.0)


def test_demo_cli_bad_target(capsys):
    assert main(["demo", "--target", "neutral"]) == 2
    assert "use positive or negative" in capsys.readouterr().err


def test_demo_resumes_after_a_crash_between_phases(tmp_path, tiny_dir, monkeypatch):
    """A crash after sampling keeps samples and trunk features; the rerun trains from them."""
    import qvlm.apps.demo as demo

    out = tmp_path / "demo"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "train_value", crash)
    with pytest.raises(KeyboardInterrupt):
        run_demo(small(tiny_dir), out, log=lambda *_: None, progress=False)
    assert (out / "samples.jsonl").is_file() and (out / "features.safetensors").is_file()
    assert (out / "ilql" / "heads.safetensors").is_file() and not (out / "metrics.json").exists()
    monkeypatch.undo()
    logs = []
    summary = run_demo(small(tiny_dir), out, log=logs.append, progress=False)
    assert any("trunk features kept from sampling" in line for line in logs)
    assert not (out / "features.safetensors").exists()  # removed once both learners trained
    assert "mcq_beta_2" in summary["methods"]
