"""Learners on multi-turn text environments, scored as LMRL-Gym scores them (issue 24, deliverable 4).

Per task and per seed ``s`` (the learners' seed: data, initialisation, sampling):

1. data from a mixed-quality policy (LMRL-Gym's offline protocol): ``--base-episodes`` of the base model
   plus ``--noisy-episodes`` of the scripted player with ``--epsilon``-random actions, on training seeds;
2. **ILQL** (frozen trunk, feature cache) and **MC** (a V head and Q heads regressed on Monte-Carlo
   returns, ``qvlm train value --target mc --with-q``) on that data; each guides the base model token by
   token (``log pi_ref + beta (Q - V)``), ``beta`` chosen from ``--betas`` on validation seeds of the
   training side (DESIGN.md's evaluation protocol);
3. **guidance**: value-guided decoding at the turn level: each turn the base model writes
   ``--candidates`` replies and the one with the highest ``Q`` at its last token is played
   (:func:`qvlm.envs.rollout.run_lm` ``candidates``), with the ILQL or the MC heads, whichever
   does better on the validation seeds;
4. **PPO** online in the environment (``qvlm train ppo --env``: LoRA policy, GAE across turns) on its own
   training seeds; its policy samples plainly;
5. the **base** model sampling plainly.

Every method is scored on the same ``--eval-episodes`` held-out environment seeds (``900_000_000 + i``;
every training and validation seed is below ``100_000_000``), decoded once. Scores as LMRL-Gym reports
them: ``normalised = 100 (return - random) / (optimal - random)`` with the task's exact optimal and random
returns (qvlm.envs), 95% CI over episodes (Student's t), means over seeds. After each task, one held-out
episode of the ILQL-guided policy is shown with V before and after each turn (the report section of
issue 24's demo).

    python benchmarks/env_learners.py                                  # the full protocol (GPU: hours)
    python benchmarks/env_learners.py --smoke --json /tmp/smoke.json   # a tiny random model, a minute
    nice -n 15 python benchmarks/env_learners.py --tasks guess --seeds 0 --base-episodes 16 ...  # one small run

Prints a table per task and writes JSON (default ``benchmarks/results/env_learners.json``, atomically).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from qvlm.algos.actor_critic import ActorCritic  # noqa: E402
from qvlm.algos.ilql import train_ilql  # noqa: E402
from qvlm.algos.ppo_env import train_ppo_env  # noqa: E402
from qvlm.algos.value import train_value  # noqa: E402
from qvlm.configs import DecodeConfig, ILQLConfig, PPOConfig, TrunkConfig, ValueConfig  # noqa: E402
from qvlm.envs import make, optimal_and_random  # noqa: E402
from qvlm.envs.rollout import run_lm, run_scripted  # noqa: E402
from qvlm.envs.scores import score_summary  # noqa: E402
from qvlm.envs.values import episode_turn_values  # noqa: E402
from qvlm.eval.metrics import json_safe, mean_ci95  # noqa: E402
from qvlm.features import FeatureCache  # noqa: E402
from qvlm.fileio import atomic_write_text  # noqa: E402
from qvlm.loading import context_length, load_model  # noqa: E402
from qvlm.model import QVModel  # noqa: E402
from qvlm.train.rng import set_seed  # noqa: E402

TASKS = {"guess": ("GuessTheNumber-v0", {}), "maze": ("Maze-v0", {})}
METHODS = ("base", "ilql", "mc", "guidance", "ppo")
EVAL_SEED = 900_000_000  # held-out environment seeds: EVAL_SEED + i, the same for every learner seed
# training-side seeds of learner seed s: s * SEED_STRIDE + ROLE[role] + i (all below 100_000_000)
SEED_STRIDE = 10_000_000
ROLE = {"base": 0, "noisy": 1_000_000, "ppo": 2_000_000, "val": 3_000_000}


@dataclass
class Protocol:
    """The protocol's settings (every one a flag)."""

    model: str = "smollm2-135m-instruct"
    device: str = "auto"
    tasks: str = "guess,maze"
    seeds: str = "0,1,2"
    methods: str = ",".join(METHODS)
    max_new_tokens: int = 8
    base_episodes: int = 64
    noisy_episodes: int = 448
    epsilon: float = 0.3
    val_episodes: int = 32
    eval_episodes: int = 100
    betas: str = "1,4,16"
    candidates: int = 8
    ilql_epochs: int = 4
    ilql_lr: float = 1e-3
    ilql_gamma: float = 0.99
    mc_epochs: int = 6
    mc_lr: float = 3e-3
    batch_size: int = 8
    ppo_iterations: int = 40
    ppo_seeds_per_iter: int = 8
    ppo_episodes_per_seed: int = 2
    ppo_lr: float = 1e-4
    ppo_kl_coef: float = 0.05
    decode_batch_size: int = 64
    smoke: bool = False


SMOKE = dict(
    tasks="guess,maze",
    seeds="0",
    max_new_tokens=4,
    base_episodes=4,
    noisy_episodes=12,
    val_episodes=2,
    eval_episodes=4,
    betas="1",
    candidates=2,
    ilql_epochs=1,
    mc_epochs=1,
    ppo_iterations=2,
    ppo_seeds_per_iter=2,
    ppo_episodes_per_seed=1,
    ppo_lr=1e-3,
)


def log(task: str, seed: int, what: str, t0: float) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[{time.perf_counter() - t0:7.0f} s] {task} seed {seed}: {what}", file=sys.stderr, flush=True)


def train_seeds(seed: int, role: str, n: int) -> list[int]:
    start = seed * SEED_STRIDE + ROLE[role]
    return list(range(start, start + n))


def eval_seeds(n: int) -> list[int]:
    return list(range(EVAL_SEED, EVAL_SEED + n))


# ---------------------------------------------------------------- models


def tiny_chat_model(seed: int = 0):
    """The smoke test's model: a random tiny Llama with a character tokenizer and a chat template."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import char_tokenizer, tiny_llama_config

    tok = char_tokenizer(" abcdefghijklmnopqrstuvwxyz0123456789:.,#")
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}s:hi<eos>{% endif %}"
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    config = tiny_llama_config(len(tok))
    config.max_position_embeddings = 2048
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    return model, tok


def load(p: Protocol):
    return tiny_chat_model() if p.smoke else load_model(p.model, device=p.device)


# ---------------------------------------------------------------- phases


def decode_cfg(p: Protocol, beta: float = 0.0) -> DecodeConfig:
    return DecodeConfig(max_new_tokens=p.max_new_tokens, beta=beta, batch_size=p.decode_batch_size)


def play(model, tok, env, kwargs, seeds, p: Protocol, seed: int, heads=None, beta=0.0, candidates=1, label=""):
    return run_lm(model, tok, env, seeds, decode_cfg(p, beta), heads=heads, env_kwargs=kwargs, sample_seed=seed,
                  candidates=candidates, policy_name=label)  # fmt: skip


def collect(model, tok, env, kwargs, p: Protocol, seed: int):
    """The mixed-quality data: the base model's episodes and the noisy scripted player's."""
    base = play(model, tok, env, kwargs, train_seeds(seed, "base", p.base_episodes), p, seed, label="base")
    noisy = run_scripted(env, train_seeds(seed, "noisy", p.noisy_episodes), "noisy", p.epsilon, tokenizer=tok,
                         env_kwargs=kwargs)  # fmt: skip
    return base + noisy


def heads_for(model, kind: str, data, tok, p: Protocol, seed: int, cache: FeatureCache) -> QVModel:
    """ILQL or Monte-Carlo Q/V heads on the frozen trunk, trained on ``data`` (one feature cache for both)."""
    max_length = max(len(e.token_ids) for e in data)
    set_seed(seed)
    qv = QVModel.from_trunk(model, TrunkConfig("frozen"), with_q=True, base_model=p.model, feature_cache=cache)
    common = dict(batch_size=p.batch_size, max_length=max_length, seed=seed, progress=False, checkpoint_every=0)
    if kind == "ilql":
        train_ilql(qv, tok, data, ILQLConfig(epochs=p.ilql_epochs, lr=p.ilql_lr, gamma=p.ilql_gamma, **common))
    else:
        cfg = ValueConfig(target="mc", q_target="return", gamma=1.0, epochs=p.mc_epochs, lr=p.mc_lr, **common)
        train_value(qv, tok, data, cfg)
    return qv.eval()


def choose_beta(model, tok, env, kwargs, qv, p: Protocol, seed: int) -> tuple[float, dict]:
    """The beta of ``--betas`` with the best mean return on validation seeds (training side)."""
    val = {}
    for beta in [float(b) for b in p.betas.split(",")]:
        episodes = play(model, tok, env, kwargs, train_seeds(seed, "val", p.val_episodes), p, seed, qv.heads, beta)
        val[beta] = sum(e.total_return for e in episodes) / len(episodes)
    return max(val, key=val.get), val


def choose_guidance_heads(model, tok, env, kwargs, heads: dict, p: Protocol, seed: int) -> tuple[str, dict]:
    """Turn-level guidance: the heads (ILQL or MC, those trained) whose best-of-``--candidates`` choice by
    Q has the best mean return on validation seeds. They differ where the data never took a token: ILQL's
    conservative term pushes such a token's Q down, while an MC Q head leaves it at its initial 0, which
    outranks every seen reply when the returns are negative."""
    val = {}
    for kind in ("ilql", "mc"):
        if kind in heads:
            seeds = train_seeds(seed, "val", p.val_episodes)
            episodes = play(model, tok, env, kwargs, seeds, p, seed, heads[kind].heads, 0.0, p.candidates)
            val[kind] = sum(e.total_return for e in episodes) / len(episodes)
    return max(val, key=val.get), val


def train_ppo(tok, env, kwargs, p: Protocol, seed: int):
    """A fresh copy of the base (LoRA goes into its weights) trained online; returns the policy."""
    model, _ = load(p)
    set_seed(seed)
    ac = ActorCritic(model, TrunkConfig("lora"), base_model=p.model)
    cfg = PPOConfig(iterations=p.ppo_iterations, prompts_per_iter=p.ppo_seeds_per_iter,
                    responses_per_prompt=p.ppo_episodes_per_seed, max_new_tokens=p.max_new_tokens,
                    minibatch_size=p.ppo_seeds_per_iter * p.ppo_episodes_per_seed, lr=p.ppo_lr,
                    kl_coef=p.ppo_kl_coef, decode_batch_size=p.decode_batch_size, seed=seed, progress=False,
                    checkpoint_every=0)  # fmt: skip
    history = train_ppo_env(ac, tok, env, cfg, kwargs, env_seed=train_seeds(seed, "ppo", 1)[0])
    return ac.policy, [v for _, v in history["charts/return"]]


def summary(episodes, optimal, random) -> dict:
    returns = [e.total_return for e in episodes]
    s = score_summary(returns, random, optimal)
    turns = [t for e in episodes for t in e.turns]
    s["invalid_rate"] = sum(t.invalid_action for t in turns) / max(1, len(turns))
    s["returns"] = returns
    return s


def run_seed(model, tok, task: str, p: Protocol, seed: int) -> dict:
    env, kwargs = TASKS[task]
    optimal, random = optimal_and_random(make(env, **kwargs))
    methods = p.methods.split(",")
    held_out = eval_seeds(p.eval_episodes)
    out: dict = {"seed": seed, "methods": {}}
    t0 = time.perf_counter()

    def scored(name: str, episodes, **extra) -> None:
        out["methods"][name] = {**summary(episodes, optimal, random), **extra}
        log(task, seed, f"{name}: normalised {out['methods'][name]['normalised']:.1f} {extra or ''}", t0)

    if "base" in methods:
        scored("base", play(model, tok, env, kwargs, held_out, p, seed, label="base"))
    cache, heads = FeatureCache(), {}
    if {"ilql", "mc", "guidance"} & set(methods):
        data = collect(model, tok, env, kwargs, p, seed)
        out["data"] = {
            "episodes": len(data),
            "base_mean_return": sum(e.total_return for e in data[: p.base_episodes]) / max(1, p.base_episodes),
            "noisy_mean_return": sum(e.total_return for e in data[p.base_episodes :]) / max(1, p.noisy_episodes),
            "seconds": time.perf_counter() - t0,
        }
        log(task, seed, f"data: {out['data']}", t0)
    for kind in ("ilql", "mc"):
        if kind in methods or "guidance" in methods:
            t = time.perf_counter()
            heads[kind] = heads_for(model, kind, data, tok, p, seed, cache)
            out[f"{kind}_train_seconds"] = time.perf_counter() - t
            log(task, seed, f"{kind} heads trained", t0)
        if kind in methods:
            beta, val = choose_beta(model, tok, env, kwargs, heads[kind], p, seed)
            episodes = play(model, tok, env, kwargs, held_out, p, seed, heads[kind].heads, beta, label=kind)
            scored(kind, episodes, beta=beta, validation=val)
            if kind == "ilql":
                out["report"] = report(heads[kind], tok, episodes[0])
    if "guidance" in methods:
        kind, val = choose_guidance_heads(model, tok, env, kwargs, heads, p, seed)
        episodes = play(model, tok, env, kwargs, held_out, p, seed, heads[kind].heads, 0.0, p.candidates, "guidance")
        scored("guidance", episodes, candidates=p.candidates, heads=kind, validation=val)
    heads.clear()
    if "ppo" in methods:
        t = time.perf_counter()
        policy, curve = train_ppo(tok, env, kwargs, p, seed)
        scored("ppo", play(policy, tok, env, kwargs, held_out, p, seed, label="ppo"), train_returns=curve,
               seconds=time.perf_counter() - t)  # fmt: skip
        del policy
    out["seconds"] = time.perf_counter() - t0
    return out


def report(qv: QVModel, tok, episode) -> dict:
    """One held-out episode of the ILQL-guided policy with V per turn under the ILQL heads."""
    rows = episode_turn_values(qv, tok, episode, gamma=1.0)
    return {"seed": episode.seed, "return": episode.total_return, "terminated": episode.terminated, "turns": rows}


# ---------------------------------------------------------------- tables


def aggregate(per_seed: list[dict]) -> dict:
    """Per method: the normalised mean over seeds, the CI over all episodes pooled, per-seed numbers."""
    out = {}
    for m in METHODS:
        rows = [r["methods"][m] for r in per_seed if m in r["methods"]]
        if not rows:
            continue
        scale = 100.0 / (rows[0]["optimal_return"] - rows[0]["random_return"])
        pooled = [x for r in rows for x in r["returns"]]
        mean, half = mean_ci95(pooled)
        out[m] = {
            "normalised_mean_over_seeds": sum(r["normalised"] for r in rows) / len(rows),
            "normalised_ci95_pooled": half * scale,
            "normalised_per_seed": [r["normalised"] for r in rows],
            "mean_return": mean,
            "invalid_rate": sum(r["invalid_rate"] for r in rows) / len(rows),
            "episodes": len(pooled),
        }
    return out


def print_table(task: str, agg: dict, per_seed: list[dict]) -> None:
    env = TASKS[task][0]
    print(f"\n{env}: normalised score (0 random, 100 optimal), held-out seeds")
    print("| method | normalised (mean over seeds) | 95% CI (episodes) | per seed | mean return | invalid replies |")
    print("|---|---|---|---|---|---|")
    for m, a in agg.items():
        extra = ""
        betas = [r["methods"][m].get("beta") for r in per_seed if m in r["methods"]]
        if betas and betas[0] is not None:
            extra = f" (beta {', '.join(f'{b:g}' for b in betas)})"
        kinds = [r["methods"][m].get("heads") for r in per_seed if m in r["methods"]]
        if kinds and kinds[0] is not None:
            extra = f" ({', '.join(kinds)} heads)"
        per = ", ".join(f"{x:.1f}" for x in a["normalised_per_seed"])
        print(f"| {m}{extra} | {a['normalised_mean_over_seeds']:.1f} | +- {a['normalised_ci95_pooled']:.1f} | {per} | "
              f"{a['mean_return']:.3f} | {a['invalid_rate']:.2f} |")  # fmt: skip
    rep = per_seed[0].get("report")
    if rep:
        print(f"\none held-out episode (seed {rep['seed']}) of the ILQL-guided policy, return {rep['return']:.2f}:")
        print("| turn | V before | reward | return that followed | V after | action |")
        print("|---|---|---|---|---|---|")
        for r in rep["turns"]:
            after = "-" if r["value_after"] is None else f"{r['value_after']:.3f}"
            print(f"| {r['turn']} | {r['value']:.3f} | {r['reward']:.2f} | {r['return_to_go']:.2f} | {after} | "
                  f"{r['action']!r} |")  # fmt: skip


HELP = {
    "model": "the base model (a qvlm model name or a Hugging Face directory)",
    "device": "cpu, cuda or auto",
    "tasks": f"comma-separated, from {sorted(TASKS)}",
    "seeds": "learner seeds (data, initialisation, sampling); the held-out episodes are the same for each",
    "methods": f"comma-separated, from {METHODS}",
    "max_new_tokens": "tokens per reply",
    "base_episodes": "offline data: the base model's episodes per seed",
    "noisy_episodes": "offline data: the noisy scripted player's episodes per seed",
    "epsilon": "the noisy scripted player's probability of a random action",
    "val_episodes": "validation episodes (training side) that choose beta",
    "eval_episodes": "held-out episodes per method and seed",
    "betas": "guidance strengths to choose from on validation",
    "candidates": "replies per turn for turn-level guidance",
    "ilql_epochs": "ILQL epochs over the offline data",
    "ilql_lr": "ILQL learning rate",
    "ilql_gamma": "ILQL discount per token",
    "mc_epochs": "Monte-Carlo value epochs",
    "mc_lr": "Monte-Carlo value learning rate",
    "batch_size": "offline minibatch (episodes)",
    "ppo_iterations": "PPO rollout + update rounds",
    "ppo_seeds_per_iter": "environment seeds per PPO iteration",
    "ppo_episodes_per_seed": "episodes per seed per PPO iteration (the RLOO/GRPO group)",
    "ppo_lr": "PPO's LoRA learning rate",
    "ppo_kl_coef": "PPO's KL coefficient",
    "decode_batch_size": "episodes decoded together",
    "smoke": f"a random tiny model and a tiny protocol (a minute): {SMOKE}",
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring as written, each flag's default shown."""


def parse(argv=None) -> tuple[Protocol, str, list[str]]:
    ap = argparse.ArgumentParser(
        description=__doc__,
        epilog="python benchmarks/env_learners.py --merge a.json b.json --json all.json   # seeds run apart, one table",
        formatter_class=_Formatter,
    )
    for f in fields(Protocol):
        if f.type in ("bool", bool):
            ap.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=HELP[f.name])
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=HELP[f.name])
    ap.add_argument("--json", default="benchmarks/results/env_learners.json", help="results file (written atomically)")
    ap.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="JSON",
        help="run nothing: combine result files of the same protocol run with different --seeds into one table",
    )
    args = vars(ap.parse_args(argv))
    path = args.pop("json")
    merged = args.pop("merge")
    p = Protocol(**args)
    if p.smoke:
        given = {k for k in args if args[k] != getattr(Protocol, k)}
        p = Protocol(**{**args, **{k: v for k, v in SMOKE.items() if k not in given}})
    return p, path, merged


def read_result(path: str) -> dict:
    """A result file of this benchmark, or SystemExit naming the file and what is wrong with it."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"--merge {path}: not a readable JSON result file ({err})") from None
    if not isinstance(result, dict) or not {"protocol", "tasks"} <= result.keys():
        raise SystemExit(f"--merge {path}: no 'protocol' and 'tasks': not a file this benchmark wrote")
    return result


def merge(results: list[dict]) -> dict:
    """One result from several runs of the same protocol with different ``seeds``: each task's
    per-seed rows concatenated (in the order given) and aggregated again. Any other protocol difference,
    or a seed that appears twice, is an error that names it."""
    if not results:
        raise SystemExit("--merge needs at least one result file")
    first = results[0]["protocol"]
    for r in results[1:]:
        diff = sorted(
            k for k in first.keys() | r["protocol"].keys() if k != "seeds" and first.get(k) != r["protocol"].get(k)
        )
        if diff:
            raise SystemExit(f"--merge: the runs differ in more than their seeds: {', '.join(diff)}")
    out = {"protocol": {**first, "seeds": ",".join(r["protocol"]["seeds"] for r in results)}, "tasks": {}}
    for task in dict.fromkeys(t for r in results for t in r["tasks"]):
        parts = [r["tasks"][task] for r in results if task in r["tasks"]]
        per_seed = [row for part in parts for row in part["per_seed"]]
        seeds = [row["seed"] for row in per_seed]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(
                f"--merge: task {task} has seed(s) {sorted({s for s in seeds if seeds.count(s) > 1})} twice"
            )
        keep = {k: parts[0][k] for k in ("env", "optimal_return", "random_return")}
        out["tasks"][task] = {**keep, "aggregate": aggregate(per_seed), "per_seed": per_seed}
    out["seconds"] = sum(r.get("seconds", 0.0) for r in results)
    out["machine"] = results[0].get("machine")
    return out


def main(argv=None) -> dict:
    p, path, merged = parse(argv)
    if merged:
        result = merge([read_result(f) for f in merged])
        result["merged_from"] = list(merged)
        for task, t in result["tasks"].items():
            print_table(task, t["aggregate"], t["per_seed"])
        atomic_write_text(path, json.dumps(json_safe(result), indent=1) + "\n")
        print(f"\nwrote {path} ({len(merged)} runs merged)")
        return result
    model, tok = load(p)
    if not p.smoke and context_length(model.config) and context_length(model.config) < 1024:
        print(f"warning: the model's context is {context_length(model.config)} tokens")
    result = {"protocol": asdict(p), "tasks": {}}
    t0 = time.perf_counter()
    for task in p.tasks.split(","):
        per_seed = [run_seed(model, tok, task, p, int(s)) for s in p.seeds.split(",")]
        env, kwargs = TASKS[task]
        optimal, random = optimal_and_random(make(env, **kwargs))
        agg = aggregate(per_seed)
        result["tasks"][task] = {"env": env, "optimal_return": optimal, "random_return": random,
                                 "aggregate": agg, "per_seed": per_seed}  # fmt: skip
        print_table(task, agg, per_seed)
    result["seconds"] = time.perf_counter() - t0
    result["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    text = json.dumps(json_safe(result), indent=1)
    atomic_write_text(path, text + "\n")
    print(f"\nwrote {path} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
