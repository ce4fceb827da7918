"""`qvlm demo`: steer the embedded SmolLM2-135M-Instruct toward a reward with learned Q/V heads,
against best-of-N, and write metrics.json and a report a person wants to read.

Phases, each cached in the output directory so a rerun after an interruption resumes:
sample (base responses to training prompts, scored) -> ILQL heads and a Monte-Carlo prefix scorer
(both on the frozen trunk, sharing one feature cache) -> evaluation on held-out prompts (base,
best-of-4/16, ILQL-guided at several betas, V-guided blockwise) -> value maps -> report.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from qvlm.algos.ilql import train_ilql
from qvlm.algos.value import train_value
from qvlm.configs import DecodeConfig, DemoConfig, ILQLConfig, TrunkConfig, ValueConfig
from qvlm.decoding import GenerationResult, generate
from qvlm.decoding.best_of_n import best_of_n_kl_bound
from qvlm.decoding.blockwise import blockwise_generate
from qvlm.errors import QVLMError
from qvlm.eval.metrics import summarize
from qvlm.eval.valuemap import value_maps
from qvlm.fileio import atomic_write_text
from qvlm.heads import load_heads
from qvlm.loading import load_model
from qvlm.mdp import Sample, read_samples, write_samples
from qvlm.model import QVModel
from qvlm.rewards import get_reward, score
from qvlm.train.metrics import read_history

__all__ = ["PRESETS", "run_demo", "resolve", "compute_cost"]

PRESETS = {
    "full": dict(
        train_prompts=128, eval_prompts=48, samples_per_prompt=8, max_new_tokens=20, ilql_epochs=8, value_epochs=6
    ),
    "quick": dict(
        train_prompts=32, eval_prompts=20, samples_per_prompt=8, max_new_tokens=16, ilql_epochs=8, value_epochs=6
    ),
}


def resolve(cfg: DemoConfig) -> DemoConfig:
    """Fill the zero fields from the full or quick preset."""
    preset = PRESETS["quick" if cfg.quick else "full"]
    return dataclasses.replace(cfg, **{k: v for k, v in preset.items() if not getattr(cfg, k)})


def _phase(out: Path, name: str, log) -> Path:
    log(f"[{name}] {time.strftime('%H:%M:%S')}")
    return out / name


def compute_cost(trunk, heads_macs: int = 0) -> float:
    """Compute per generated token relative to the trunk alone: ``1 + heads / trunk`` multiply-adds.

    A token costs one multiply-add per weight it touches; the input embedding is a lookup (free)
    but the LM head is a matmul, so a tied embedding counts once, as the LM head.
    """
    total = sum(p.numel() for p in trunk.parameters())
    embed = trunk.get_input_embeddings().weight.numel()
    lm_head = trunk.get_output_embeddings().weight
    tied = lm_head.data_ptr() == trunk.get_input_embeddings().weight.data_ptr()
    trunk_compute = total - embed + (lm_head.numel() if tied else 0)
    return 1.0 + heads_macs / trunk_compute


def _metrics(texts, rewards, kl, base_logprobs, cost, seconds, tokens) -> dict:
    metrics = summarize(texts, rewards, kl, base_logprobs, cost).as_dict()
    return {**metrics, "seconds": seconds, "seconds_per_token": seconds / max(tokens, 1)}


def _save_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def run_demo(cfg: DemoConfig, out: str | Path, log=print, progress: bool = True) -> dict:
    """Run (or resume) the demo into ``out``; returns the metrics dict written to metrics.json."""
    cfg = resolve(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, cfg)
    torch.manual_seed(cfg.seed)
    reward_name = cfg.reward or ("vader" if cfg.target == "positive" else "vader-negative")
    reward = get_reward(reward_name)
    from qvlm.apps.demo_prompts import load_demo_prompts

    train_prompts = load_demo_prompts("train")[: cfg.train_prompts]
    eval_prompts = load_demo_prompts("eval")[: cfg.eval_prompts]
    log(
        f"qvlm demo: {cfg.model}, reward {reward_name}, {len(train_prompts)} training and "
        f"{len(eval_prompts)} held-out prompts, output in {out}"
    )
    model, tokenizer = load_model(cfg.model)
    decode = DecodeConfig(
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed, guidance_top_k=cfg.guidance_top_k
    )

    # 1. sample and score the offline data. Each prompt is prefilled once for its responses, and
    # the trunk's hidden states are kept while decoding: the frozen-trunk learners need no second pass.
    # The task has a fixed horizon: the reward scores exactly the first max_new_tokens tokens (as in
    # evaluation), so a response cut there is a terminal state, not a truncation to bootstrap past.
    samples_file = _phase(out, "samples.jsonl", log)
    features_file = out / "features.safetensors"  # kept until both learners are trained (for resume)
    features = None
    if samples_file.is_file():
        samples = read_samples(samples_file)
        log(f"  cached: {len(samples)} samples")
        if features_file.is_file():
            features = _load_features(features_file)
    else:
        prompts = [p for p in train_prompts for _ in range(cfg.samples_per_prompt)]
        sample_cfg = dataclasses.replace(decode, num_return_sequences=cfg.samples_per_prompt)
        res = generate(model, tokenizer, train_prompts, cfg=sample_cfg, progress=progress, return_hidden=True)
        rewards = score(reward, prompts, res.texts, name=f"reward {reward_name}")
        samples = [
            Sample(p, t, r, finished=f, terminal=not f, response_ids=ids[:-1] if f else ids)
            for p, t, r, f, ids in zip(prompts, res.texts, rewards, res.finished, res.response_ids)
        ]
        features = ([p + r for p, r in zip(res.prompt_ids, res.response_ids)], res.hidden)
        _save_features(features_file, *features)
        write_samples(samples_file, samples)
        log(f"  {len(samples)} samples, mean reward {sum(rewards) / len(rewards):.3f}")

    # 2. ILQL heads and 3. a prefix scorer, on the frozen trunk with one shared feature cache
    ilql = QVModel.from_trunk(
        model, TrunkConfig("frozen"), head_hidden=cfg.head_hidden, base_model=cfg.model, q_head=cfg.q_head
    )
    ilql_cfg = ILQLConfig(
        epochs=cfg.ilql_epochs,
        batch_size=8,
        max_length=512,
        seed=cfg.seed,
        progress=progress,
        cql_scale=cfg.ilql_cql_scale,
    )
    if features is not None:
        primed = ilql.prime_features(tokenizer, samples, features[1], features[0], ilql_cfg.max_length)
        log(
            f"  trunk features kept from sampling for {primed} of {len(samples)} samples "
            "(the rest re-tokenise differently and are recomputed)"
        )
    history = _train_or_load(out / "ilql", ilql, lambda d, r: train_ilql(ilql, tokenizer, samples, ilql_cfg, d, r), log)
    scorer = QVModel.from_trunk(
        model, TrunkConfig("frozen"), head_hidden=cfg.head_hidden, base_model=cfg.model, q_head=cfg.q_head
    )
    scorer.share_feature_cache(ilql)  # same trunk, same tokens: reuse the features
    # Monte-Carlo regression trains on the taken actions only (cheap), so it affords more epochs;
    # epochs and lr were chosen on held-out training prompts, never on the evaluation split
    value_cfg = ValueConfig(
        epochs=cfg.value_epochs,
        lr=3e-3,
        batch_size=8,
        max_length=512,
        seed=cfg.seed,
        progress=progress,
        q_target=cfg.mc_q_target,
    )
    v_history = _train_or_load(
        out / "value", scorer, lambda d, r: train_value(scorer, tokenizer, samples, value_cfg, d, r), log
    )
    features_file.unlink(missing_ok=True)  # both learners are trained: the features have done their job
    ilql.clear_cache()
    history = {
        "ILQL " + k[len("losses/") :]: v for k, v in history.items() if k.startswith("losses/") and k != "losses/total"
    }
    history.update({"Monte-Carlo " + k[len("losses/") :]: v for k, v in v_history.items() if k.startswith("losses/")})
    history = {k: v for k, v in history.items() if any(x != 0 for _, x in v)}  # a term switched off logs zeros

    # 4. evaluate on held-out prompts
    eval_dir = out / "eval"
    eval_dir.mkdir(exist_ok=True)
    ilql_cost = compute_cost(model, ilql.heads.decode_macs_per_token(cfg.guidance_top_k))
    mc_cost = compute_cost(model, scorer.heads.decode_macs_per_token(cfg.guidance_top_k))
    v_cost = compute_cost(model, sum(p.numel() for p in scorer.heads.v_head.parameters()))
    methods, texts = {}, {}

    def run_method(name, fn, cost):
        file = eval_dir / f"{name}.json"
        if file.is_file():
            saved = json.loads(file.read_text())
            log(f"[eval {name}] cached")
        else:
            log(f"[eval {name}] {time.strftime('%H:%M:%S')}")
            start = time.perf_counter()
            res: GenerationResult = fn()
            seconds = time.perf_counter() - start
            rewards = score(reward, eval_prompts, res.texts, name=f"reward {reward_name}")
            tokens = sum(len(r) for r in res.response_ids)
            saved = {
                "texts": res.texts,
                "rewards": rewards,
                "finished": res.finished,
                "metrics": _metrics(res.texts, rewards, res.kl, res.base_logprobs, cost, seconds, tokens),
            }
            _save_json(file, saved)
        methods[name], texts[name] = saved["metrics"], saved
        m = saved["metrics"]
        log(
            f"  reward {m['reward_mean']:.3f} +- {m['reward_ci95']:.3f}, KL {m['kl_to_base']:.2f}, cost {m['cost']:.2f}"
        )

    _best_of(
        out, eval_dir, model, tokenizer, eval_prompts, reward, reward_name, decode, cfg, methods, texts, log, progress
    )
    for beta in [float(b) for b in cfg.betas.split(",") if b.strip()]:
        guided = dataclasses.replace(decode, beta=beta)
        run_method(
            f"ilql_beta_{beta:g}",
            lambda g=guided: generate(model, tokenizer, eval_prompts, ilql.heads, g, track_kl=True, progress=progress),
            ilql_cost,
        )
    for beta in [float(b) for b in cfg.mc_betas.split(",") if b.strip()]:
        guided = dataclasses.replace(decode, beta=beta)
        run_method(
            f"mcq_beta_{beta:g}",
            lambda g=guided: generate(
                model, tokenizer, eval_prompts, scorer.heads, g, track_kl=True, progress=progress
            ),
            mc_cost,
        )
    run_method(
        f"cd_blockwise_k{cfg.candidates}",
        lambda: blockwise_generate(
            model, tokenizer, eval_prompts, scorer.heads, cfg.candidates, cfg.block_size, decode, progress
        ),
        cfg.candidates * v_cost,
    )
    base_time = methods["base"]["seconds_per_token"]
    for m in methods.values():
        m["time_ratio"] = m["seconds_per_token"] / base_time if base_time else float("nan")

    # 5. value maps and the report
    summary = {"methods": methods, "reward": reward_name, "config": dataclasses.asdict(cfg)}
    _save_json(out / "metrics.json", summary)
    _report(
        out, cfg, {"ilql_": ilql, "mcq_": scorer}, tokenizer, eval_prompts, methods, texts, history, reward_name, log
    )
    return summary


def _save_features(path: Path, token_ids: list[list[int]], hidden: list[torch.Tensor]) -> None:
    """Trunk features kept while sampling, as safetensors (written to a temporary file, renamed)."""
    from safetensors.torch import save_file

    tensors = {}
    for i, (ids, h) in enumerate(zip(token_ids, hidden)):
        tensors[f"{i}.ids"] = torch.tensor(ids, dtype=torch.long)
        tensors[f"{i}.h"] = h.contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def _load_features(path: Path) -> tuple[list[list[int]], list[torch.Tensor]]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    n = len(tensors) // 2
    return [tensors[f"{i}.ids"].tolist() for i in range(n)], [tensors[f"{i}.h"] for i in range(n)]


def _train_or_load(run_dir: Path, model: QVModel, train, log) -> dict:
    name = run_dir.name
    if (run_dir / "heads.safetensors").is_file() and (run_dir / "training.json").is_file():
        log(f"[train {name}] cached")
        model.heads.load_state_dict(load_heads(run_dir).state_dict())
        return read_history(run_dir / "metrics.jsonl")
    resume = (run_dir / "checkpoint" / "trainer_state.pt").is_file()
    log(f"[train {name}] {time.strftime('%H:%M:%S')}" + (" resuming from checkpoint" if resume else ""))
    return train(run_dir, resume)


def _best_of(out, eval_dir, model, tokenizer, prompts, reward, reward_name, decode, cfg, methods, texts, log, progress):
    """``best_of`` base draws per prompt: draw 0 is base sampling, the best of the first 4 and of all
    are best-of-4 and best-of-N by the true reward (the strong baseline; costs N samples)."""
    file = eval_dir / "draws.json"
    if file.is_file():
        draws = json.loads(file.read_text())
        log("[eval base draws] cached")
    else:
        log(f"[eval base draws] {time.strftime('%H:%M:%S')} {cfg.best_of} per prompt")
        start = time.perf_counter()
        repeated = [p for p in prompts for _ in range(cfg.best_of)]
        draw_cfg = dataclasses.replace(decode, num_return_sequences=cfg.best_of)
        res = generate(model, tokenizer, prompts, cfg=draw_cfg, track_kl=True, progress=progress)
        seconds = time.perf_counter() - start
        rewards = score(reward, repeated, res.texts, name=f"reward {reward_name}")
        draws = {
            "texts": res.texts,
            "rewards": rewards,
            "finished": res.finished,
            "base_logprobs": res.base_logprobs,
            "tokens": [len(r) for r in res.response_ids],
            "seconds": seconds,
        }
        _save_json(file, draws)
    # time plain sampling as every guided method runs: one response per prompt, each prefilled
    # (the draws share each prompt's prefill over N responses, so their per-token time is lower)
    timing_file = eval_dir / "base_timing.json"
    if timing_file.is_file():
        timing = json.loads(timing_file.read_text())
    else:
        log(f"[eval base timing] {time.strftime('%H:%M:%S')}")
        start = time.perf_counter()
        res = generate(model, tokenizer, prompts, cfg=decode, progress=progress)
        timing = {"seconds": time.perf_counter() - start, "tokens": sum(len(r) for r in res.response_ids)}
        _save_json(timing_file, timing)
    n, N = len(prompts), cfg.best_of
    per_token = draws["seconds"] / max(sum(draws["tokens"]), 1)
    for name, k in (("base", 1), ("best_of_4", 4), (f"best_of_{N}", N)):
        picks = []
        for i in range(n):
            group = range(i * N, i * N + k)
            picks.append(max(group, key=lambda j: draws["rewards"][j]))
        sel_texts = [draws["texts"][j] for j in picks]
        sel_rewards = [draws["rewards"][j] for j in picks]
        kl = [best_of_n_kl_bound(k) if k > 1 else 0.0] * n
        tokens = sum(draws["tokens"][j] for j in picks)
        # best-of-k decodes k responses for each one it returns
        seconds = per_token * sum(draws["tokens"][j] for i in range(n) for j in range(i * N, i * N + k))
        if k == 1:
            seconds, tokens = timing["seconds"], timing["tokens"]
        m = _metrics(sel_texts, sel_rewards, kl, [draws["base_logprobs"][j] for j in picks], float(k), seconds, tokens)
        methods[name], texts[name] = (
            m,
            {"texts": sel_texts, "rewards": sel_rewards, "finished": [draws["finished"][j] for j in picks]},
        )
        log(f"  {name}: reward {m['reward_mean']:.3f} +- {m['reward_ci95']:.3f}")


def _report(out, cfg, models, tokenizer, prompts, methods, texts, history, reward_name, log) -> None:
    from qvlm.report import render_report

    log(f"[report] {time.strftime('%H:%M:%S')}")
    guided = [k for k in methods if k.startswith(("ilql_", "mcq_"))]
    best = max(guided, key=lambda k: methods[k]["reward_mean"])
    n_show = min(8, len(prompts))
    samples = [
        {
            "prompt": prompts[i],
            "base": texts["base"]["texts"][i],
            "guided": texts[best]["texts"][i],
            "base_reward": texts["base"]["rewards"][i],
            "guided_reward": texts[best]["rewards"][i],
            "method": best,
        }
        for i in range(n_show)
    ]
    maps_file = out / "value_maps.json"
    if maps_file.is_file():
        maps = json.loads(maps_file.read_text())
    else:
        idx = list(range(min(4, len(prompts))))
        ps = [prompts[i] for i in idx] * 2
        rs = [texts["base"]["texts"][i] for i in idx] + [texts[best]["texts"][i] for i in idx]
        rw = [texts["base"]["rewards"][i] for i in idx] + [texts[best]["rewards"][i] for i in idx]
        fin = [texts["base"]["finished"][i] for i in idx] + [texts[best]["finished"][i] for i in idx]
        heads_of_best = next(m for prefix, m in models.items() if best.startswith(prefix))
        # responses cut at the horizon get no EOS step (none was written)
        maps = value_maps(heads_of_best, tokenizer, ps, [r if r.strip() else "." for r in rs], finished=fin)
        for m, r, label in zip(maps, rw, ["base"] * len(idx) + [best] * len(idx)):
            m["reward"], m["method"] = r, label
        _save_json(maps_file, maps)
    intro = (
        f"<p>The base model <b>{cfg.model}</b> wrote {cfg.samples_per_prompt} responses of at most "
        f"{cfg.max_new_tokens} tokens to each of {cfg.train_prompts} training prompts; the reward "
        f"<b>{reward_name}</b> scored them. The task has a fixed horizon: the reward scores exactly those "
        "tokens, so the last one ends the episode. On that offline data we trained ILQL Q and V heads "
        f"(<code>ilql_*</code>, CQL weight {cfg.ilql_cql_scale:g}) and Monte-Carlo heads (<code>mcq_*</code>): V regressed on the final "
        "reward, Q(s, a) on V of the next prefix s + a (exact in a token MDP, where the next state is "
        "the prefix plus the token). V alone drives <code>cd_blockwise</code>. All heads sit on the "
        "frozen trunk, whose features were kept while sampling. Token-level guidance shifts only the "
        f"base model's {cfg.guidance_top_k} likeliest tokens at each step: Q is computed for those "
        "tokens only, and their advantages are centred on their mean under the base model, so "
        "guidance reorders them without moving mass to or from the other tokens. Every method below then answered the same {cfg.eval_prompts} held-out prompts. "
        "The value maps use the heads of the best guided method. Best-of-N samples N responses from "
        "the base model and keeps the one the true reward likes best: the strong baseline, at N times "
        "the cost. Cost is compute per generated token relative to plain sampling (heads and "
        "candidate blocks included); KL is the exact per-token KL to the base model summed per "
        "response (for best-of-N and blockwise selection, the analytic best-of-N bound).</p>"
    )
    b, bo4 = methods[best], methods["best_of_4"]
    verdict = "reaches" if b["reward_mean"] >= bo4["reward_mean"] else "falls short of"
    intro += (
        f"<p><b>Headline.</b> The best guided method, <code>{best}</code>, scores "
        f"{b['reward_mean']:.3f} ± {b['reward_ci95']:.3f} at {b['cost']:.2f}x the cost of plain sampling; "
        f"it {verdict} best-of-4 ({bo4['reward_mean']:.3f} ± {bo4['reward_ci95']:.3f} at 4x). Base sampling "
        f"scores {methods['base']['reward_mean']:.3f} ± {methods['base']['reward_ci95']:.3f}. Its price is "
        f"a KL of {b['kl_to_base']:.1f} nats per response to the base model (best-of-4: at most "
        f"{bo4['kl_to_base']:.2f}) and a perplexity of {b['perplexity']:.0f} under the base model "
        f"(base: {methods['base']['perplexity']:.0f}): read the samples below.</p>"
    )
    render_report(
        out / "report.html",
        title=f"qvlm demo: steering {cfg.model} toward {reward_name}",
        intro_html=intro,
        methods=methods,
        loss_history=history,
        samples=samples,
        value_maps=maps,
        config=dataclasses.asdict(cfg),
    )


def _check_config(out: Path, cfg: DemoConfig) -> None:
    """Refuse to resume a directory made with other settings (its cached phases would not match)."""
    file = out / "demo_config.json"
    current = dataclasses.asdict(cfg)
    if file.is_file():
        saved = json.loads(file.read_text())
        diff = sorted(k for k in current if saved.get(k) != current[k])
        if diff:
            raise QVLMError(
                f"{out} holds a demo run with other settings ({', '.join(diff)} differ); "
                "use another --out or the same settings to resume"
            )
    else:
        atomic_write_text(file, json.dumps(current, indent=2) + "\n")
