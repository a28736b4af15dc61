"""Activations applied inside the low-rank bottleneck (the r-dim latent), one registry.

`make_activation(name, r, cfg)` returns an `nn.Module` acting element-wise on (..., r).
`sinter` is also used by LoRAN on the weight update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from nora.config import AdapterConfig


def sinter(z: torch.Tensor, a: float, omega: float) -> torch.Tensor:
    """Sinter(z) = z + a·z·sin(ω·z)  (LoRAN, EMNLP 2024 Findings)."""
    return z + a * z * torch.sin(omega * z)


class Sinter(nn.Module):
    def __init__(self, a: float, omega: float):
        super().__init__()
        self.a, self.omega = a, omega

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return sinter(z, self.a, self.omega)

    def extra_repr(self) -> str:
        return f"a={self.a}, omega={self.omega}"


class LearnableSiLU(nn.Module):
    """f(z) = z·sigmoid(β ⊙ z) with a learnable per-rank β ∈ R^r, β = 1 at init (i.e. SiLU).

    [ours] NoLoRA's "learnable non-linearity": its full text is not public, so we use the
    Swish family, which contains SiLU (β=1), a scaled ReLU (β→∞) and z/2 (β=0).
    """

    def __init__(self, r: int, device=None, dtype=None):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(r, device=device, dtype=dtype))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (..., r)
        return z * torch.sigmoid(self.beta * z)


ACTIVATIONS = ("identity", "relu", "silu", "gelu", "tanh", "sinter", "learnable")


def make_activation(name: str, r: int, cfg: AdapterConfig, device=None, dtype=None) -> nn.Module:
    if name == "identity":
        return nn.Identity()
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU()
    if name == "tanh":
        return nn.Tanh()
    if name == "sinter":
        return Sinter(cfg.sinter_a, cfg.sinter_omega)
    if name == "learnable":
        return LearnableSiLU(r, device=device, dtype=dtype)
    raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")
