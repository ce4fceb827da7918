"""Rewards against a reference text per prompt (the ``reference`` field of a .jsonl prompts file):
``match`` (per token: 1 when the generated token equals the reference's token at that position, else
0, the source documents' translation example), ``bleu`` and ``chrf`` (sacrebleu's sentence scores /
100, Papineni et al. 2002, Popovic 2015) and ``rougeL`` (rouge-score's ROUGE-L F-measure, Lin 2004).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from qvlm.errors import QVLMError
from qvlm.rewards.base import RewardFn, token_level

__all__ = ["REFERENCE_REWARDS", "read_references", "reference_reward", "match_rewards"]

REFERENCE_REWARDS = ("match", "bleu", "chrf", "rougeL")


def read_references(path: str | Path, needed_by: str = "a reference reward") -> dict[str, str]:
    """``{prompt: reference}`` from a .jsonl prompts file where every line has ``"prompt"`` and ``"reference"``.

    A missing or non-string reference raises :class:`QVLMError` naming the file and line.
    """
    text = str(path)
    if text.startswith("demo:") or Path(text).suffix != ".jsonl":
        raise QVLMError(
            f"{text}: {needed_by} compares each response with its prompt's reference; give a .jsonl prompts "
            'file with lines {"prompt": ..., "reference": ...}'
        )
    path = Path(path)
    if not path.is_file():
        raise QVLMError(f"{path}: no such prompt file")
    from qvlm.jsonl import read_jsonl  # here: qvlm --help imports this module, and qvlm.jsonl imports torch

    refs: dict[str, str] = {}
    # UTF-8, NUL bytes, overlong lines and invalid JSON: one line naming file:line (issue 25)
    for where, obj in read_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise QVLMError(f'{where}: expected an object with a string field "prompt"')
        ref = obj.get("reference")
        if not isinstance(ref, str):
            what = "no" if ref is None else f"a {type(ref).__name__} as its"
            raise QVLMError(
                f'{where}: {what} "reference" field; {needed_by} needs a reference text on every line: '
                'add "reference": "..."'
            )
        if refs.get(obj["prompt"], ref) != ref:
            raise QVLMError(f"{where}: this prompt appears earlier with another reference; give each prompt one")
        refs[obj["prompt"]] = ref
    return refs


def _lookup(references: Mapping[str, str], prompts: Sequence[str], name: str) -> list[str]:
    missing = [p for p in prompts if p not in references]
    if missing:
        raise QVLMError(f"reward {name}: no reference for the prompt {missing[0][:60]!r}; add it to the prompts file")
    return [references[p] for p in prompts]


def match_rewards(tokens: Sequence[str], reference_tokens: Sequence[str]) -> list[float]:
    """1.0 where ``tokens[t] == reference_tokens[t]``, else 0.0 (also past the reference's end). Shape: (T,)."""
    return [float(t < len(reference_tokens) and tok == reference_tokens[t]) for t, tok in enumerate(tokens)]


def _match(references: Mapping[str, str], tokenizer) -> RewardFn:
    if tokenizer is None:
        raise QVLMError("reward match compares tokens: it needs the policy's tokenizer (get_reward(..., tokenizer=))")

    @token_level
    def match(prompts: Sequence[str], response_tokens: Sequence[Sequence[str]]) -> list[list[float]]:
        refs = _lookup(references, prompts, "match")
        ref_tokens = [
            [tokenizer.decode([i]) for i in tokenizer(r, add_special_tokens=False)["input_ids"]] for r in refs
        ]
        return [match_rewards(toks, ref) for toks, ref in zip(response_tokens, ref_tokens)]

    return match


def _sacrebleu(kind: str, references: Mapping[str, str]) -> RewardFn:
    try:
        import sacrebleu
    except ImportError:
        raise QVLMError(f"the {kind} reward needs sacrebleu: pip install 'qvlm[rewards]'") from None
    metric = sacrebleu.sentence_bleu if kind == "bleu" else sacrebleu.sentence_chrf

    def reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        refs = _lookup(references, prompts, kind)
        return [metric(r, [ref]).score / 100.0 for r, ref in zip(responses, refs)]

    reward.__name__ = kind
    return reward


def _rouge_l(references: Mapping[str, str]) -> RewardFn:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise QVLMError("the rougeL reward needs rouge-score: pip install 'qvlm[rewards]'") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"])

    def rougeL(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        refs = _lookup(references, prompts, "rougeL")
        return [scorer.score(ref, r)["rougeL"].fmeasure for r, ref in zip(responses, refs)]

    return rougeL


def reference_reward(name: str, references: Mapping[str, str] | None, tokenizer=None) -> RewardFn:
    """The reference reward ``name`` (one of :data:`REFERENCE_REWARDS`) against ``{prompt: reference}``."""
    if references is None:
        raise QVLMError(
            f"reward {name} compares each response with a reference: give a .jsonl prompts file whose lines "
            'have "prompt" and "reference"'
        )
    if name == "match":
        return _match(references, tokenizer)
    if name in ("bleu", "chrf"):
        return _sacrebleu(name, references)
    return _rouge_l(references)
