"""`qvlm demo` end to end on a tiny random model with a toy reward: every output file, the keys of
metrics.json, the validation protocol (the method shown is chosen on validation prompts), and
resuming from the cached phases."""

import json

import pytest

from qvlm.apps.demo import VAL_START, check_splits, choose_shown, compute_cost, resolve, run_demo
from qvlm.cli import main
from qvlm.configs import DemoConfig
from qvlm.decoding import best_of_n_kl_bound
from qvlm.errors import QVLMError
from tests.helpers import tiny_demo_config

pytestmark = pytest.mark.usefixtures("one_thread")


KEYS = {"reward_mean", "reward_ci95", "kl_to_base", "distinct_2", "perplexity", "cost"}


def small(tiny_dir, **kw):
    return tiny_demo_config(tiny_dir, **kw)


def test_demo_pipeline_outputs(tmp_path, tiny_dir):
    out = tmp_path / "demo"
    summary = run_demo(small(tiny_dir), out, log=lambda *_: None, progress=False)
    for name in (
        "samples.jsonl",
        "ilql/heads.safetensors",
        "value/heads.safetensors",
        "qsharp/heads.safetensors",
        "qsharp/replay.jsonl",
        "eval/draws.json",
        "val/draws.json",
        "val/ilql_beta_1.json",
        "val/cd_blockwise_k4.json",
        "metrics.json",
        "report.html",
        "value_maps.json",
        "demo_config.json",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    methods = metrics["methods"]
    assert {"base", "best_of_4", "ilql_beta_1", "ilql_beta_4", "mcq_beta_2", "cd_blockwise_k4", "qsharp_beta_2",
            "qsharp_mean_beta_2"} <= set(methods)  # fmt: skip
    for name, m in methods.items():
        assert KEYS <= set(m), name
    assert methods["base"]["cost"] == 1.0 and methods["best_of_4"]["cost"] == 4.0
    assert methods["base"]["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert 1.0 < methods["ilql_beta_1"]["cost"] < methods["cd_blockwise_k4"]["cost"]
    assert methods["mcq_beta_2"]["cost"] == methods["ilql_beta_1"]["cost"]  # same head design
    # the method shown is chosen on validation prompts, never on the eval table
    validation, shown = metrics["validation"], metrics["shown"]
    assert set(validation) == {"ilql_beta_1", "ilql_beta_4", "mcq_beta_2", "cd_blockwise_k4", "qsharp_beta_2",
                               "qsharp_mean_beta_2"}  # fmt: skip
    assert all(m["n"] == 4 for m in validation.values())
    assert shown["chosen_on"] == "validation" and shown["validation_prompts"] == 4
    # the rule: the best validation reward among rows within best-of-N's validation KL and 0.9x base distinct-2
    rule = {"kl_max": shown["rule_kl_max"], "distinct_2_min": shown["rule_distinct_2_min"]}
    assert shown["method"] == choose_shown(validation, rule) and "distinct-2" in shown["rule"]
    passing = [k for k, m in validation.items() if m["kl_to_base"] <= rule["kl_max"]
               and m["distinct_2"] >= rule["distinct_2_min"]]  # fmt: skip
    assert shown["passed_rule"] == (shown["method"] in passing) == bool(passing)
    assert shown["eval_reward"] == methods[shown["method"]]["reward_mean"]
    assert methods["base"]["kl_kind"] == "exact" and methods["best_of_4"]["kl_kind"] == "estimate"
    assert methods["cd_blockwise_k4"]["kl_kind"] == "estimate" and methods["ilql_beta_1"]["kl_kind"] == "exact"
    # best-of-N's KL is estimated from each prompt's draws: never above the bound log N - (N-1)/N
    assert 0.0 <= methods["best_of_4"]["kl_to_base"] <= best_of_n_kl_bound(4) + 1e-9
    # the frontier: every family over its setting, best-of-N for N in 1, 2, 4 (up to --best-of 4)
    frontier = metrics["frontier"]
    assert set(frontier) == {"best_of_n", "ilql", "mcq", "cd_blockwise", "qsharp", "qsharp_mean"}
    assert [p["n"] for p in frontier["best_of_n"]] == [1, 2, 4]
    assert [p["beta"] for p in frontier["ilql"]] == [0.0, 1.0, 4.0] and frontier["ilql"][0]["kl_to_base"] == 0.0
    assert frontier["best_of_n"][2]["reward_mean"] == methods["best_of_4"]["reward_mean"]
    assert frontier["best_of_n"][1]["kl_kind"] == "estimate" and frontier["best_of_n"][1]["cost"] == 2.0
    assert "topk_mass" in methods["ilql_beta_1"]
    html = (out / "report.html").read_text()
    assert "ilql_beta_4" in html and "data:image/png;base64," in html
    assert "{cfg" not in html and "Infinity" not in (out / "metrics.json").read_text()
    assert "Chosen on validation (reward" in html and 'id="validation"' in html
    assert 'id="frontier"' in html and 'alt="frontier: reward vs cost"' in html
    assert html.index('id="frontier"') < html.index("<img")  # the frontier is the report's first plot

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
    assert "--target is 'neutral'; it must be positive or negative" in capsys.readouterr().err


def test_demo_resumes_after_a_crash_between_phases(tmp_path, tiny_dir, monkeypatch):
    """A crash after sampling keeps samples and trunk features; the rerun trains from them."""
    import qvlm.apps.demo_train as demo_train

    out = tmp_path / "demo"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_train, "train_value", crash)
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


def test_choose_shown_is_the_validation_argmax():
    val = {"a": {"reward_mean": 0.2}, "b": {"reward_mean": 0.5}, "c": {"reward_mean": 0.5}, "d": {"reward_mean": None}}
    assert choose_shown(val) == "b"  # the first of equals, in order; a missing reward is skipped
    assert choose_shown({"x": {"reward_mean": float("nan")}, "y": {"reward_mean": -1.0}}) == "y"
    with pytest.raises(ValueError, match="no validation reward"):
        choose_shown({"x": {"reward_mean": None}})


def test_choose_shown_under_the_rule_a_gamed_method_cannot_pass():
    """The rule (issue 22): the best validation reward among rows within best-of-N's KL and at least 0.9x
    the base's distinct-2; a gamed row (far KL, or repeating itself) loses to a lower honest one; none
    passing: the row of least KL."""
    rule = {"kl_max": 2.0, "distinct_2_min": 0.8}
    val = {
        "far": {"reward_mean": 0.9, "kl_to_base": 30.0, "distinct_2": 0.95},
        "repeats": {"reward_mean": 0.8, "kl_to_base": 1.0, "distinct_2": 0.5},
        "honest": {"reward_mean": 0.6, "kl_to_base": 1.5, "distinct_2": 0.9},
        "mild": {"reward_mean": 0.4, "kl_to_base": 0.2, "distinct_2": 0.96},
    }
    assert choose_shown(val) == "far" and choose_shown(val, rule) == "honest"
    assert choose_shown({k: val[k] for k in ("far", "repeats")}, rule) == "repeats"  # none passes: least KL


def test_demo_shows_the_validation_choice_when_eval_prefers_another(tmp_path, tiny_dir, monkeypatch):
    """Validation favours mcq_beta_2, the eval table favours ilql_beta_4: the page shows mcq_beta_2."""
    import qvlm.apps.demo as demo

    real_validation, real_eval = demo.validation_phase, demo.eval_phase

    def validation(ctx, methods):
        rows = real_validation(ctx, methods)
        return {k: {**m, "reward_mean": 1.0 if k == "mcq_beta_2" else 0.0} for k, m in rows.items()}

    def evaluation(ctx, methods):
        rows, responses = real_eval(ctx, methods)
        rows["ilql_beta_4"]["reward_mean"] = 5.0
        return rows, responses

    monkeypatch.setattr(demo, "validation_phase", validation)
    monkeypatch.setattr(demo, "eval_phase", evaluation)
    out = tmp_path / "demo"
    summary = run_demo(small(tiny_dir), out, log=lambda *_: None, progress=False)
    shown = summary["shown"]
    assert shown["method"] == "mcq_beta_2" and shown["eval_argmax"] == "ilql_beta_4"
    assert shown["chosen_on"] == "validation" and shown["validation_reward"] == 1.0
    maps = json.loads((out / "value_maps.json").read_text())
    assert {m["method"] for m in maps} == {"base", "mcq_beta_2"}
    html = (out / "report.html").read_text()
    assert "<code>mcq_beta_2</code> scores" in html  # the headline names the validation choice
    assert "<code>ilql_beta_4</code> scored highest on the eval prompts" in html
    assert html.count('<span class="method">mcq_beta_2</span>') >= 5  # 5 sample cards (+ value maps)


def test_validation_prompts_never_overlap_training():
    check_splits(resolve(DemoConfig(train_prompts=VAL_START, val_prompts=20)), 219)
    with pytest.raises(QVLMError, match="--train-prompts is 161"):
        check_splits(resolve(DemoConfig(train_prompts=VAL_START + 1)), 219)
    with pytest.raises(QVLMError, match="--val-prompts is 60; .* use --val-prompts 59 or fewer"):
        check_splits(resolve(DemoConfig(val_prompts=60)), 219)
    assert resolve(DemoConfig()).val_prompts == 32 and resolve(DemoConfig(quick=True)).val_prompts == 12


def test_demo_refuses_overlapping_splits_before_writing(tmp_path):
    with pytest.raises(QVLMError, match="validation prompts start at training prompt 160"):
        run_demo(DemoConfig(train_prompts=200), tmp_path / "demo", log=lambda *_: None, progress=False)
    assert not (tmp_path / "demo").exists()


def test_demo_ppo_method_on_the_same_protocol(tmp_path, tiny_dir):
    """--ppo-iterations 1,2: one PPO run with a snapshot after 1 iteration; the count is chosen on
    validation; the chosen policy decodes the eval prompts once (the ppo row, exact KL); a rerun is cached."""
    import copy

    from qvlm.algos.actor_critic import load_policy
    from qvlm.configs import DecodeConfig
    from qvlm.eval.policy import evaluate_policy_decoding
    from qvlm.loading import load_model
    from qvlm.rewards import get_reward

    out = tmp_path / "demo"
    cfg = small(tiny_dir, ppo_iterations="1,2", ppo_prompts_per_iter=2)
    summary = run_demo(cfg, out, log=lambda *_: None, progress=False)
    for name in ("ppo/adapter/adapter_model.safetensors", "ppo/metrics.jsonl", "ppo/it_1/adapter/adapter_model.safetensors",
                 "val/ppo_it_1.json", "val/ppo_it_2.json", "eval/ppo.json"):  # fmt: skip
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    ppo, row = metrics["ppo"], metrics["methods"]["ppo"]
    assert KEYS <= set(row) and row["kl_kind"] == "exact" and row["cost"] == 1.0 and row["n"] == 5
    assert set(ppo["validation"]) == {"ppo_it_1", "ppo_it_2"} and ppo["stages"] == [1, 2]
    assert ppo["chosen"] == choose_shown(ppo["validation"]) and ppo["chosen_on"] == "validation"
    assert ppo["chosen"] == f"ppo_it_{ppo['iterations']}"
    assert row["reward_calls"] == ppo["iterations"] * 2 * 4 and row["train_seconds"] > 0  # 2 prompts x 4 responses
    assert [len(ppo["history"][k]) for k in ("reward", "kl")] == [2, 2]
    assert "ppo" not in metrics["validation"] and metrics["shown"]["method"] != "ppo"  # guided methods only
    # the row is the chosen snapshot's decode of the eval prompts: the same numbers from scratch
    base, tok = load_model(str(tiny_dir), device="cpu")
    policy_dir = out / "ppo" / ("it_1" if ppo["iterations"] == 1 else "")
    decode = DecodeConfig(max_new_tokens=6, batch_size=64, seed=0, guidance_top_k=20)
    again, _, _ = evaluate_policy_decoding(
        load_policy(copy.deepcopy(base), policy_dir),
        base,
        tok,
        _eval_prompts(cfg),
        get_reward("count:e"),
        cfg=decode,
    )
    assert again.reward_mean == pytest.approx(row["reward_mean"]) and again.kl_to_base == pytest.approx(
        row["kl_to_base"]
    )
    html = (out / "report.html").read_text()
    assert 'id="ppo"' in html and '<svg class="ppo-curves"' in html and "ppo_it_2" in html
    assert "<code>ppo</code> changes the model" in html  # the introduction names it
    # a rerun is cached: no training, same numbers
    mtime = (out / "ppo" / "adapter" / "adapter_model.safetensors").stat().st_mtime
    logs = []
    assert run_demo(cfg, out, log=logs.append, progress=False)["methods"] == summary["methods"]
    assert (out / "ppo" / "adapter" / "adapter_model.safetensors").stat().st_mtime == mtime
    assert "[train ppo] cached" in logs


def _eval_prompts(cfg):
    from qvlm.apps.demo_prompts import load_demo_prompts

    return load_demo_prompts("eval")[: cfg.eval_prompts]


def test_demo_ppo_takes_the_validation_choice(tmp_path, tiny_dir, monkeypatch):
    """Validation favours 2 iterations: the eval row is the final policy's, with 2 iterations' cost."""
    import qvlm.apps.demo_ppo as demo_ppo

    real = demo_ppo._decode

    def decode(ctx, split, prompts, policy_dir, name):
        saved = real(ctx, split, prompts, policy_dir, name)
        if split == "val":
            saved["metrics"]["reward_mean"] = 1.0 if name == "ppo_it_2" else 0.0
        return saved

    monkeypatch.setattr(demo_ppo, "_decode", decode)
    summary = run_demo(small(tiny_dir, ppo_iterations="1,2", ppo_prompts_per_iter=2), tmp_path, log=lambda *_: None,
                       progress=False)  # fmt: skip
    assert summary["ppo"]["chosen"] == "ppo_it_2" and summary["ppo"]["iterations"] == 2
    assert summary["methods"]["ppo"]["reward_calls"] == 16
    assert summary["methods"]["ppo"]["train_seconds"] == pytest.approx(summary["ppo"]["train_seconds_total"])


def test_demo_ppo_resumes_from_its_checkpoint(tmp_path, tiny_dir, monkeypatch):
    """Killed right after the checkpoint at iteration 5, before the snapshot of 5 iterations was kept:
    the rerun writes the snapshot from the checkpoint and trains on; the policies equal an uninterrupted run's."""
    import qvlm.apps.runs as runs

    cfg = small(tiny_dir, ppo_iterations="5,6", ppo_prompts_per_iter=1)
    whole = tmp_path / "whole"
    run_demo(cfg, whole, log=lambda *_: None, progress=False)
    real = runs.save_policy_run

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "killed"
    monkeypatch.setattr(runs, "save_policy_run", killed)
    with pytest.raises(KeyboardInterrupt):
        run_demo(cfg, out, log=lambda *_: None, progress=False)
    assert (out / "ppo" / "checkpoint" / "step-00000005").is_dir() and not (out / "ppo" / "it_5").exists()
    monkeypatch.setattr(runs, "save_policy_run", real)
    logs = []
    run_demo(cfg, out, log=logs.append, progress=False)
    assert any("[train ppo]" in line and "resuming from checkpoint" in line for line in logs)
    for name in ("it_5/adapter/adapter_model.safetensors", "adapter/adapter_model.safetensors", "heads.safetensors"):
        assert (out / "ppo" / name).read_bytes() == (whole / "ppo" / name).read_bytes(), name


def test_ppo_presets_and_bad_ppo_settings(capsys):
    from qvlm.apps.demo_ppo import ppo_stages

    assert ppo_stages(resolve(DemoConfig())) == [9, 18]  # the full preset trains PPO
    assert ppo_stages(resolve(DemoConfig(quick=True))) == []  # --quick does not...
    assert ppo_stages(resolve(DemoConfig(quick=True, ppo_iterations="2, 3"))) == [2, 3]  # ...unless asked
    assert ppo_stages(resolve(DemoConfig(ppo_iterations="0"))) == []  # and the full demo can leave it out
    for flags, needle in (
        (["--ppo-iterations", "8,4"], "--ppo-iterations is '8,4'; it must be 0 (no ppo method) or ascending"),
        (["--ppo-iterations", "0,4"], "--ppo-iterations is '0,4'"),
        (["--ppo-lr", "0"], "--ppo-lr is 0.0; it must be a finite number > 0"),
        (["--ppo-epochs", "0"], "--ppo-epochs is 0; it must be at least 1"),
    ):
        assert main(["demo", *flags]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
