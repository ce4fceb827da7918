"""Q and V heads on a trunk's hidden states, target copies, Polyak sync, and safetensors I/O.

Heads read the hidden state at the position of the last token of ``s_t`` (DESIGN.md), so
``Q(s_t, .)`` is aligned with the LM logits that predict ``y_t``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from qvlm.configs import option
from qvlm.distributional import categorical_mean, make_support, soft_q_from_categorical
from qvlm.errors import QVLMError
from qvlm.fileio import atomic_write_bytes, atomic_write_text, read_text

__all__ = [
    "HeadsConfig",
    "Q_HEADS",
    "MLPHead",
    "TiedQHead",
    "QVHeads",
    "alpha_of",
    "TiedDistHead",
    "DistHeads",
    "MeanView",
    "build_heads",
    "polyak_update",
    "save_heads",
    "load_heads",
    "save_tensors",
    "load_tensors",
    "load_heads_state",
]


@dataclass
class HeadsConfig:
    """Shape of the heads. ``hidden_size`` and ``vocab_size`` come from the trunk's config."""

    hidden_size: int = field(metadata={"help": "the trunk's hidden size (the heads' input width)"})
    vocab_size: int = field(metadata={"help": "rows of the trunk's output embedding (Q heads' output width)"})
    # twin Q (clipped double-Q: Fujimoto et al. 2018), min over targets
    num_q_heads: int = option(2, "number of online Q heads (twin Q: the min over them is used)")
    # trlx uses 2 * hidden_size; one times keeps twin vocabulary-sized Q heads under ~0.45x the
    # trunk's compute per token on SmolLM2
    head_hidden: int = option(0, "width of the heads' hidden layer (0: hidden_size)")
    with_q: bool = option(True, "build Q heads (False: a V head only, a prefix scorer)")
    # mlp: Q(s, .) = W2 relu(W1 h) + b, its own vocabulary-sized output layer (trlx's design).
    # tied: Q(s, a) = e_a . g(h) + b_a, with e_a the trunk's frozen output embedding of token a, so
    # tokens the LM treats alike share value (far fewer parameters; learns from little data).
    q_head: str = option("mlp", "Q head design: mlp (own output layer) or tied (the LM's output embedding)")
    base_model: str = option("", "the trunk these heads were trained on, recorded for loading")
    # distributional heads (issue 22): bins > 0 builds DistHeads, Z(s, a) and Z(s) as categoricals
    bins: int = option(0, "atoms of the return distribution's support (0: mean-valued Q/V heads)")
    support_low: float = option(-1.0, "the support's lowest atom (cover the lowest return)")
    support_high: float = option(1.0, "the support's highest atom (cover the highest return)")
    dist_rank: int = option(64, "rank of Z(s, a)'s state-token interaction (dist_head bilinear)")
    dist_head: str = option(
        "bilinear",
        "Z(s, a)'s design: bilinear (own logits per token, a rank-d state-token form) or tilt (Z(s) tilted "
        "by exp(delta(s, a) z), delta a tied scalar head)",
        choices=("bilinear", "tilt"),
    )

    @property
    def width(self) -> int:
        return self.head_hidden or self.hidden_size

    def __post_init__(self):
        if self.q_head not in Q_HEADS:
            raise QVLMError(f"unknown q_head {self.q_head!r}; use one of {', '.join(Q_HEADS)}")
        for name in ("hidden_size", "vocab_size", "num_q_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QVLMError(f"heads {name} is {value!r}; it must be an integer >= 1")
        if self.bins and not (self.bins >= 2 and self.support_high > self.support_low and self.dist_rank >= 1):
            raise QVLMError(
                f"distributional heads: bins {self.bins}, support [{self.support_low}, {self.support_high}], rank "
                f"{self.dist_rank}; give bins >= 2, support_low < support_high and dist_rank >= 1"
            )
        if isinstance(self.head_hidden, bool) or not isinstance(self.head_hidden, int) or self.head_hidden < 0:
            raise QVLMError(
                f"head_hidden is {self.head_hidden!r}; it must be an integer >= 0 (0: the trunk's hidden size)"
            )


Q_HEADS = ("mlp", "tied")


class MLPHead(nn.Module):
    """``Linear -> ReLU -> Linear``: (..., hidden) -> (..., out).

    ``zero_out`` starts the last layer at zero: a Q head then begins neutral (every action's
    advantage equal), so guidance moves only what the data supports instead of amplifying the
    noise of a random vocabulary-sized layer.
    """

    def __init__(self, hidden_size: int, width: int, out: int, zero_out: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, out))
        if zero_out:
            nn.init.zeros_(self.net[2].weight)
            nn.init.zeros_(self.net[2].bias)

    def forward(self, h: torch.Tensor, unembedding: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(h)

    def select(self, h: torch.Tensor, tokens: torch.Tensor, unembedding: torch.Tensor | None = None) -> torch.Tensor:
        """The output entries ``tokens`` only: (..., hidden), (..., k) -> (..., k).

        Reads the rows of the last layer that the tokens pick instead of computing all ``out``
        entries and gathering: for a vocabulary-sized head, a factor of ``vocab / k`` fewer FLOPs.
        """
        z = self.net[1](self.net[0](h))  # (..., width)
        last = self.net[2]
        return (last.weight[tokens] @ z[..., None]).squeeze(-1) + last.bias[tokens]

    def taken(self, h: torch.Tensor, actions: torch.Tensor, unembedding: torch.Tensor | None = None) -> torch.Tensor:
        """The taken actions' entries: (B, T, hidden), (B, T) -> (B, T)."""
        return self.select(h, actions[..., None], unembedding)[..., 0]


class TiedQHead(nn.Module):
    """``Q(s, a) = e_a . g(h) + b_a``: a delta in the LM's own output space.

    ``g`` is ``Linear -> ReLU -> Linear`` back to the hidden size (last layer zero at start, so Q
    starts at 0), ``e_a`` row ``a`` of the trunk's output embedding (frozen, passed in, not saved),
    ``b_a`` a per-token bias. (..., hidden) -> (..., vocab), at the cost of one LM-head matmul.
    """

    def __init__(self, hidden_size: int, width: int, vocab_size: int):
        super().__init__()
        self.g = MLPHead(hidden_size, width, hidden_size, zero_out=True)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def _embedding(self, unembedding: torch.Tensor | None) -> torch.Tensor:
        if unembedding is None:
            raise QVLMError(
                "a tied Q head needs the trunk's output embedding: attach the heads to a model "
                "(QVModel or load_qv_model) before using them"
            )
        return unembedding

    def forward(self, h: torch.Tensor, unembedding: torch.Tensor | None = None) -> torch.Tensor:
        return self.g(h) @ self._embedding(unembedding).T + self.bias  # (..., vocab)

    def select(self, h: torch.Tensor, tokens: torch.Tensor, unembedding: torch.Tensor | None = None) -> torch.Tensor:
        """Q of the given tokens only: (..., hidden), (..., k) -> (..., k)."""
        g = self.g(h)  # (..., hidden)
        return (self._embedding(unembedding)[tokens] @ g[..., None]).squeeze(-1) + self.bias[tokens]

    def taken(self, h: torch.Tensor, actions: torch.Tensor, unembedding: torch.Tensor | None = None) -> torch.Tensor:
        """Q of the taken actions only: (B, T, hidden), (B, T) -> (B, T)."""
        return self.select(h, actions[..., None], unembedding)[..., 0]


class Unembedding:
    """Heads that read the trunk's output embedding (tied Q heads, distributional heads) hold it here."""

    unembedding: torch.Tensor | None = None

    def attach_unembedding(self, weight: torch.Tensor | None) -> None:
        """Give tied Q heads the trunk's output embedding ``(vocab, hidden)`` (kept frozen; None detaches).

        A plain attribute, not a buffer: it is the trunk's tensor (its storage, not a copy) and is
        not saved with the heads. :class:`qvlm.model.QVModel` re-attaches it whenever it moves.
        """
        self.unembedding = weight.detach() if weight is not None else None

    def _apply(self, fn, recurse: bool = True):
        # .to(), .cuda(), .half(), ...: move and cast an attached unembedding with the heads, so
        # heads moved on their own never mix devices or dtypes with it
        super()._apply(fn, recurse)
        if self.unembedding is not None:
            self.unembedding = fn(self.unembedding)
        return self


class QVHeads(Unembedding, nn.Module):
    """A V head, ``num_q_heads`` vocabulary-sized Q heads, and frozen target copies of the Q heads."""

    distributional = False
    soft = False  # guidance centres the candidates on their base-weighted mean Q

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        self.v_head = MLPHead(config.hidden_size, config.width, 1)
        n_q = config.num_q_heads if config.with_q else 0
        self.q_heads = nn.ModuleList(_q_head(config) for _ in range(n_q))
        self.target_q_heads = copy.deepcopy(self.q_heads).requires_grad_(False)
        self.unembedding: torch.Tensor | None = None  # the trunk's output embedding, for tied heads

    @property
    def has_q(self) -> bool:
        return len(self.q_heads) > 0

    def values(self, h: torch.Tensor) -> torch.Tensor:
        """``V(s)``: (..., hidden) -> (...)."""
        return self.v_head(h).squeeze(-1)

    def q_values(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Each Q head: (..., hidden) -> (..., vocab)."""
        return [q(h, self.unembedding) for q in self.q_heads]

    def q_taken(self, h: torch.Tensor, actions: torch.Tensor) -> list[torch.Tensor]:
        """Each online Q head at the taken actions only: (B, T, hidden), (B, T) -> (B, T)."""
        return [q.taken(h, actions, self.unembedding) for q in self.q_heads]

    def decode_macs_per_token(self, guidance_top_k: int = 0) -> int:
        """Multiply-adds per decoded token for guidance: V head plus every online Q head.

        Q is computed for ``guidance_top_k`` candidate tokens (0: the whole vocabulary). An MLP
        head costs its first layer plus one output row per token; a tied head its ``g`` plus one
        dot product with the trunk's output embedding per token (``hidden``), and the bias.
        """
        k = guidance_top_k or self.config.vocab_size
        macs = sum(p.numel() for p in self.v_head.parameters())
        for q in self.q_heads:
            if isinstance(q, TiedQHead):
                macs += sum(p.numel() for p in q.g.parameters()) + k * (self.config.hidden_size + 1)
            else:
                first = q.net[0]
                macs += first.weight.numel() + first.bias.numel() + k * (self.config.width + 1)
        return macs

    @torch.no_grad()
    def target_q_values(self, h: torch.Tensor) -> torch.Tensor:
        """Min over the target Q heads: (..., hidden) -> (..., vocab)."""
        return torch.stack([q(h, self.unembedding) for q in self.target_q_heads]).min(0).values

    def target_q_taken(self, h: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Min over target heads of ``Q'(s, a)`` for the taken actions: (B, T, hidden) -> (B, T).

        Computes only the taken actions' outputs (see :meth:`MLPHead.taken`).
        """
        with torch.no_grad():
            taken = [q.taken(h, actions, self.unembedding) for q in self.target_q_heads]
        return torch.stack(taken).min(0).values

    @torch.no_grad()
    def advantages(self, h: torch.Tensor, tokens: torch.Tensor | None = None, beta: float | None = None):
        """``Q(s, a) - V(s)`` for decoding, Q the min over the (online) twin heads (mean values: the
        same at every guidance strength ``beta``).

        (..., hidden) -> (..., vocab); with ``tokens`` (..., k), only those tokens: -> (..., k).
        """
        if not self.has_q:
            raise QVLMError("these heads have no Q heads (a V-only prefix scorer); use V-guided blockwise decoding")
        if tokens is None:
            q = torch.stack(self.q_values(h)).min(0).values
        else:
            q = torch.stack([head.select(h, tokens, self.unembedding) for head in self.q_heads]).min(0).values
        return q - self.values(h)[..., None]

    def sync_targets(self, alpha: float) -> None:
        """Polyak-average the online Q heads into the targets (alpha = 1 copies)."""
        polyak_update(self.q_heads.parameters(), self.target_q_heads.parameters(), alpha)


def alpha_of(beta: float | None) -> float:
    """The KL temperature of a guidance strength: ``alpha = 1 / beta`` (``beta`` 0 or None: infinity,
    where ``Q*_alpha`` is the mean, the reference policy's own Q)."""
    return math.inf if not beta else 1.0 / float(beta)


class TiedDistHead(nn.Module):
    """``Z(s, a)`` logits over ``K`` bins: ``c(h) + G(h) (P e_a)``, a rank-``d`` bilinear form between the
    state and the candidate's output embedding ``e_a`` (the LM's, frozen, passed in; ``P`` projects it
    to ``d`` dims). ``c(h)`` is the state's own logits; ``G`` starts at zero, so ``Z(s, a)`` starts as
    the state's distribution whatever the token."""

    def __init__(self, hidden_size: int, width: int, bins: int, rank: int):
        super().__init__()
        self.bins, self.rank = bins, rank
        self.body = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU())
        self.state = nn.Linear(width, bins)
        self.inter = nn.Linear(width, bins * rank)
        nn.init.zeros_(self.inter.weight)
        nn.init.zeros_(self.inter.bias)
        self.proj = nn.Linear(hidden_size, rank, bias=False)

    def select(self, h: torch.Tensor, tokens: torch.Tensor, unembedding: torch.Tensor) -> torch.Tensor:
        """Logits of the given tokens: ``h (..., H)``, ``tokens (..., k)`` -> ``(..., k, K)``."""
        z = self.body(h)  # (..., width)
        c = self.state(z)  # (..., K)
        g = self.inter(z).unflatten(-1, (self.bins, self.rank))  # (..., K, d)
        e = self.proj(unembedding[tokens].to(h.dtype))  # (..., k, d)
        return c[..., None, :] + e @ g.transpose(-1, -2)  # (..., k, K)

    def taken(self, h: torch.Tensor, actions: torch.Tensor, unembedding: torch.Tensor) -> torch.Tensor:
        """Logits of the taken actions: ``(B, T, H)``, ``(B, T)`` -> ``(B, T, K)``."""
        return self.select(h, actions[..., None], unembedding)[..., 0, :]


class DistHeads(Unembedding, nn.Module):
    """``Z(s, a)`` (:class:`TiedDistHead`) and ``Z(s)`` (an MLP to ``K`` logits) on a fixed support of
    ``config.bins`` atoms from ``config.support_low`` to ``config.support_high``.

    The interface guidance, decoding and value maps read is :class:`qvlm.heads.QVHeads`'s: ``values(h)``
    (the mean of ``Z(s)``, the expected return) and ``advantages(h, tokens, beta)``: ``Q*_alpha(s, a) -
    V*_alpha(s)`` at ``alpha = 1 / beta`` (the means at ``beta = 0``). ``soft = True`` tells guidance to
    centre the candidates on their soft value at that alpha (:func:`qvlm.decoding.guidance.soft_centre`).
    """

    distributional = True
    soft = True
    has_q = True

    def __init__(self, config: HeadsConfig):
        super().__init__()
        if config.bins < 2:
            raise QVLMError(f"distributional heads need bins >= 2, got {config.bins}")
        self.config = config
        support = make_support(config.support_low, config.support_high, config.bins)
        self.register_buffer("support", support, persistent=False)  # rebuilt from the config on load
        if config.dist_head == "tilt":  # one scalar per (state, token), the shape from Z(s)
            self.z_head = TiedQHead(config.hidden_size, config.width, config.vocab_size)
        else:
            self.z_head = TiedDistHead(config.hidden_size, config.width, config.bins, config.dist_rank)
        self.v_head = MLPHead(config.hidden_size, config.width, config.bins)
        self.unembedding: torch.Tensor | None = None

    # ------------------------------------------------------------------ logits

    def q_logits(self, h: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``Z(s, a)`` logits: ``h (..., H)``, ``tokens (..., k)`` -> ``(..., k, K)`` (every token of the
        vocabulary without ``tokens``: ``(..., V, K)``)."""
        unembedding = self._embedding()
        if tokens is None:
            tokens = torch.arange(unembedding.shape[0], device=h.device).expand(*h.shape[:-1], -1)
        if self.config.dist_head == "tilt":  # log Z(s) + delta(s, a) z: an exponential tilt of the state's law
            delta = self.z_head.select(h, tokens, unembedding)  # (..., k)
            # Z(s) detached: Z(s, a)'s loss moves delta only (else the state head would absorb the token's
            # effect, pulled toward the taken tokens' targets, and delta would stay near 0)
            return self.v_logits(h).detach()[..., None, :] + delta[..., None] * self.support.to(h.dtype)
        return self.z_head.select(h, tokens, unembedding)

    def q_logits_taken(self, h: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``Z(s_t, a_t)`` logits of the taken actions: ``(B, T, H)``, ``(B, T)`` -> ``(B, T, K)``."""
        return self.q_logits(h, actions[..., None])[..., 0, :]

    def v_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``Z(s)`` logits: ``(..., H)`` -> ``(..., K)``."""
        return self.v_head(h)

    def _embedding(self) -> torch.Tensor:
        if self.unembedding is None:
            raise QVLMError(
                "distributional heads read the trunk's output embedding: attach them to a model (QVModel or "
                "load_qv_model) before using them"
            )
        return self.unembedding

    # ------------------------------------------------------------------ what guidance and value maps read

    def values(self, h: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        """``V*_alpha(s)`` from ``Z(s)`` at ``alpha = 1 / beta`` (default: the mean): ``(..., H)`` -> ``(...)``."""
        log_p = torch.log_softmax(self.v_logits(h).float(), dim=-1)
        return soft_q_from_categorical(log_p, self.support, alpha_of(beta))

    @torch.no_grad()
    def advantages(self, h: torch.Tensor, tokens: torch.Tensor | None = None, beta: float | None = None):
        """``Q*_alpha(s, a) - V*_alpha(s)`` at ``alpha = 1 / beta`` (the means at ``beta`` 0 or None):
        ``(..., H)`` -> ``(..., V)``, or ``(..., k)`` for ``tokens (..., k)``."""
        alpha = alpha_of(beta)
        log_p = torch.log_softmax(self.q_logits(h, tokens).float(), dim=-1)  # (..., k, K)
        return soft_q_from_categorical(log_p, self.support, alpha) - self.values(h, beta)[..., None]

    def mean_q_taken(self, h: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``E[Z(s_t, a_t)]`` of the taken actions: ``(B, T, H)``, ``(B, T)`` -> ``(B, T)`` (value maps)."""
        return categorical_mean(torch.log_softmax(self.q_logits_taken(h, actions).float(), dim=-1), self.support)

    def decode_macs_per_token(self, guidance_top_k: int = 0) -> int:
        """Multiply-adds per decoded token: the state's body, ``c`` and ``G`` (and ``Z(s)``), then per
        candidate its projection ``P e_a`` and ``K x d`` products (``guidance_top_k`` 0: every token);
        tilt: ``Z(s)``, ``g`` and per candidate one dot product with ``e_a`` and ``K`` tilted atoms."""
        k = guidance_top_k or self.config.vocab_size
        z = self.z_head
        if self.config.dist_head == "tilt":
            v = sum(p.numel() for p in self.v_head.parameters())
            return (
                v + sum(p.numel() for p in z.g.parameters()) + k * (self.config.hidden_size + 1 + 2 * self.config.bins)
            )
        per_state = sum(p.numel() for m in (z.body, z.state, z.inter) for p in m.parameters())
        per_state += sum(p.numel() for p in self.v_head.parameters())
        return per_state + k * (z.proj.weight.numel() + z.bins * z.rank)


class MeanView:
    """Distributional heads read through their means: guidance by ``E[Z(s, a)] - E[Z(s)]`` at every beta,
    centred on the candidates' base-weighted mean, as mean-valued heads guide. The ablation that
    separates Q#'s two causes (issue 22): the same heads and data, the mean instead of ``Q*_alpha``."""

    distributional = True
    soft = False
    has_q = True

    def __init__(self, heads: DistHeads):
        self.heads, self.config = heads, heads.config

    def values(self, h: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        return self.heads.values(h)

    def advantages(self, h: torch.Tensor, tokens: torch.Tensor | None = None, beta: float | None = None):
        return self.heads.advantages(h, tokens, beta=None)

    def decode_macs_per_token(self, guidance_top_k: int = 0) -> int:
        return self.heads.decode_macs_per_token(guidance_top_k)


def build_heads(config: HeadsConfig) -> QVHeads | DistHeads:
    """Fresh heads of ``config``: :class:`DistHeads` when ``config.bins`` > 0, else :class:`QVHeads`."""
    return DistHeads(config) if config.bins else QVHeads(config)


def _q_head(config: HeadsConfig) -> nn.Module:
    if config.q_head == "tied":
        return TiedQHead(config.hidden_size, config.width, config.vocab_size)
    return MLPHead(config.hidden_size, config.width, config.vocab_size, zero_out=True)


@torch.no_grad()
def polyak_update(params: Iterable[torch.Tensor], target_params: Iterable[torch.Tensor], alpha: float) -> None:
    """``theta' <- (1 - alpha) theta' + alpha theta``, in place (Stable-Baselines3 ``polyak_update``)."""
    for p, tp in zip(params, target_params, strict=True):
        tp.mul_(1.0 - alpha).add_(p.detach(), alpha=alpha)


def save_heads(heads: QVHeads | DistHeads, path: str | Path) -> None:
    """Save heads to ``path/heads.safetensors`` and ``path/heads_config.json`` atomically."""
    path = Path(path)
    save_tensors(path / "heads.safetensors", heads.state_dict())
    atomic_write_text(path / "heads_config.json", json.dumps(asdict(heads.config), indent=2) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as a safetensors file atomically (a temporary file, then a rename), each on the CPU
    as its own contiguous copy (tied weights share storage, which safetensors refuses)."""
    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, every one finite; a damaged, truncated or foreign file, or
    a NaN/inf weight (a diverged run), raises :class:`QVLMError` naming the file."""

    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise QVLMError(
            f"{path}: not a readable safetensors file ({reason}); it is damaged or truncated: restore it or train again"
        ) from None
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise QVLMError(
                f"{path}: tensor {key} is not finite (NaN or inf): these weights come from a diverged run; "
                "train again with a lower lr"
            )
    return state


def load_heads_state(heads: QVHeads, state: dict[str, torch.Tensor], where: str | Path) -> None:
    """``heads.load_state_dict(state)``, with a mismatch (missing tensors, another shape) as a
    :class:`QVLMError` naming ``where`` and the first differing tensor."""
    own = heads.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise QVLMError(
            f"{where}: heads of another design (missing {missing[:2]}, unexpected {unexpected[:2]}); "
            "use the --q-head, --with-q and --trunk settings they were trained with"
        )
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise QVLMError(
                f"{where}: tensor {key} has shape {tuple(state[key].shape)}, these heads {tuple(value.shape)}: "
                "heads of another shape; use the --head-hidden and --model they were trained with"
            )
    heads.load_state_dict(state)


def load_heads(path: str | Path, device: str | torch.device = "cpu") -> QVHeads | DistHeads:
    """Load heads saved by :func:`save_heads` (safetensors: no unpickling).

    Refuses, with a :class:`QVLMError` naming the file, a missing, damaged or non-finite file.
    """

    path = Path(path)
    cfg_file, weights = path / "heads_config.json", path / "heads.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise QVLMError(
            f"{path}: no heads here (expected heads_config.json and heads.safetensors); "
            "train some with `qvlm train ilql` or `qvlm train value`"
        )
    try:
        raw = json.loads(read_text(cfg_file))
        if not isinstance(raw, dict):
            raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
        config = HeadsConfig(**raw)
    except (TypeError, ValueError) as err:
        if isinstance(err, QVLMError) and str(err).startswith(str(cfg_file)):
            raise
        raise QVLMError(f"{cfg_file}: not a valid heads config ({err}); restore it or train again") from None
    heads = build_heads(config)
    load_heads_state(heads, load_tensors(weights, device), weights)
    return heads.to(device)
