"""Shared CLI plumbing: config dataclasses become flags, with each field's ``metadata["help"]`` as help."""

from __future__ import annotations

import argparse
import dataclasses

from qvlm.configs import DEFAULT_MODEL, DEVICES_HELP, DTYPE_CHOICES, from_flat, parse_numbers


def add_config_args(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = (), title: str | None = None):
    """One ``--flag`` per dataclass field, with its default and one-line description as help.

    The description is the field's ``metadata["help"]`` (see :func:`qvlm.configs.option`); a field
    without one is a programming error, caught here rather than shipped as an undocumented flag.
    ``metadata["choices"]`` restricts the values; ``metadata["type"]`` gives the type of a field
    whose default is ``None``. Booleans become ``--flag/--no-flag``. A nested config
    (:func:`qvlm.configs.nested`) adds the flags it exposes, named as it names them, with its own
    defaults. A field declared with ``flag=`` is that flag (``TrunkConfig.mode``: ``--trunk``).
    """
    group = parser.add_argument_group(title or f"{cls.__name__} (defaults shown)")
    for f, dest, default, help_text in _flags(cls):
        if dest in exclude:
            continue
        flag = "--" + dest.replace("_", "-")
        help_text = help_text.replace("%", "%%") + " (default: %(default)s)"
        kind = f.metadata.get("type") or type(default)
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            choices = f.metadata.get("choices")
            group.add_argument(
                flag,
                dest=dest,
                type=kind,
                default=default,
                choices=choices,
                metavar=None if choices else dest.upper(),
                help=help_text,
            )


def _flags(cls, prefix_help: str = "", defaults=None):
    """``(field, flag dest, default, help)`` of each flag of config class ``cls``, nested ones included."""
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help"):
            raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it with qvlm.configs.option")
        default = getattr(defaults, f.name) if defaults is not None else f.default
        if "nested" in f.metadata:
            inner = f.default_factory() if defaults is None else default
            flags = f.metadata["flags"]
            for g, dest, value, text in _flags(f.metadata["nested"], f.metadata["help"], inner):
                if g.name in flags:
                    yield g, flags[g.name], value, text
            continue
        help_text = f"{prefix_help}: {f.metadata['help']}" if prefix_help else f.metadata["help"]
        yield f, f.metadata.get("flag", f.name), default, help_text


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """The config ``cls`` from parsed flags (:func:`qvlm.configs.from_flat`), ``overrides`` by flag name."""
    return from_flat(cls, {**vars(args), **overrides}, strict=False)


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
    from qvlm.configs.base import number_list
    from qvlm.errors import QVLMError

    if not number_list(text):
        raise QVLMError(f"{name} must be comma-separated finite numbers, at least one (e.g. 0,1,2); got {text!r}")
    return parse_numbers(text)


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


def online_inputs(args, max_prompts: int = 0) -> tuple[list, list | None]:
    """An online trainer's prompts (the first ``max_prompts``, 0: all) and, for a reward that compares
    with references, their references; the reward spec checked and ``--out`` refused when it holds a
    run and ``--resume`` is off: all before the model loads."""
    from pathlib import Path

    from qvlm.errors import QVLMError
    from qvlm.jsonl import read_prompts
    from qvlm.rewards import check_reward, needs_reference, read_references
    from qvlm.train.checkpoint import has_checkpoint

    prompts = read_prompts(args.prompts)
    if max_prompts > 0:
        prompts = prompts[:max_prompts]
    references = read_references(args.prompts, f"reward {args.reward}") if needs_reference(args.reward) else None
    check_reward(args.reward)  # a bad reward fails before the model loads
    if has_checkpoint(Path(args.out)) and not args.resume:
        raise QVLMError(f"{args.out} already holds a run; pass --resume to continue it or choose a new --out")
    return prompts, references


def online_reward(args, references, model, tokenizer):
    """``--reward`` as a batch reward of whole responses (a per-token reward: its sum over the response)."""
    from qvlm.rewards import as_sequence_reward, get_reward

    reward = get_reward(args.reward, references=references, tokenizer=tokenizer, device=model.device)
    return as_sequence_reward(reward, tokenizer)
