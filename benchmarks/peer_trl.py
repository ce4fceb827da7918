"""qvlm PPO side by side with TRL's GRPO and RLOO trainers, in one run, on the same model, training
prompts, reward, response length and number of reward calls; each trained policy is then decoded
once on the eval prompts and measured against the base model.

    python benchmarks/peer_trl.py                                    # SmolLM2-135M-Instruct, VADER
    python benchmarks/peer_trl.py --steps 10 --methods grpo,ppo      # shorter
    python benchmarks/peer_trl.py --model DIR --reward count:e       # any local model, any qvlm reward

Per method the JSON holds: the eval-prompt reward (mean and 95% CI, Student t over the eval prompts'
mean rewards, ``--eval-samples`` responses each), the exact KL to the
base model (per step, summed along each response: qvlm.eval.policy), perplexity under the base,
distinct-2, wall-clock of training, and the reward calls (responses scored). TRL 1.16.0 ships no PPO
trainer; its GRPO and RLOO are the peers. Equal budgets: a TRL step scores ``--prompts-per-step`` x
``--generations`` completions; qvlm PPO runs ``--steps`` iterations of the same shape. TRL is an
optional extra (``pip install -e ".[bench]"``); without it the script stops with a clear message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvlm.fileio import atomic_write_text  # noqa: E402

METHODS = ("grpo", "rloo", "ppo")


class CountingReward:
    """A qvlm batch reward that counts the responses it scores; also callable as a TRL reward."""

    def __init__(self, name: str):
        from qvlm.rewards import get_reward

        self.fn, self.calls, self.__name__ = get_reward(name), 0, name.replace(":", "_")

    def __call__(self, prompts, responses) -> list[float]:
        self.calls += len(responses)
        return [float(x) for x in self.fn(prompts, responses)]

    def trl(self, prompts, completions, **kwargs) -> list[float]:
        # conversational completions are [{"role": "assistant", "content": ...}]
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return self(prompts, texts)


def train_trl(method: str, model, tokenizer, prompts: list[str], reward: CountingReward, args, workdir: Path):
    from datasets import Dataset

    chat = tokenizer.chat_template is not None
    rows = [{"prompt": [{"role": "user", "content": p}] if chat else p} for p in prompts]
    common = dict(
        output_dir=str(workdir / method),
        use_cpu=args.device == "cpu",
        learning_rate=args.lr,
        beta=args.kl_coef,
        num_generations=args.generations,
        per_device_train_batch_size=args.prompts_per_step * args.generations,
        max_completion_length=args.max_new_tokens,
        max_steps=args.steps,
        temperature=1.0,
        report_to=[],
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        seed=args.seed,
        bf16=False,
    )
    if method == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        trainer = GRPOTrainer(model=model, reward_funcs=reward.trl, args=GRPOConfig(**common),
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer)  # fmt: skip
    else:
        from trl import RLOOConfig, RLOOTrainer

        trainer = RLOOTrainer(model=model, reward_funcs=reward.trl, args=RLOOConfig(**common),
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    return trainer.model


def train_qvlm_ppo(model, tokenizer, prompts: list[str], reward: CountingReward, args, workdir: Path):
    from qvlm.algos.actor_critic import ActorCritic
    from qvlm.algos.ppo import PPOConfig, train_ppo
    from qvlm.train.rng import set_seed

    set_seed(args.seed)
    ac = ActorCritic(model, trunk=args.ppo_trunk, critic="shared")
    cfg = PPOConfig(
        iterations=args.steps,
        prompts_per_iter=args.prompts_per_step,
        responses_per_prompt=args.generations,
        max_new_tokens=args.max_new_tokens,
        lr=args.ppo_lr or args.lr,
        kl_coef=args.kl_coef,
        ppo_epochs=args.ppo_epochs,
        seed=args.seed,
        checkpoint_every=0,
    )
    train_ppo(ac, tokenizer, prompts, reward, cfg, run_dir=workdir / "ppo")
    return ac.policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model (as qvlm --model)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--methods", default="grpo,rloo,ppo", help=f"comma-separated: {', '.join(METHODS)}")
    ap.add_argument("--reward", default="vader", help="a qvlm reward name")
    ap.add_argument("--train-prompts", default="demo:train", help="training prompt file")
    ap.add_argument("--eval-prompts", default="demo:eval", help="held-out prompt file")
    ap.add_argument("--max-eval-prompts", type=int, default=0, help="first N eval prompts (0: all)")
    ap.add_argument("--steps", type=int, default=90, help="TRL steps = qvlm PPO iterations")
    ap.add_argument("--prompts-per-step", type=int, default=2, help="prompts per step")
    ap.add_argument("--generations", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=20, help="response length limit")
    ap.add_argument("--lr", type=float, default=1e-5, help="learning rate (TRL; and PPO unless --ppo-lr)")
    ap.add_argument("--ppo-lr", type=float, default=0.0, help="qvlm PPO's learning rate (0: --lr)")
    ap.add_argument("--ppo-trunk", default="full", choices=("full", "lora"), help="qvlm PPO's trained weights")
    ap.add_argument("--ppo-epochs", type=int, default=4, help="qvlm PPO's passes over each rollout")
    ap.add_argument("--kl-coef", type=float, default=0.05, help="KL coefficient (TRL beta; PPO kl_coef)")
    ap.add_argument(
        "--eval-samples",
        type=int,
        default=4,
        help="responses per eval prompt for every method; the 95%% CI is over the prompts' means",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of every method and of the eval decoding")
    ap.add_argument("--json", default="benchmarks/results/peer_trl.json", help="where to write results")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if any(m not in METHODS for m in methods):
        raise SystemExit(f"--methods: choose from {', '.join(METHODS)}")
    if any(m in ("grpo", "rloo") for m in methods):
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit(
                "benchmarks/peer_trl.py needs TRL for its grpo and rloo rows: pip install -e '.[bench]' "
                "(or run --methods ppo)"
            ) from None
    from qvlm.configs import DecodeConfig
    from qvlm.eval.metrics import json_safe
    from qvlm.eval.policy import evaluate_policy_decoding
    from qvlm.jsonl import read_prompts
    from qvlm.loading import load_model

    train_prompts = read_prompts(args.train_prompts)
    eval_prompts = read_prompts(args.eval_prompts)
    if args.max_eval_prompts:
        eval_prompts = eval_prompts[: args.max_eval_prompts]
    base, tokenizer = load_model(args.model, device=args.device)
    eval_cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, seed=args.seed, num_return_sequences=args.eval_samples)
    eval_reward = CountingReward(args.reward)
    results = {}
    metrics, _, _ = evaluate_policy_decoding(base, base, tokenizer, eval_prompts, eval_reward, cfg=eval_cfg)
    results["base"] = {**metrics.as_dict(), "train_seconds": 0.0, "reward_calls": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            model, _ = load_model(args.model, device=args.device)
            reward = CountingReward(args.reward)
            start = time.perf_counter()
            train = train_qvlm_ppo if method == "ppo" else lambda *a: train_trl(method, *a)
            policy = train(model, tokenizer, train_prompts, reward, args, Path(tmp)).eval()
            seconds = time.perf_counter() - start
            metrics, _, _ = evaluate_policy_decoding(policy, base, tokenizer, eval_prompts, eval_reward, cfg=eval_cfg)
            results[method] = {**metrics.as_dict(), "train_seconds": seconds, "reward_calls": reward.calls}
            print(f"{method}: {json.dumps(results[method])}", flush=True)
    print(f"{'method':<8}{'reward':>9}{'+-95%':>8}{'KL':>8}{'ppl':>8}{'dist-2':>8}{'train s':>9}{'calls':>7}")
    for name, r in results.items():
        print(
            f"{name:<8}{r['reward_mean']:>9.4f}{r['reward_ci95']:>8.4f}{r['kl_to_base']:>8.3f}{r['perplexity']:>8.2f}"
            f"{r['distinct_2']:>8.3f}{r['train_seconds']:>9.1f}{r['reward_calls']:>7d}"
        )
    import torch
    import transformers

    machine = {"cpu_count": os.cpu_count(), "processor": platform.processor(), "loadavg": os.getloadavg(),
               "torch": torch.__version__, "transformers": transformers.__version__}  # fmt: skip
    try:
        import trl

        machine["trl"] = trl.__version__
    except ImportError:
        pass
    out = {"settings": vars(args), "eval_prompts": len(eval_prompts), "methods": results, "machine": machine}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(json_safe(out), indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
