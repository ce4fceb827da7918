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
    "fsdp",  # added with FSDP (issue 12); a checkpoint without it resumes as fsdp=False
]


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


NAN = math.nan


@pytest.mark.parametrize(
    "cls, kwargs, needle",
    [
        (ILQLConfig, {"batch_size": 0}, "batch_size is 0"),
        (ValueConfig, {"epochs": 0}, "epochs is 0"),
        (ILQLConfig, {"steps": -1}, "steps is -1"),
        (ILQLConfig, {"lr": 0.0}, "lr is 0.0"),
        (ValueConfig, {"lr": NAN}, "lr is nan"),
        (ValueConfig, {"lr": math.inf}, "lr is inf"),
        (ILQLConfig, {"trunk_lr": NAN}, "trunk_lr is nan"),
        (ILQLConfig, {"weight_decay": -0.1}, "weight_decay is -0.1"),
        (ILQLConfig, {"grad_clip": NAN}, "grad_clip is nan"),
        (ValueConfig, {"grad_clip": -1.0}, "grad_clip is -1.0"),
        (ILQLConfig, {"checkpoint_every": -1}, "checkpoint_every is -1"),
        (ValueConfig, {"max_length": 1}, "max_length is 1"),
        (ILQLConfig, {"gamma": 1.5}, "gamma is 1.5"),
        (ILQLConfig, {"gamma": NAN}, "gamma is nan"),
        (ValueConfig, {"gamma": -0.1}, "gamma is -0.1"),
        (ValueConfig, {"lam": 1.1}, "lam is 1.1"),
        (ValueConfig, {"lam": NAN}, "lam is nan"),
        (ILQLConfig, {"target_sync_every": 0}, "target_sync_every is 0"),
        (ILQLConfig, {"cql_scale": NAN}, "cql_scale is nan"),
        (ILQLConfig, {"cql_scale": -0.1}, "cql_scale is -0.1"),
        (ILQLConfig, {"awac_scale": NAN}, "awac_scale is nan"),
        (ILQLConfig, {"tau": NAN}, "tau is nan"),
        (ILQLConfig, {"polyak": NAN}, "polyak is nan"),
        (DecodeConfig, {"beta": NAN}, "beta is nan"),
        (DecodeConfig, {"beta": math.inf}, "beta is inf"),
        (DecodeConfig, {"temperature": NAN}, "temperature is nan"),
        (DecodeConfig, {"temperature": 0.0}, "temperature is 0.0"),
        (DecodeConfig, {"top_p": NAN}, "top_p is nan"),
        (DecodeConfig, {"batch_size": 0}, "batch_size is 0"),
        (TrunkConfig, {"lora_r": 0}, "lora_r is 0"),
        (DemoConfig, {"ilql_cql_scale": NAN}, "--ilql-cql-scale is nan"),
        (DemoConfig, {"dtype": "float64"}, "--dtype is 'float64'"),
        (DemoConfig, {"batch_size": 0}, "--batch-size is 0"),
        (DemoConfig, {"train_prompts": -1}, "--train-prompts is -1"),
    ],
)
def test_invalid_values_are_rejected(cls, kwargs, needle):
    with pytest.raises(QVLMError, match="^" + re.escape(needle) + "; "):
        cls(**kwargs)


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
