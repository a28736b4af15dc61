"""LoRA, the linear baseline (Hu et al. 2021), compatible with PEFT's LoRA checkpoints.

    Δ(x) = s · B · A · Dropout(x),   s = α/r  (rsLoRA: α/√r; or a fixed `scale`)

A ∈ R^{r×k} Kaiming-uniform (a=√5), B ∈ R^{d×r} zeros; defaults as in PEFT: r=8, α=8, p=0.
Params r(d+k). Exactly mergeable: W0 += s·B·A.
"""

from __future__ import annotations

import torch

from nora.adapters.base import Adapter, register


@register
class LoRA(Adapter):
    name = "lora"
    mergeable = True
    linear = True
    default_alpha = 8.0

    # σ = identity (the base class's): Δ(x) = B·(s·A·D(x)), the scale on the r-wide latent,
    # not the d-wide output — same function, a fraction of the elementwise work.

    def delta_weight(self) -> torch.Tensor:  # (d, k)
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)
