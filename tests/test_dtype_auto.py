"""``--dtype auto`` (issue 23): bfloat16 only where the device computes it natively, float32 elsewhere.

The choice is a pure function of (device, CPU flags or GPU capability): both outcomes are tested
for every device kind, and end to end through ``load_model`` with the flags forced either way.
"""

from __future__ import annotations

import argparse

import pytest
import torch

import qvlm.loading
from qvlm.cli import build_parser
from qvlm.configs import DemoConfig
from qvlm.errors import QVLMError
from qvlm.loading import auto_dtype, cpu_flags, load_model, resolve_dtype

AVX2_EPYC = {"fpu", "sse2", "avx", "avx2", "fma"}  # the AVX2-only machine of issue 23


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (AVX2_EPYC, torch.float32),
        (AVX2_EPYC | {"avx512f", "avx512bw"}, torch.float32),  # AVX-512 without BF16: emulated
        (AVX2_EPYC | {"avx512f", "avx512_bf16"}, torch.bfloat16),  # Cooper Lake, Zen 4
        (AVX2_EPYC | {"amx_tile", "amx_bf16"}, torch.bfloat16),  # Sapphire Rapids
        (set(), torch.float32),
    ],
)
def test_cpu_choice_follows_the_native_bf16_flags(flags, expected):
    assert auto_dtype("cpu", flags) is expected


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 5), torch.float32), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), (None, torch.float32)],
)
def test_cuda_choice_follows_the_compute_capability(capability, expected):
    assert auto_dtype("cuda", cuda_capability=capability) is expected


def test_cpu_flags_on_a_gpu_do_not_count():
    assert auto_dtype("cuda", {"amx_bf16"}, cuda_capability=(7, 0)) is torch.float32
    assert auto_dtype("mps", {"amx_bf16"}) is torch.float32


def test_cpu_flags_read_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 amx_bf16\nbogomips\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16"}


@pytest.mark.parametrize(("amx", "avx512_bf16", "expected"), [(False, False, set()), (True, False, {"amx_bf16"})])
def test_cpu_flags_fall_back_to_torch_probes(tmp_path, monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert cpu_flags(tmp_path / "missing") == expected


@pytest.mark.parametrize(("flags", "expected"), [(frozenset(AVX2_EPYC), torch.float32), ({"amx_bf16"}, torch.bfloat16)])
def test_resolve_and_load_auto(monkeypatch, tiny_dir, flags, expected):
    monkeypatch.setattr(qvlm.loading, "cpu_flags", lambda: frozenset(flags))
    assert resolve_dtype("auto", "cpu") is expected
    model, _ = load_model(str(tiny_dir), device="cpu", dtype="auto")
    assert next(model.parameters()).dtype is expected


def test_named_dtypes_are_unchanged():
    assert resolve_dtype("float32", "cpu") is torch.float32 and resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(QVLMError, match="unknown dtype 'fp8'; use one of float32, bfloat16, float16, auto"):
        resolve_dtype("fp8")


def dtype_options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command, its --dtype action) for every (sub)command of the CLI."""
    for action in parser._actions:
        if "--dtype" in action.option_strings:
            yield " ".join(path), action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from dtype_options(sub, (*path, name))


def test_every_command_with_dtype_takes_auto_and_keeps_float32_as_default():
    found = dict(dtype_options(build_parser()))
    assert {"generate", "sample", "train ppo", "train ilql", "demo", "proxy", "eval", "inspect"} <= set(found)
    for command, action in found.items():
        assert "auto" in action.choices, command
        assert action.default == "float32", command


def test_demo_config_accepts_auto():
    assert DemoConfig(dtype="auto").dtype == "auto"
    with pytest.raises(QVLMError, match="--dtype is 'fp8'"):
        DemoConfig(dtype="fp8")
