"""Samples -> token batches of the token-level MDP (shared/DESIGN.md, "Conventions").

A sample is ``{"prompt": str, "response": str, "reward": float}`` with optional
``"token_rewards"`` (one float per response token, EOS excluded), ``"finished"`` (bool,
default true: the model ended the response itself, so EOS is appended; false: the response was
cut by the length limit, which is truncation, not termination) and ``"terminal"`` (bool, default
false; only with ``"finished": false``): the episode ended at the cut although no EOS was written.
That is a fixed-horizon task, whose reward scores exactly these tokens (``qvlm demo``, or
``qvlm sample --fixed-horizon``): the last response token is terminal and nothing bootstraps past it.
``"response_ids"`` (ints, EOS excluded) are the exact tokens sampled; when given, they are the
actions instead of a re-tokenisation of the text (sampled text often re-tokenises differently).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from qvlm.errors import QVLMError
from qvlm.fileio import MAX_LINE_BYTES, atomic_write_text, read_lines

__all__ = [
    "Sample",
    "TokenBatch",
    "read_samples",
    "write_samples",
    "encode_prompt",
    "encode_samples",
    "collate",
    "read_prompts",
]


@dataclass
class Sample:
    """One scored response. ``token_rewards`` has one float per response token (EOS excluded)."""

    prompt: str
    response: str
    reward: float = 0.0
    token_rewards: list[float] | None = None
    finished: bool = True
    meta: dict = field(default_factory=dict)
    terminal: bool = False  # finished=False but the episode ended there anyway (a fixed horizon)
    response_ids: list[int] | None = None  # the exact tokens sampled (EOS excluded), if known
    where: str = field(default="", compare=False, repr=False)  # "file:line" it was read from, for errors

    def label(self, index: int) -> str:
        """Where errors about this sample point: its ``file:line``, else ``sample N`` (1-based)."""
        return self.where or f"sample {index + 1}"

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None and k not in ("meta", "where")}
        if not self.terminal:
            out.pop("terminal")
        out = {k: out[k] for k in sorted(out, key=lambda k: k == "response_ids")}  # the long field last
        out.update(self.meta)
        return out


# a samples line holds response_ids too: a larger cap than a prompt line's
MAX_SAMPLE_LINE_BYTES = 16 * MAX_LINE_BYTES


def _fail(where: str, what: str) -> QVLMError:
    return QVLMError(f"{where}: {what}")


def _json_line(line: str, where: str):
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
    samples = []
    for lineno, line in read_lines(path, MAX_SAMPLE_LINE_BYTES):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        obj = _json_line(line, where)
        samples.append(sample_from_dict(obj, where))
    if not samples:
        raise QVLMError(f"{path}: no samples; the file is empty")
    return samples


def write_samples(path: str | Path, samples: Iterable[Sample]) -> None:
    """Write samples as JSONL atomically."""
    atomic_write_text(path, "".join(json.dumps(s.to_json(), ensure_ascii=False) + "\n" for s in samples))


# a token covers at most this many characters in the check below (English BPE: about 4)
CHARS_PER_TOKEN_BOUND = 8


def check_fits(tokenizer: PreTrainedTokenizerBase, text: str, budget: int, what: str, advice: str = "") -> None:
    """Refuse a text that cannot fit in ``budget`` tokens without tokenising all of it.

    A text longer than ``CHARS_PER_TOKEN_BOUND * budget`` characters is judged by its prefix of that
    many characters: when the prefix alone has more than ``budget`` tokens, raise :class:`QVLMError`.
    The cost is bounded by the context, not by the text (a 50 MB line costs a context's worth). A
    text that passes is tokenised in full by its caller, which checks it exactly.
    """
    cap = CHARS_PER_TOKEN_BOUND * max(budget, 1)
    if len(text) <= cap:
        return
    n = len(tokenizer(text[:cap], add_special_tokens=False)["input_ids"])
    if n > budget:
        raise QVLMError(
            f"{what} is too long: its first {cap:,} of {len(text):,} characters alone are {n} tokens, over the "
            f"{budget} that fit in the model's context; shorten it" + (f" or {advice}" if advice else "")
        )


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool | None = None) -> list[int]:
    """Token ids of a prompt: through the chat template when the tokenizer has one (``chat=None``).

    Every stage (sampling, training, decoding) encodes prompts with this function, so the states
    the heads see in training are the states they score in decoding.
    """
    if not prompt.strip():
        raise QVLMError("empty prompt; every prompt needs some text")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = out["input_ids"] if not isinstance(out, list) else out
        return list(ids)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


@dataclass
class TokenBatch:
    """A right-padded batch of prompt + response sequences and their per-step MDP tensors.

    ``input_ids, attention_mask (B, L)``: prompt then response, then padding.
    ``state_positions (B, T)``: position of the last token of ``s_t`` (DESIGN.md: ``m + t - 2``
    for 1-based t), whose hidden state gives ``Q(s_t, .)``, ``V(s_t)`` and the LM logits for
    ``y_t``; ``state_positions + 1`` gives ``V(s_{t+1})``.
    ``actions, response_mask, rewards, done (B, T)``: ``y_t``, 1 on real steps, ``r_t``,
    1 where ``s_{t+1}`` is terminal. ``truncated (B,)``: cut by the length limit (bootstrap).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    state_positions: torch.Tensor
    actions: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor
    done: torch.Tensor
    truncated: torch.Tensor
    index: torch.Tensor  # (B,) sample indices, for feature caches

    def to(self, device) -> "TokenBatch":
        return TokenBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    @property
    def next_positions(self) -> torch.Tensor:
        return self.state_positions + 1


@dataclass
class EncodedSample:
    prompt_ids: list[int]
    response_ids: list[int]
    rewards: list[float]
    terminated: bool
    truncated: bool


def encode_samples(
    samples: Sequence[Sample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    chat: bool | None = None,
) -> list[EncodedSample]:
    """Tokenise samples; place rewards on steps; cut at ``max_length`` total tokens.

    The scalar reward goes on the last response step that is kept; ``token_rewards`` add per step.
    A finished sample gets EOS appended and is done; a ``terminal`` one is done at its last token
    (a fixed horizon: no EOS). A response cut here is marked truncated (not done), so its last
    state bootstraps. A prompt that leaves no room for a response raises :class:`QVLMError`.
    """
    encoded = []
    eos = tokenizer.eos_token_id
    for i, s in enumerate(samples):
        check_fits(tokenizer, s.prompt, max_length - 1, f"{s.label(i)}: the prompt", "raise max_length")
        prompt_ids = encode_prompt(tokenizer, s.prompt, chat)
        if s.response_ids is not None:
            response_ids = list(s.response_ids)
            if tokenizer.decode(response_ids, skip_special_tokens=True) != s.response:
                raise QVLMError(
                    f"{s.label(i)}: response_ids do not decode to the response text under this tokenizer; "
                    "they were sampled with another model's tokenizer, or drop the field to re-tokenise"
                )
        else:
            response_ids = tokenizer(s.response, add_special_tokens=False)["input_ids"]
        n_text = len(response_ids)
        if s.token_rewards is not None and len(s.token_rewards) != n_text:
            raise QVLMError(
                f"{s.label(i)}: token_rewards has {len(s.token_rewards)} values but the response has "
                f"{n_text} tokens under this tokenizer; give one value per response token"
            )
        step_rewards = list(s.token_rewards) if s.token_rewards is not None else [0.0] * n_text
        terminated = s.finished and eos is not None
        if terminated:
            response_ids = response_ids + [eos]
            step_rewards.append(0.0)
        elif s.terminal:
            terminated = True  # the horizon ended the episode: done at the last token, no EOS
        if not response_ids:
            raise QVLMError(f"{s.label(i)}: empty response with finished=false; drop it or mark it finished")
        room = max_length - len(prompt_ids)
        if room < 1:
            raise QVLMError(
                f"{s.label(i)}: the prompt has {len(prompt_ids)} tokens, which leaves no room for a "
                f"response within max_length={max_length}; shorten the prompt or raise max_length"
            )
        truncated = not terminated
        if len(response_ids) > room:
            response_ids, step_rewards = response_ids[:room], step_rewards[:room]
            terminated, truncated = False, True
        step_rewards[-1] += s.reward
        encoded.append(EncodedSample(prompt_ids, response_ids, step_rewards, terminated, truncated))
    return encoded


def collate(items: Sequence[EncodedSample], pad_token_id: int, index: Sequence[int] | None = None) -> TokenBatch:
    """Right-pad encoded samples into a :class:`TokenBatch`."""
    B = len(items)
    L = max(len(e.prompt_ids) + len(e.response_ids) for e in items)
    T = max(len(e.response_ids) for e in items)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    state_positions = torch.zeros((B, T), dtype=torch.long)
    actions = torch.full((B, T), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((B, T))
    rewards = torch.zeros((B, T))
    done = torch.zeros((B, T))
    truncated = torch.zeros(B, dtype=torch.bool)
    for b, e in enumerate(items):
        m, n = len(e.prompt_ids), len(e.response_ids)
        input_ids[b, : m + n] = torch.tensor(e.prompt_ids + e.response_ids)
        attention_mask[b, : m + n] = 1
        state_positions[b, :n] = torch.arange(m - 1, m - 1 + n)  # (n,)
        actions[b, :n] = torch.tensor(e.response_ids)
        response_mask[b, :n] = 1
        rewards[b, :n] = torch.tensor(e.rewards)
        done[b, n - 1] = float(e.terminated)
        truncated[b] = e.truncated
    idx = torch.tensor(list(index) if index is not None else range(B), dtype=torch.long)
    return TokenBatch(input_ids, attention_mask, state_positions, actions, response_mask, rewards, done, truncated, idx)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.jsonl`` file (field ``"prompt"``) or a text file (one per line).

    Blank lines are skipped; an empty prompt or a malformed line raises :class:`QVLMError` naming
    the line.
    """
    if str(path).startswith("demo:"):  # the prompts shipped with qvlm: demo:train, demo:eval, demo:all
        from qvlm.apps.demo_prompts import load_demo_prompts

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
            obj = _json_line(line, where)
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
