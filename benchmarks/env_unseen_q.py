"""Why Monte-Carlo Q heads cannot pick a reply in a multi-turn task (issue 24, docs/envs.md).

An MC Q head starts at zero (its last layer is zero-initialised) and is regressed on the tokens the data
took only, so a token the data never took keeps Q = 0 exactly. Where returns are negative, a reply that
ends on such a token outranks every reply the data saw. This script trains the heads exactly as
``benchmarks/env_learners.py`` does for one seed (the mixed-quality data, the MC heads), samples
``--candidates`` first-turn replies on ``--episodes`` held-out seeds, and prints each candidate's Q at its
last token (min over the twin heads, as turn-level guidance reads it), whether the environment accepts it,
and how many candidates score exactly 0.

    python benchmarks/env_unseen_q.py --seed 1                 # SmolLM2, about 3 minutes on a CPU
    python benchmarks/env_unseen_q.py --smoke --json /tmp/q.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(_DIR.parent))
import torch  # noqa: E402

from qvlm.envs import make  # noqa: E402
from qvlm.envs.tokens import observation_ids  # noqa: E402
from qvlm.eval.metrics import json_safe  # noqa: E402
from qvlm.features import FeatureCache  # noqa: E402
from qvlm.fileio import atomic_write_text  # noqa: E402


def _env_learners():
    spec = importlib.util.spec_from_file_location("env_learners", _DIR / "env_learners.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["env_learners"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def first_turn_candidates(bench, model, tok, qv, p, seeds, n: int) -> list[dict]:
    """``n`` first-turn replies per held-out seed, each with its Q at the last token and validity."""
    from qvlm.decoding import GenerationResult, sample_rollout

    env, kwargs = bench.TASKS[p.tasks]
    cfg = dataclasses.replace(bench.decode_cfg(p), num_return_sequences=n)
    rows = []
    for seed in seeds:
        game = make(env, **kwargs)
        observation, _ = game.reset(seed=seed)
        rollout = sample_rollout(model, tok, [observation_ids(tok, [observation], cfg.chat)], qv.heads, cfg,
                                 logprobs=False, ref_logprobs=False, return_hidden=True)  # fmt: skip
        index = torch.arange(len(rollout))
        last = (rollout.lengths - 1).clamp(min=0)
        with torch.no_grad():  # as turn-level guidance reads it: the state the last token was written in
            q = torch.stack(qv.heads.q_taken(rollout.hidden[index, last], rollout.response_ids[index, last][:, None]))
        q = q.amin(0)[:, 0].tolist()
        for text, value in zip(GenerationResult.from_rollout(rollout, tok).texts, q):
            check = make(env, **kwargs)
            check.reset(seed=seed)
            *_, info = check.step(text)
            rows.append({"seed": seed, "reply": text, "valid": not info.get("invalid_action", False), "q": value})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="guess", help="guess or maze (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=1, help="learner seed, as env_learners.py --seeds (default: 1)")
    ap.add_argument("--episodes", type=int, default=6, help="held-out seeds (default: %(default)s)")
    ap.add_argument("--candidates", type=int, default=4, help="replies per seed (default: %(default)s)")
    ap.add_argument("--smoke", action="store_true", help="a random tiny model and a tiny protocol")
    ap.add_argument(
        "--json", default="benchmarks/results/env_unseen_q.json", help="results file (default: %(default)s)"
    )
    args = ap.parse_args(argv)
    bench = _env_learners()
    # the protocol of docs/envs.md's 3-seed table (data and MC heads); --smoke takes env_learners' smoke one
    settings = dict(base_episodes=16, noisy_episodes=112, mc_epochs=6)
    p = bench.Protocol(tasks=args.task, seeds=str(args.seed), smoke=args.smoke, **({} if args.smoke else settings))
    if args.smoke:
        p = bench.Protocol(**{**dataclasses.asdict(p), **bench.SMOKE, "tasks": args.task, "seeds": str(args.seed)})
    model, tok = bench.load(p)
    env, kwargs = bench.TASKS[args.task]
    data = bench.collect(model, tok, env, kwargs, p, args.seed)
    qv = bench.heads_for(model, "mc", data, tok, p, args.seed, FeatureCache())
    rows = first_turn_candidates(bench, model, tok, qv, p, bench.eval_seeds(args.episodes), args.candidates)
    print(f"{'seed':>10} {'valid':>6} {'Q':>8}  reply")
    for r in rows:
        print(f"{r['seed']:>10} {str(r['valid']):>6} {r['q']:>8.3f}  {r['reply']!r}")
    zero = [r for r in rows if r["q"] == 0.0]
    valid = [r["q"] for r in rows if r["valid"]]
    summary = {
        "candidates": len(rows),
        "q_exactly_zero": len(zero),
        "valid": len(valid),
        "valid_q": sorted(valid, reverse=True),
        "invalid_nonzero_q_range": [
            min((r["q"] for r in rows if not r["valid"] and r["q"] != 0.0), default=None),
            max((r["q"] for r in rows if not r["valid"] and r["q"] != 0.0), default=None),
        ],
    }
    print(f"\n{summary['q_exactly_zero']} of {len(rows)} candidates have Q exactly 0; valid replies' Q: "
          f"{', '.join(f'{q:.3f}' for q in summary['valid_q']) or 'none'}")  # fmt: skip
    out = {"settings": vars(args), "protocol": dataclasses.asdict(p), "summary": summary, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(json_safe(out), indent=1) + "\n")
    print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
