"""Activations applied inside the low-rank bottleneck (the r-dim latent), one registry.

Each activation is written once, as a pure function `fn(z, p)` of the latent z and its
parameters p (a dict of tensors that broadcast against z). The module form holds p's
learnable tensors and is what adapters keep as `act` (checkpoint keys such as `act.beta`);
its forward is `fn(z, self.params())`. Adapters, the fused backward, analysis and serving
all call the same `fn`: serving with p stacked over many adapters, see `Adapter.stack`.

`make_activation(name, r, cfg)` returns the module; `sinter` is also LoRAN's weight-space map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from nora.config import AdapterConfig


def sinter(z: torch.Tensor, a, omega) -> torch.Tensor:
    """Sinter(z) = z + a·z·sin(ω·z)  (LoRAN, EMNLP 2024 Findings)."""
    return z + a * z * torch.sin(omega * z)


class Activation(nn.Module):
    """Base of the latent activations: `fn` is the math, `params()` its tensors.

    `rank_dims` says, for each key of p, how many leading dims are rank dims (1: one value
    per latent channel); keys not listed are per-adapter scalars. `Adapter.stack` uses it.
    """

    name: ClassVar[str]
    rank_dims: ClassVar[dict[str, int]] = {}

    @staticmethod
    def fn(z: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (..., r) -> (..., r)
        return self.fn(z, self.params())


def _pointwise(cls_name: str, name: str, f) -> type[Activation]:
    """An activation without parameters: σ(z) = f(z)."""
    return type(cls_name, (Activation,), {"name": name, "fn": staticmethod(lambda z, p: f(z))})


Identity = _pointwise("Identity", "identity", lambda z: z)
ReLU = _pointwise("ReLU", "relu", F.relu)
SiLU = _pointwise("SiLU", "silu", F.silu)
GELU = _pointwise("GELU", "gelu", F.gelu)
Tanh = _pointwise("Tanh", "tanh", torch.tanh)


class Sinter(Activation):
    """Sinter on the latent (an ablation); a, ω fixed by the config, per adapter."""

    name = "sinter"

    def __init__(self, a: float, omega: float):
        super().__init__()
        self.a, self.omega = a, omega

    @staticmethod
    def fn(z, p):
        return sinter(z, p["a"], p["omega"])

    def params(self):
        return {"a": torch.tensor(float(self.a)), "omega": torch.tensor(float(self.omega))}

    def extra_repr(self) -> str:
        return f"a={self.a}, omega={self.omega}"


class LearnableSiLU(Activation):
    """f(z) = z·sigmoid(β ⊙ z) with a learnable per-rank β ∈ R^r, β = 1 at init (i.e. SiLU).

    [ours] NoLoRA's "learnable non-linearity": its full text is not public, so we use the
    Swish family, which contains SiLU (β=1), a scaled ReLU (β→∞) and z/2 (β=0).
    """

    name = "learnable"
    rank_dims = {"beta": 1}

    def __init__(self, r: int, device=None, dtype=None):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(r, device=device, dtype=dtype))

    @staticmethod
    def fn(z, p):
        return z * torch.sigmoid(p["beta"] * z)

    def params(self):
        return {"beta": self.beta}


_CLASSES = (Identity, ReLU, SiLU, GELU, Tanh, Sinter, LearnableSiLU)
REGISTRY: dict[str, type[Activation]] = {c.name: c for c in _CLASSES}
ACTIVATIONS = tuple(REGISTRY)


def make_activation(name: str, r: int, cfg: AdapterConfig, device=None, dtype=None) -> Activation:
    if name == "sinter":
        return Sinter(cfg.sinter_a, cfg.sinter_omega)
    if name == "learnable":
        return LearnableSiLU(r, device=device, dtype=dtype)
    if name not in REGISTRY:
        raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")
    return REGISTRY[name]()
