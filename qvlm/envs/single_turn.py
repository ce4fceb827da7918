"""The single-turn tasks as environments: a prompt set and any qvlm reward, one step per episode.

``reset`` draws a prompt (uniformly, from the seed; ``options={"index": i}`` picks one), ``step``
scores the response with the reward (:func:`qvlm.rewards.get_reward`: a built-in name, a Python
function, a classifier, a weighted sum) and ends the episode. Every response is a valid action.
So a single-turn task and a multi-turn one share one data path: an episode of one turn, whose
token sequence (:mod:`qvlm.envs.tokens`) is the prompt encoded as :func:`qvlm.mdp.encode_prompt`
encodes it, then the response.
"""

from __future__ import annotations

from typing import Sequence

from qvlm.envs.base import TextEnv
from qvlm.errors import QVLMError
from qvlm.rewards import as_sequence_reward, get_reward, is_token_level, score

__all__ = ["PromptEnv"]


class PromptEnv(TextEnv):
    """One prompt, one response, one reward (``qvlm/Prompts-v0``).

    ``prompts``: a list of strings, or a prompt file or ``demo:train`` / ``demo:eval`` (read with
    :func:`qvlm.mdp.read_prompts`). ``reward``: a name or a callable, as :func:`qvlm.rewards.get_reward`
    takes it; a per-token reward needs ``tokenizer`` (it is summed over the re-tokenised response).
    ``references`` serves the reference rewards (``match``, ``bleu``, ...): ``{prompt: reference}``;
    with a prompt file they default to its ``reference`` field.
    """

    accepts_any_text = True

    def __init__(
        self,
        prompts: Sequence[str] | str = "demo:train",
        reward="vader",
        tokenizer=None,
        references: dict | None = None,
    ):
        super().__init__(any_unicode=True)  # prompts are anyone's text
        if isinstance(prompts, str):
            from qvlm.jsonl import read_prompts
            from qvlm.rewards import needs_reference, read_references

            if references is None and needs_reference(reward):  # bleu, match, ...: the file's "reference" field
                references = read_references(prompts, f"reward {reward}")
            prompts = read_prompts(prompts)
        self.prompts = list(prompts)
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise QVLMError("PromptEnv needs a non-empty list of non-empty prompt strings")
        fn = get_reward(reward, references=references, tokenizer=tokenizer)
        if is_token_level(fn):
            if tokenizer is None:
                raise QVLMError(f"reward {reward!r} is per token; give PromptEnv a tokenizer to score responses")
            fn = as_sequence_reward(fn, tokenizer)
        self.reward_fn, self.reward_name = fn, reward if isinstance(reward, str) else "reward"
        self.prompt = ""

    def _reset(self, options: dict) -> tuple[str, dict]:
        index = options.get("index")
        if index is None:
            index = int(self.np_random.integers(len(self.prompts)))
        elif not (isinstance(index, int) and 0 <= index < len(self.prompts)):
            raise QVLMError(f"options['index'] is {index!r}; give a prompt index from 0 to {len(self.prompts) - 1}")
        self.prompt = self.prompts[index]
        return self.prompt, {"index": index}

    def _step(self, action: str) -> tuple[str, float, bool, dict]:
        (reward,) = score(self.reward_fn, [self.prompt], [action], name=f"reward {self.reward_name}")
        return "", reward, True, {"invalid_action": False}
