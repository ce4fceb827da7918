"""``hf:PATH[:LABEL[:logit]]``: a local ``AutoModelForSequenceClassification`` directory as a reward.

With one output (a reward model, e.g. from ``qvlm train rm``) the reward is that logit (``hf:PATH:0``:
its sigmoid). With several labels, ``LABEL`` (a name from the config's ``id2label`` or an index)
chooses one: its probability (softmax over the labels), or its logit with the suffix ``:logit``. The classifier reads the response
alone, or the pair (prompt, response) when its config says ``"qvlm_input": "pair"`` (reward models
trained on preferences by ``qvlm train rm``). Scores are computed in batches on the run's device.

Pooling is Hugging Face's (an encoder's CLS through its pooler, a causal LM's last non-pad token) unless
the config says ``"qvlm_pooling": "mean"`` (``qvlm train rm --pooling mean``): then the last hidden states
are averaged over the real tokens and the model's own linear head (``classifier`` or ``score``) reads the
mean. The saved weights keep Hugging Face's names, so plain ``AutoModelForSequenceClassification`` loads
such a directory too, but it pools the first token and gives other scores: score it through qvlm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from qvlm.errors import QVLMError
from qvlm.loading import check_finite_weights, ensure_pad_token, resolve_device

__all__ = [
    "HFClassifierReward",
    "check_classifier_dir",
    "parse_hf_spec",
    "encode_texts",
    "classifier_logits",
    "linear_head",
    "WEIGHT_FILES",
    "MEAN_LOGITS",
]

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# the forward method of a classifier sharded with FSDP2 that mean-pools (qvlm train rm --fsdp)
MEAN_LOGITS = "qvlm_mean_logits"


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:PATH[:LABEL[:logit|prob]]`` -> ``(path, label or None, "logit" | "prob")``."""
    rest = spec[len("hf:") :]
    mode = "prob"
    head, sep, last = rest.rpartition(":")
    if sep and last in ("logit", "prob") and not Path(rest).exists():
        rest, mode = head, last
    label = None
    head, sep, last = rest.rpartition(":")
    if sep and not Path(rest).exists():
        rest, label = head, last
    if not rest:
        raise QVLMError(f"reward {spec}: give a classifier directory, e.g. hf:runs/rm or hf:runs/clf:positive")
    return rest, label, mode


def encode_texts(tokenizer, prompts: Sequence[str] | None, texts: Sequence[str], max_length: int, device=None):
    """Tokenize a batch for a sequence classifier: the texts alone, or (prompt, text) pairs.

    The same function serves training (``qvlm train rm``) and scoring (``hf:``), so both see the same tokens.
    """
    args = (list(prompts), list(texts)) if prompts is not None else (list(texts),)
    # right padding whatever the tokenizer's default: an encoder's CLS stays at position 0, and a causal
    # LM's positions are those of the unpadded text (its pooling finds the last non-pad token)
    enc = tokenizer(
        *args, padding=True, padding_side="right", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {k: v.to(device) for k, v in enc.items()} if device is not None else dict(enc)


def linear_head(model) -> torch.nn.Linear:
    """The classification head of a sequence classifier whose head is one linear layer (BERT-like
    encoders' ``classifier``, Llama-like causal LMs' ``score``): what mean pooling feeds."""
    for name in ("classifier", "score"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear):
            return head
    raise QVLMError(
        f"mean pooling needs a classifier whose head is one linear layer (BERT-like encoders, Llama-like "
        f"causal LMs); {type(model).__name__} has another head: use the default pooling"
    )


def classifier_logits(model, enc: dict) -> torch.Tensor:
    """``(B, num_labels)`` logits of a batch from :func:`encode_texts`: the model's own forward, or,
    when ``model.config.qvlm_pooling == "mean"``, its linear head on the mean of the last hidden states
    over the real tokens (dropout as the model applies it before its head, when it has one)."""
    if getattr(model.config, "qvlm_pooling", "default") != "mean":
        return model(**enc).logits
    # a classifier sharded with FSDP2 (qvlm train rm --fsdp) runs it as a forward of its root unit, which
    # gathers the embeddings and the head around it (qvlm.algos.reward_model.shard_classifier)
    sharded = vars(model).get(MEAN_LOGITS)
    return sharded(enc) if sharded is not None else _mean_logits(model, enc)


def _mean_logits(model, enc: dict) -> torch.Tensor:
    """The linear head on the mean of the last hidden states over the real tokens: ``(B, num_labels)``."""
    head = linear_head(model)
    hidden = model.base_model(**enc)[0]  # (B, T, H) last hidden states
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)
    dropout = getattr(model, "dropout", None)
    if isinstance(dropout, torch.nn.Dropout):
        pooled = dropout(pooled)
    return head(pooled)


def _check_dir(path: Path, spec: str) -> None:
    if not path.is_dir():
        raise QVLMError(f"reward {spec}: {path} is not a directory; give a sequence-classification model directory")
    if not (path / "config.json").is_file():
        raise QVLMError(f"reward {spec}: {path} has no config.json; save the classifier with save_pretrained")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise QVLMError(
            f"reward {spec}: {path} has no weights (model.safetensors); save the classifier with save_pretrained"
        )


def check_classifier_dir(spec: str) -> None:
    """Raise :class:`QVLMError` when ``hf:PATH...`` names no directory with a config and weights."""
    _check_dir(Path(parse_hf_spec(spec)[0]), spec)


class HFClassifierReward:
    """A sequence classifier's logit or label probability as the reward (see the module docstring)."""

    def __init__(self, spec: str, device: str | torch.device = "cpu", batch_size: int = 32, max_length: int = 512):
        path_text, label, mode = parse_hf_spec(spec)
        path = Path(path_text)
        _check_dir(path, spec)
        self.__name__ = spec
        self.device = resolve_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            raise QVLMError(
                f"reward {spec}: cannot load a sequence classifier from {path} ({reason}); its files are damaged or "
                "incomplete: restore the directory or train it again (qvlm train rm)"
            ) from None
        check_finite_weights(self.model, f"reward {spec}")  # a NaN weight: refused now, not as NaN scores later
        ensure_pad_token(self.tokenizer, str(path))
        if self.model.config.pad_token_id is None:  # causal LMs pool at the last non-pad token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.pair = getattr(self.model.config, "qvlm_input", "response") == "pair"
        if getattr(self.model.config, "qvlm_pooling", "default") == "mean":
            try:
                linear_head(self.model)
            except QVLMError as err:
                raise QVLMError(f"reward {spec}: its config asks for mean pooling, but {err}") from None
        self.batch_size, self.max_length, self.mode = batch_size, max_length, mode
        self.index = self._label_index(label, spec)

    def _label_index(self, label: str | None, spec: str) -> int:
        n = self.model.config.num_labels
        names = {str(v): int(k) for k, v in (self.model.config.id2label or {}).items()}
        if label is None:
            if n == 1:
                self.mode = "logit"
                return 0
            raise QVLMError(
                f"reward {spec}: the classifier has {n} labels ({', '.join(names)}); choose one, e.g. "
                f"hf:{parse_hf_spec(spec)[0]}:{next(iter(names), 0)}"
            )
        if label in names:
            return names[label]
        if label.isdigit() and int(label) < n:
            return int(label)
        raise QVLMError(f"reward {spec}: no label {label!r}; the classifier's labels are {', '.join(names)}")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        out = []
        for i in range(0, len(responses), self.batch_size):
            batch_prompts = list(prompts[i : i + self.batch_size]) if self.pair else None
            enc = encode_texts(
                self.tokenizer, batch_prompts, responses[i : i + self.batch_size], self.max_length, self.device
            )
            logits = classifier_logits(self.model, enc).float()  # (B, num_labels)
            if self.mode == "logit":
                values = logits[:, self.index]
            elif logits.shape[-1] == 1:  # one logit: the probability is its sigmoid
                values = logits[:, 0].sigmoid()
            else:
                values = logits.softmax(-1)[:, self.index]
            out.extend(values.tolist())
        return out
