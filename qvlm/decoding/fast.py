"""A fast decoding step for Llama-family models: a static KV cache and a hand-written layer.

:class:`FastDecodeStep` has :class:`qvlm.decoding.step.DecodeStep`'s interface (``prefill``,
``step``, ``select``, ``logits``), so every decoding loop can run on it
(``DecodeConfig.fast``, ``qvlm generate --fast``). What makes it fast (issue 12, item 3):

- one preallocated cache ``(layers, 2, B, kv_heads, capacity, head_dim)`` written in place, where
  Hugging Face's ``DynamicCache`` concatenates a new tensor per layer per step;
- one decoder layer written out in plain tensor ops (RMSNorm, RoPE, grouped-query SDPA, SiLU MLP)
  on fused weights built once: q/k/v in one matmul, gate/up in one matmul;
- no per-step mask or position bookkeeping beyond a boolean "slot holds a real token" map;
- optionally, the one-token step compiled with ``torch.compile`` (fixed shapes: attention over the
  whole capacity under the mask, so it compiles once per batch shape). Off by default: on this
  CPU (SmolLM2-135M, batch 8, one thread) it took 55 s to compile and then 303 ms a step against
  70 ms eager, since inductor's own matmuls at 8 rows are slower than the packed ones here; a
  GPU (CUDA graphs, ``mode="reduce-overhead"``) was not measured.

It reads the model's own modules for what varies between Llama-style models: RMSNorm epsilons,
the rotary embedding (``rotary_emb``, so SmolLM2's ``rope_theta`` and any scaled RoPE come out as
Hugging Face computes them), the attention scale, biases. Any other architecture is refused with a
:class:`QVLMError` (:func:`check_supported`); :class:`DecodeStep` runs those.

Fused weights are copies made at construction: build the step after the weights are final (it is
built per decoding batch in :mod:`qvlm.decoding.sampling`). A peft LoRA policy decodes here too
(:mod:`qvlm.decoding.fast_lora`): the packed copies hold its base weights, built once, and each step
adds the adapters' low-rank term, read from their current weights when the step is built.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from qvlm.decoding.fast_lora import (
    LoraDelta,
    adapter_parameter_ids,
    base_linear,
    lora_delta,
    lora_layers,
    merged_adapters,
)
from qvlm.decoding.step import StepOutput
from qvlm.errors import QVLMError
from qvlm.heads import MLPHead, QVHeads

__all__ = [
    "FastDecodeStep",
    "FastHeads",
    "Matmul",
    "built_for",
    "check_supported",
    "fast_heads",
    "rms_norm",
    "apply_rope",
]

SUPPORTED_MODEL_TYPES = ("llama",)


def check_supported(model: PreTrainedModel) -> None:
    """Raise :class:`QVLMError` unless ``model`` is a plain Llama-style causal LM the fast step
    reproduces: ``config.model_type`` "llama", SiLU MLP, ``nn.Linear`` projections or peft LoRA on
    them (:mod:`qvlm.decoding.fast_lora`; no quantised layers, whose weights the fused copies would
    miss), a plain embedding and LM head (no adapters there)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QVLMError(
            f"the fast decoding path supports Llama-style models ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"this model is {model_type!r} ({type(model).__name__}): decode without --fast"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise QVLMError(f"the fast decoding path needs a SiLU MLP; this model uses {config.hidden_act!r}")
    for layer in model.base_model.layers:
        for proj in _projections(layer):
            base_linear(proj)  # raises for anything but Linear or LoRA on Linear
    lm_head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if type(lm_head) is not nn.Linear or type(embed) is not nn.Embedding:
        raise QVLMError(
            f"the fast decoding path needs a plain embedding and LM head; found {type(embed).__name__} and "
            f"{type(lm_head).__name__} (adapters on them?): decode without --fast"
        )


def _projections(layer: nn.Module) -> tuple[nn.Module, ...]:
    """A decoder layer's projections: q, k, v, o, gate, up, down."""
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama computes it (in float32, weight applied in the input dtype): (..., H) -> (..., H)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Su et al. 2021, rotate-half form as in Llama): x (N, heads, d), cos/sin (N, d)."""
    cos, sin = cos[:, None], sin[:, None]  # (N, 1, d)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class _Layer:
    """One decoder layer's weights, fused: ``qkv`` (q + 2 kv widths, H), ``gate_up`` (2 I, H)."""

    attn_norm: torch.Tensor
    qkv: Matmul
    o: Matmul
    mlp_norm: torch.Tensor
    gate_up: Matmul
    down: Matmul


class Matmul:
    """``x @ W.T + b``, with ``W`` also kept in oneDNN's blocked layout (``torch.ops.mkldnn``) on CPU.

    Measured on this CPU (one thread, SmolLM2's shapes, weights streamed from memory as in a
    decoding step): at 8 rows the packed kernel runs a whole step in 70 ms where ``F.linear`` takes
    ~115 ms (and ``x @ W.T`` with ``W.T`` made contiguous ~90 ms); at 1 row ``F.linear`` is the
    fastest (48 ms against 58 ms packed). So rows >= ``MIN_PACKED_ROWS`` use the packed weight, fewer
    rows (and other devices) ``F.linear``. Both are the same product to float32 rounding.
    """

    MIN_PACKED_ROWS = 4

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self.packed = None
        if weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 8)  # batch-size hint
            except (RuntimeError, AttributeError):  # a build without the packed kernels
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        # under torch.compile the opaque packed tensor cannot be traced: inductor picks its own kernel
        if self.packed is None or x.shape[:-1].numel() < self.MIN_PACKED_ROWS or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], -1)


def _cat_bias(*linears: nn.Linear) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in linears])


def _fuse(layer: nn.Module) -> _Layer:
    q, k, v, o, gate, up, down = (base_linear(p) for p in _projections(layer))  # LoRA: the base weights
    return _Layer(
        attn_norm=layer.input_layernorm.weight.detach(),
        qkv=Matmul(torch.cat([q.weight, k.weight, v.weight]), _cat_bias(q, k, v)),
        o=Matmul(o.weight, o.bias),
        mlp_norm=layer.post_attention_layernorm.weight.detach(),
        gate_up=Matmul(torch.cat([gate.weight, up.weight]), _cat_bias(gate, up)),
        down=Matmul(down.weight, down.bias),
    )


def _lora_deltas(layer: nn.Module, i: int) -> dict[str, LoraDelta]:
    """The low-rank terms of a decoder layer's fused matmuls (only those with active adapters)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = {
        "qkv": (attn.q_proj, attn.k_proj, attn.v_proj),
        "o": (attn.o_proj,),
        "gate_up": (mlp.gate_proj, mlp.up_proj),
        "down": (mlp.down_proj,),
    }
    deltas = {key: lora_delta(projs, f"layer {i} {key}") for key, projs in groups.items()}
    return {key: d for key, d in deltas.items() if d is not None}


_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def built_for(module: nn.Module, build, skip: set[int] = frozenset(), state: tuple = ()):
    """``build(module)``, kept while ``module`` lives, its parameters (but those whose ``id`` is in
    ``skip``) are unchanged and ``state`` is the same.

    Fused and packed copies of a model's weights take about a second to build for SmolLM2-135M,
    as long as eight decoding steps, and a decoding loop builds a step per batch. They are rebuilt
    when any parameter is replaced or changed in place (its storage or version counter moves), as
    an optimiser step or ``load_state_dict`` does between the rollouts of a trainer. Writes that
    bypass version counters leave them stale: in place through ``.data`` (hence ``state``: peft
    merges adapters that way) or ``torch.optim.AdamW(fused=True)``.
    """
    key = (state, tuple((p.data_ptr(), p._version) for p in module.parameters() if id(p) not in skip))
    hit = _BUILT.get(module)
    if hit is None or hit[0] != key:
        hit = (key, build(module))
        _BUILT[module] = hit
    return hit[1]


def _fuse_model(model: PreTrainedModel) -> tuple[list[_Layer], Matmul]:
    lm_head = model.get_output_embeddings()
    return [_fuse(layer) for layer in model.base_model.layers], Matmul(lm_head.weight, lm_head.bias)


class FastDecodeStep:
    """Prefill, then one token per row per step, on a static KV cache: :class:`DecodeStep`'s
    interface and logits (to rounding) for Llama-family models.

    ``max_new_tokens`` sizes the cache (prompt length + ``max_new_tokens`` + 1 slots; it grows,
    by a copy, if a loop steps further). ``compile`` compiles the one-token step with
    ``torch.compile`` (attention then runs over the whole capacity, masked, so shapes stay fixed).
    """

    def __init__(self, model: PreTrainedModel, max_new_tokens: int = 64, compile: bool = False):
        check_supported(model)
        base = model.base_model
        config = model.config
        self.model = model
        # the base weights, fused and packed once; LoRA adapters (which train) are left out of the key
        adapters = lora_layers(model)
        self.layers, self.unembed = built_for(
            model, _fuse_model, skip=adapter_parameter_ids(adapters), state=merged_adapters(adapters)
        )
        # the adapters' low-rank terms, per layer, from their weights now (empty dicts without LoRA)
        self.lora = (
            [_lora_deltas(layer, i) for i, layer in enumerate(base.layers)] if adapters else [{}] * len(base.layers)
        )
        self.max_new_tokens = max_new_tokens
        self.embed = base.embed_tokens.weight.detach()
        self.rotary = base.rotary_emb
        self.final_norm = base.norm.weight.detach()
        self.eps = base.norm.variance_epsilon
        self.layer_eps = [
            (lay.input_layernorm.variance_epsilon, lay.post_attention_layernorm.variance_epsilon) for lay in base.layers
        ]
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.scale = base.layers[0].self_attn.scaling
        self.kv: torch.Tensor | None = None  # (layers, 2, B, kv_heads, capacity, head_dim)
        self.valid: torch.Tensor | None = None  # (B, capacity): slot holds a real token
        self.positions: torch.Tensor | None = None  # (B,): the next token's position id
        self.length = 0  # slots written
        self._step_fn = torch.compile(self._step_forward, dynamic=False) if compile else None

    # ---- the interface of DecodeStep ------------------------------------------------------------

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on last hidden states, in float32: (B, H) -> (B, V)."""
        return self.unembed(hidden).to(torch.float32)

    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeat: int = 1, logits: bool = True
    ) -> StepOutput:
        """Run the prompts (B, L) once into a fresh cache; with ``repeat = n`` each row then stands
        for its ``n`` responses (rows ``b * n .. b * n + n - 1``).

        The matmuls run on the prompts' real tokens only, packed into one (N, H) block (left padding
        costs them nothing; ``generate`` runs every padded position); attention runs per prompt in
        the padded layout of the cache."""
        B, L = input_ids.shape
        capacity = L + self.max_new_tokens + 1
        self.kv = self.final_norm.new_zeros((len(self.layers), 2, B, self.n_kv, capacity, self.head_dim))
        self.valid = torch.zeros((B, capacity), dtype=torch.bool, device=input_ids.device)
        self.valid[:, :L] = attention_mask.bool()
        rows, cols = attention_mask.nonzero(as_tuple=True)  # (N,) each: the real tokens, row by row
        positions = (attention_mask.cumsum(-1) - 1)[rows, cols]  # (N,): each row counts from 0, as DecodeStep
        # causal and not padding; a padding query sees itself, so no row of the softmax is empty
        causal = torch.ones((L, L), dtype=torch.bool, device=input_ids.device).tril()
        mask = (causal & self.valid[:, None, :L]) | torch.eye(L, dtype=torch.bool, device=input_ids.device)

        def attend(cache: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache[0][rows, :, cols] = k  # (N, kv, d) into (B, kv, capacity, d)
            cache[1][rows, :, cols] = v
            q_pad = q.new_zeros((B, L, *q.shape[1:]))  # (B, L, h, d)
            q_pad[rows, cols] = q
            out = self._sdpa(q_pad.transpose(1, 2), cache[:, :, :, :L], mask[:, None])  # (B, h, L, d)
            return out.transpose(1, 2)[rows, cols]  # (N, h, d)

        h = self._forward(input_ids[rows, cols], positions, attend)  # (N, H)
        h = h[attention_mask.sum(-1).cumsum(0) - 1]  # (B, H): each prompt's last token (left padding)
        self.length = L
        self.positions = attention_mask.sum(-1)
        if repeat > 1:  # one prefill per prompt; its responses share (copies of) its cache rows
            self.select(torch.arange(B, device=input_ids.device).repeat_interleave(repeat))
            h = h.repeat_interleave(repeat, 0)
        return StepOutput(h, self.logits(h) if logits else None, None)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, logits: bool = True) -> StepOutput:
        """Append one token per row (B,) and run it: the next state's hidden state and logits."""
        if self.length == self.kv.shape[-2]:
            self._grow()
        t = self.length
        self.valid[:, t] = True
        slot = torch.tensor([t], device=tokens.device)
        if self._step_fn is not None:  # fixed shapes: attend over the whole capacity, masked
            h = self._step_fn(tokens, self.positions, self.valid[:, None, None, :], slot)
        else:
            h = self._step_forward(tokens, self.positions, self.valid[:, None, None, : t + 1], slot)
        self.length += 1
        self.positions = self.positions + 1
        return StepOutput(h, self.logits(h) if logits else None, None)

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and repeat) rows ``rows`` (B',) of the batch: cache, slot map and positions."""
        self.kv = self.kv[:, :, rows]
        self.valid = self.valid[rows]
        self.positions = self.positions[rows]

    # ---- the model --------------------------------------------------------------------------------

    def _grow(self) -> None:
        extra = self.max_new_tokens + 1
        self.kv = torch.cat([self.kv, self.kv.new_zeros((*self.kv.shape[:-2], extra, self.head_dim))], dim=-2)
        self.valid = torch.cat([self.valid, self.valid.new_zeros((self.valid.shape[0], extra))], dim=-1)

    def _sdpa(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention of q (B, h, T, d) over kv (2, B, kv_heads, S, d) where mask
        (B, 1, T, S) allows: (B, h, T, d)."""
        gqa = self.n_kv != self.n_heads
        return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, scale=self.scale, enable_gqa=gqa)

    def _step_forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor):
        """One token per row: tokens and positions (B,), mask (B, 1, 1, S), cache slot ``slot`` (1,)."""

        def attend(cache: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache[0].index_copy_(2, slot, k[:, :, None])  # (B, kv, 1, d) into (B, kv, capacity, d)
            cache[1].index_copy_(2, slot, v[:, :, None])
            return self._sdpa(q[:, :, None], cache[:, :, :, : mask.shape[-1]], mask)[:, :, 0]  # (B, h, d)

        return self._forward(tokens, positions, attend)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """The decoder on tokens ``ids`` (N,) at ``positions`` (N,): -> final-norm hidden states (N, H).

        ``attend(cache, q, k, v)`` writes a layer's keys and values (N, kv_heads, d) into its cache
        (2, B, kv_heads, capacity, d) and returns the attention output (N, heads, d)."""
        N = ids.shape[0]
        x = F.embedding(ids, self.embed)  # (N, H)
        cos, sin = (c[0] for c in self.rotary(x, positions[None]))  # (N, d), the model's own RoPE
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        for i, (w, (eps_attn, eps_mlp), lora) in enumerate(zip(self.layers, self.layer_eps, self.lora)):
            qkv = _linear(w.qkv, lora.get("qkv"), rms_norm(x, w.attn_norm, eps_attn))  # (N, q + 2 kv)
            q, k, v = qkv.split((q_width, kv_width, kv_width), dim=-1)
            q = apply_rope(q.view(N, self.n_heads, self.head_dim), cos, sin)  # (N, h, d)
            k = apply_rope(k.view(N, self.n_kv, self.head_dim), cos, sin)  # (N, kv, d)
            attn = attend(self.kv[i], q, k, v.view(N, self.n_kv, self.head_dim))  # (N, h, d)
            x = x + _linear(w.o, lora.get("o"), attn.reshape(N, q_width))
            gate_up = _linear(w.gate_up, lora.get("gate_up"), rms_norm(x, w.mlp_norm, eps_mlp))
            gate, up = gate_up.chunk(2, dim=-1)  # (N, I) each
            x = x + _linear(w.down, lora.get("down"), F.silu(gate) * up)
        return rms_norm(x, self.final_norm, self.eps)


def _linear(matmul: Matmul, lora: LoraDelta | None, x: torch.Tensor) -> torch.Tensor:
    """A fused projection, plus its adapters' low-rank term where it has one: (N, in) -> (N, out)."""
    y = matmul(x)
    return y if lora is None else lora.add(y, x)


def fast_heads(heads: QVHeads) -> FastHeads:
    """:class:`FastHeads` for ``heads``, built once while their weights stay the same (:func:`built_for`);
    distributional heads decode as they are (per candidate, no vocabulary-sized layer to pack)."""
    return heads if heads.distributional else built_for(heads, FastHeads)


class FastHeads:
    """Q/V heads for decoding on the fast path: the same ``advantages`` and ``values`` as
    :class:`qvlm.heads.QVHeads` (to float32 rounding), for :func:`qvlm.decoding.guidance.guided_scores`.

    For MLP heads the first layers of the V head and every online Q head run as one matmul
    (``(1 + n_q) * width`` outputs) and the vocabulary-sized output layers on oneDNN-packed
    weights (:class:`Matmul`): full-vocabulary guidance then costs two packed LM-head-sized
    matmuls instead of two ``F.linear`` ones. Tied Q heads (and V-only heads) use ``heads`` as they are.
    Built once per decoding batch, from the heads' current weights.
    """

    def __init__(self, heads: QVHeads):
        self.heads = heads
        self.has_q = heads.has_q
        self.soft = heads.soft
        self.mlp = heads.has_q and all(isinstance(q, MLPHead) for q in heads.q_heads)
        if not self.mlp:
            return
        mlps = [heads.v_head, *heads.q_heads]
        self.width = heads.config.width
        self.first = Matmul(torch.cat([m.net[0].weight for m in mlps]), torch.cat([m.net[0].bias for m in mlps]))
        self.v_out = heads.v_head.net[2]
        self.q_out = [Matmul(q.net[2].weight, q.net[2].bias) for q in heads.q_heads]

    def _hidden(self, h: torch.Tensor) -> list[torch.Tensor]:
        """ReLU of every head's first layer: (B, H) -> [(B, width)] * (1 + n_q), V first."""
        return list(torch.relu(self.first(h)).split(self.width, dim=-1))

    def values(self, h: torch.Tensor) -> torch.Tensor:
        """``V(s)``: (B, H) -> (B,)."""
        return self.heads.values(h)

    @torch.no_grad()
    def advantages(self, h: torch.Tensor, tokens: torch.Tensor | None = None, beta: float | None = None):
        """``min_i Q_i(s, a) - V(s)``: (B, H) -> (B, V), or (B, k) for ``tokens`` (B, k) (the same at every
        ``beta``)."""
        if not self.mlp:
            return self.heads.advantages(h, tokens)
        z_v, *z_q = self._hidden(h)
        v = F.linear(z_v, self.v_out.weight, self.v_out.bias)  # (B, 1)
        if tokens is None:
            q = torch.stack([out(z) for out, z in zip(self.q_out, z_q)]).min(0).values  # (B, V)
        else:  # the rows of the output layers that the tokens pick (MLPHead.select)
            picked = [
                (out.weight[tokens] @ z[..., None]).squeeze(-1) + out.bias[tokens] for out, z in zip(self.q_out, z_q)
            ]
            q = torch.stack(picked).min(0).values  # (B, k)
        return q - v
