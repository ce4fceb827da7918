"""The policy, its reference and its V critic for online training (:mod:`qvlm.algos.ppo`).

- policy: the causal LM, with LoRA adapters (peft; the reference is the same trunk with the
  adapters disabled, not a second copy: DESIGN.md) or every weight training (the reference is then
  a frozen copy of the base);
- critic: a V head (:class:`qvlm.heads.QVHeads` without Q heads) on the policy's trunk
  (``shared``: it reads the policy's hidden states, detached, so only the policy loss moves the
  policy) or on its own copy of the base model (``separate``: LoRA or full like the policy),
  optionally initialised from a ``qvlm train value`` run's V head.

:meth:`ActorCritic.evaluate` is the teacher-forced pass over a :class:`qvlm.rollout.Rollout` that
the optimiser needs (log-probs of the sampled tokens, entropy, ``V(s_t)`` and ``V(s_{T+1})``);
decoding itself runs through :class:`qvlm.decoding.step.DecodeStep` on :attr:`ActorCritic.policy`.

Run directory written by :func:`save_policy_run`: ``adapter/`` (peft format) or ``policy.safetensors``
(the full model's weights), ``heads.safetensors`` + ``heads_config.json`` (the V head),
``critic.safetensors`` (a separate critic's trainable trunk tensors) and ``training.json``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from qvlm.configs import TrunkConfig
from qvlm.decoding.step import position_ids
from qvlm.envs.tokens import EpisodeBatch
from qvlm.errors import QVLMError
from qvlm.fileio import atomic_write_text, read_json
from qvlm.heads import HeadsConfig, QVHeads, load_heads, load_tensors, save_heads, save_tensors
from qvlm.loading import hidden_size_of
from qvlm.mdp import value_positions
from qvlm.rollout import Rollout
from qvlm.train.distributed import full_state_dict, fully_shard_trunk, is_main_process
from qvlm.trunk import gather_positions, lora_model, trunk_forward, trunk_hidden_states

__all__ = [
    "PolicyOutput",
    "response_hidden",
    "response_outputs",
    "episode_outputs",
    "ActorCritic",
    "save_policy_run",
    "load_policy",
]


@dataclass
class PolicyOutput:
    """Teacher-forced outputs on a rollout, all ``(B, T)`` except ``last_values (B,)``."""

    logprobs: torch.Tensor  # log pi(y_t | s_t)
    entropy: torch.Tensor  # H(pi(. | s_t))
    values: torch.Tensor  # V(s_t)
    last_values: torch.Tensor  # V(s_{T_b + 1}) after each row's last real token


def response_hidden(model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Teacher-forced hidden states of ``model`` at the states ``s_1 .. s_{T+1}`` of a rollout's
    prompt + response: ``(B, T + 1, H)`` (``s_{T+1}`` of a short row is read past its end, never used
    there). Position ``P - 1 + (t - 1)`` holds ``s_t``: prompts are left-padded."""
    return response_outputs(model, rollout, logits=False)[0]


def response_outputs(
    model: PreTrainedModel, rollout: Rollout, logits: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`response_hidden` and the LM logits at ``s_1 .. s_T``, from one pass of the trunk.

    Shapes ``(B, T + 1, H)`` and ``(B, T, V)`` (None without ``logits``), from one pass of the trunk (:func:`qvlm.trunk.trunk_forward`: what a
    sharded trunk needs to compute the logits inside its forward).

    ``rollout`` may be a multi-turn :class:`qvlm.envs.tokens.EpisodeBatch` (:mod:`qvlm.algos.ppo_env`):
    the steps are then the action tokens, read at their state positions, and ``s_{T+1}`` at the
    sequence's last position (:func:`episode_outputs`)."""
    if isinstance(rollout, EpisodeBatch):
        return episode_outputs(model, rollout, logits)
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)  # (B, P + T)
    mask = torch.cat([rollout.prompt_mask, rollout.response_mask.to(rollout.prompt_mask.dtype)], dim=1)
    P, T = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    at = slice(P - 1, P - 1 + T) if logits else None
    h, lm_logits, _ = trunk_forward(model, ids, mask, logits_at=at, position_ids=position_ids(mask))  # (B, P + T, H)
    return h[:, P - 1 :], lm_logits


def episode_outputs(
    model: PreTrainedModel, batch: EpisodeBatch, logits: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced hidden states at the states ``s_1 .. s_{T+1}`` of right-padded multi-turn
    episodes ``(B, T + 1, H)`` (:func:`qvlm.mdp.value_positions`: each action token's state, then the
    state after the last one) and the LM logits at ``s_1 .. s_T`` ``(B, T, V)`` (None without
    ``logits``), from one pass of the trunk. The environment's tokens are read only as context: no
    logit, log-prob or value of an observation token is computed."""
    positions = value_positions(batch.state_positions, batch.next_state_positions, batch.response_mask)  # (B, T + 1)
    at = batch.state_positions if logits else None
    h, lm_logits, _ = trunk_forward(model, batch.input_ids, batch.attention_mask, logits_at=at)  # (B, L, H)
    return gather_positions(h, positions), lm_logits


class ActorCritic(nn.Module):
    """Policy LM + reference + V critic. ``heads`` is the V head; the checkpoint helpers of
    :mod:`qvlm.train.checkpoint` read ``heads`` and :meth:`trainable_trunk_state` (policy adapters or
    weights, and a separate critic's)."""

    def __init__(
        self,
        model: PreTrainedModel,
        trunk: TrunkConfig | None = None,
        critic: str = "shared",
        head_hidden: int = 0,
        base_model: str = "",
    ):
        super().__init__()
        trunk = trunk or TrunkConfig("lora")
        self.trunk_config, self.mode, self.critic_mode = trunk, trunk.mode, critic
        base = model.requires_grad_(False)
        critic_base = copy.deepcopy(base) if critic == "separate" else None
        self.peft = None
        if trunk.mode == "lora":
            self.peft = lora_model(base, trunk)
            self.policy = self.peft.base_model.model  # the Hugging Face model, adapters injected
            self.reference = None
        elif trunk.mode == "full":
            self.reference = copy.deepcopy(base).eval()  # frozen copy of the base
            self.policy = base.requires_grad_(True)
        else:
            raise QVLMError(f"--trunk is {trunk.mode!r}; a policy trains: use lora or full")
        self.critic_trunk = self.critic_peft = None
        if critic == "separate":
            self.critic_peft = lora_model(critic_base, trunk) if trunk.mode == "lora" else None
            self.critic_trunk = (
                self.critic_peft.base_model.model if trunk.mode == "lora" else critic_base.requires_grad_(True)
            )
        elif critic != "shared":
            raise QVLMError(f"unknown critic {critic!r}; use shared or separate")
        weight = self.policy.get_output_embeddings().weight
        config = HeadsConfig(
            hidden_size=hidden_size_of(self.policy.config),
            vocab_size=weight.shape[0],
            head_hidden=head_hidden,
            with_q=False,
            base_model=base_model,
        )
        self.heads = QVHeads(config).to(device=weight.device, dtype=weight.dtype)

    @property
    def device(self) -> torch.device:
        return self.policy.get_output_embeddings().weight.device

    # ------------------------------------------------------------ parameters and state

    def policy_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def critic_parameters(self) -> list[nn.Parameter]:
        params = list(self.heads.parameters())
        if self.critic_trunk is not None:
            params += [p for p in self.critic_trunk.parameters() if p.requires_grad]
        return params

    def trainable_trunk_state(self) -> dict[str, torch.Tensor]:
        """Trainable tensors of the policy (``policy.*``) and of a separate critic (``critic.*``)."""
        state = {"policy." + n: p.detach() for n, p in self.policy.named_parameters() if p.requires_grad}
        if self.critic_trunk is not None:
            state.update(
                {"critic." + n: p.detach() for n, p in self.critic_trunk.named_parameters() if p.requires_grad}
            )
        return state

    def load_trunk_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.trainable_trunk_state()) - set(state)
        if missing:
            raise QVLMError(f"checkpoint lacks {len(missing)} trunk tensors (e.g. {sorted(missing)[0]})")
        for prefix, module in (("policy.", self.policy), ("critic.", self.critic_trunk)):
            if module is not None:
                part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                module.load_state_dict(part, strict=False)

    def init_critic_from(self, run_dir: str | Path) -> None:
        """Start the V head from a ``qvlm train value`` run's V head (shapes checked)."""
        loaded = load_heads(run_dir)
        mine = self.heads.config
        if (loaded.config.hidden_size, loaded.config.width) != (mine.hidden_size, mine.width):
            raise QVLMError(
                f"--critic-init {run_dir}: its V head has hidden size {loaded.config.hidden_size} and width "
                f"{loaded.config.width}; this critic has {mine.hidden_size} and {mine.width}: pass the --model and "
                "--head-hidden the value run used"
            )
        self.heads.v_head.load_state_dict(loaded.v_head.state_dict())

    def shard(self) -> None:
        """Shard the policy's weights over the processes with FSDP2 (``--fsdp``; a full trunk only).
        The V head and the frozen reference stay whole on every process."""
        fully_shard_trunk(self.policy)  # PPOConfig checked: a full trunk, a shared critic

    # ------------------------------------------------------------ forward passes

    @contextmanager
    def reference_mode(self):
        """Inside, :attr:`policy` computes the reference: LoRA adapters disabled (a no-op for full)."""
        with self.peft.disable_adapter() if self.peft is not None else nullcontext():
            yield

    def _hidden(self, model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
        return response_hidden(model, rollout)

    def _values(self, h: torch.Tensor, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.heads.values(h).to(torch.float32)  # (B, T + 1)
        T = rollout.response_ids.shape[1]
        return v[:, :T], v[torch.arange(v.shape[0], device=v.device), rollout.lengths.to(v.device)]

    def evaluate(self, rollout: Rollout, with_policy: bool = True, with_values: bool = True) -> PolicyOutput:
        """Log-probs, entropy (zeros when ``with_policy`` is False) and values (zeros, the V head not run,
        when ``with_values`` is False: a critic-free advantage) on a rollout."""
        h = logits = None
        if with_policy or (with_values and self.critic_trunk is None):
            with torch.set_grad_enabled(with_policy and torch.is_grad_enabled()):
                h, logits = response_outputs(self.policy, rollout, logits=with_policy)  # (B, T + 1, H), (B, T, V)
        if with_policy:
            logits = logits.to(torch.float32)
            logp_all = torch.log_softmax(logits, dim=-1)
            logprobs = logp_all.gather(-1, rollout.response_ids[..., None]).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        else:
            logprobs = entropy = torch.zeros_like(rollout.response_mask)
        mask = rollout.response_mask
        if not with_values:
            return PolicyOutput(logprobs * mask, entropy * mask, torch.zeros_like(mask), mask.new_zeros(len(mask)))
        # a shared critic reads the policy's features detached: only the policy loss moves the policy
        critic_h = self._hidden(self.critic_trunk, rollout) if self.critic_trunk is not None else h.detach()
        values, last_values = self._values(critic_h, rollout)
        return PolicyOutput(logprobs * mask, entropy * mask, values * mask, last_values)

    @torch.no_grad()
    def ref_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """``log pi_ref(y_t | s_t)`` ``(B, T)``, 0 on padding."""
        model = self.reference if self.reference is not None else self.policy
        with self.reference_mode():
            _, logits = response_outputs(model, rollout)  # (B, T, V)
            logits = logits.to(torch.float32)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, rollout.response_ids[..., None]).squeeze(-1)
        return logp * rollout.response_mask

    @torch.no_grad()
    def state_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``V`` of each (left-padded) sequence's last position: ``(B, L) -> (B,)``."""
        model = self.critic_trunk if self.critic_trunk is not None else self.policy
        h, _ = trunk_hidden_states(model, input_ids, attention_mask, position_ids=position_ids(attention_mask))
        return self.heads.values(h[:, -1]).to(torch.float32)


def save_policy_run(run_dir: str | Path, ac: ActorCritic, info: dict) -> None:
    """The trained policy (peft adapter folder or ``policy.safetensors``), the V head, a separate
    critic's tensors and ``training.json``; every file written atomically (main process only).
    Every process calls it: a sharded policy (``--fsdp``) is gathered collectively first."""
    policy_state = full_state_dict(ac.policy) if ac.peft is None else None
    if not is_main_process():
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if ac.peft is not None:
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=run_dir))
        ac.peft.save_pretrained(str(tmp))
        _sort_target_modules(tmp / "adapter_config.json")
        old = run_dir / "adapter"
        if old.exists():
            trash = run_dir / f".trash-adapter-{os.getpid()}"
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, old)
    else:
        save_tensors(run_dir / "policy.safetensors", policy_state)
    if ac.critic_trunk is not None:
        state = {n: p for n, p in ac.critic_trunk.named_parameters() if p.requires_grad}
        save_tensors(run_dir / "critic.safetensors", state)
    save_heads(ac.heads, run_dir)
    info = {**info, "trunk": ac.mode, "critic": ac.critic_mode}
    atomic_write_text(run_dir / "training.json", json.dumps(info, indent=2) + "\n")


def _sort_target_modules(config_file: Path) -> None:
    """peft writes ``target_modules`` from a set, in an order that changes with each process's string
    hashing: sorted, two runs with one seed write the same bytes (issue 25)."""
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        atomic_write_text(config_file, json.dumps(config, indent=2, sort_keys=True))


def load_policy(model: PreTrainedModel, run_dir: str | Path) -> PreTrainedModel:
    """The policy a ``qvlm train ppo`` run trained, on ``model`` (its base): the LoRA adapter merged
    into the weights, or the full weights loaded. Eval mode, no gradients.

    Every file is checked before use: ``training.json`` must be a JSON object of a ppo run, the
    weights readable and finite (:func:`qvlm.heads.load_tensors`), the adapter's config valid JSON; a
    damaged, truncated or diverged file is a :class:`QVLMError` naming it."""

    run_dir = Path(run_dir)
    info_file = run_dir / "training.json"
    if not info_file.is_file():
        raise QVLMError(f"--policy {run_dir}: not a `qvlm train ppo` run directory (no training.json of ppo)")
    info = read_json(info_file, "restore the run directory or train the policy again")
    if info.get("algorithm") not in ("ppo", "a2c"):
        raise QVLMError(f"--policy {run_dir}: not a `qvlm train ppo` run directory (no training.json of ppo)")
    device = next(model.parameters()).device
    adapter = run_dir / "adapter"
    if adapter.is_dir():
        from peft import PeftModel

        weights, config = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
        for f in (config, weights):
            if not f.is_file():
                raise QVLMError(f"--policy {run_dir}: {f} is missing; restore the run directory or train again")
        read_json(config, "restore the run directory or train the policy again")
        state = load_tensors(weights, device)  # readable and finite, before peft reads it again
        try:
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise QVLMError(
                f"--policy {run_dir}: its adapter does not load on this --model ({reason[:200]}); pass the base model "
                "the run trained (training.json's base_model) or train again"
            ) from None
        del state
    elif (run_dir / "policy.safetensors").is_file():
        state = load_tensors(run_dir / "policy.safetensors", device)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError:  # a tensor of another shape
            missing, unexpected = [], ["(shapes differ)"]
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise QVLMError(f"--policy {run_dir}: its weights do not fit this --model (pass the base the run used)")
    else:
        raise QVLMError(f"--policy {run_dir}: holds neither adapter/ nor policy.safetensors; is the run finished?")
    return model.eval().requires_grad_(False)
