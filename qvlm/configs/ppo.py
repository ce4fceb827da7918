"""PPO (and A2C) settings (:mod:`qvlm.algos.ppo`)."""

from __future__ import annotations

from dataclasses import dataclass

from qvlm.configs.base import Config, ConfigError, flag_name, nested, option, positive_number
from qvlm.configs.trunk import TrunkConfig
from qvlm.errors import QVLMError

__all__ = ["DEFAULT_LR", "PPO_ALGOS", "PPO_TRUNKS", "PPO_CRITICS", "KL_MODES", "ADVANTAGES", "PPOConfig"]

PPO_ALGOS = ("ppo", "a2c")
PPO_TRUNKS = ("lora", "full")
PPO_CRITICS = ("shared", "separate")
KL_MODES = ("reward", "loss")
# the advantage estimators of qvlm.online (declared here: configs import nothing heavy); rloo and grpo
# need no critic
ADVANTAGES = ("gae", "rloo", "grpo")
# the policy's learning rate when none is given, per trunk mode (benchmarks/ppo_sweep.py chose both)
DEFAULT_LR = {"lora": 3e-4, "full": 1e-5}


@dataclass
class PPOConfig(Config):
    """PPO with a V critic on a causal LM (``qvlm train ppo``). The learning rate, KL coefficient and
    epochs were chosen by a sweep on validation prompts (``benchmarks/ppo_sweep.py``, issue 23: LoRA lr
    3e-4, KL coefficient 0.1, one epoch over minibatches of 8); the rest follow Ziegler et al. 2019 /
    TRL's PPO where one applies; ``algo = a2c`` is plain actor-critic (one epoch, one minibatch,
    no clipping: it overrides ppo_epochs, minibatch_size, clip_eps and value_clip).

    ``advantage = rloo | grpo`` replaces the critic by a baseline from the other responses to the same
    prompt (issue 23): no V head is run or trained, so the critic's settings (critic_lr, vf_coef,
    value_clip, gamma, lam, fixed_horizon, head_hidden) go unused (a response's return is its summed
    reward); the ones that would build, load or train a critic
    (``critic = separate``, ``critic_init``, ``critic_warmup``) are refused."""

    algo: str = option(
        "ppo", "ppo: clipped surrogate, several epochs; a2c: plain actor-critic preset", choices=PPO_ALGOS
    )
    iterations: int = option(20, "rollout + update rounds", ge=1)
    prompts_per_iter: int = option(8, "prompts per rollout (drawn in a seeded order, epoch by epoch)", ge=1)
    responses_per_prompt: int = option(4, "responses sampled per prompt", ge=1)
    max_new_tokens: int = option(
        24, "response length limit (a cut response bootstraps from V unless fixed_horizon)", ge=1
    )
    fixed_horizon: bool = option(False, "the length limit ends the episode (done) instead of cutting it")
    ppo_epochs: int = option(1, "passes over each rollout (chosen by benchmarks/ppo_sweep.py)", ge=1)
    minibatch_size: int = option(8, "responses per optimiser step", ge=1)
    lr: float | None = option(
        None,
        "AdamW learning rate of the policy, its LoRA adapters or every weight with --trunk full; unset: "
        + ", ".join(f"{v:.0e}".replace("e-0", "e-") + f" with --trunk {k}" for k, v in DEFAULT_LR.items())
        + " (chosen by benchmarks/ppo_sweep.py)",
        type=float,
        check=lambda v: v is None or positive_number(v),
        rule="a finite number > 0",
    )
    critic_lr: float = option(1e-3, "AdamW learning rate of the V head (and a separate critic's trunk)", gt=0)
    anneal_lr: bool = option(False, "decay both learning rates linearly to 0 over the iterations (CleanRL)")
    weight_decay: float = option(0.0, "AdamW weight decay (0: off)", ge=0)
    grad_clip: float = option(1.0, "max global gradient norm (0: off)", ge=0)
    trunk: TrunkConfig = nested(
        TrunkConfig,
        {"mode": "trunk", "lora_r": "lora_r", "lora_alpha": "lora_alpha", "fsdp": "fsdp"},
        "the policy's weights that train (lora: the reference is the trunk with adapters off; full: a frozen copy)",
        mode="lora",
    )
    critic: str = option(
        "shared", "V head on the policy's trunk (shared) or on its own copy of the base (separate)", choices=PPO_CRITICS
    )
    deepspeed: str = option(
        "",
        "DeepSpeed ZeRO for the optimiser: zero1 (AdamW moments partitioned over the processes), zero2 (and "
        "the gradients), or a DeepSpeed JSON config of stage 1 or 2 (--trunk full, several processes; '': off)",
    )
    critic_init: str = option("", "a `qvlm train value` run directory whose V head starts the critic ('': fresh)")
    critic_warmup: int = option(0, "first iterations that train the critic only", ge=0)
    head_hidden: int = option(
        0, "width of the V head's hidden layer (0: the trunk's hidden size)", ge=0, note="0: the trunk's hidden size"
    )
    gamma: float = option(1.0, "discount per token", ge=0, le=1)
    lam: float = option(0.95, "GAE lambda", ge=0, le=1)
    clip_eps: float = option(0.2, "PPO ratio clip epsilon", gt=0)
    value_clip: float = option(0.2, "value clip around V_old (0: off)", ge=0)
    vf_coef: float = option(1.0, "weight of the value loss", ge=0)
    ent_coef: float = option(0.0, "weight of the entropy bonus (0: off)", ge=0)
    kl_coef: float = option(
        0.1,
        "KL coefficient beta_kl to the reference (initial value when adaptive; chosen by benchmarks/ppo_sweep.py)",
        ge=0,
    )
    kl_mode: str = option(
        "reward", "reward: k1 penalty in the per-token reward; loss: k3 KL loss term", choices=KL_MODES
    )
    kl_target: float = option(
        0.0, "adaptive KL controller's target KL per response in nats (0: fixed coefficient)", ge=0
    )
    kl_horizon: float = option(10000.0, "adaptive KL controller's horizon (Ziegler et al. 2019)", gt=0)
    advantage: str = option(
        "gae",
        "gae: GAE with the V critic; rloo: leave-one-out baseline over the responses to one prompt; grpo: "
        "returns normalised within those responses (rloo, grpo: no critic, --responses-per-prompt >= 2)",
        choices=ADVANTAGES,
    )
    whiten: bool = option(
        True,
        "whiten GAE advantages over the batch's real tokens (gae only: rloo's are used as they are, grpo's are "
        "normalised per prompt)",
    )
    decode_batch_size: int = option(64, "responses decoded together", ge=1)
    fast: bool = option(
        False, "decode rollouts on the fast path (Llama-style models; a LoRA policy's adapters applied in the step)"
    )
    chat: bool | None = option(None, "wrap prompts in the chat template (None: when the tokenizer has one)", type=bool)
    seed: int = option(0, "seed of the V head, the prompt order, the sampling and the minibatches")
    checkpoint_every: int = option(
        5, "iterations between resumable checkpoints (0: only at the end)", ge=0, note="0: only at the end"
    )
    progress: bool = option(True, "show a progress bar")

    def check(self) -> None:
        if self.trunk.mode not in PPO_TRUNKS:
            raise ConfigError("trunk", self.trunk.mode, "one of " + ", ".join(PPO_TRUNKS))
        if self.lr is None:  # the trunk's own default, fixed when the config is built (runs record the number)
            self.lr = DEFAULT_LR[self.trunk.mode]
        if self.trunk.fsdp and self.critic != "shared":
            raise QVLMError("--fsdp supports --critic shared only (a separate critic's trunk is not sharded)")
        if self.deepspeed and (self.trunk.mode != "full" or self.critic != "shared" or self.trunk.fsdp):
            raise QVLMError(
                "--deepspeed partitions the optimiser of --trunk full --critic shared without --fsdp (LoRA "
                "adapters are small: use plain data parallel; --fsdp shards the weights too)"
            )
        if self.fast and (self.trunk.fsdp or self.deepspeed):
            # the fast step packs whole weights and repacks when their version counters move: FSDP shards them,
            # DeepSpeed writes them through .data (no counter moves), so its rollouts would use stale weights
            raise QVLMError(
                "--fast decodes from packed copies of whole weights, which --fsdp shards and --deepspeed updates "
                "unseen; drop --fast (or --fsdp / --deepspeed)"
            )
        if self.advantage != "gae":
            self._check_critic_free()
        if self.algo == "a2c":  # the plain actor-critic of the source documents, as a preset
            self.ppo_epochs = 1
            self.minibatch_size = self.prompts_per_iter * self.responses_per_prompt
            self.clip_eps = 1e9
            self.value_clip = 0.0

    def _check_critic_free(self) -> None:
        """rloo / grpo: two responses per prompt at least, and nothing that builds or trains a critic."""
        name = self.advantage
        if self.responses_per_prompt < 2:
            raise ConfigError(
                "responses_per_prompt",
                self.responses_per_prompt,
                f"at least 2 with --advantage {name}: its baseline is the other responses to the same prompt "
                "(or use --advantage gae)",
            )
        refused = {
            "critic": (self.critic != "shared", "builds a second copy of the model for a critic"),
            "critic_init": (bool(self.critic_init), "loads a V head into a critic"),
            "critic_warmup": (self.critic_warmup > 0, "trains a critic alone first"),
        }
        for key, (given, what) in refused.items():
            if given:
                raise QVLMError(
                    f"{flag_name(key)} {getattr(self, key)} {what}, but --advantage {name} uses no critic; drop "
                    f"{flag_name(key)} or use --advantage gae"
                )
