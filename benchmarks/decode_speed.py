"""Value-guided decoding speed against Hugging Face ``model.generate``, side by side in one run.

Rows (each at every batch size, same prompts, same number of new tokens per row):

1. ``hf-generate``            HF ``model.generate``, plain sampling (do_sample, top_k=0): the peer.
2. ``qvlm beta=0``            :func:`qvlm.decoding.generate` without guidance.
3. ``qvlm beta=1``            :func:`qvlm.decoding.generate` with Q/V heads (random weights; speed
                              does not depend on them).
4. ``hf-generate + processor`` HF ``generate`` with :class:`ValueGuidanceLogitsProcessor`, beta=1.
5. ``qvlm fast beta=0``       the same on the fast path (``DecodeConfig.fast``: static KV cache,
                              hand-written Llama step, :mod:`qvlm.decoding.fast`).
6. ``qvlm fast beta=1``       the fast path with guidance on the whole vocabulary (twin Q heads:
                              two vocabulary-sized matmuls more per step, ~43% more FLOPs).
7. ``qvlm fast beta=1 top-k`` the fast path guiding the base model's ``--guidance-top-k``
                              likeliest tokens only (Q on k candidates: the practical setting).
   ``... compiled``           with ``--compile``: rows 5 and 7 with the step under ``torch.compile``.
8. ``qvlm.generate LoRA policy beta=0`` a PPO policy's rollouts: the model with peft LoRA adapters
                              (``--lora-r``, alpha 2r, all linear layers, random nonzero weights: the
                              layout :class:`qvlm.algos.actor_critic.ActorCritic` trains) on the
                              standard step; adapters in float32 on a bfloat16 model, as peft keeps them.
9. ``qvlm fast LoRA policy beta=0`` the same policy on the fast path (base weights packed, the
                              adapters' low-rank term added in the step: :mod:`qvlm.decoding.fast_lora`).
                              Its "time vs fast plain" is LoRA's overhead over a merged policy, which
                              decodes as fast as the plain model.
10. ``naive no-cache loop``   the guided loop on the decoding step's no-cache mode
                              (``sample_rollout(..., use_cache=False)``): it re-runs the whole model
                              on the whole sequence every step (no KV cache, logits at every
                              position) and applies the heads to the last hidden state. This is
                              what a hand loop without a cache costs; it is not trlx's own
                              ``generate`` (which keeps a cache). Its cost grows with length, so it runs
                              ``--naive-new-tokens`` tokens (default: min(new tokens, 8)) and its
                              tokens/s is optimistic compared with a full-length run.

EOS is made unreachable for every row alike (the EOS id is set to the vocabulary size for the
duration of the run), so every row writes exactly ``new_tokens`` tokens per prompt; tokens are
also counted from the outputs. Per batch size every method is warmed up once (a call of at most 4 tokens), then all methods
are timed round-robin ``--repeats`` times (interleaved, so drifts in machine load hit all of them
alike) and the median wall time is kept. Tokens/s counts generated tokens only; the time includes
the prefill of the prompt.

"analytic cost vs plain" counts matmul FLOPs as 2 * parameters touched per token position
(non-embedding trunk parameters for every position run, the LM head for every position whose
logits are computed, the V head and the online Q heads once per step) for one decode step,
relative to a plain cached step: (trunk + heads) / trunk for the guided rows; for the no-cache
loop, the average step of its run (it re-runs all positions). "analytic, whole call" does the
same for the whole call, prefill included, which is what the measured time covers.
Attention-score FLOPs are left out.

The CPU model and its bf16-relevant flags (and what ``--dtype auto`` picks on it) are printed and
recorded: bfloat16 is fast only on a CPU with native bf16 (AMX, AVX-512 BF16).

Usage::

    python benchmarks/decode_speed.py                       # embedded SmolLM2-135M-Instruct
    python benchmarks/decode_speed.py --model PATH --batch-sizes 1 8 --new-tokens 32 --repeats 3
    python benchmarks/decode_speed.py --threads 1           # a shared, busy machine
    python benchmarks/decode_speed.py --batch-sizes 8 --skip-guided --skip-naive   # plain and LoRA rows only
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import LogitsProcessorList

from qvlm.decoding import DecodeConfig, ValueGuidanceLogitsProcessor, generate, left_pad, sample_rollout
from qvlm.loading import DEFAULT_MODEL, NATIVE_BF16_CPU_FLAGS, auto_dtype, cpu_flags, load_model
from qvlm.mdp import encode_prompt
from qvlm.model import QVModel

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "decode_speed.json"

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain why the sky is blue.",
    "Give me three tips for staying focused while studying at home in the evening.",
    "What is the capital of France?",
    "Describe a sunset over the ocean in a few sentences.",
    "How do I make a cup of green tea?",
    "List some fun things to do on a rainy weekend with friends and family.",
    "Summarise the plot of a fairy tale you like.",
]

HF_PLAIN = "hf-generate (plain sampling)"
QV_B0 = "qvlm.generate beta=0"
QV_B1 = "qvlm.generate beta=1"
HF_PROC = "hf-generate + ValueGuidanceLogitsProcessor beta=1"
FAST_B0 = "qvlm fast beta=0"
FAST_B1 = "qvlm fast beta=1"
FAST_B1_TOPK = "qvlm fast beta=1 guidance_top_k={k}"
NAIVE = "naive no-cache guided loop beta=1 (trlx-style hand loop)"
LORA_STD = "qvlm.generate LoRA policy beta=0"
LORA_FAST = "qvlm fast LoRA policy beta=0"
# the CPU flags that say how fast bf16 and the packed kernels can be
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_vnni", *NATIVE_BF16_CPU_FLAGS, "amx_tile", "avx512_fp16")


# ---- methods: each takes (prompt ids, new tokens) and returns the number of generated tokens ----


def hf_generate(model, pad_id, eos_id, processor=None):
    def run(prompts: list[list[int]], n: int) -> int:
        ids, mask = left_pad(prompts, pad_id)
        kwargs = dict(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=n,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
        if processor is None:
            out = model.generate(**kwargs)
        else:
            with processor.attach(model):
                out = model.generate(**kwargs, logits_processor=LogitsProcessorList([processor]))
        new = out[:, ids.shape[1] :]
        return int(new.numel())

    return run


def qvlm_generate(model, tokenizer, heads, beta: float, **decode):
    """:func:`qvlm.decoding.generate`; ``decode``: more DecodeConfig fields (fast, guidance_top_k, ...)."""

    def run(prompts: list[list[int]], n: int) -> int:
        cfg = DecodeConfig(max_new_tokens=n, do_sample=True, top_k=0, beta=beta, batch_size=len(prompts), **decode)
        res = generate(model, tokenizer, prompts, heads=heads if beta else None, cfg=cfg)
        return sum(len(r) for r in res.response_ids)

    return run


def naive_loop(model, tokenizer, heads, beta: float):
    """Guided sampling that re-runs the whole sequence every step (no KV cache, logits at every
    position): :func:`qvlm.decoding.sample_rollout` on the decoding step's no-cache mode."""

    def run(prompts: list[list[int]], n: int) -> int:
        cfg = DecodeConfig(max_new_tokens=n, do_sample=True, top_k=0, beta=beta, batch_size=len(prompts))
        rollout = sample_rollout(
            model, tokenizer, prompts, heads, cfg, logprobs=False, ref_logprobs=False, use_cache=False
        )
        return int(rollout.response_mask.sum())

    return run


def lora_policy(model, r: int, seed: int):
    """A copy of ``model`` with peft LoRA adapters as :class:`qvlm.algos.actor_critic.ActorCritic`
    puts them (all linear layers, alpha 2r, no dropout), their weights random and nonzero (peft
    starts ``B`` at 0): the Hugging Face model holding the adapters, and the adapter parameter count."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(model), config)
    torch.manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.02)
                n += p.numel()
    return peft_model.base_model.model.eval(), n


# ---- helpers -----------------------------------------------------------------------------------


@contextmanager
def eos_disabled(model, unreachable: int):
    """Point the model's EOS id at a token that cannot be sampled, for every method alike."""
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = unreachable
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


def time_interleaved(methods, prompts, ns, repeats: int, seed: int):
    """Warm every method up once (a short call), then time them round-robin ``repeats`` times.

    Interleaving spreads drifts in machine load (other processes, frequency changes) over all
    methods alike instead of charging them to whichever method ran at that moment.
    """
    for (name, _kind, fn), n in zip(methods, ns):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        fn(prompts, min(n, 4))
        print(f"  warm-up {name}: {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
    times = [[] for _ in methods]
    cpu_times = [[] for _ in methods]
    counts = [[] for _ in methods]
    for r in range(repeats):
        for i, ((_name, _kind, fn), n) in enumerate(zip(methods, ns)):
            torch.manual_seed(seed + 1 + r)
            t0, c0 = time.perf_counter(), time.process_time()
            counts[i].append(fn(prompts, n))
            cpu_times[i].append(time.process_time() - c0)
            times[i].append(time.perf_counter() - t0)
    return times, cpu_times, counts


def param_counts(model, heads, guidance_top_k: int) -> dict[str, int]:
    lm_head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    lm = lm_head.weight.numel()
    embed_ids = {id(p) for p in embed.parameters()} | {id(p) for p in lm_head.parameters()}
    trunk_nonembed = sum(p.numel() for p in model.parameters() if id(p) not in embed_ids)
    touched_heads = sum(p.numel() for p in heads.v_head.parameters())
    touched_heads += sum(p.numel() for p in heads.q_heads.parameters())
    return {
        "trunk_total": sum(p.numel() for p in model.parameters()),
        "trunk_nonembedding": trunk_nonembed,
        "lm_head": lm,
        "trunk_touched_per_token": trunk_nonembed + lm,
        "heads_touched_per_token": touched_heads,  # V head + online Q heads (targets unused)
        "heads_topk_per_token": heads.decode_macs_per_token(guidance_top_k),  # Q on k candidates
        "heads_total": sum(p.numel() for p in heads.parameters()),
    }


def analytic_flops(kind: str, L: int, n: int, pc: dict[str, int]) -> tuple[float, float]:
    """Matmul FLOPs per prompt row: ``(per decode step, whole call)``; L padded prompt positions.

    Per decode step is the cost of producing one token once the prompt is in the cache; for the
    no-cache loop it is the average step of its run (every step re-runs all ``L + t`` positions and
    computes logits for all of them). The whole call adds the prefill of the cached methods.
    """
    tn, lm, hd = pc["trunk_nonembedding"], pc["lm_head"], pc["heads_touched_per_token"]
    extra = {"guided": hd, "naive": hd, "guided_topk": pc["heads_topk_per_token"], "lora": pc.get("lora", 0)}.get(
        kind, 0
    )
    if kind == "naive":
        total = 2.0 * (sum((L + t) * (tn + lm) for t in range(n)) + n * hd)
        return total / n, total
    step = 2.0 * (tn + lm + extra)
    # prefill L positions + n - 1 one-token steps; logits (and heads) at n positions
    total = 2.0 * ((L + n - 1) * tn + n * (lm + extra))
    return step, total


def fast_ratio(name: str, median_s: float, medians: dict[str, float]) -> float | None:
    """A fast row's time over the fast plain row's (compiled rows: over the compiled plain row's)."""
    if not name.startswith("qvlm fast"):
        return None
    return median_s / medians[FAST_B0 + (" compiled" if name.endswith(" compiled") else "")]


def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    u = platform.uname()
    flags = cpu_flags()
    return {
        "cpu_model": cpu_model(),
        "cpu_flags_shown": {f: f in flags for f in SHOWN_FLAGS},
        "dtype_auto_on_cpu": str(auto_dtype("cpu", flags)).removeprefix("torch."),
        "processor": platform.processor(),
        "uname": {"system": u.system, "node": u.node, "release": u.release, "version": u.version, "machine": u.machine},
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def atomic_write_json(path: Path, data: dict) -> None:
    from qvlm.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| method | batch | new tokens/row | median s | tokens/s | ms/step | CPU ms/step | vs HF plain "
        "| analytic cost vs plain | analytic, whole call | time vs fast plain | CPU time vs fast plain |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {r['new_tokens']} | {r['median_s']:.3f} "
            f"| {r['tokens_per_s']:.1f} | {r['ms_per_step']:.1f} | {r['cpu_ms_per_step']:.1f} "
            f"| {r['speed_vs_hf_plain']:.2f}x "
            f"| {r['analytic_cost_vs_plain']:.2f}x | {r['analytic_cost_vs_plain_whole_call']:.2f}x "
            f"| {_ratio(r['time_vs_fast_plain'])} | {_ratio(r['cpu_time_vs_fast_plain'])} |"
        )
    return "\n".join(lines)


# ---- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "auto"),
        help="weights of every row alike (auto: bfloat16 on a CPU with native bf16, else float32)",
    )
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--naive-new-tokens",
        type=int,
        default=None,
        help="new tokens for the no-cache loop (default: min(new tokens, 8))",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--q-heads", type=int, default=2, help="Q heads in the random heads (default 2: twin Q)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: os.cpu_count()); on a machine shared with other busy "
        "processes, fewer threads than cores avoids oversubscription stalls",
    )
    ap.add_argument("--skip-naive", action="store_true", help="leave out the no-cache loop")
    ap.add_argument("--skip-guided", action="store_true", help="leave out the guided rows (beta=1)")
    ap.add_argument("--skip-lora", action="store_true", help="leave out the LoRA policy rows")
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank of the policy rows (default 8, PPO's)")
    ap.add_argument(
        "--guidance-top-k", type=int, default=20, help="candidates guided in the fast top-k row (default 20)"
    )
    ap.add_argument("--compile", action="store_true", help="add the fast rows with the step under torch.compile")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"output JSON (default {DEFAULT_JSON})")
    args = ap.parse_args(argv)
    if args.new_tokens < 1 or args.repeats < 1 or min(args.batch_sizes) < 1:
        ap.error("--new-tokens, --repeats and --batch-sizes must be at least 1")
    naive_n = args.naive_new_tokens or min(args.new_tokens, 8)

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    machine = machine_info()
    shown = " ".join(f for f, on in machine["cpu_flags_shown"].items() if on) or "none"
    print(
        f"CPU: {machine['cpu_model']}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; "
        f"flags: {shown} (of {', '.join(SHOWN_FLAGS)}); --dtype auto picks {machine['dtype_auto_on_cpu']}",
        file=sys.stderr,
    )
    busy = os.getloadavg()[0]
    if busy >= 1.0:
        print(
            f"note: load average {busy:.2f} on {os.cpu_count()} CPUs before the run; if other processes "
            "compete for the cores the timings will be noisy (try --threads 1)",
            file=sys.stderr,
        )
    t_load = time.perf_counter()
    model, tokenizer = load_model(args.model, device="cpu", dtype=args.dtype)
    load_s = time.perf_counter() - t_load
    dtype = str(model.dtype).removeprefix("torch.")
    torch.manual_seed(args.seed)
    heads = QVModel.from_trunk(model, num_q_heads=args.q_heads).heads.eval().to(model.dtype)
    pad_id = tokenizer.pad_token_id
    vocab = model.get_output_embeddings().weight.shape[0]
    unreachable_eos = vocab  # no logit exists for this id, so it is never sampled
    pc = param_counts(model, heads, args.guidance_top_k)
    encoded = [encode_prompt(tokenizer, p) for p in PROMPTS]

    methods = [
        (HF_PLAIN, "plain", hf_generate(model, pad_id, unreachable_eos)),
        (QV_B0, "plain", qvlm_generate(model, tokenizer, heads, 0.0)),
    ]
    if not args.skip_guided:
        methods += [
            (QV_B1, "guided", qvlm_generate(model, tokenizer, heads, 1.0)),
            (HF_PROC, "guided", hf_generate(model, pad_id, unreachable_eos, ValueGuidanceLogitsProcessor(heads, 1.0))),
        ]
    k = args.guidance_top_k
    fast_topk = FAST_B1_TOPK.format(k=k)
    methods.append((FAST_B0, "plain", qvlm_generate(model, tokenizer, heads, 0.0, fast=True)))
    if not args.skip_guided:
        methods += [
            (FAST_B1, "guided", qvlm_generate(model, tokenizer, heads, 1.0, fast=True)),
            (fast_topk, "guided_topk", qvlm_generate(model, tokenizer, heads, 1.0, fast=True, guidance_top_k=k)),
        ]
    if args.compile:
        methods.append(
            (FAST_B0 + " compiled", "plain", qvlm_generate(model, tokenizer, heads, 0.0, fast=True, fast_compile=True))
        )
        if not args.skip_guided:
            methods.append(
                (
                    fast_topk + " compiled",
                    "guided_topk",
                    qvlm_generate(model, tokenizer, heads, 1.0, fast=True, fast_compile=True, guidance_top_k=k),
                )
            )
    if not args.skip_lora:
        policy, pc["lora"] = lora_policy(model, args.lora_r, args.seed)
        policy.generation_config.eos_token_id = unreachable_eos  # its own copy of the generation config
        methods += [
            (LORA_STD, "lora", qvlm_generate(policy, tokenizer, heads, 0.0)),
            (LORA_FAST, "lora", qvlm_generate(policy, tokenizer, heads, 0.0, fast=True)),
        ]
    if not args.skip_naive:
        methods.append((NAIVE, "naive", naive_loop(model, tokenizer, heads, 1.0)))

    rows: list[dict] = []
    load_before = os.getloadavg()
    t_bench = time.perf_counter()
    with torch.inference_mode(), eos_disabled(model, unreachable_eos):
        for bs in args.batch_sizes:
            prompts = [encoded[i % len(encoded)] for i in range(bs)]
            L = max(len(p) for p in prompts)
            ns = [naive_n if kind == "naive" else args.new_tokens for _, kind, _ in methods]
            print(f"batch size {bs} (padded prompt length {L})", file=sys.stderr, flush=True)
            times, cpu_times, counts = time_interleaved(methods, prompts, ns, args.repeats, args.seed)
            hf_tps = None
            fast_s = {name: statistics.median(ts) for (name, _k, _f), ts in zip(methods, times)}
            fast_cpu = {name: statistics.median(c) for (name, _k, _f), c in zip(methods, cpu_times)}
            for (name, kind, _fn), n, ts, cpu, cs in zip(methods, ns, times, cpu_times, counts):
                med = statistics.median(ts)
                if len(set(cs)) != 1 or cs[0] != bs * n:
                    print(f"warning: {name} wrote {cs} tokens, expected {bs * n}", file=sys.stderr)
                tps = cs[0] / med
                if name == HF_PLAIN:
                    hf_tps = tps
                step, total = analytic_flops(kind, L, n, pc)
                plain_step, plain_total = analytic_flops("plain", L, n, pc)
                rows.append(
                    {
                        "method": name,
                        "batch_size": bs,
                        "prompt_len_padded": L,
                        "new_tokens": n,
                        "generated_tokens": cs[0],
                        "times_s": ts,
                        "median_s": med,
                        "tokens_per_s": tps,
                        "ms_per_step": 1000 * med / n,
                        # this process's CPU time (all its threads): on a shared machine, what the
                        # call computed, without the time it waited for a core (one thread: wall time
                        # on an idle machine)
                        "cpu_times_s": cpu,
                        "cpu_ms_per_step": 1000 * statistics.median(cpu) / n,
                        "ms_per_token": 1000 * med / cs[0],
                        "speed_vs_hf_plain": tps / hf_tps if hf_tps else float("nan"),
                        # the fast rows: time over the fast plain row's (guidance overhead: this - 1)
                        "time_vs_fast_plain": fast_ratio(name, med, fast_s),
                        "cpu_time_vs_fast_plain": fast_ratio(name, statistics.median(cpu), fast_cpu),
                        "analytic_cost_vs_plain": step / plain_step,
                        "analytic_cost_vs_plain_whole_call": total / plain_total,
                        "analytic_gflops_per_row_step": step / 1e9,
                    }
                )
                print(
                    f"  {name}: {tps:.1f} tok/s (median {med:.3f} s of {[round(t, 3) for t in ts]})",
                    file=sys.stderr,
                    flush=True,
                )
    bench_s = time.perf_counter() - t_bench
    load_after = os.getloadavg()

    table = markdown_table(rows)
    print(f"CPU: {machine['cpu_model']}; flags: {shown}; dtype {dtype}; {torch.get_num_threads()} torch threads\n")
    print(table)
    result = {
        "benchmark": "decode_speed",
        "model": args.model,
        "settings": {
            "dtype": dtype,
            "dtype_flag": args.dtype,
            "batch_sizes": args.batch_sizes,
            "new_tokens": args.new_tokens,
            "naive_new_tokens": naive_n,
            "repeats": args.repeats,
            "warmup": 1,
            "statistic": "median",
            "seed": args.seed,
            "sampling": "do_sample=True, top_k=0, top_p=1, temperature=1",
            "beta_guided": 1.0,
            "guidance_top_k": args.guidance_top_k,
            "compile": args.compile,
            "eos": "unreachable for every method (each row writes exactly new_tokens per prompt)",
            "heads": "random QVModel.from_trunk(model, num_q_heads=q_heads).heads; decoding runs the "
            "V head and the online Q heads (min over Q heads)",
            "heads_config": dataclasses.asdict(heads.config),
            "lora": None
            if args.skip_lora
            else {"r": args.lora_r, "alpha": 2 * args.lora_r, "target_modules": "all-linear", "weights": "N(0, 0.02)"},
        },
        "load_s": load_s,
        "bench_s": bench_s,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "params": pc,
        "machine": machine,
        "rows": rows,
        "markdown": table,
    }
    atomic_write_json(args.json, result)
    print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
