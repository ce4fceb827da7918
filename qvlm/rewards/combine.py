"""Weighted sums of rewards: ``vader+0.2*length``, ``0.5*bleu+0.5*chrf``, ``vader+-0.1*length``.

Terms are separated by ``+``; a term is ``[WEIGHT*]REWARD`` (a negative weight subtracts). When some
term is a token reward, the sum is one too: the sequence terms are added on each response's last token.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from qvlm.errors import QVLMError
from qvlm.rewards.base import RewardFn, is_token_level, score, score_tokens, token_level

__all__ = ["split_terms", "weighted_sum"]

_TERM = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*(\S.*?)\s*$")


def split_terms(spec: str) -> list[tuple[float, str]]:
    """``"vader+0.2*length"`` -> ``[(1.0, "vader"), (0.2, "length")]``; a single reward -> ``[(1.0, spec)]``."""
    terms = []
    for part in spec.split("+") if "+" in spec else [spec]:
        if not part.strip():
            raise QVLMError(f"reward {spec!r}: an empty term; write sums as vader+0.2*length")
        m = _TERM.match(part)
        if m and not math.isfinite(float(m.group(1))):  # 1e999 parses as inf: refused before any model loads
            raise QVLMError(
                f"reward {spec!r}: the weight {m.group(1)} of {m.group(2)} is not a finite number; write weights "
                "within float range, e.g. vader+0.2*length"
            )
        terms.append((float(m.group(1)), m.group(2)) if m else (1.0, part.strip()))
    return terms


def weighted_sum(terms: Sequence[tuple[float, RewardFn]], names: Sequence[str]) -> RewardFn:
    """``sum_k w_k r_k``: a sequence reward, or a token reward when any term is one."""
    if not any(is_token_level(r) for _, r in terms):

        def reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
            total = [0.0] * len(responses)
            for (w, r), name in zip(terms, names):
                total = [t + w * v for t, v in zip(total, score(r, prompts, responses, name=f"reward {name}"))]
            return total

        return reward

    @token_level
    def token_reward(prompts: Sequence[str], tokens: Sequence[Sequence[str]]) -> list[list[float]]:
        texts = ["".join(t) for t in tokens]
        total = [[0.0] * len(t) for t in tokens]
        for (w, r), name in zip(terms, names):
            if is_token_level(r):
                rows = score_tokens(r, prompts, tokens, name=f"reward {name}")
                total = [[a + w * b for a, b in zip(tot, row)] for tot, row in zip(total, rows)]
            else:
                for tot, v in zip(total, score(r, prompts, texts, name=f"reward {name}")):
                    if tot:  # an empty response has no token to carry the sequence reward
                        tot[-1] += w * v
        return total

    return token_reward
