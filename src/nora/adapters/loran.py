"""LoRAN with Sinter (EMNLP 2024 Findings; arXiv 2509.21870): non-linear in weight space.

    ΔW = s · Sinter(B·A),  Sinter(z) = z + a·z·sin(ω·z)  (element-wise),
    Δ(x) = ΔW · Dropout(x)                               [official code]

a = 5e-4, ω = 1e3 (code defaults; the released configs use a = 5e-5, ω = 1e4), s = α/r with
α = 16, dropout 0.2 (released configs). A Kaiming-uniform, B zeros.
Sinter(B·A) is computed in float32 whatever the parameter dtype: its perturbation is far
below bf16 resolution otherwise. Works for non-square layers (ΔW is d×k).
Params r(d+k). Exactly mergeable: W0 += ΔW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nora.activations import sinter
from nora.adapters.base import Adapter, register
from nora.fused import dropped_linear


@register
class LoRAN(Adapter):
    name = "loran"
    mergeable = True
    default_alpha = 16.0
    default_dropout = 0.2
    default_activation = "sinter"
    activations = ("sinter",)
    shrinks = False  # Δ(x) = ΔW·x with a dense ΔW: nothing to share with siblings

    def __init__(self, in_features, out_features, cfg, device=None, dtype=None):
        super().__init__(in_features, out_features, cfg, device=device, dtype=dtype)
        self.a, self.omega = cfg.sinter_a, cfg.sinter_omega
        self._cache: tuple[tuple, torch.Tensor] | None = None  # (weights' versions, ΔW)

    def delta_weight(self) -> torch.Tensor:  # (d, k), float32
        BA = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (d, k)
        return self.scale * sinter(BA, self.a, self.omega)

    def _inference_delta(self, dtype: torch.dtype) -> torch.Tensor:
        # Without autograd, ΔW (a d×k matmul plus a sine) is reused until A or B change:
        # recomputing it per call would cost more than the layer itself at decode.
        A, B = self.lora_A.weight, self.lora_B.weight
        key = (A._version, B._version, A.data_ptr(), B.data_ptr(), dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.delta_weight().to(dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., k) -> (..., d)
        if torch.is_grad_enabled():  # ΔW·D(x)
            return dropped_linear(x, self.delta_weight().to(x.dtype), self.dropout_rate())
        return F.linear(self.dropout(x), self._inference_delta(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, a={self.a:g}, omega={self.omega:g}"
