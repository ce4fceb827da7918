"""Config dataclasses: every field documented in its metadata, one shared training config with a
flat asdict, and validation that rejects what would silently misbehave (NaN included)."""

import dataclasses
import math
import re
import subprocess
import sys

import pytest

from qvlm.configs import (
    DecodeConfig,
    DemoConfig,
    ILQLConfig,
    TrainConfig,
    TrunkConfig,
    ValueConfig,
    option,
)
from qvlm.errors import QVLMError
from qvlm.heads import HeadsConfig

CONFIGS = [TrunkConfig, DecodeConfig, TrainConfig, ILQLConfig, ValueConfig, DemoConfig, HeadsConfig]
SHARED = [
    "lr",
    "trunk_lr",
    "weight_decay",
    "grad_clip",
    "batch_size",
    "epochs",
    "steps",
    "max_length",
    "seed",
    "checkpoint_every",
    "progress",
]  # fsdp moved to TrunkConfig (issue 21): a checkpoint that has it resumes (a retired field is not compared)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_a_one_line_help(cls):
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help", "")
        assert text.strip() and "\n" not in text, f"{cls.__name__}.{f.name}"


def test_option_keeps_default_and_help():
    f = option(3, "three things", choices=(1, 3))
    assert f.default == 3 and dict(f.metadata) == {"help": "three things", "choices": (1, 3)}


def test_training_fields_are_declared_once_and_asdict_stays_flat():
    assert [f.name for f in dataclasses.fields(TrainConfig)] == SHARED
    for cls in (ILQLConfig, ValueConfig):
        assert issubclass(cls, TrainConfig)
        own = {f.name for f in dataclasses.fields(cls)} - set(SHARED)
        assert not own & set(SHARED)
    # the keys a checkpoint's config.json has always held (qvlm/train/checkpoint.py compares them)
    assert set(dataclasses.asdict(ILQLConfig())) == set(SHARED) | {
        "gamma",
        "tau",
        "cql_scale",
        "awac_scale",
        "awac_beta",
        "polyak",
        "target_sync_every",
    }
    assert set(dataclasses.asdict(ValueConfig())) == set(SHARED) | {"target", "q_target", "gamma", "lam"}
    assert all(not isinstance(v, dict) for v in dataclasses.asdict(ValueConfig()).values())


def test_defaults_unchanged():
    ilql, value = ILQLConfig(), ValueConfig()
    assert (ilql.lr, ilql.trunk_lr, ilql.batch_size, ilql.epochs, ilql.max_length, ilql.checkpoint_every) == (
        1e-3,
        1e-5,
        8,
        4,
        256,
        100,
    )
    assert (ilql.gamma, ilql.tau, ilql.cql_scale, ilql.polyak, ilql.target_sync_every) == (0.99, 0.7, 0.1, 0.01, 1)
    assert (value.gamma, value.lam, value.target, value.q_target, value.grad_clip) == (1.0, 0.95, "mc", "return", 1.0)


def test_ppo_learning_rate_defaults_per_trunk():
    """Unset, the policy's learning rate is its trunk's (benchmarks/ppo_sweep.py chose both); given, it is
    kept; it is fixed when the config is built, so a run records the number; 0, NaN and inf are refused."""
    from qvlm.configs import ConfigError, PPOConfig
    from qvlm.configs.ppo import DEFAULT_LR

    assert DEFAULT_LR == {"lora": 3e-4, "full": 1e-5}
    assert PPOConfig().lr == 3e-4 and PPOConfig(trunk=TrunkConfig("full")).lr == 1e-5
    assert PPOConfig(lr=2e-4, trunk=TrunkConfig("full")).lr == 2e-4
    for bad in (0.0, -1e-4, NAN, math.inf):
        with pytest.raises(ConfigError, match="--lr is"):
            PPOConfig(lr=bad)


NAN = math.nan


@pytest.mark.parametrize(
    "cls, kwargs, needle",
    [
        (ILQLConfig, {"batch_size": 0}, "--batch-size is 0"),
        (ValueConfig, {"epochs": 0}, "--epochs is 0"),
        (ILQLConfig, {"steps": -1}, "--steps is -1"),
        (ILQLConfig, {"lr": 0.0}, "--lr is 0.0"),
        (ValueConfig, {"lr": NAN}, "--lr is nan"),
        (ValueConfig, {"lr": math.inf}, "--lr is inf"),
        (ILQLConfig, {"trunk_lr": NAN}, "--trunk-lr is nan"),
        (ILQLConfig, {"weight_decay": -0.1}, "--weight-decay is -0.1"),
        (ILQLConfig, {"grad_clip": NAN}, "--grad-clip is nan"),
        (ValueConfig, {"grad_clip": -1.0}, "--grad-clip is -1.0"),
        (ILQLConfig, {"checkpoint_every": -1}, "--checkpoint-every is -1"),
        (ValueConfig, {"max_length": 1}, "--max-length is 1"),
        (ILQLConfig, {"gamma": 1.5}, "--gamma is 1.5"),
        (ILQLConfig, {"gamma": NAN}, "--gamma is nan"),
        (ValueConfig, {"gamma": -0.1}, "--gamma is -0.1"),
        (ValueConfig, {"lam": 1.1}, "--lam is 1.1"),
        (ValueConfig, {"lam": NAN}, "--lam is nan"),
        (ILQLConfig, {"target_sync_every": 0}, "--target-sync-every is 0"),
        (ILQLConfig, {"cql_scale": NAN}, "--cql-scale is nan"),
        (ILQLConfig, {"cql_scale": -0.1}, "--cql-scale is -0.1"),
        (ILQLConfig, {"awac_scale": NAN}, "--awac-scale is nan"),
        (ILQLConfig, {"tau": NAN}, "--tau is nan"),
        (ILQLConfig, {"polyak": NAN}, "--polyak is nan"),
        (DecodeConfig, {"beta": NAN}, "--beta is nan"),
        (DecodeConfig, {"beta": math.inf}, "--beta is inf"),
        (DecodeConfig, {"temperature": NAN}, "--temperature is nan"),
        (DecodeConfig, {"temperature": 0.0}, "--temperature is 0.0"),
        (DecodeConfig, {"top_p": NAN}, "--top-p is nan"),
        (DecodeConfig, {"batch_size": 0}, "--batch-size is 0"),
        (TrunkConfig, {"lora_r": 0}, "--lora-r is 0"),
        (DemoConfig, {"ilql": {"cql_scale": NAN}}, "--cql-scale is nan"),
        (DemoConfig, {"dtype": "float64"}, "--dtype is 'float64'"),
        (DemoConfig, {"batch_size": 0}, "--batch-size is 0"),
        (DemoConfig, {"train_prompts": -1}, "--train-prompts is -1"),
    ],
)
def test_invalid_values_are_rejected(cls, kwargs, needle):
    with pytest.raises(QVLMError, match="^" + re.escape(needle) + "; "):
        nested = {f.name: f.metadata["nested"] for f in dataclasses.fields(cls) if "nested" in f.metadata}
        cls(**{k: nested[k](**v) if k in nested else v for k, v in kwargs.items()})


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (ILQLConfig, {"grad_clip": 0.0, "weight_decay": 0.0, "cql_scale": 0.0, "steps": 0, "checkpoint_every": 0}),
        (ILQLConfig, {"gamma": 0.0, "max_length": 2, "target_sync_every": 1}),
        (ValueConfig, {"gamma": 1.0, "lam": 0.0}),
        (ValueConfig, {"lam": 1.0}),
        (DecodeConfig, {"beta": -2.0, "temperature": 0.5}),
    ],
)
def test_boundary_values_are_accepted(cls, kwargs):
    cfg = cls(**kwargs)
    assert all(getattr(cfg, k) == v for k, v in kwargs.items())


def test_configs_and_parser_do_not_import_torch():
    code = "import sys, qvlm.configs, qvlm.cli; qvlm.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_constraint_is_declared_at_its_field_and_checked_once():
    """option(ge=..., gt=...) declares the rule; Config checks it with one message form, NaN failing it."""
    from dataclasses import dataclass

    from qvlm.configs import Config

    @dataclass
    class Toy(Config):
        n: int = option(1, "a count", ge=1)
        rate: float = option(0.5, "a rate", gt=0, le=1)
        name: str = option("a", "a name", choices=("a", "b"))

    Toy(n=3, rate=1.0, name="b")
    for kwargs, message in (
        ({"n": 0}, "--n is 0; it must be at least 1"),
        ({"rate": 0.0}, "--rate is 0.0; it must be in (0, 1]"),
        ({"rate": NAN}, "--rate is nan; it must be in (0, 1]"),
        ({"name": "c"}, "--name is 'c'; it must be one of a, b"),
    ):
        with pytest.raises(QVLMError, match="^" + re.escape(message) + "$"):
            Toy(**kwargs)


def test_app_configs_nest_algorithm_configs_and_expose_their_flags():
    """DemoConfig.ppo is a PPOConfig; its exposed fields are flags of the demo under the demo's names
    (--ppo-lr), flat() and from_flat() map them both ways, and a refused value names the demo's flag."""
    from qvlm.configs import PPOConfig, ProxyConfig, flat, from_flat

    cfg = DemoConfig()
    assert isinstance(cfg.ppo, PPOConfig) and isinstance(cfg.ilql, ILQLConfig) and isinstance(cfg.value, ValueConfig)
    assert (cfg.ppo.lr, cfg.ppo.kl_coef, cfg.ppo.prompts_per_iter, cfg.ppo.ppo_epochs) == (3e-4, 0.1, 10, 1)
    assert (cfg.ilql.epochs, cfg.ilql.cql_scale, cfg.value.epochs, cfg.value.q_target) == (8, 0.0, 6, "next_v")
    view = flat(cfg)
    assert view["ppo_lr"] == 3e-4 and view["ilql_epochs"] == 8 and view["mc_q_target"] == "next_v"
    assert not any(isinstance(v, dict) for v in view.values()) and "ppo" not in view
    again = from_flat(DemoConfig, {**view, "ppo_lr": 5e-4, "value_epochs": 2})
    assert again.ppo.lr == 5e-4 and again.value.epochs == 2 and again.ppo.kl_coef == 0.1
    with pytest.raises(QVLMError, match=r"^--ppo-lr is 0\.0; it must be a finite number > 0$"):
        from_flat(DemoConfig, {"ppo_lr": 0.0})
    with pytest.raises(TypeError, match="no flag ppo_learning_rate"):
        from_flat(DemoConfig, {"ppo_learning_rate": 1.0})
    proxy = flat(ProxyConfig())
    assert (proxy["rm_epochs"], proxy["ppo_lr"], proxy["guide_epochs"], proxy["backbone"]) == (2, 2e-4, 6, "")
    # the PPO config's own trunk is one TrunkConfig, exposed as --trunk/--lora-r/--lora-alpha/--fsdp
    ppo = flat(PPOConfig())
    assert (ppo["trunk"], ppo["lora_r"], ppo["fsdp"]) == ("lora", 8, False)


def test_fsdp_needs_a_full_trunk_declared_once_in_the_trunk_config():
    with pytest.raises(QVLMError, match="not --trunk frozen"):
        TrunkConfig(fsdp=True)
    with pytest.raises(QVLMError, match="not --trunk lora"):
        TrunkConfig("lora", fsdp=True)
    assert TrunkConfig("full", fsdp=True).fsdp
