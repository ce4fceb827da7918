"""``qvlm exact``: exact optimal Q*, V*, pi* on a small token MDP, and learners measured against them."""

from __future__ import annotations

import argparse
import json
import math

DEFAULT_LEARNERS = "ilql,mc,softq,softq_sweep,qsharp"


def register(sub) -> None:
    p = sub.add_parser(
        "exact",
        help="exact optimal Q*/V*/pi* on a small token MDP; score learners against them",
        description=(
            "Enumerate a small token MDP (tokens a, b, ... and EOS as the last id; states are token "
            "tuples; EOS or the horizon ends an episode), solve the KL-regularised optimum exactly "
            "in float64 (Q*, V*, pi* against the reference policy pi_ref at temperature alpha), then "
            "train tabular learners from the data each could really have and report: RMSE of V and "
            "Q against V*, Q* over the states their data visited (each state weighted equally), and "
            "the exact objective J = reward - alpha*KL of the policy their heads induce by guided "
            "decoding (pi ~ pi_ref exp((Q - V)/alpha)), as a ratio J/J*. See docs/exact.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--vocab", type=int, default=4, help="vocabulary size including EOS (3..8)")
    p.add_argument("--horizon", type=int, default=5, help="maximum response length in tokens (1..8)")
    p.add_argument("--alpha", type=float, default=0.1, help="KL temperature alpha (> 0); guidance uses beta = 1/alpha")
    p.add_argument("--gamma", type=float, default=1.0, help="discount in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference policy and of every learner's sampling")
    p.add_argument(
        "--ref",
        choices=("dirichlet", "lm"),
        default="dirichlet",
        help="reference policy: a seeded Dirichlet(concentration) table per prefix, or a tiny "
        "random Llama (hidden 16, 1 layer) reading [EOS] + prefix (imports transformers: slower)",
    )
    p.add_argument("--concentration", type=float, default=1.0, help="Dirichlet concentration of --ref dirichlet")
    p.add_argument(
        "--reward",
        choices=("count", "pattern", "eos"),
        default="count",
        help="terminal reward in [0, 1]: count = occurrences of --token / horizon; pattern = 1 if "
        "--pattern occurs as a contiguous run; eos = 1 if the response ends with EOS",
    )
    p.add_argument("--token", default="a", help="the counted token of --reward count (a letter or an id; not EOS)")
    p.add_argument("--pattern", default="a,b", help="comma-separated tokens of --reward pattern (letters, ids or eos)")
    p.add_argument(
        "--learners",
        default=DEFAULT_LEARNERS,
        help="comma-separated learners: ilql, mc, softq (online soft Q-learning from the guided policy's own "
        "samples, plain Boltzmann exploration), softq_sweep (soft Q with systematic exploration of every "
        "untried pair), ppo (train_ppo on a tiny causal LM distilled to pi_ref; docs/ppo.md), qsharp (Q#: pi_ref's "
        "return distribution from guided roll-ins and pi_ref roll-outs; one run gives Q*_alpha at every alpha, "
        "reported at 0.05, 0.1, 0.2, 0.5, 1 and --alpha); 'none' only solves",
    )
    p.add_argument(
        "--frontier",
        action="store_true",
        help="also report the exact reward-KL frontier: best-of-N (N = 1..32), guidance with pi_ref's own Q "
        "(controlled decoding) and with each learner's heads over beta, and the soft optimum over alpha; "
        "each point with the soft optimum's reward at the same KL",
    )
    p.add_argument(
        "--plot", metavar="FILE", help="write the reward-KL frontier plot here (.png or .svg; implies --frontier)"
    )
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write the results as JSON (atomically)")
    p.add_argument(
        "--max-states",
        type=int,
        default=2_000_000,
        help="budget of tree nodes; larger MDPs are refused before anything is allocated",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the learner progress bars")
    p.set_defaults(handler=run)


def _token_id(text: str, vocab: int, flag: str) -> int:
    from qvlm.errors import QVLMError
    from qvlm.exact import token_names

    names = token_names(vocab)
    text = text.strip()
    if text in ("eos", "<eos>"):
        return vocab - 1
    if text in names:
        return names.index(text)
    if text.isdigit() and int(text) < vocab:
        return int(text)
    raise QVLMError(
        f"{flag} {text!r} is not a token of this vocabulary ({' '.join(names)}): "
        f"give a letter or an id in 0..{vocab - 1}"
    )


def _learner_names(text: str) -> list[str]:
    from qvlm.errors import QVLMError
    from qvlm.exact.learners import LEARNERS

    if text.strip() == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LEARNERS]
    if unknown:
        raise QVLMError(
            f"--learners: unknown learner {', '.join(unknown)}; choose from {', '.join(LEARNERS)} "
            "(comma-separated) or 'none'"
        )
    return names


def run(args) -> int:
    from qvlm.errors import QVLMError
    from qvlm.exact import MDPConfig, build_mdp, build_tree, token_names
    from qvlm.exact.learners import compare_learners

    if not 3 <= args.vocab <= 8:
        raise QVLMError(f"--vocab {args.vocab}: the exact MDP needs 3..8 tokens including EOS; pass 3..8")
    if not 1 <= args.horizon <= 8:
        raise QVLMError(f"--horizon {args.horizon}: exact enumeration supports horizons 1..8; pass 1..8")
    if not args.alpha > 0 or not math.isfinite(args.alpha):
        raise QVLMError(f"--alpha {args.alpha}: the KL temperature must be a positive number (e.g. 0.1)")
    if not 0 < args.gamma <= 1:
        raise QVLMError(f"--gamma {args.gamma}: use a discount in (0, 1]")
    if not (math.isfinite(args.concentration) and args.concentration > 0):
        raise QVLMError(f"--concentration {args.concentration}: the Dirichlet concentration must be a number > 0")
    if args.seed < 0:
        raise QVLMError(f"--seed {args.seed}: seeds are integers >= 0")
    if args.max_states < 1:
        raise QVLMError(f"--max-states {args.max_states}: the state budget must be at least 1")
    from qvlm.fileio import check_output_file

    if args.json_path:
        check_output_file(args.json_path, "--json")
    if args.plot:
        if not args.plot.lower().endswith((".png", ".svg")):
            raise QVLMError(f"--plot {args.plot}: use a file name ending in .png or .svg")
        check_output_file(args.plot, "--plot", inputs=(args.json_path,))
    learners = _learner_names(args.learners)
    pattern = tuple(_token_id(t, args.vocab, "--pattern") for t in args.pattern.split(",") if t.strip())
    config = MDPConfig(
        vocab_size=args.vocab,
        horizon=args.horizon,
        gamma=args.gamma,
        seed=args.seed,
        reference=args.ref,
        concentration=args.concentration,
        reward=args.reward,
        token=_token_id(args.token, args.vocab, "--token"),
        pattern=pattern,
        max_states=args.max_states,
    )
    mdp = build_mdp(config)
    tree = build_tree(mdp, max_states=config.max_states)
    frontier = args.frontier or bool(args.plot)
    result = compare_learners(
        tree, args.alpha, learners, seed=args.seed, progress=not args.no_progress, frontier=frontier
    )
    result["mdp"] = {
        "vocab": token_names(args.vocab),
        "horizon": args.horizon,
        "gamma": args.gamma,
        "alpha": args.alpha,
        "seed": args.seed,
        "reference": args.ref,
        "reward": mdp.reward.name,
        "states": tree.num_states,
    }
    print(format_table(result))
    if frontier:
        print(format_frontier(result["frontier"]))
    if args.plot:
        from qvlm.report.frontier_plot import write_frontier_plot

        title = f"exact frontier: {mdp.reward.name}, vocab {args.vocab}, horizon {args.horizon}, seed {args.seed}"
        write_frontier_plot(result["frontier"], args.plot, title=title)
        print(f"wrote {args.plot}")
    if args.json_path:
        from qvlm.eval.metrics import json_safe
        from qvlm.fileio import atomic_write_text

        atomic_write_text(args.json_path, json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.json_path}")
    return 0


def format_table(result: dict) -> str:
    """One line per policy: the optimum, pi_ref, then each learner's guided policy."""
    m = result["mdp"]
    lines = [
        f"token MDP: vocab {' '.join(m['vocab'])}, horizon {m['horizon']}, gamma {m['gamma']:g}, "
        f"alpha {m['alpha']:g}, reward {m['reward']}, pi_ref {m['reference']} (seed {m['seed']}), "
        f"{m['states']} states",
        f"{'policy':<16}{'objective':>10}{'ratio':>8}{'reward':>9}{'KL':>8}{'V rmse':>9}{'V@pi*':>9}{'Q rmse':>9}"
        f"{'V-Vref rmse':>12}{'states':>8}{'pairs':>7}",
    ]
    opt, ref = result["optimal"], result["reference"]
    lines.append(f"{'optimal pi*':<16}{opt['objective']:>10.4f}{1.0:>8.4f}{opt['reward']:>9.4f}{opt['kl']:>8.4f}")
    lines.append(
        f"{'reference':<16}{ref['objective']:>10.4f}{ref['objective_ratio']:>8.4f}{ref['reward']:>9.4f}"
        f"{ref['kl']:>8.4f}"
    )
    for name, r in result["learners"].items():
        lines.append(
            f"{name:<16}{r['objective']:>10.4f}{r['objective_ratio']:>8.4f}{r['reward']:>9.4f}"
            f"{r['kl']:>8.4f}{r['v_rmse']:>9.3g}{r['v_rmse_reach']:>9.3g}{r['q_rmse']:>9.3g}{r['v_rmse_ref']:>12.3g}"
            f"{r['visited_states']:>8d}{r['visited_pairs']:>7d}"
        )
    for name, r in result["learners"].items():
        if "per_alpha" in r:
            lines.append(format_per_alpha(name, r))
            if m["gamma"] != 1:
                lines.append(
                    f"  gamma {m['gamma']:g} < 1: alpha log E exp(R / alpha) of the discounted return is not the "
                    "discounted-KL optimum Q*_alpha (the identity needs gamma = 1); the Q rmse includes that gap"
                )
    lines.append(
        "ratio = J/J* with J = reward - alpha*KL (exact, of the guided policy; ppo: its own); RMSEs over the states "
        "(Q: state-action pairs) each learner's data visited, uniformly weighted; V@pi*: V RMSE over the states "
        "pi* reaches with probability >= 1%; V-Vref: RMSE against V^pi_ref"
    )
    return "\n".join(lines)


def format_per_alpha(name: str, r: dict) -> str:
    """A distributional learner's one run read at each alpha: guidance with its ``Q*_alpha`` at beta = 1/alpha,
    its ``Q*_alpha`` and the distribution against the exact ones, over the states ``pi*_alpha`` reaches >= 1%."""
    extra = r.get("extra", {})
    lines = [
        f"{name}: one run ({extra.get('episodes', '?')} episodes = reward calls, {extra.get('tokens', '?')} tokens), "
        "read at each alpha",
        f"{'alpha':>8}{'ratio':>9}{'reward':>9}{'KL':>8}{'Q rmse':>9}{'Q max':>8}{'V rmse':>9}{'W1':>8}{'states':>8}",
    ]
    for alpha, a in r["per_alpha"].items():
        lines.append(
            f"{alpha:>8}{a['objective_ratio']:>9.4f}{a['reward']:>9.4f}{a['kl']:>8.4f}{a['q_rmse_reach']:>9.4f}"
            f"{a['q_err_max_reach']:>8.3f}{a['v_rmse_reach']:>9.4f}{a['w1_reach']:>8.4f}{a['reached_states']:>8d}"
        )
    lines.append(
        "  Q rmse / Q max / W1 (mean 1-Wasserstein distance to pi_ref's exact return distribution): over every action "
        "of the states pi*_alpha reaches with probability >= 1%; V rmse over those states"
    )
    return "\n".join(lines)


def format_frontier(frontier: dict, ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> str:
    """The frontier, one line per point (best-of-N at ``ns`` only; the JSON has every N): reward, exact
    KL, cost, and the soft optimum's reward at the same KL (the gap is what the method leaves)."""
    lines = [
        "exact reward-KL frontier (every KL exact, nats per response)",
        f"{'method':<22}{'setting':>12}{'reward':>9}{'KL':>9}{'cost':>6}{'soft opt. at KL':>17}{'gap':>9}",
    ]
    for name, points in frontier.items():
        for p in points:
            key = next(k for k in ("n", "beta", "alpha") if k in p)
            if (key == "n" and p["n"] not in ns) or (key == "alpha" and round(8 * math.log10(p["alpha"])) % 4):
                continue  # best-of-N at ns, the soft optimum at half decades of alpha: the JSON has all
            soft = p.get("soft_optimum_reward")
            tail = f"{soft:>17.4f}{soft - p['reward']:>9.4f}" if soft is not None else ""
            lines.append(
                f"{name:<22}{key + ' ' + format(p[key], '.3g'):>12}{p['reward']:>9.4f}{p['kl_to_base']:>9.4f}"
                f"{p['cost']:>6g}{tail}"
            )
    return "\n".join(lines)
