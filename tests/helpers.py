"""Test helpers: tiny random causal LMs and a character tokenizer built in code (no files, no network),
tiny run settings, and a launcher of several processes. Not part of the installed package: users get
models from :func:`qvlm.loading.load_model`, and the exact MDPs build their own tiny LM
(:func:`qvlm.exact.tiny_llama`)."""

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
    "TINY_PPO_PROMPTS",
    "Killed",
    "tiny_ppo_config",
    "train_tiny_ppo",
    "tiny_ppo_weights",
    "assert_same_full_ppo_run",
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
    qsharp_rounds=1,
    qsharp_prompts_per_round=2,
    qsharp_steps=4,
    qsharp_betas="2",
)


def tiny_demo_config(model_dir, **overrides):
    """A :class:`~qvlm.configs.DemoConfig` of :data:`TINY_DEMO` on the model saved in ``model_dir``."""
    from qvlm.configs import DemoConfig, from_flat

    return from_flat(DemoConfig, {"model": str(model_dir), **TINY_DEMO, **overrides})


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


# ---------------------------------------------------------------- PPO on a tiny model (distributed tests)

TINY_PPO_PROMPTS = ["hello", "abc", "the cat", "zz", "a dog", "why"]  # prompts of different lengths


class Killed(Exception):
    """Raised by a test's callback to stop a run as a kill would."""


def tiny_ppo_config(**overrides):
    """The distributed PPO tests' settings: 4 prompts x 2 responses = 8 rows an iteration, minibatches
    of 3, 3 and 2 rows (split 2/1, 2/1, 1/1 over two processes, with unequal token counts), a first
    iteration that trains the critic only, the adaptive KL controller and the k1 penalty, a checkpoint
    every iteration; ``overrides`` replace any of them."""
    from qvlm.configs import PPOConfig, TrunkConfig

    settings = dict(iterations=3, prompts_per_iter=4, responses_per_prompt=2, max_new_tokens=6, ppo_epochs=2,
                    minibatch_size=3, lr=3e-3, critic_lr=3e-3, critic_warmup=1, kl_coef=0.1, kl_target=1.0,
                    kl_horizon=10.0, chat=False, progress=False, checkpoint_every=1)  # fmt: skip
    settings.update(overrides)
    settings["trunk"] = TrunkConfig(settings.pop("trunk", "lora"), fsdp=settings.pop("fsdp", False))
    return PPOConfig(**settings)


def train_tiny_ppo(run_dir: str, resume: bool = False, kill: bool = False, **overrides) -> None:
    """PPO (shared critic, the config's trunk) on the tiny Llama with :func:`tiny_ppo_config`
    ``(**overrides)`` and the reward ``count:e`` into ``run_dir``; ``kill``: stop after iteration 1 (run
    and checkpointed) as a killed run would. The V head's initial draw differs on a resume, which must
    restore it from the checkpoint."""
    from qvlm.algos.actor_critic import ActorCritic
    from qvlm.algos.ppo import train_ppo

    cfg = tiny_ppo_config(**overrides)
    model, tok = tiny_model("llama", seed=0)
    torch.manual_seed(1 if resume else 0)
    ac = ActorCritic(model, trunk=cfg.trunk, critic="shared")

    def stop_after_iteration_1(it: int, floats: dict) -> None:
        if it == 1:
            raise Killed

    try:
        train_ppo(ac, tok, TINY_PPO_PROMPTS, "count:e", cfg, run_dir=run_dir, resume=resume,
                  callbacks=[stop_after_iteration_1] if kill else [])  # fmt: skip
    except Killed:
        pass


def tiny_ppo_weights(run_dir) -> dict[str, torch.Tensor]:
    """The trained tensors of a PPO run directory: ``policy.`` (full trunk) or ``adapter.`` (LoRA)
    weights and ``heads.``."""
    from pathlib import Path

    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if (run_dir / "policy.safetensors").is_file():
        policy = {"policy." + k: v for k, v in load_file(str(run_dir / "policy.safetensors")).items()}
    else:
        policy = {
            "adapter." + k: v for k, v in load_file(str(run_dir / "adapter" / "adapter_model.safetensors")).items()
        }
    return {**policy, **{"heads." + k: v for k, v in load_file(str(run_dir / "heads.safetensors")).items()}}


def assert_same_full_ppo_run(one, two) -> None:
    """Two ``--trunk full`` PPO runs of :func:`train_tiny_ppo` trained the same weights: every policy
    and V-head tensor agrees to 1e-5 (and the policy moved, so equal weights are not untouched ones),
    every iteration sampled the same tokens (equal rewards and lengths), the gradient norms agree to 1e-4."""
    import json
    from pathlib import Path

    import pytest

    one, two = Path(one), Path(two)
    a, b = tiny_ppo_weights(one), tiny_ppo_weights(two)
    assert a.keys() == b.keys() and "policy.lm_head.weight" in a
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    before, _ = tiny_model("llama", seed=0)
    moved = a["policy.model.layers.0.mlp.up_proj.weight"] - before.model.layers[0].mlp.up_proj.weight
    assert float(moved.abs().max()) > 1e-3
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in m2] == [0, 1, 2]
    for x, y in zip(m1, m2):
        assert y["charts/reward"] == x["charts/reward"]
        assert y["charts/response_length"] == x["charts/response_length"]
        assert y["charts/grad_norm"] == pytest.approx(x["charts/grad_norm"], rel=1e-4)
