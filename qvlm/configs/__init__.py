"""Typed configs, one dataclass per algorithm or app (TRL-style), one module each: every field has a
default, a one-line description and its constraints (:func:`option`), which the CLI turns into
``--flag`` help and :class:`Config` checks once. An app config nests the configs of the algorithms it
runs (``DemoConfig.ppo: PPOConfig``, :func:`nested`). Nothing here imports torch, so ``qvlm --help``
starts fast.
"""

from qvlm.configs.base import (
    DEFAULT_MODEL,
    DEVICES_HELP,
    DTYPE_CHOICES,
    DTYPE_NAMES,
    Config,
    ConfigError,
    flat,
    from_flat,
    nested,
    option,
    parse_numbers,
)
from qvlm.configs.decode import DecodeConfig
from qvlm.configs.demo import DemoConfig
from qvlm.configs.ilql import ILQLConfig
from qvlm.configs.offline import TrainConfig
from qvlm.configs.ppo import KL_MODES, PPO_ALGOS, PPO_CRITICS, PPO_TRUNKS, PPOConfig
from qvlm.configs.proxy import ProxyConfig
from qvlm.configs.qsharp import QSharpConfig
from qvlm.configs.reward_model import LR_SCHEDULES, POOLINGS, RewardModelConfig
from qvlm.configs.softq import SoftQConfig
from qvlm.configs.trunk import TRUNK_MODES, TrunkConfig
from qvlm.configs.value import Q_TARGETS, SCORER, VALUE_TARGETS, ValueConfig

__all__ = [
    "DEFAULT_MODEL",
    "DEVICES_HELP",
    "DTYPE_NAMES",
    "DTYPE_CHOICES",
    "TRUNK_MODES",
    "VALUE_TARGETS",
    "Q_TARGETS",
    "LR_SCHEDULES",
    "POOLINGS",
    "PPO_ALGOS",
    "PPO_TRUNKS",
    "PPO_CRITICS",
    "KL_MODES",
    "SCORER",
    "Config",
    "ConfigError",
    "option",
    "nested",
    "flat",
    "from_flat",
    "parse_numbers",
    "TrunkConfig",
    "DecodeConfig",
    "TrainConfig",
    "ILQLConfig",
    "ValueConfig",
    "DemoConfig",
    "RewardModelConfig",
    "ProxyConfig",
    "QSharpConfig",
    "SoftQConfig",
    "PPOConfig",
]
