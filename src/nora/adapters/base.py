"""The adapter base class, the method registry, and the two wrappers that place an adapter.

An `Adapter` is only a method's math: Δ(x) for an input x of width k (in_features) and an
output of width d (out_features). It owns `lora_A` (k→r) and `lora_B` (r→d) and whatever
else the method needs, and it is the one place the method is described: its latent map σ
(`sigma`, a pure function of the latent and σ's tensors, which training, the fused backward,
analysis and serving all call), how it packs and stacks for batched serving (`pack`,
`stack`), its checkpoint type (`peft_type`) and its merge (`delta_weight`).
Where the adapter sits is the wrapper's business:

- `AdapterLinear` (weight-level): wraps a targeted `nn.Linear`, h = W0·x + Δ(x).
- `ParallelAdapter` (module-level, the paper's ablation row (a)): wraps a whole block
  (attention or MLP), h = block(x) + Δ(x), added to the block's first output.

The wrappers keep the original module as `base_layer` (the same object, so unloading
restores it exactly) and forward any other attribute to it.
"""

from __future__ import annotations

import math
import sys
import textwrap
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nora.activations import ACTIVATIONS, REGISTRY, make_activation
from nora.fused import dropped_linear, expand

if TYPE_CHECKING:
    from nora.config import AdapterConfig

METHODS: dict[str, type[Adapter]] = {}
GENERIC_FORMULA = "Δ(x) = s · B · D(σ(A·x))"  # what every bottleneck method computes


def indented_block(doc: str | None) -> str | None:
    """The first block of lines indented deeper than the text around it, dedented (the
    formula in a method file's docstring), or None."""
    lines = textwrap.dedent((doc or "").partition("\n")[2]).splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(" ") and line.strip()), None)
    if start is None:
        return None
    end = next(
        (
            i
            for i in range(start, len(lines))
            if not lines[i].startswith(" ") or not lines[i].strip()
        ),
        len(lines),
    )
    return textwrap.dedent("\n".join(lines[start:end])).rstrip()


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: add a method to the registry under `cls.name`."""
    METHODS[cls.name] = cls
    return cls


@dataclass
class Packed:
    """One adapter at one Linear in serving form: Δ(x) = σ(x·A)·B, or x·W for dense kinds.

    The scale s is folded into B, after σ: σ(s·A·x) ≠ s·σ(A·x) for a non-linear σ.
    """

    kind: Hashable  # adapters of one kind share σ's code and static settings
    r: int
    A: torch.Tensor | None  # (k, r)
    B: torch.Tensor | None  # (r, d), s folded in
    W: torch.Tensor | None = None  # (k, d), dense kinds only
    p: dict[str, torch.Tensor] = field(default_factory=dict)  # σ's tensors

    @property
    def nbytes(self) -> int:
        ts = [self.A, self.B, self.W, *self.p.values()]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class Stack:
    """n packed adapters of one kind stacked for `bmm`, ranks zero-padded to R."""

    A: torch.Tensor  # (n, k, R)
    B: torch.Tensor  # (n, R, d)
    p: dict[str, torch.Tensor]  # σ's tensors, stacked as `Adapter.stack` says


class NotMergeableError(RuntimeError):
    """The adapter's update is not a weight matrix, so it cannot be folded into W0."""


class Adapter(nn.Module):
    """Base class of every method. Subclasses set the class attributes and define forward."""

    name: ClassVar[str]
    mergeable: ClassVar[bool] = False  # Δ(x) = ΔW·x for a fixed ΔW
    approximately_mergeable: ClassVar[bool] = False  # an explicit, inexact merge exists
    linear: ClassVar[bool] = False  # r > min(d, k) adds nothing: refused at injection
    default_alpha: ClassVar[float | None] = None
    default_scale: ClassVar[float | None] = None
    default_dropout: ClassVar[float] = 0.0
    default_activation: ClassVar[str] = "identity"
    activations: ClassVar[tuple[str, ...]] = ("identity",)
    shrinks: ClassVar[bool] = True  # Δ starts with z = A·x (all but loran)
    latent_dropout: ClassVar[bool] = False  # dropout on the r-dim latent, not on the input
    sigma_rank_dims: ClassVar[dict[str, int]] = {}  # leading rank dims of σ's tensors
    peft_type: ClassVar[str]  # adapter_config.json's "peft_type"; default: NAME
    formula: ClassVar[str] = GENERIC_FORMULA  # the math, as model cards print it (see below)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and "peft_type" not in cls.__dict__:
            cls.peft_type = cls.name.upper()
        if "name" in cls.__dict__ and "formula" not in cls.__dict__:
            # Each method file opens with its math as an indented block: that block is the
            # formula (one description, not a copy); a class may set `formula` itself.
            doc = getattr(sys.modules.get(cls.__module__), "__doc__", None)
            cls.formula = indented_block(cls.__doc__) or indented_block(doc) or cls.formula

    def __init__(
        self, in_features: int, out_features: int, cfg: AdapterConfig, device=None, dtype=None
    ):
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, cfg.r
        self.scale = cfg.effective_scale
        self.lora_A = nn.Linear(in_features, cfg.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(cfg.r, out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.shared = None  # a nora.fused.SharedInputGroup, set by fuse_shared_inputs

    def reset_parameters(self, init_weights: bool = True) -> None:
        """A Kaiming-uniform (a=√5), B zeros so Δ = 0 at start. Subclasses may override.

        With init_weights=False, B is random too (for tests and serving benchmarks).
        """
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        self._init_B(init_weights)

    def _init_B(self, init_weights: bool) -> None:
        if init_weights:
            nn.init.zeros_(self.lora_B.weight)
        else:
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))

    # ---- the method's latent map σ: the one description every path calls ----------------
    # Δ(x) = s·B·D(σ(A·x)). `sigma` is a pure function of z and σ's tensors p, so the same
    # code runs on one adapter's latent (..., r) with its own p, and in serving on a stack
    # of adapters' latents (n, L, R) with p stacked by `stack`.

    def kind(self) -> Hashable:
        """Adapters with equal kinds share σ's code and static settings: they stack."""
        return (self.name,)

    def sigma_params(self) -> dict[str, torch.Tensor]:
        """σ's tensors for this adapter (differentiable functions of its parameters)."""
        return {}

    @classmethod
    def sigma(cls, kind: Hashable, z: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """σ(z): (..., r) -> (..., r). The identity here (LoRA); methods override it."""
        return z

    @classmethod
    def identity_sigma(cls) -> bool:
        """σ is the base class's identity (LoRA): there is nothing between shrink and expand."""
        return cls.sigma.__func__ is Adapter.sigma.__func__

    def phi(self, z: torch.Tensor) -> torch.Tensor:  # (..., r) -> (..., r)
        """σ on this adapter's latent, with its own tensors."""
        return self.sigma(self.kind(), z, self.sigma_params())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., k) -> (..., d)
        """s·B·D(σ(A·x)) (dropout on the input or on the latent, as the method says).

        Methods without parameters in σ that are not leaves (see `sigma_leaves`) need not
        override anything but `sigma`; in training σ is recomputed in backward. In eval mode
        only shrink, σ and expand run (`eval_forward`).
        """
        if self.plain_eval():
            return self.eval_forward(x, None if self.identity_sigma() else self.phi)
        if self.identity_sigma():
            return self.bottleneck(x)  # linear: no φ node at all
        return self.bottleneck(x, self.phi, self.sigma_leaves())

    def plain_eval(self) -> bool:
        """Eval mode without grad (`generate()`, serving) and nothing that needs the module
        path: no hooks on lora_A or lora_B (analysis hooks lora_B), no shared shrink
        (`nora.fused.fuse_shared_inputs`). With grad on, eval keeps the fused node (its
        saved-memory savings still count)."""
        A, B = self.lora_A, self.lora_B
        return not (
            self.training
            or torch.is_grad_enabled()
            or self.shared is not None
            or A._forward_hooks
            or A._forward_pre_hooks
            or B._forward_hooks
            or B._forward_pre_hooks
        )

    def eval_forward(self, x: torch.Tensor, phi=None) -> torch.Tensor:  # (..., k) -> (..., d)
        """Δ(x) = B·(s·σ(A·x)), dropout being the identity: shrink, σ, expand and nothing else
        (no dropout call, no fused node, no submodule calls) — what `generate()` pays per
        adapted call. Equal to the module path's output in eval mode."""
        z = F.linear(x, self.lora_A.weight)  # (..., r)
        h = z if phi is None else phi(z)
        return F.linear(h if self.scale == 1 else h * self.scale, self.lora_B.weight)

    def sigma_leaves(self) -> tuple[torch.Tensor, ...]:
        """The trainable tensors σ depends on (the fused node differentiates them)."""
        own = {"lora_A.weight", "lora_B.weight"}
        return tuple(p for n, p in self.named_parameters() if n not in own)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """σ(A·x), no dropout, no scale: (..., k) -> (..., r), what analysis measures."""
        return self.phi(self.lora_A(x))

    @torch.no_grad()
    def pack(self) -> Packed:
        """This adapter in serving form (see `Packed`); dense methods give W = ΔWᵀ."""
        dtype = self.lora_A.weight.dtype
        if not self.shrinks:  # Δ(x) = ΔW·x: the weight-space map has no low-rank split
            W = self.delta_weight().to(dtype).t().contiguous()  # (k, d)
            return Packed(self.kind(), self.r, None, None, W=W)
        A = self.lora_A.weight.t().contiguous()  # (k, r)
        B = (self.lora_B.weight * self.scale).t().contiguous()  # (r, d)
        p = {k: v.detach().to(A.device, dtype) for k, v in self.sigma_params().items()}
        return Packed(self.kind(), self.r, A, B, p=p)

    @classmethod
    def stack(cls, packs: list[Packed]) -> Stack:
        """n packs of one kind -> one Stack, ranks zero-padded to R = max r.

        σ's tensors by their rank dims (`sigma_rank_dims`): 0 (a per-adapter scalar) ->
        (n, 1, 1); 1, (r, ...) -> (n, 1, R, ...); 2, (r, r, ...) -> (n, R, R, ...), so they
        broadcast against (or multiply) stacked latents (n, L, R). Zero padding: a padded
        slot's A column and B row are zero, so whatever σ gives there adds nothing.
        """
        n, R = len(packs), max(w.r for w in packs)
        A0, B0 = packs[0].A, packs[0].B
        A = A0.new_zeros(n, A0.shape[0], R)
        B = B0.new_zeros(n, R, B0.shape[1])
        for i, w in enumerate(packs):
            A[i, :, : w.r], B[i, : w.r] = w.A, w.B
        p: dict[str, torch.Tensor] = {}
        for key, v0 in packs[0].p.items():
            dims = cls.sigma_rank_dims.get(key, 0)
            if dims == 0:
                p[key] = torch.stack([w.p[key] for w in packs]).view(n, 1, 1)
                continue
            rest = v0.shape[dims:]
            out = v0.new_zeros(n, *([1] if dims == 1 else []), *([R] * dims), *rest)
            for i, w in enumerate(packs):
                idx = (i, 0) if dims == 1 else (i,)
                out[idx][tuple(slice(0, w.r) for _ in range(dims))] = w.p[key]
            p[key] = out
        return Stack(A, B, p)

    def dropout_rate(self) -> float:
        """The dropout probability in effect now: the configured one in training, else 0."""
        return self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0

    def bottleneck(self, x: torch.Tensor, phi=None, params=()) -> torch.Tensor:
        """s · B · D(φ(A · x)), with D on the input or on the latent: (..., k) -> (..., d).

        The shared shape of lora, nora, nolora and aurora; `nora.fused` makes it fast.
        """
        p = self.dropout_rate()
        if p > 0 and not self.latent_dropout:  # input dropout: this adapter's own x
            z, p = dropped_linear(x, self.lora_A, p), 0.0
        elif self.shared is not None and not torch.compiler.is_compiling():
            z = self.shared.shrink(self, x)  # one GEMM with the siblings that read x
        else:
            z = self.lora_A(x)  # (..., r)
        return expand(z, self.lora_B, self.scale, p, phi, params)  # (..., d)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (d, k) with Δ(x) = ΔW·x; defined by mergeable methods only."""
        raise NotMergeableError(f"method {self.name!r} has no weight-space update")

    def approximate_delta_weight(self) -> torch.Tensor:
        """An explicit, inexact ΔW; defined by approximately mergeable methods only."""
        raise NotMergeableError(f"method {self.name!r} has no approximate merge")

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}"


class ActivationAdapter(Adapter):
    """An adapter whose σ is one of `nora.activations` (`cfg.activation`), kept as `act`."""

    activations = ACTIVATIONS
    latent_dropout = True
    sigma_rank_dims = {k: n for c in REGISTRY.values() for k, n in c.rank_dims.items()}
    sigma_gain: ClassVar[str | None] = None  # a per-channel tensor of p: σ(z) = p[gain] ⊙ act(z)

    def __init__(self, in_features, out_features, cfg, device=None, dtype=None):
        super().__init__(in_features, out_features, cfg, device=device, dtype=dtype)
        self.act = make_activation(cfg.activation, cfg.r, cfg, device=device, dtype=dtype)

    def kind(self) -> Hashable:
        return (self.name, self.act.name)

    def sigma_params(self) -> dict[str, torch.Tensor]:
        return self.act.params()

    @classmethod
    def sigma(cls, kind, z, p):  # (..., r) -> (..., r): the activation, then the gain if any
        h = REGISTRY[kind[1]].fn(z, p)
        return h if cls.sigma_gain is None else p[cls.sigma_gain] * h


class AdapterWrapper(nn.Module):
    """Shared state of both wrappers: the original module, the adapter, merged/disabled."""

    def __init__(self, base_layer: nn.Module, adapter: Adapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.merged = False
        self.disabled = False

    def __getattr__(self, name: str) -> Any:
        # Model code may read e.g. `q_proj.weight` or `self_attn.layer_idx`: forward to the
        # wrapped module (nn.Module.__getattr__ only sees parameters/buffers/submodules).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def active(self) -> bool:
        return not (self.merged or self.disabled)


class AdapterLinear(AdapterWrapper):
    """Weight-level placement: h = W0·x (+ bias) + Δ(x) inside a targeted nn.Linear."""

    base_layer: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., d)
        if not self.active:
            return out
        return out + self.adapter(x).to(out.dtype)

    def check_mergeable(self, approximate_merge: bool = False) -> None:
        a = self.adapter
        if a.mergeable or (approximate_merge and a.approximately_mergeable):
            return
        raise NotMergeableError(
            f"method {a.name!r} is non-linear: its update depends on x, not on a fixed ΔW, so "
            "it cannot be merged; serve it unmerged"
            + (" (or pass approximate_merge=True)" if a.approximately_mergeable else "")
        )

    def merge(self, approximate_merge: bool = False) -> None:
        """Fold ΔW into W0 in place (exact for mergeable methods)."""
        self.check_mergeable(approximate_merge)
        a = self.adapter
        dw = a.delta_weight() if a.mergeable else a.approximate_delta_weight()
        w = self.base_layer.weight
        w.data += dw.to(device=w.device, dtype=w.dtype)
        self.merged = True


class ParallelAdapter(AdapterWrapper):
    """Module-level placement: h = block(x, ...) + Δ(x), added to the block's first output.

    The block's input is its first positional argument or its `hidden_states` keyword, as in
    Hugging Face attention and MLP blocks.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs.get("hidden_states")
        if x is None:
            raise RuntimeError(
                f"{type(self.base_layer).__name__} was called without a positional input or a "
                "`hidden_states` keyword; module-level placement cannot find the block's input"
            )
        out = self.base_layer(*args, **kwargs)
        if not self.active:
            return out
        if isinstance(out, tuple):  # attention blocks return (hidden, attn_weights, ...)
            return (out[0] + self.adapter(x).to(out[0].dtype), *out[1:])
        return out + self.adapter(x).to(out.dtype)

    def check_mergeable(self, approximate_merge: bool = False) -> None:
        raise NotMergeableError(
            "module-level adapters sit parallel to a whole block, not inside one weight: "
            "they cannot be merged"
        )

    def merge(self, approximate_merge: bool = False) -> None:
        self.check_mergeable(approximate_merge)
