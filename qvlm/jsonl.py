"""JSON Lines files: samples (``qvlm sample`` writes them, the offline trainers read them), prompts, and any
other rows, read line by line with every error naming the file, the line and the field, and written
atomically. The sample format is :class:`qvlm.mdp.Sample`'s (see :mod:`qvlm.mdp`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

from qvlm.apps.demo_prompts import load_demo_prompts
from qvlm.errors import QVLMError
from qvlm.fileio import MAX_LINE_BYTES, atomic_write_text, read_lines
from qvlm.mdp import Sample

__all__ = [
    "json_line",
    "read_jsonl",
    "write_jsonl",
    "sample_from_dict",
    "read_samples",
    "write_samples",
    "read_prompts",
]


# a samples line holds response_ids too: a larger cap than a prompt line's
MAX_SAMPLE_LINE_BYTES = 16 * MAX_LINE_BYTES


def _fail(where: str, what: str) -> QVLMError:
    return QVLMError(f"{where}: {what}")


def json_line(line: str, where: str):
    """One JSON value from ``line``; an error names ``where`` (file:line)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise _fail(where, f"not valid JSON ({err.msg} at column {err.colno})") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise _fail(where, f"not valid JSON ({err})") from None


def _number(value, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f'field "{name}" must be a number, got {type(value).__name__} {str(value)[:40]!r}')
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        shown = value if isinstance(value, float) else f"an integer of {len(str(abs(value)))} digits"
        raise _fail(where, f'field "{name}" is {shown}; rewards must be finite numbers (within float range)')
    return number


def sample_from_dict(obj: dict, where: str) -> Sample:
    """Validate one decoded JSON object; errors name ``where`` (file:line) and the field."""
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "response"):
        if key not in obj:
            raise _fail(where, f'missing field "{key}"; each line needs "prompt", "response", "reward"')
        if not isinstance(obj[key], str):
            raise _fail(where, f'field "{key}" must be a string, got {type(obj[key]).__name__}')
    if not obj["prompt"].strip():
        raise _fail(where, 'field "prompt" is empty; give every sample a non-empty prompt')
    if "reward" not in obj and "token_rewards" not in obj:
        raise _fail(where, 'missing field "reward" (a number); add it or give "token_rewards"')
    reward = _number(obj.get("reward", 0.0), where, "reward")
    token_rewards = obj.get("token_rewards")
    if token_rewards is not None:
        if not isinstance(token_rewards, list):
            raise _fail(where, 'field "token_rewards" must be a list of numbers')
        token_rewards = [_number(r, where, f"token_rewards[{i}]") for i, r in enumerate(token_rewards)]
    finished = obj.get("finished", True)
    if not isinstance(finished, bool):
        raise _fail(where, 'field "finished" must be true or false')
    terminal = obj.get("terminal", False)
    if not isinstance(terminal, bool):
        raise _fail(where, 'field "terminal" must be true or false')
    response_ids = obj.get("response_ids")
    if response_ids is not None and (
        not isinstance(response_ids, list)
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in response_ids)
    ):
        raise _fail(where, 'field "response_ids" must be a list of token ids (non-negative integers)')
    known = {"prompt", "response", "reward", "token_rewards", "finished", "terminal", "response_ids"}
    meta = {k: v for k, v in obj.items() if k not in known}
    return Sample(obj["prompt"], obj["response"], reward, token_rewards, finished, meta, terminal, response_ids, where)


def read_samples(path: str | Path) -> list[Sample]:
    """Read and validate a samples JSONL file. Blank lines are skipped.

    Raises :class:`QVLMError` naming the file, line and field of the first problem.
    """
    path = Path(path)
    if not path.is_file():
        raise QVLMError(f"{path}: no such file; create it with `qvlm sample` or write JSONL lines")
    samples = [sample_from_dict(obj, where) for where, obj in read_jsonl(path, MAX_SAMPLE_LINE_BYTES)]
    if not samples:
        raise QVLMError(f"{path}: no samples; the file is empty")
    return samples


def write_samples(path: str | Path, samples: Iterable[Sample]) -> None:
    """Write samples as JSONL atomically."""
    write_jsonl(path, (s.to_json() for s in samples))


def read_jsonl(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, Any]]:
    """``(file:line, value)`` of each non-blank line of a JSONL file, decoded (errors name the line)."""
    for lineno, line in read_lines(path, max_line_bytes):
        if line.strip():
            where = f"{path}:{lineno}"
            yield where, json_line(line, where)


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """Write ``rows`` as JSON Lines (UTF-8, not ASCII-escaped), atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.jsonl`` file (field ``"prompt"``) or a text file (one per line).

    Blank lines are skipped; an empty prompt or a malformed line raises :class:`QVLMError` naming
    the line.
    """
    if str(path).startswith("demo:"):  # the prompts shipped with qvlm: demo:train, demo:eval, demo:all
        split = str(path)[len("demo:") :]
        return load_demo_prompts(None if split == "all" else split)
    path = Path(path)
    if not path.is_file():
        raise QVLMError(
            f"{path}: no such prompt file; give a .txt (one prompt per line) or .jsonl file, "
            "or demo:train / demo:eval for the prompts shipped with qvlm"
        )
    prompts = []
    for lineno, line in read_lines(path, MAX_LINE_BYTES):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if path.suffix == ".jsonl":
            obj = json_line(line, where)
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise _fail(where, 'expected an object with a string field "prompt"')
            text = obj["prompt"]
        else:
            text = line
        if not text.strip():
            raise _fail(where, "empty prompt; remove the line or give it text")
        prompts.append(text)
    if not prompts:
        raise QVLMError(f"{path}: no prompts in the file")
    return prompts
