"""PPO on an exact token MDP, with the trainer every user runs (:func:`qvlm.algos.ppo.train_ppo`).

Not a tabular re-implementation: the policy is a tiny causal LM (a random Llama whose vocabulary is
the MDP's, EOS = the last id, reading ``[EOS] + prefix`` like :class:`qvlm.exact.CausalLMPolicy`),
sampled by the shared decoding step, scored by a batch reward callable, trained by ``train_ppo``
with the k1 KL penalty in the reward at the fixed coefficient ``alpha`` (so PPO's objective is
exactly ``J = reward - alpha KL``), ``fixed_horizon`` (the MDP terminates at its horizon) and
``gamma`` of the MDP.

The reference must be the MDP's ``pi_ref``. The LM's frozen base plays that role (LoRA: adapters
off; full: a frozen copy), so the base is first distilled to the tree's ``pi_ref`` table, full
batch over every decision state (cross-entropy to the table's rows). The distillation is not exact:
the report's ``extra['distill_kl']`` is its mean KL over the states, and the objective is scored exactly against the
tree's own ``pi_ref`` (the distillation error counts against PPO).

Scoring (:func:`qvlm.exact.learners.measure`): the policy's next-token table at every state
(enumerated), evaluated exactly; ``V`` is the critic at every state; RMSEs are over the states the
final policy reaches with probability >= ``visit_threshold`` (a PPO learner has no Q: ``q_rmse``
is NaN).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qvlm.algos.actor_critic import ActorCritic
from qvlm.algos.ppo import train_ppo
from qvlm.configs import PPOConfig, TrunkConfig
from qvlm.errors import QVLMError
from qvlm.exact import CausalLMPolicy, policy_table, token_names
from qvlm.exact.tabular import TabularHeads

__all__ = [
    "ExactPPOConfig",
    "mdp_tokenizer",
    "mdp_reward",
    "distill_reference",
    "reach_probabilities",
    "train_exact_ppo",
]


def _exact_ppo_defaults():
    # one prompt (the start token) and its responses; the k1 penalty in the reward at alpha (set per run),
    # the MDP's horizon and gamma (set per tree); both learning rates decayed to 0 so the last iterate settles
    return PPOConfig(
        iterations=60,
        prompts_per_iter=1,
        ppo_epochs=2,
        minibatch_size=256,
        lr=2e-3,
        critic_lr=3e-3,
        anneal_lr=True,
        trunk=TrunkConfig("full"),  # every weight of the tiny LM
        fixed_horizon=True,
        kl_mode="reward",
        chat=False,
        progress=False,
    )


@dataclass
class ExactPPOConfig:
    """PPO on the exact MDP: the tiny LM, its distillation to pi_ref, and train_ppo's own config (``ppo``;
    its responses per rollout, length, gamma, KL coefficient, seed and progress are set from the MDP,
    alpha and the fields below)."""

    ppo: Any = field(default_factory=_exact_ppo_defaults)  # a qvlm.configs.PPOConfig
    episodes_per_iter: int = 256  # responses per rollout (one prompt: the start token)
    hidden_size: int = 32  # the tiny Llama's width
    num_layers: int = 2  # and depth
    distill_steps: int = 500  # full-batch Adam steps distilling the base to pi_ref
    distill_lr: float = 0.01
    visit_threshold: float = 1e-3  # states reached with at least this probability are scored
    seed: int = 0
    progress: bool = False


def mdp_tokenizer(vocab_size: int):
    """A tokenizer of the MDP's tokens: ``a, b, ...`` one character each, EOS ``<eos>`` the last id."""

    vocab = {name: i for i, name in enumerate(token_names(vocab_size)[:-1])}
    vocab["<eos>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _tiny_lm(vocab_size: int, horizon: int, cfg: ExactPPOConfig):
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=2 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(16, 2 * horizon + 2),
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = vocab_size - 1
    return model


def _level_inputs(tree) -> list[torch.Tensor]:
    """Per level d, ``[EOS] + prefix`` of its states: ``(n_d, d + 1)`` token ids."""
    eos = tree.vocab_size - 1
    return [
        torch.cat([torch.full((len(p), 1), eos), torch.as_tensor(p, dtype=torch.long).reshape(len(p), -1)], 1)
        for p in tree.level_tokens[: tree.horizon]
    ]


def _deepest_inputs(tree) -> tuple[torch.Tensor, torch.Tensor]:
    """``[EOS] + p`` for every prefix ``p`` of the deepest level ``(n, H)``, and the state id read
    at each position ``(n, H)``: every decision state is a prefix of some deepest one, so one
    forward pass reads the LM's distribution at all of them."""
    deepest = torch.as_tensor(tree.level_tokens[tree.horizon - 1], dtype=torch.long).reshape(-1, tree.horizon - 1)
    ids = torch.cat([torch.full((len(deepest), 1), tree.eos_id), deepest], 1)  # (n, H)
    states = torch.tensor(
        [[tree.state_id(row[:d]) for d in range(tree.horizon)] for row in deepest.tolist()], dtype=torch.long
    )
    return ids, states


def distill_reference(model, tree, steps: int, lr: float) -> float:
    """Fit ``model``'s next-token distribution to ``tree.ref_probs`` at every decision state (full
    batch, cross-entropy, Adam with the rate decayed linearly to 0, each state weighted equally);
    returns the mean over states of KL(pi_ref || model)."""
    ids, states = _deepest_inputs(tree)
    weight = 1.0 / torch.bincount(states.flatten(), minlength=tree.num_states).double()[states]  # (n, H)
    weight = (weight / weight.sum()).float()
    target = tree.ref_probs[states].float()  # (n, H, V)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / steps)
    model.train()
    for _ in range(steps):
        logp = torch.log_softmax(model(input_ids=ids).logits, -1)  # (n, H, V)
        loss = -(weight * (target * logp).sum(-1)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
        ref = tree.ref_probs[states]
        kl = (ref * (torch.log(ref.clamp(min=1e-300)) - logp)).sum(-1)  # (n, H)
    return float((kl * weight.double()).sum())


def reach_probabilities(tree, policy: torch.Tensor) -> torch.Tensor:
    """``(N,)`` probability that ``policy`` (``(N, V)``) visits each decision state."""
    reach = torch.zeros(tree.num_states, dtype=torch.float64)
    reach[0] = 1.0
    for sl in tree.level_slices:
        child = tree.child[sl]  # (n, V)
        flow = reach[sl, None] * policy[sl]
        live = child >= 0
        reach.index_add_(0, child[live], flow[live])
    return reach


def mdp_reward(tree):
    """Batch reward on texts: a response's letters are its tokens, and a response shorter than the
    horizon ended with EOS (one character per ordinary token makes this unambiguous)."""

    index = {name: i for i, name in enumerate(token_names(tree.vocab_size)[:-1])}

    def reward(prompts, responses) -> list[float]:
        out = []
        for text in responses:
            tokens = [index[c] for c in text]
            if len(tokens) < tree.horizon:
                tokens.append(tree.eos_id)
            s, total = 0, 0.0
            for a in tokens:
                total += float(tree.rewards[s, a])
                s = int(tree.child[s, a])
            out.append(total)
        return out

    return reward


def train_exact_ppo(tree, config: ExactPPOConfig, alpha: float):
    """Distil a tiny LM to pi_ref, train it with ``train_ppo`` on the MDP, and hand back its policy
    table, critic values and the states it reaches (:class:`qvlm.exact.tabular.TabularHeads`)."""

    if tree.gamma != 1.0:
        raise QVLMError(
            f"the ppo learner places the episode's reward on its last token; use --gamma 1 (got {tree.gamma})"
        )
    model = _tiny_lm(tree.vocab_size, tree.horizon, config)
    distill_kl = distill_reference(model, tree, config.distill_steps, config.distill_lr)
    torch.manual_seed(config.seed)
    cfg = dataclasses.replace(
        config.ppo,
        responses_per_prompt=config.episodes_per_iter,
        max_new_tokens=tree.horizon,
        gamma=tree.gamma,
        kl_coef=alpha,
        decode_batch_size=config.episodes_per_iter,
        seed=config.seed,
        progress=config.progress,
    )
    ac = ActorCritic(model, cfg.trunk, cfg.critic)
    train_ppo(ac, mdp_tokenizer(tree.vocab_size), [[tree.eos_id]], mdp_reward(tree), cfg)
    policy = policy_table(tree, CausalLMPolicy(ac.policy, tree.vocab_size))
    inputs = _level_inputs(tree)
    v = torch.cat([ac.state_values(x, torch.ones_like(x)) for x in inputs]).double()
    reach = reach_probabilities(tree, policy)
    visited_pairs = (reach[:, None] * policy) >= config.visit_threshold
    return TabularHeads(
        torch.full_like(policy, float("nan")), v, visited_pairs, policy=policy, extra={"distill_kl": distill_kl}
    )
