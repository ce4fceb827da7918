"""Demo prompts packaged with qvlm: short instructions whose continuation's sentiment is left open.

The data lives in `qvlm/assets/demo_prompts.jsonl`, one JSON object per line:

    {"prompt": "Describe your neighbour's garden in one sentence.", "split": "train", "kind": "description"}

`split` is "train" (prompts to sample from and train heads on) or "eval" (held out: the report's
before/after comparison). `kind` groups prompts (review, description, message, story, opinion).
The prompts name no sentiment, so a value function can steer the continuation either way.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files

from qvlm.errors import QVLMError

SPLITS = ("train", "eval")
_RESOURCE = ("assets", "demo_prompts.jsonl")


def _parse_line(line: str, lineno: int) -> dict:
    """One validated record from one JSONL line; QVLMError names the line on any defect."""
    where = f"{'/'.join(_RESOURCE)} line {lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise QVLMError(f"{where}: not valid JSON ({exc.msg}); fix or remove the line") from exc
    if not isinstance(record, dict):
        raise QVLMError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt, split, kind = record.get("prompt"), record.get("split"), record.get("kind")
    if not isinstance(prompt, str) or not prompt.strip():
        raise QVLMError(f"{where}: 'prompt' must be a non-empty string")
    if split not in SPLITS:
        raise QVLMError(f"{where}: 'split' is {split!r}; expected one of {SPLITS}")
    if not isinstance(kind, str) or not kind.strip():
        raise QVLMError(f"{where}: 'kind' must be a non-empty string")
    return {"prompt": prompt.strip(), "split": split, "kind": kind}


@lru_cache(maxsize=1)
def _records() -> tuple[dict, ...]:
    # `/` one part at a time: a namespace package's MultiplexedPath takes one part per joinpath.
    resource = files("qvlm") / _RESOURCE[0] / _RESOURCE[1]
    text = resource.read_text(encoding="utf-8")
    records = tuple(_parse_line(line, lineno) for lineno, line in enumerate(text.splitlines(), start=1) if line.strip())
    if not records:
        raise QVLMError(f"{'/'.join(_RESOURCE)} holds no prompts; reinstall qvlm")
    return records


def load_demo_records(split: str | None = None) -> list[dict]:
    """The packaged prompt records `{"prompt", "split", "kind"}`, in file order.

    Args:
        split: "train", "eval", or None for both.

    Raises:
        QVLMError: `split` is not one of "train", "eval", None; or the packaged file is malformed.
    """
    if split is not None and split not in SPLITS:
        raise QVLMError(f"unknown prompt split {split!r}; use one of {SPLITS} or None for all")
    return [dict(r) for r in _records() if split is None or r["split"] == split]


def load_demo_prompts(split: str | None = None) -> list[str]:
    """The packaged demo prompt strings, in file order.

    Args:
        split: "train" (about 75%), "eval" (about 25%, distinct from train), or None for both.

    Raises:
        QVLMError: `split` is not one of "train", "eval", None; or the packaged file is malformed.
    """
    return [r["prompt"] for r in load_demo_records(split)]
