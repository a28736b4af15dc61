"""The adapter base class, the method registry, and the two wrappers that place an adapter.

An `Adapter` is only a method's math: Δ(x) for an input x of width k (in_features) and an
output of width d (out_features). It owns `lora_A` (k→r) and `lora_B` (r→d) and whatever
else the method needs. Where the adapter sits is the wrapper's business:

- `AdapterLinear` (weight-level): wraps a targeted `nn.Linear`, h = W0·x + Δ(x).
- `ParallelAdapter` (module-level, the paper's ablation row (a)): wraps a whole block
  (attention or MLP), h = block(x) + Δ(x), added to the block's first output.

The wrappers keep the original module as `base_layer` (the same object, so unloading
restores it exactly) and forward any other attribute to it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from nora.fused import dropped_linear, expand

if TYPE_CHECKING:
    from nora.config import AdapterConfig

METHODS: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: add a method to the registry under `cls.name`."""
    METHODS[cls.name] = cls
    return cls


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., k) -> (..., d)
        raise NotImplementedError

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


class _Wrapper(nn.Module):
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


class AdapterLinear(_Wrapper):
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


class ParallelAdapter(_Wrapper):
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
