"""How a trunk (the causal LM under the heads, or a PPO policy) trains: one description everywhere."""

from __future__ import annotations

from dataclasses import dataclass

from qvlm.configs.base import Config, option
from qvlm.errors import QVLMError

__all__ = ["TRUNK_MODES", "TrunkConfig"]

TRUNK_MODES = ("frozen", "lora", "full")


@dataclass
class TrunkConfig(Config):
    """How the trunk is trained."""

    mode: str = option(
        "frozen", "frozen: heads only; lora: adapters train too; full: every weight", choices=TRUNK_MODES, flag="trunk"
    )
    lora_r: int = option(8, "LoRA rank (mode = lora)", ge=1)
    lora_alpha: int = option(16, "LoRA scaling numerator (mode = lora)")
    lora_dropout: float = option(0.0, "LoRA dropout (mode = lora); 0 keeps runs deterministic", ge=0, lt=1)
    fsdp: bool = option(False, "shard the trunk over the processes with FSDP2 (mode full, several processes)")

    def check(self) -> None:
        # sharding splits weights that train: LoRA adapters are small (plain data parallel), a frozen
        # trunk does not train
        if self.fsdp and self.mode != "full":
            raise QVLMError(
                f"--fsdp shards a trunk that trains every weight, not --trunk {self.mode}: use --trunk full with "
                "--fsdp, or plain data parallel (no --fsdp) for LoRA adapters or a frozen trunk"
            )
