"""NoRA (the seed paper, later called CeRA): a non-linearity inside the bottleneck.

    Δ(x) = s · B · D(σ(A·x))          [paper eq. 2]

σ = SiLU by default (the ablations swap it), D = dropout on the r-dim latent *after* the
activation [paper code], p = 0.1 (the training script's value; the class default was 0.3).
A ∈ R^{r×k} Kaiming-normal with nonlinearity="relu", i.e. N(0, 2/k) [paper code];
B ∈ R^{d×r} zeros, so the adapted model starts exactly equal to the base.
s = 1.0 [paper code] (no α/r); pass `alpha` (or `scale`) to change it.
Params r(d+k), LoRA's budget at equal rank (plus r for the `learnable` activation).
Not mergeable: σ makes the update depend on x; it is served unmerged.
"""

from __future__ import annotations

import torch
from torch import nn

from nora.adapters.base import ActivationAdapter, register


@register
class NoRA(ActivationAdapter):  # σ = the configured activation (SiLU)
    name = "nora"
    default_scale = 1.0
    default_dropout = 0.1
    default_activation = "silu"

    def reset_parameters(self, init_weights: bool = True) -> None:
        nn.init.kaiming_normal_(self.lora_A.weight, nonlinearity="relu")  # N(0, 2/k)
        self._init_B(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., k) -> (..., d)
        # B·(s·D(σ(A·x))); s·B·h == B·(s·h). In training σ(z) is recomputed in backward. The
        # activation module itself is φ (its forward is `sigma`), so the fused node
        # recognises SiLU/ReLU/Tanh/GELU and uses ATen's backward kernels for them.
        phi = None if self.act.name == "identity" else self.act
        if self.plain_eval():
            return self.eval_forward(x, phi)
        return self.bottleneck(x, phi, tuple(self.act.parameters()))
