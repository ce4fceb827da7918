"""Shared CLI plumbing: config dataclasses become flags, with each field's ``metadata["help"]`` as help."""

from __future__ import annotations

import argparse
import dataclasses

from qvlm.configs import DEFAULT_MODEL, DEVICES_HELP, DTYPE_CHOICES


def add_config_args(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = (), title: str | None = None):
    """One ``--flag`` per dataclass field, with its default and one-line description as help.

    The description is the field's ``metadata["help"]`` (see :func:`qvlm.configs.option`); a field
    without one is a programming error, caught here rather than shipped as an undocumented flag.
    ``metadata["choices"]`` restricts the values; ``metadata["type"]`` gives the type of a field
    whose default is ``None``. Booleans become ``--flag/--no-flag``.
    """
    group = parser.add_argument_group(title or f"{cls.__name__} (defaults shown)")
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if not f.metadata.get("help"):
            raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it with qvlm.configs.option")
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"].replace("%", "%%") + " (default: %(default)s)"
        kind = f.metadata.get("type") or type(f.default)
        if kind is bool:
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        else:
            choices = f.metadata.get("choices")
            group.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=f.default,
                choices=choices,
                metavar=None if choices else f.name.upper(),
                help=help_text,
            )


def config_from_args(cls, args: argparse.Namespace, **overrides):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype`` and ``--trust-remote-code``: what :func:`load` reads."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model: a local directory, a cached hub id, a .gguf file, or {DEFAULT_MODEL!r} "
        "(the embedded default; converted to safetensors once) (default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", help=f"where the model runs: {DEVICES_HELP} (default: %(default)s)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPE_CHOICES,
        help="the model's weights and the heads'; auto: bfloat16 on a GPU or a CPU with native bf16 (AMX, "
        "avx512_bf16), else float32 (default: %(default)s)",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the model's files (off by default)"
    )


def load(args):
    """``(model, tokenizer)`` from ``--model``, on ``--device`` in ``--dtype`` (checked: a missing GPU
    is a :class:`~qvlm.errors.QVLMError`, exit code 2)."""
    from transformers.utils import logging as hf_logging

    from qvlm.loading import load_model
    from qvlm.train.distributed import launcher_device

    hf_logging.disable_progress_bar()  # transformers' per-file bars; qvlm shows its own per phase
    device = args.device
    if device == "auto" and launcher_device():  # one GPU per process under accelerate launch / torchrun
        device = launcher_device()
    return load_model(args.model, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)


def parse_floats(text: str, name: str) -> list[float]:
    """Comma-separated finite numbers, at least one; anything else is a :class:`QVLMError` naming ``name``."""
    import math

    from qvlm.errors import QVLMError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise QVLMError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise QVLMError(f"{name} is empty; give comma-separated numbers, e.g. 0,1,2")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise QVLMError(f"{name} holds {bad[0]}; every value must be a finite number")
    return values


# responses one command may ask for (prompts x responses per prompt): the lists of prompts, texts and
# token ids held for them grow with this count, so a typo such as --n 1000000000 is refused up front
MAX_RESPONSES = 1_000_000


def check_count(n: int, flag: str, prompts: int = 1) -> None:  # prompts: 1 before they are read
    """Refuse ``n`` responses per prompt below 1, or ``n * prompts`` above :data:`MAX_RESPONSES`."""
    from qvlm.errors import QVLMError

    if n < 1:
        raise QVLMError(f"{flag} is {n}; ask for at least one response per prompt")
    if n > MAX_RESPONSES:
        raise QVLMError(f"{flag} is {n:,}, over the limit of {MAX_RESPONSES:,} responses per run; ask for fewer")
    if n * prompts > MAX_RESPONSES:
        raise QVLMError(
            f"{flag} {n} x {prompts} prompt(s) = {n * prompts:,} responses, over the limit of {MAX_RESPONSES:,} "
            "per run; split the prompts into several runs"
        )


def check_non_negative(value: int, flag: str, meaning: str = "") -> None:
    from qvlm.errors import QVLMError

    if value < 0:
        raise QVLMError(f"{flag} is {value}; it must be >= 0" + (f" ({meaning})" if meaning else ""))
