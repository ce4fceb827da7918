"""Limits on the work one command may ask for, checked before any model loads (issue 25).

A typo such as ``--best-of 100000000`` or ``--max-new-tokens 1000000000`` must end in one line, not in
an allocator's traceback minutes later. Responses (and draws, samples, candidate pairs) per run are
bounded by :data:`qvlm.cli._common.MAX_RESPONSES` through :func:`qvlm.cli._common.check_count`; new
tokens per response by :data:`MAX_NEW_TOKENS` (once the model is loaded, its own context is checked
exactly).
"""

from __future__ import annotations

from qvlm.cli._common import MAX_RESPONSES, check_count
from qvlm.errors import QVLMError

__all__ = ["MAX_NEW_TOKENS", "MAX_WIDTH", "check_tokens", "check_width", "check_total", "check_count", "MAX_RESPONSES"]

# longer than the context of any model qvlm runs: a larger --max-new-tokens is a typo
MAX_NEW_TOKENS = 1_000_000
# wider than the hidden size of any model qvlm runs (a layer this wide next to a vocabulary-sized one
# already holds billions of weights): a larger --head-hidden or --lora-r is a typo
MAX_WIDTH = 65_536


def check_tokens(n: int, flag: str = "--max-new-tokens") -> None:
    """Refuse a response length below 1 or above :data:`MAX_NEW_TOKENS`."""
    if n < 1:
        raise QVLMError(f"{flag} is {n}; it must be at least 1")
    if n > MAX_NEW_TOKENS:
        raise QVLMError(
            f"{flag} is {n:,}, over the limit of {MAX_NEW_TOKENS:,} tokens per response (longer than any model's "
            "context); ask for fewer"
        )


def check_width(n: int, flag: str, zero: str = "") -> None:
    """Refuse a layer width (``--head-hidden``, ``--lora-r``) below 0 (below 1 unless ``zero`` says
    what 0 means) or above :data:`MAX_WIDTH`: its weights are allocated at once."""
    low = 0 if zero else 1
    if n < low:
        raise QVLMError(f"{flag} is {n}; it must be >= {low}" + (f" ({zero})" if zero else ""))
    if n > MAX_WIDTH:
        raise QVLMError(
            f"{flag} is {n:,}, over the limit of {MAX_WIDTH:,} (wider than any model's hidden size; its weights "
            "would be allocated at once); ask for less"
        )


def check_total(total: int, how: str, what: str = "responses per run", advice: str = "ask for fewer") -> None:
    """Refuse ``total`` ``what`` (computed as ``how`` says, e.g. ``"--iterations 5 x --prompts-per-iter 8
    x --responses-per-prompt 4"``) above :data:`MAX_RESPONSES`."""
    if total > MAX_RESPONSES:
        raise QVLMError(f"{how} = {total:,} {what}, over the limit of {MAX_RESPONSES:,}; {advice}")


def check_ppo_stages(iterations: str, ppo) -> list[int]:
    """An app's ``--ppo-iterations`` stages, refused when the last asks for more responses than the limit
    (``ppo``: the app's nested PPOConfig)."""
    from qvlm.apps.runs import parse_iterations

    stages = parse_iterations(iterations)
    if stages:
        check_total(
            stages[-1] * ppo.prompts_per_iter * ppo.responses_per_prompt,
            f"--ppo-iterations {stages[-1]:,} x --ppo-prompts-per-iter {ppo.prompts_per_iter:,} x "
            f"{ppo.responses_per_prompt} responses",
        )
    return stages
