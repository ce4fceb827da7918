"""qvlm's online trainers side by side with TRL's, fairly (issue 23): TRL GRPO, TRL RLOO, qvlm PPO,
qvlm RLOO and qvlm GRPO on the same model, prompts, reward, reward calls and sampling, each tuned with
the same budget on validation prompts and reported as a reward-KL curve, compared at matched KL.

    /work/venv-trl/bin/python benchmarks/peer_trl.py --smoke           # a few minutes: proves it runs
    /work/venv-trl/bin/python benchmarks/peer_trl.py                   # the full run (hours on 2 CPUs)
    python benchmarks/peer_trl.py --methods qvlm-ppo,qvlm-rloo         # qvlm only: no TRL needed

Run it with a Python that has TRL 1.16 (a separate venv: benchmarks/README.md); the qvlm rows need
only qvlm.

Protocol (every method alike):

- **Prompts.** Training: the first ``--n-train`` prompts of ``--train-prompts`` (160 of demo:train).
  Validation: the rest of them (59), from the training side, never trained on. Eval: the first
  ``--max-eval-prompts`` of ``--eval-prompts`` (50 of demo:eval), decoded once per trained policy,
  for the table only.
- **Budget.** ``--reward-calls`` responses scored in training (720 = 18 steps x 10 prompts x 4
  responses), counted on both sides and checked; TRL's step and qvlm's iteration have the same
  shape (``--prompts-per-step`` x ``--generations``).
- **Sampling**, pinned on both sides: temperature 1, top-k 0, top-p 1 (TRL's config fields and the
  model's generation config; qvlm's ``DecodeConfig`` defaults), ``--max-new-tokens`` (20).
- **Tuning.** Every method trains at the same number of KL coefficients (``--kl-coefs``, 3 by
  default; a method's own grid with ``--kl-coefs-METHOD``): TRL GRPO's k3 loss ``beta`` (0 in TRL by
  default, so set), TRL RLOO's ``beta`` (k1 in the reward), qvlm's ``--kl-coef`` (k1 in the
  reward). Each run is measured on the validation prompts; the validation curves choose the KLs at
  which the methods are compared (``--kl-targets``, default: 3 points up to the largest KL every
  curve reaches) and each method's shown setting (its best validation reward within that range).
  The eval prompts choose nothing.
- **Evaluation**, one evaluator for all: the trained policy decodes the prompts with qvlm's sampler
  (same seed, ``--eval-samples`` responses per prompt) and :func:`qvlm.eval.policy.rollout_metrics`
  scores them: reward (95% CI, Student t over the prompts' means), the exact KL to the base model
  (per step, summed along each response), perplexity under the base, distinct-2.
- **Curves and matched KL.** A method's curve is its runs' (KL, reward) points plus the base model
  at KL 0, ordered by KL; a reward at a given KL is the linear interpolation between the two
  neighbouring points (none outside the curve: no extrapolation). Every point of every method is
  also compared with ``--reference``'s curve (TRL GRPO) at the same KL.
- **Cost**, measured in the same run, each run in a fresh process: wall-clock and CPU time of
  training per reward call, peak memory (max RSS when training ends), torch threads, dtype.

Settings: TRL at its defaults but for the pinned sampling, the budget, ``--trl-lr`` (1e-5, as in
issue 23), ``beta``, and CPU settings made explicit (``use_cpu``, bf16 and fp16 off, gradient
checkpointing off); a full fine-tune, as TRL trains a model it is given. qvlm at ``PPOConfig``'s
defaults (LoRA r 8, lr 3e-4, KL coefficient 0.2, one epoch over minibatches of 8, as
``benchmarks/ppo_sweep.py`` chose them) but for the budget, ``kl_coef`` and ``advantage`` (``--fast``:
rollouts on the fast path; ``--qvlm-set KEY=VALUE``: other ``PPOConfig`` fields). A grid point
``KL@lr=LR`` also sets that run's learning rate, on either side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ("trl-grpo", "trl-rloo", "qvlm-ppo", "qvlm-rloo", "qvlm-grpo")
QVLM_ADVANTAGE = {"qvlm-ppo": "gae", "qvlm-rloo": "rloo", "qvlm-grpo": "grpo"}
SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}  # pinned on both sides
# --smoke: minutes, not a measurement (one KL coefficient a method, one thread for a shared machine)
SMOKE = dict(n_train=8, max_val_prompts=4, max_eval_prompts=4, reward_calls=8, prompts_per_step=2, generations=2,
             max_new_tokens=8, eval_samples=2, kl_coefs="0.05", threads=1)  # fmt: skip


# ---- the reward both sides call -----------------------------------------------------------------


class CountingReward:
    """A qvlm batch reward that counts the responses it scores; :meth:`trl` is the same function as a
    TRL reward (prompts as the texts qvlm sees, completions' text)."""

    def __init__(self, name: str):
        from qvlm.rewards import get_reward

        self.fn, self.calls, self.__name__ = get_reward(name), 0, name.replace(":", "_")

    def __call__(self, prompts, responses) -> list[float]:
        self.calls += len(responses)
        return [float(x) for x in self.fn(list(prompts), list(responses))]

    def trl(self, prompts, completions, **kwargs) -> list[float]:
        # conversational rows are message lists: the user's text, the assistant's completion
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        users = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        return self(users, texts)


# ---- curves -------------------------------------------------------------------------------------


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """The reward at KL ``x`` on a curve of ``(kl, reward)`` points: linear between the two points
    around ``x`` after sorting by KL; None outside ``[min kl, max kl]`` (no extrapolation).

    ``interpolate([(0, 0.3), (1, 0.5), (2, 0.6)], 1.5) == 0.55``.
    """
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]  # a single point, x on it


def curve(base: dict, runs: list[dict], split: str) -> list[tuple[float, float]]:
    """A method's ``(kl, reward)`` curve on ``split`` (val or eval): the base at KL 0, then its runs."""
    return [(0.0, base[split]["reward_mean"])] + [(r[split]["kl_to_base"], r[split]["reward_mean"]) for r in runs]


def kl_targets(base: dict, by_method: dict[str, list[dict]], given: str, n: int = 3) -> list[float]:
    """The KLs the methods are compared at, chosen on validation: ``given`` (comma-separated), or ``n``
    points evenly up to the largest validation KL every method's curve reaches."""
    if given:
        return [float(x) for x in given.split(",") if x.strip()]
    top = min(max(k for k, _ in curve(base, runs, "val")) for runs in by_method.values())
    return [top * (i + 1) / n for i in range(n)] if top > 0 else []


def selected_run(runs: list[dict], top_kl: float) -> dict:
    """A method's shown setting, chosen on validation: its best validation reward among the runs whose
    validation KL is within the compared range (``top_kl``), else its lowest-KL run."""
    inside = [r for r in runs if r["val"]["kl_to_base"] <= top_kl]
    if inside:
        return max(inside, key=lambda r: r["val"]["reward_mean"])
    return min(runs, key=lambda r: r["val"]["kl_to_base"])


# ---- one run, in its own process ----------------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _load(spec: dict):
    from qvlm.loading import load_model

    model, tok = load_model(spec["model"], device=spec["device"], dtype=spec["dtype"])
    for key, value in SAMPLING.items():  # nothing of the model's own generation config may change the sampling
        setattr(model.generation_config, key, value)
    return model, tok


def train_trl(method: str, model, tok, prompts: list[str], reward: CountingReward, spec: dict, workdir: Path):
    from datasets import Dataset

    chat = tok.chat_template is not None
    rows = [{"prompt": [{"role": "user", "content": p}] if chat else p} for p in prompts]
    args = dict(
        output_dir=str(workdir / method),
        use_cpu=spec["device"] == "cpu",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        learning_rate=spec["trl_lr"],
        beta=spec["kl_coef"],
        num_generations=spec["generations"],
        per_device_train_batch_size=spec["prompts_per_step"] * spec["generations"],
        gradient_accumulation_steps=1,
        max_completion_length=spec["max_new_tokens"],
        max_steps=spec["steps"],
        **SAMPLING,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=spec["seed"],
    )
    if method == "trl-grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    trainer = Trainer(
        model=model,
        reward_funcs=reward.trl,
        args=Config(**args),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    trainer.train()
    return trainer.model, "full"


def train_qvlm(method: str, model, tok, prompts: list[str], reward: CountingReward, spec: dict):
    from qvlm.algos.actor_critic import ActorCritic
    from qvlm.algos.ppo import PPOConfig, train_ppo
    from qvlm.train.rng import set_seed

    cfg = PPOConfig(
        iterations=spec["steps"],
        prompts_per_iter=spec["prompts_per_step"],
        responses_per_prompt=spec["generations"],
        max_new_tokens=spec["max_new_tokens"],
        kl_coef=spec["kl_coef"],
        advantage=QVLM_ADVANTAGE[method],
        fast=spec["fast"],
        seed=spec["seed"],
        checkpoint_every=0,
        progress=False,
        **ppo_overrides(spec.get("ppo", {})),
    )
    set_seed(cfg.seed)  # the V head's initialisation
    ac = ActorCritic(model, cfg.trunk, cfg.critic, cfg.head_hidden, base_model=spec["model"])
    train_ppo(ac, tok, prompts, reward, cfg, run_dir=None)
    return ac.policy, cfg.trunk.mode


def ppo_overrides(given: dict[str, str]) -> dict:
    """``PPOConfig`` keyword arguments from ``KEY=VALUE`` strings (``--qvlm-set``): each value cast to
    the field's type; ``trunk`` is the trunk's mode (lora or full)."""
    import dataclasses

    from qvlm.algos.ppo import PPOConfig
    from qvlm.configs.trunk import TrunkConfig

    fields = {f.name: f for f in dataclasses.fields(PPOConfig)}
    fixed = {"iterations", "prompts_per_iter", "responses_per_prompt", "max_new_tokens", "kl_coef", "advantage", "seed"}
    out = {}
    for key, value in given.items():
        if key == "trunk":
            out[key] = TrunkConfig(mode=value)
        elif key in fixed or key not in fields:
            raise SystemExit(
                f"--qvlm-set {key}: not a PPOConfig field the benchmark leaves free ({sorted(set(fields) - fixed)})"
            )
        else:
            kind = fields[key].metadata.get("type") or type(fields[key].default)  # a None default names its type
            out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def parse_sets(items: list[str]) -> dict[str, str]:
    """``["lr=3e-4", "ppo_epochs=1"]`` -> ``{"lr": "3e-4", "ppo_epochs": "1"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise SystemExit(f"--qvlm-set {item!r}: write KEY=VALUE, for example lr=3e-4")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def evaluate(policy, base, tok, prompts: list[str], reward, spec: dict) -> dict:
    """Decode ``prompts`` once with ``policy`` (qvlm's sampler, pinned sampling, the run's seed) and
    score them with the one exact-KL evaluator."""
    import torch

    from qvlm.configs import DecodeConfig
    from qvlm.decoding.sampling import sample_rollout
    from qvlm.eval.policy import rollout_metrics

    cfg = DecodeConfig(
        max_new_tokens=spec["max_new_tokens"], num_return_sequences=spec["eval_samples"], seed=spec["seed"], **SAMPLING
    )
    policy.eval()
    with torch.no_grad():
        rollout = sample_rollout(policy, tok, prompts, cfg=cfg, logprobs=False, ref_logprobs=False)
        metrics, _, _ = rollout_metrics(policy, base, tok, prompts, rollout, reward, cfg=cfg)
    return metrics.as_dict()


def worker(spec_path: str) -> None:
    """One (method, KL coefficient) run: train on the training prompts with the budget, then evaluate
    on the validation and the eval prompts; writes its result JSON to ``spec["out"]``."""
    import torch

    from qvlm.eval.metrics import json_safe
    from qvlm.fileio import atomic_write_text

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    model, tok = _load(spec)
    result = {
        "method": spec["method"],
        "kl_coef": spec["kl_coef"],
        "lr": spec.get("lr"),
        "threads": torch.get_num_threads(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "rss_loaded_mb": _peak_rss_mb(),
    }
    policy = model
    if spec["method"] != "base":
        reward = CountingReward(spec["reward"])
        wall, cpu = time.perf_counter(), time.process_time()
        if spec["method"].startswith("trl-"):
            policy, weights = train_trl(spec["method"], model, tok, spec["train"], reward, spec, Path(spec["workdir"]))
        else:
            policy, weights = train_qvlm(spec["method"], model, tok, spec["train"], reward, spec)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if reward.calls != spec["reward_calls"]:
            raise SystemExit(f"{spec['method']}: {reward.calls} reward calls in training, not {spec['reward_calls']}")
        result.update(
            trained_weights=weights,
            reward_calls=reward.calls,
            train_seconds=wall,
            train_cpu_seconds=cpu,
            seconds_per_call=wall / reward.calls,
            cpu_seconds_per_call=cpu / reward.calls,
            peak_rss_mb=_peak_rss_mb(),
        )
    base, _ = _load(spec)  # a fresh copy: the base of the KL and the perplexity
    eval_reward = CountingReward(spec["reward"])
    result["val"] = evaluate(policy, base, tok, spec["val"], eval_reward, spec)
    if spec["eval"]:  # a sweep decodes validation prompts only
        result["eval"] = evaluate(policy, base, tok, spec["eval"], eval_reward, spec)
    atomic_write_text(spec["out"], json.dumps(json_safe(result), indent=2) + "\n")


def parse_setting(text: str) -> dict:
    """One point of a method's grid: a KL coefficient, optionally with its own learning rate
    (``"0.05"`` or ``"0.05@lr=3e-5"``: TRL's ``learning_rate`` or qvlm's ``PPOConfig.lr`` for that run).

    >>> parse_setting("0.05@lr=3e-5")
    {'kl_coef': 0.05, 'lr': 3e-05}
    """
    kl, sep, rest = text.strip().partition("@")
    setting = {"kl_coef": float(kl)}
    if sep:
        key, eq, value = rest.partition("=")
        if key.strip() != "lr" or not eq:
            raise SystemExit(f"grid point {text!r}: write KL or KL@lr=LR, for example 0.05@lr=3e-5")
        setting["lr"] = float(value)
    return setting


def setting_label(r: dict) -> str:
    """``0.05`` or ``0.05@lr=3e-05``: a run's grid point as the tables print it."""
    return f"{r['kl_coef']:g}" + (f"@lr={r['lr']:g}" if r.get("lr") is not None else "")


def run_spec(common: dict, method: str, setting: dict) -> dict:
    """The spec of ``method``'s run at a grid point; a point's own learning rate goes to TRL's
    ``trl_lr`` or qvlm's PPO settings (and into the run's name)."""
    spec = {**common, "method": method, "kl_coef": setting["kl_coef"]}
    if setting.get("lr") is not None:
        spec["lr"] = setting["lr"]
        if method.startswith("trl-"):
            spec["trl_lr"] = setting["lr"]
        else:
            spec["ppo"] = {**spec.get("ppo", {}), "lr": str(setting["lr"])}
    return spec


def run_name(spec: dict) -> str:
    lr = f"_lr{spec['lr']:g}" if spec.get("lr") is not None else ""
    return spec.get("name") or f"{spec['method']}_kl{spec['kl_coef']}{lr}"


def start_one(spec: dict, workdir: Path) -> tuple[subprocess.Popen, dict, Path]:
    """``spec``'s run in a fresh process of this Python (own memory peak, own threads), its log in
    ``workdir``."""
    name = run_name(spec)
    spec = {**spec, "out": str(workdir / f"{name}.json"), "workdir": str(workdir)}
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = workdir / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(spec_path)], stdout=f, stderr=subprocess.STDOUT
        )
    return proc, spec, log


def finish_one(proc: subprocess.Popen, spec: dict, log: Path) -> dict:
    """Wait for a started run; its result, or its log's tail if it failed."""
    rc = proc.wait()
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{run_name(spec)} failed (exit {rc}); the end of its log {log}:\n{tail}")
    return json.loads(Path(spec["out"]).read_text())


def run_one(spec: dict, workdir: Path) -> dict:
    """``spec``'s run in a fresh process, waited for."""
    return finish_one(*start_one(spec, workdir))


def kept(spec: dict, workdir: Path) -> dict | None:
    """A finished run of exactly ``spec`` in ``workdir`` (``--keep``), or None."""
    name = run_name(spec)
    spec_path, out = workdir / f"{name}.spec.json", workdir / f"{name}.json"
    if not (spec_path.exists() and out.exists()):
        return None
    old = {k: v for k, v in json.loads(spec_path.read_text()).items() if k not in ("out", "workdir")}
    return json.loads(out.read_text()) if old == spec else None


def run_many(specs: list[dict], workdir: Path, jobs: int, on_done=None) -> list[dict]:
    """Every spec's run, ``jobs`` at a time, results in ``specs``' order. TRL's full fine-tunes (about
    10 GB each at 135M parameters in fp32, a frozen reference beside the trained copy and AdamW's
    moments) never run two at once: the next run that fits is started instead. ``on_done(result)``
    after each run."""
    pending, running, results = list(range(len(specs))), {}, {}
    heavy = lambda i: specs[i]["method"].startswith("trl-")  # noqa: E731
    while pending or running:
        while pending and len(running) < max(1, jobs):
            busy = any(heavy(i) for i in running)
            fits = [i for i in pending if not (busy and heavy(i))]
            if not fits:
                break
            i = fits[0]
            pending.remove(i)
            results[i] = kept(specs[i], workdir)  # finished earlier, or by another invocation sharing --keep
            if results[i] is None:
                running[i] = start_one(specs[i], workdir)
                continue
            print(f"{run_name(specs[i])}: kept from {workdir}", flush=True)
            if on_done is not None:
                on_done(results[i])
        if not running:
            continue
        done = None
        while done is None:
            done = next((i for i, (proc, _, _) in running.items() if proc.poll() is not None), None)
            if done is None:
                time.sleep(0.5)
        results[done] = finish_one(*running.pop(done))
        if on_done is not None:
            on_done(results[done])
    return [results[i] for i in range(len(specs))]


# ---- the whole benchmark ------------------------------------------------------------------------


def add_budget_args(ap: argparse.ArgumentParser) -> None:
    """The model, prompts, reward and budget every run shares (this benchmark's and ppo_sweep.py's)."""
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model (as qvlm --model)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"), help="every run's dtype")
    ap.add_argument("--reward", default="vader", help="a qvlm reward name")
    ap.add_argument("--train-prompts", default="demo:train", help="prompt file of the training side")
    ap.add_argument("--n-train", type=int, default=160, help="its first N train; the rest are validation prompts")
    ap.add_argument("--max-val-prompts", type=int, default=0, help="first N validation prompts (0: all)")
    ap.add_argument("--reward-calls", type=int, default=720, help="responses scored in training, every run")
    ap.add_argument("--prompts-per-step", type=int, default=10, help="prompts per TRL step / qvlm iteration")
    ap.add_argument("--generations", type=int, default=4, help="responses per prompt in training")
    ap.add_argument("--max-new-tokens", type=int, default=20, help="response length limit, training and eval")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_budget_args(ap)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of every run")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--eval-prompts", default="demo:eval", help="held-out prompt file (the table only)")
    ap.add_argument("--max-eval-prompts", type=int, default=50, help="first N eval prompts (0: all)")
    ap.add_argument("--kl-coefs", default="0.01,0.05,0.2", help="KL coefficients every method trains at")
    for m in METHODS:
        ap.add_argument(
            f"--kl-coefs-{m}",
            default="",
            help=f"{m}'s own grid (same count: the same budget); a point KL@lr=LR sets its learning rate too",
        )
    ap.add_argument("--kl-targets", default="", help="KLs to compare at (default: chosen on validation)")
    ap.add_argument("--reference", default="trl-grpo", choices=METHODS, help="the curve every point is compared to")
    ap.add_argument("--trl-lr", type=float, default=1e-5, help="TRL's learning rate (its default is 1e-6)")
    ap.add_argument("--fast", action="store_true", help="qvlm rollouts on the fast decoding path")
    ap.add_argument(
        "--qvlm-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a PPOConfig field for every qvlm run (repeat: --qvlm-set lr=3e-4 --qvlm-set ppo_epochs=1; "
        "trunk=full); default: PPOConfig's defaults",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each in its own process at --threads (2 on 2 cores with --threads 1; TRL's "
        "full fine-tunes never two at once); recorded, as runs side by side share memory bandwidth",
    )
    ap.add_argument("--eval-samples", type=int, default=4, help="responses per validation / eval prompt")
    ap.add_argument("--seed", type=int, default=0, help="seed of every run and of the evaluation decoding")
    ap.add_argument("--smoke", action="store_true", help="a tiny budget that runs in minutes: " + str(SMOKE))
    ap.add_argument("--json", default="", help="results file (default benchmarks/results/peer_trl[_smoke].json)")
    ap.add_argument(
        "--keep",
        default="",
        help="a folder for the runs' specs, logs and results (default: a temporary one); a run whose exact spec "
        "already finished there is read back, not rerun",
    )
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        for m in METHODS:  # one grid for all
            setattr(args, f"kl_coefs_{m.replace('-', '_')}", "")
    args.json = args.json or f"benchmarks/results/peer_trl{'_smoke' if args.smoke else ''}.json"
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or any(m not in METHODS for m in args.methods):
        ap.error(f"--methods: choose from {', '.join(METHODS)}")
    per_step = args.prompts_per_step * args.generations
    if args.reward_calls % per_step:
        ap.error(
            f"--reward-calls {args.reward_calls} is not a multiple of --prompts-per-step x --generations ({per_step})"
        )
    if args.generations < 2:
        ap.error("--generations must be at least 2 (GRPO and RLOO compare the responses to one prompt)")
    args.steps = args.reward_calls // per_step
    grids = {
        m: [parse_setting(x) for x in (getattr(args, f"kl_coefs_{m.replace('-', '_')}") or args.kl_coefs).split(",")]
        for m in args.methods
    }
    if len({len(g) for g in grids.values()}) != 1:
        ap.error("every method gets the same tuning budget: give every --kl-coefs-METHOD as many values as --kl-coefs")
    args.grids = grids
    args.ppo = parse_sets(args.qvlm_set)
    return args


def machine(dtype: str, threads: int) -> dict:
    import platform

    import torch
    import transformers
    from decode_speed import SHOWN_FLAGS, machine_info

    info = machine_info()
    info.update(
        torch_threads=threads,
        dtype=dtype,
        loadavg_start=os.getloadavg(),
        python_executable=sys.executable,
        peft=_version("peft"),
        trl=_version("trl"),
        transformers=transformers.__version__,
        torch=torch.__version__,
        platform=platform.platform(),
    )
    shown = " ".join(f for f in SHOWN_FLAGS if info["cpu_flags_shown"].get(f)) or "none"
    print(
        f"CPU: {info['cpu_model']}; flags: {shown} (of {', '.join(SHOWN_FLAGS)}); {os.cpu_count()} CPUs; "
        f"{threads} torch threads; dtype {dtype}; load average {info['loadavg_start'][0]:.2f}",
        flush=True,
    )
    return info


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def report(args, base: dict, runs: list[dict]) -> dict:
    """The tables (printed) and the summary: curves, matched-KL rewards, points against the reference
    curve, the setting chosen on validation per method, cost per method."""
    by_method = {m: [r for r in runs if r["method"] == m] for m in args.methods}
    targets = kl_targets(base, by_method, args.kl_targets)
    top = max(targets) if targets else 0.0
    print("\nruns (validation chooses; eval prompts decoded once, for the table):")
    print(
        f"{'method':<10}{'setting':>14}{'val R':>8}{'val KL':>8}{'eval R':>8}{'+-95%':>7}{'eval KL':>8}"
        f"{'s/call':>8}{'cpu s/call':>11}{'peak MB':>9}{'thr':>4} dtype"
    )
    print(
        f"{'base':<10}{'':>14}{base['val']['reward_mean']:>8.3f}{0:>8.3f}{base['eval']['reward_mean']:>8.3f}"
        f"{base['eval']['reward_ci95']:>7.3f}{0:>8.3f}"
    )
    for r in runs:
        v, e = r["val"], r["eval"]
        print(
            f"{r['method']:<10}{setting_label(r):>14}{v['reward_mean']:>8.3f}{v['kl_to_base']:>8.3f}"
            f"{e['reward_mean']:>8.3f}{e['reward_ci95']:>7.3f}{e['kl_to_base']:>8.3f}{r['seconds_per_call']:>8.3f}"
            f"{r['cpu_seconds_per_call']:>11.3f}{r['peak_rss_mb']:>9.0f}{r['threads']:>4} {r['dtype']}"
        )
    matched = {m: {f"{t:.4g}": interpolate(curve(base, rs, "eval"), t) for t in targets} for m, rs in by_method.items()}
    print(f"\neval reward at matched KL (targets chosen on validation: {', '.join(f'{t:.3g}' for t in targets)} nats):")
    print(f"{'method':<10}" + "".join(f"{'KL ' + format(t, '.3g'):>12}" for t in targets))
    for m, row in matched.items():
        print(f"{m:<10}" + "".join(f"{_fmt(v):>12}" for v in row.values()))
    versus = {}
    if args.reference in by_method:
        ref = curve(base, by_method[args.reference], "eval")
        print(f"\neach point against {args.reference}'s eval curve at the same KL:")
        for r in runs:
            ref_r = interpolate(ref, r["eval"]["kl_to_base"])
            diff = None if ref_r is None else r["eval"]["reward_mean"] - ref_r
            versus[f"{r['method']}@{setting_label(r)}"] = {
                "kl": r["eval"]["kl_to_base"],
                "reward": r["eval"]["reward_mean"],
                "reference_reward": ref_r,
                "difference": diff,
            }
            print(
                f"  {r['method']:<10} {setting_label(r):<14} KL {r['eval']['kl_to_base']:.3f}: "
                f"{r['eval']['reward_mean']:.3f} vs {_fmt(ref_r)} ({_fmt(diff, '+.3f')})"
            )
    chosen, cost = {}, {}
    print(f"\nchosen on validation (best validation reward at validation KL <= {top:.3g}), on eval:")
    for m, rs in by_method.items():
        r = selected_run(rs, top)
        chosen[m] = {
            "kl_coef": r["kl_coef"],
            "lr": r.get("lr"),
            **{k: r["eval"][k] for k in ("reward_mean", "reward_ci95", "kl_to_base")},
        }
        cost[m] = {k: sum(x[k] for x in rs) / len(rs) for k in ("seconds_per_call", "cpu_seconds_per_call")}
        cost[m]["peak_rss_mb"] = max(x["peak_rss_mb"] for x in rs)
        print(
            f"  {m:<10} {setting_label(r):<14} reward {r['eval']['reward_mean']:.3f} +- "
            f"{r['eval']['reward_ci95']:.3f} at KL {r['eval']['kl_to_base']:.3f}; "
            f"{cost[m]['seconds_per_call']:.3f} s/call (mean of its runs)"
        )
    curves = {m: {"val": curve(base, rs, "val"), "eval": curve(base, rs, "eval")} for m, rs in by_method.items()}
    return {
        "kl_targets": targets,
        "curves": curves,
        "matched_kl": matched,
        "versus_reference": versus,
        "chosen_on_validation": chosen,
        "cost": cost,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if any(m.startswith("trl-") for m in args.methods) and _version("trl") is None:
        raise SystemExit(
            f"{sys.executable} has no TRL: run this with a Python that has trl==1.16.0 (benchmarks/README.md: "
            "a separate venv), or --methods qvlm-ppo,qvlm-rloo,qvlm-grpo"
        )
    from qvlm.eval.metrics import json_safe
    from qvlm.fileio import atomic_write_text
    from qvlm.jsonl import read_prompts
    from qvlm.loading import resolve_dtype

    dtype = str(resolve_dtype(args.dtype, args.device)).removeprefix("torch.")
    info = machine(dtype, args.threads)
    side = read_prompts(args.train_prompts)
    train, val = side[: args.n_train], side[args.n_train :]
    val = val[: args.max_val_prompts] if args.max_val_prompts else val
    eval_prompts = read_prompts(args.eval_prompts)
    eval_prompts = eval_prompts[: args.max_eval_prompts] if args.max_eval_prompts else eval_prompts
    if not train or not val or not eval_prompts:
        raise SystemExit(
            f"need training, validation and eval prompts; have {len(train)}, {len(val)}, {len(eval_prompts)}"
        )
    common = dict(
        model=args.model,
        device=args.device,
        dtype=dtype,
        threads=args.threads,
        reward=args.reward,
        train=train,
        val=val,
        eval=eval_prompts,
        reward_calls=args.reward_calls,
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        generations=args.generations,
        max_new_tokens=args.max_new_tokens,
        eval_samples=args.eval_samples,
        seed=args.seed,
        trl_lr=args.trl_lr,
        fast=args.fast,
        ppo=args.ppo,
    )
    print(
        f"{len(train)} training, {len(val)} validation, {len(eval_prompts)} eval prompts; {args.reward_calls} reward "
        f"calls = {args.steps} steps x {args.prompts_per_step} prompts x {args.generations}; reward {args.reward}; "
        f"grids {args.grids}",
        flush=True,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peer_trl_") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        # interleaved (each method's first coefficient, then each one's second, ...): with --jobs 2 the
        # runs side by side are of different methods, so both sides share the machine alike
        width = max(len(g) for g in args.grids.values())
        specs = [{**common, "method": "base", "kl_coef": 0.0}] + [
            run_spec(common, m, args.grids[m][k]) for k in range(width) for m in args.methods if k < len(args.grids[m])
        ]

        def done(r: dict) -> None:
            if r["method"] == "base":
                e = r.get("eval", r["val"])
                print(f"base: val {r['val']['reward_mean']:.3f}, eval {e['reward_mean']:.3f}", flush=True)
                return
            print(
                f"{r['method']} {setting_label(r)}: val {r['val']['reward_mean']:.3f} at KL "
                f"{r['val']['kl_to_base']:.3f}; {r['train_seconds']:.0f} s training, "
                f"{r['seconds_per_call']:.3f} s/call, peak {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )

        base, *runs = run_many(specs, workdir, args.jobs, done)
        runs.sort(key=lambda r: (args.methods.index(r["method"]), r["kl_coef"], r.get("lr") or 0.0))
    summary = report(args, base, runs)
    info["loadavg_end"] = os.getloadavg()
    settings = {k: v for k, v in vars(args).items() if k not in ("worker",)}
    out = {
        "settings": settings,
        "prompts": {"train": len(train), "val": len(val), "eval": len(eval_prompts)},
        "sampling": SAMPLING,
        "machine": info,
        "seconds": time.perf_counter() - start,
        "base": base,
        "runs": runs,
        **summary,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(json_safe(out), indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.json} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
