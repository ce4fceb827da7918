"""Tiny random causal LMs and a character tokenizer, built in code: no files, no network. For tests,
examples and benchmarks that need a model of a real architecture but not its weights."""

from __future__ import annotations

import os
import random
import socket
from typing import Callable

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from qvlm.errors import QVLMError

__all__ = [
    "tiny_llama_config",
    "tiny_gpt2_config",
    "char_tokenizer",
    "tiny_model",
    "save_tiny_backbone",
    "separable_prefs",
    "tiny_demo_config",
    "free_port",
    "spawn_processes",
]

_CHARS = " abcdefghijklmnopqrstuvwxyz.,!?'"
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def char_tokenizer(chars: str = _CHARS) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer built in code (no files, no network).

    Ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, then one id per character. Upper case
    is folded to lower case; other characters map to ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )


def tiny_llama_config(vocab_size: int, hidden_size: int = 32, num_layers: int = 2) -> LlamaConfig:
    """A Llama-style config small enough for unit tests (thousands of parameters)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
    )


def tiny_gpt2_config(vocab_size: int, hidden_size: int = 32, num_layers: int = 2) -> GPT2Config:
    """A GPT-2-style config small enough for unit tests."""
    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=4,
        n_positions=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def tiny_model(
    arch: str = "llama", seed: int = 0, hidden_size: int = 32, num_layers: int = 2
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random tiny causal LM with the character tokenizer, seeded, in eval mode."""
    tokenizer = char_tokenizer()
    configs = {"llama": tiny_llama_config, "gpt2": tiny_gpt2_config}
    if arch not in configs:
        raise QVLMError(f"unknown tiny architecture {arch!r}; use one of {sorted(configs)}")
    config = configs[arch](len(tokenizer), hidden_size, num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer


def save_tiny_backbone(path, arch: str):
    """A tiny causal LM (llama, gpt2: :func:`tiny_model`) or encoder (bert, without dropout) with the
    character tokenizer, saved to ``path``, for ``qvlm train rm --backbone``; returns ``path``."""
    from qvlm.loading import save_model

    if arch in ("llama", "gpt2"):
        model, tok = tiny_model(arch, seed=0)
    else:
        tok = char_tokenizer()
        config = BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=0,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        torch.manual_seed(0)
        model = AutoModel.from_config(config)
    save_model(model, tok, path)
    return path


def separable_prefs(n: int, seed: int = 0) -> list[dict]:
    """``n`` preference pairs ``{"prompt", "chosen", "rejected"}`` of random words: chosen responses use
    the letters a-g, rejected ones n-t, so a reward model can separate them by their letters alone."""
    rng = random.Random(seed)

    def word(chars: str) -> str:
        return "".join(rng.choice(chars) for _ in range(rng.randint(3, 8)))

    return [{"prompt": word("xyz"), "chosen": word("abcdefg"), "rejected": word("nopqrst")} for _ in range(n)]


# the demo's settings for a tiny model and the toy reward count:e, in seconds (tests of qvlm demo)
TINY_DEMO = dict(
    reward="count:e",
    quick=True,
    train_prompts=6,
    eval_prompts=5,
    samples_per_prompt=2,
    max_new_tokens=6,
    ilql_epochs=1,
    value_epochs=1,
    betas="1,4",
    mc_betas="2",
    best_of=4,
    val_prompts=4,
)


def tiny_demo_config(model_dir, **overrides):
    """A :class:`~qvlm.configs.DemoConfig` of :data:`TINY_DEMO` on the model saved in ``model_dir``."""
    from qvlm.configs import DemoConfig

    return DemoConfig(model=str(model_dir), **{**TINY_DEMO, **overrides})


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a test's process group or launcher."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def spawn_processes(fn: Callable, *args, world: int = 2) -> None:
    """Run ``fn(*args)`` in ``world`` processes on this machine, as torchrun would start them (RANK,
    WORLD_SIZE, MASTER_ADDR/PORT set; one thread each); the process group, if ``fn`` starts one, is
    destroyed after. ``fn`` must be a module-level function (it is pickled). Waits for all of them."""
    import torch.multiprocessing as mp

    mp.spawn(_process, args=(world, free_port(), fn, args), nprocs=world, join=True)
