"""`qvlm proxy`: the best-of-N estimator and pairs by hand, and the experiment end to end on a tiny model."""

import json
import math
import random

import pytest

from qvlm.apps.proxy import best_of_n_curve, n_values, run_proxy
from qvlm.configs import ProxyConfig, flat, from_flat
from qvlm.errors import QVLMError
from qvlm.eval.overoptimisation import best_of_n_expectation, best_of_n_weights, gold_pairs, peak
from qvlm.rewards import get_reward, score


def test_best_of_n_weights_and_expectation_by_hand():
    assert best_of_n_weights(3, 2) == pytest.approx([0, 1 / 3, 2 / 3])
    assert best_of_n_weights(4, 1) == pytest.approx([0.25] * 4)
    assert best_of_n_weights(4, 4) == pytest.approx([0, 0, 0, 1])
    # proxy (0.1, 0.9, 0.5), gold (1, 2, 3): ascending by proxy the golds are (1, 3, 2);
    # best-of-2 keeps rank 2 (gold 3) with prob 1/3 and rank 3 (gold 2) with prob 2/3 -> 7/3
    proxy, gold = [0.1, 0.9, 0.5], [1.0, 2.0, 3.0]
    assert best_of_n_expectation(proxy, gold, 1) == pytest.approx(2.0)
    assert best_of_n_expectation(proxy, gold, 2) == pytest.approx(7 / 3)
    assert best_of_n_expectation(proxy, gold, 3) == pytest.approx(2.0)
    with pytest.raises(QVLMError, match="need 1 <= n <= pool"):
        best_of_n_weights(2, 3)


def test_best_of_n_matches_enumeration():
    rng = random.Random(0)
    proxy, gold = [rng.random() for _ in range(6)], [rng.random() for _ in range(6)]
    from itertools import combinations

    subsets = list(combinations(range(6), 3))
    brute = sum(gold[max(s, key=lambda i: proxy[i])] for s in subsets) / len(subsets)
    assert best_of_n_expectation(proxy, gold, 3) == pytest.approx(brute)


def test_gold_pairs_and_peak():
    pairs = gold_pairs([[("a", 1.0), ("b", 0.0), ("c", 1.0)]], ["p"], 0.0, random.Random(0))
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [("a", "b"), ("c", "b")]  # the tie a-c is skipped
    flipped = gold_pairs([[("a", 1.0), ("b", 0.0)]] * 200, ["p"] * 200, 0.25, random.Random(0))
    assert 0.15 < sum(p["gold_margin"] < 0 for p in flipped) / 200 < 0.35
    with pytest.raises(QVLMError, match="label noise"):
        gold_pairs([], [], 0.5, random.Random(0))
    assert peak([0, 1, 2], [0.1, 0.3, 0.2]) == (1, 0.3, 1)
    assert n_values(32) == [1, 2, 4, 8, 16, 32] and n_values(6) == [1, 2, 4, 6]


GOLD = "def gold(prompts, responses):\n    return [sum(map(ord, r)) % 97 / 97 for r in responses]\n"


def _tiny_cfg(tmp_path, tiny_dir, **overrides) -> ProxyConfig:
    """The proxy on the tiny model (also its backbone) with the toy gold reward of GOLD."""
    (tmp_path / "gold.py").write_text(GOLD)
    settings = dict(model=str(tiny_dir), gold=f"{tmp_path / 'gold.py'}:gold", backbone=str(tiny_dir), train_prompts=6,
                    samples_per_prompt=4, eval_prompts=2, max_new_tokens=6, batch_size=8, rm_epochs=1, rm_lr=1e-2)  # fmt: skip
    return from_flat(ProxyConfig, {**settings, **overrides})


def test_proxy_end_to_end_on_a_tiny_model(tmp_path, tiny_dir):
    cfg = _tiny_cfg(tmp_path, tiny_dir, max_n=4)
    result = run_proxy(cfg, tmp_path / "out", device="cpu", log=lambda s: None, progress=False)
    assert [r["n"] for r in result["curve"]] == [1, 2, 4]
    pool = [json.loads(line) for line in (tmp_path / "out" / "eval_samples.jsonl").read_text().splitlines()]
    assert len(pool) == 8 and all("proxy" in row for row in pool)
    # best-of-1 is the base: the pool's mean gold reward
    assert result["curve"][0]["gold"] == pytest.approx(sum(r["reward"] for r in pool) / 8)
    assert result["proxy_pairs"] <= cfg.pairs
    # the accuracy is the proxy's on the held-out pairs (prompts it never saw), against gold's labels
    held = [json.loads(line) for line in (tmp_path / "out" / "heldout_pairs.jsonl").read_text().splitlines()]
    proxy = get_reward(f"hf:{tmp_path / 'out' / 'proxy'}", device="cpu")
    chosen = score(proxy, [p["prompt"] for p in held], [p["chosen"] for p in held])
    rejected = score(proxy, [p["prompt"] for p in held], [p["rejected"] for p in held])
    assert result["proxy_heldout_pairs"] == len(held) > 0
    assert result["proxy_pair_accuracy"] == sum(c > r for c, r in zip(chosen, rejected)) / len(held)
    assert (tmp_path / "out" / "overoptimisation.svg").read_text().lstrip().startswith("<?xml")
    again = run_proxy(cfg, tmp_path / "out", device="cpu", log=lambda s: None, progress=False)  # all cached
    assert again["curve"] == result["curve"]
    with pytest.raises(QVLMError, match=r"other settings: --max-n 4 \(now 2\)"):
        run_proxy(from_flat(ProxyConfig, {**flat(cfg), "max_n": 2}), tmp_path / "out", device="cpu", log=lambda s: None)


def test_curve_peak_is_the_highest_gold_by_hand():
    """PPO's and guidance's gold peak: the row of highest gold (the first of equals), its KL, and whether
    it is the last row (gold still rising at the end of the sweep)."""
    from qvlm.apps.proxy import _curve_peak

    rows = [{"iterations": n, "kl": kl, "gold": g} for n, kl, g in ((0, 0.0, 0.2), (5, 1.5, 0.5), (10, 4.0, 0.4))]
    assert _curve_peak(rows, "iterations") == {"iterations": 5, "kl": 1.5, "gold": 0.5, "at_last": False}
    rows[2]["gold"] = 0.7
    assert _curve_peak(rows, "iterations") == {"iterations": 10, "kl": 4.0, "gold": 0.7, "at_last": True}
    rows[0]["gold"] = 0.7  # a tie: the first (the least KL)
    assert _curve_peak(rows, "iterations")["iterations"] == 0


def test_best_of_n_curve_rows():
    rows = best_of_n_curve([[0.0, 1.0]], [[0.0, 1.0]], [1, 2])
    assert rows[0]["gold"] == 0.5 and rows[1]["gold"] == 1.0 and rows[1]["kl_bound"] == pytest.approx(0.1931472)


def test_proxy_with_ppo_against_the_proxy_on_a_tiny_model(tmp_path, tiny_dir):
    """--ppo-iterations: a PPO run against the proxy with a snapshot per count; every snapshot (and the
    base, iteration 0, at KL 0) scored by gold and proxy; the chart draws the PPO curve; a rerun is cached."""
    cfg = _tiny_cfg(tmp_path, tiny_dir, max_n=2, ppo_iterations="1,2", ppo_prompts_per_iter=2, ppo_eval_samples=2)
    out = tmp_path / "out"
    result = run_proxy(cfg, out, device="cpu", log=lambda s: None, progress=False)
    rows = result["ppo_curve"]
    assert [r["iterations"] for r in rows] == [0, 1, 2]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the base against itself
    assert all(r["kl"] >= -1e-5 and math.isfinite(r["proxy"]) and math.isfinite(r["gold"]) for r in rows)
    assert (out / "ppo" / "it_1" / "training.json").is_file() and (out / "ppo" / "training.json").is_file()
    best = max(range(len(rows)), key=lambda j: rows[j]["gold"])  # the first of equals
    top = {"iterations": rows[best]["iterations"], "kl": rows[best]["kl"], "gold": rows[best]["gold"]}
    assert result["ppo_gold_peak"] == {**top, "at_last": best == len(rows) - 1}
    assert "PPO against the proxy: peaks after" in (out / "overoptimisation.svg").read_text()
    assert json.loads((out / "proxy.json").read_text())["ppo_curve"] == json.loads(json.dumps(rows))
    again = run_proxy(cfg, out, device="cpu", log=lambda s: None, progress=False)
    assert again["ppo_curve"] == rows
    with pytest.raises(QVLMError, match="ppo-iterations"):
        ProxyConfig(ppo_iterations="4,2")


def test_proxy_with_guidance_by_the_proxy_on_a_tiny_model(tmp_path, tiny_dir, monkeypatch):
    """--guide-betas: Monte-Carlo heads fitted to the proxy's scores (not gold's) steer decoding at each
    beta; beta 0 (the base) at KL 0, guided rows at KL > 0; the chart draws the curve; a rerun is cached;
    a run directory made before the option existed is accepted with its default."""
    import qvlm.apps.proxy as proxy_app

    fitted, real_train_value = [], proxy_app.train_value

    def recording_train_value(model, tokenizer, samples, *args, **kwargs):
        fitted.extend(samples)
        return real_train_value(model, tokenizer, samples, *args, **kwargs)

    monkeypatch.setattr(proxy_app, "train_value", recording_train_value)
    cfg = _tiny_cfg(tmp_path, tiny_dir, max_n=2, guide_betas="2,50", guide_epochs=1, guide_eval_samples=2)
    out = tmp_path / "out"
    result = run_proxy(cfg, out, device="cpu", log=lambda s: None, progress=False)
    train = [json.loads(line) for line in (out / "train_samples.jsonl").read_text().splitlines()]
    assert [s.response for s in fitted] == [r["response"] for r in train]
    proxy = get_reward(f"hf:{out / 'proxy'}", device="cpu")
    expected = score(proxy, [r["prompt"] for r in train], [r["response"] for r in train])
    assert [s.reward for s in fitted] == pytest.approx(expected, abs=1e-5)
    rows = result["guidance_curve"]
    assert [r["beta"] for r in rows] == [0.0, 2.0, 50.0]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert all(r["kl"] > 1e-4 for r in rows[1:]) and rows[2]["kl"] > rows[1]["kl"]
    assert all(math.isfinite(r["proxy"]) and math.isfinite(r["gold"]) for r in rows)
    assert (out / "guide" / "heads.safetensors").is_file()
    best = max(range(len(rows)), key=lambda j: rows[j]["gold"])  # the first of equals
    top = {"beta": rows[best]["beta"], "kl": rows[best]["kl"], "gold": rows[best]["gold"]}
    assert result["guidance_gold_peak"] == {**top, "at_last": best == len(rows) - 1}
    assert "guidance by the proxy: peaks at beta" in (out / "overoptimisation.svg").read_text()
    again = run_proxy(cfg, out, device="cpu", log=lambda s: None, progress=False)
    assert again["guidance_curve"] == rows
    # an older run's config.json lacks the guide options: they default, so a rerun without them resumes
    old = tmp_path / "old"
    plain = _tiny_cfg(tmp_path, tiny_dir, max_n=2)
    run_proxy(plain, old, device="cpu", log=lambda s: None, progress=False)
    saved = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if not k.startswith("guide_")}))
    run_proxy(plain, old, device="cpu", log=lambda s: None, progress=False)
    # a finished run may add guidance (its phase left nothing yet), but not change it afterwards
    guide = {**flat(plain), "guide_epochs": 1, "guide_eval_samples": 1}
    added = run_proxy(from_flat(ProxyConfig, {**guide, "guide_betas": "2"}), old,
                      device="cpu", log=lambda s: None, progress=False)  # fmt: skip
    assert [r["beta"] for r in added["guidance_curve"]] == [0.0, 2.0]
    with pytest.raises(QVLMError, match="--guide-betas '2' \\(now '4'\\)"):
        run_proxy(from_flat(ProxyConfig, {**guide, "guide_betas": "4"}), old, device="cpu")
    for bad in ("0", "1,x", "-2"):
        with pytest.raises(QVLMError, match="guide-betas"):
            ProxyConfig(guide_betas=bad)
