"""Shared CLI plumbing: config dataclasses become flags (help text from each field's comment)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re

from qvlm.configs import DEFAULT_MODEL

_FIELD_LINE = re.compile(r"^\s+(\w+):\s*[^=]+=\s*(.+?)\s*#\s*(.+)$")


def field_docs(cls) -> dict[str, str]:
    """``{field: comment}`` from lines ``name: type = default  # comment`` of a dataclass's source."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD_LINE.match(line)
        if m:
            docs[m.group(1)] = m.group(3)
    return docs


def add_config_args(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = (), title: str | None = None):
    """One ``--flag`` per dataclass field, with its default and one-line description as help."""
    group = parser.add_argument_group(title or f"{cls.__name__} (defaults shown)")
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        if isinstance(default, bool):
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            kind = type(default) if default is not None else str
            if f.name == "seed" and default is None:
                kind = int
            group.add_argument(flag, dest=f.name, type=kind, default=default, metavar=f.name.upper(), help=help_text)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model: a local directory, a cached hub id, a .gguf file, or {DEFAULT_MODEL!r} "
        "(the embedded default; converted to safetensors once) (default: %(default)s)",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the model's files (off by default)"
    )


def load(args):
    from transformers.utils import logging as hf_logging

    from qvlm.loading import load_model

    hf_logging.disable_progress_bar()  # transformers' per-file bars; qvlm shows its own per phase

    return load_model(args.model, trust_remote_code=args.trust_remote_code)


def parse_floats(text: str, name: str) -> list[float]:
    from qvlm.errors import QVLMError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise QVLMError(f"{name} must be comma-separated numbers, got {text!r}") from None
