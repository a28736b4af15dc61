"""NoLoRA: a learnable non-linearity with a per-rank modulation vector.

    Δ(x) = s · B · D(v ⊙ f(A·x)),   s = α/r

From the NoLoRA abstract and reviews (its full text is not public): v ∈ R^r learnable
modulation, f a learnable non-linearity. [ours]: v = 1 at init; f(z) = z·sigmoid(β⊙z) with
per-rank β = 1 at init (SiLU), the `learnable` activation; dropout D on the latent after v
(default p = 0); A Kaiming-uniform, B zeros; α = 16 by default.
Params r(d+k) + 2r (v and β). Not mergeable.
"""

from __future__ import annotations

import torch
from torch import nn

from nora.adapters.base import ActivationAdapter, register


@register
class NoLoRA(ActivationAdapter):  # σ(z) = v ⊙ f(z), f the configured activation
    name = "nolora"
    default_alpha = 16.0
    default_activation = "learnable"
    sigma_rank_dims = {"v": 1, **ActivationAdapter.sigma_rank_dims}
    sigma_gain = "v"  # σ(z) = v ⊙ f(z): ActivationAdapter.sigma applies it

    def __init__(self, in_features, out_features, cfg, device=None, dtype=None):
        super().__init__(in_features, out_features, cfg, device=device, dtype=dtype)
        self.lora_v = nn.Parameter(torch.ones(cfg.r, device=device, dtype=dtype))

    def reset_parameters(self, init_weights: bool = True) -> None:
        super().reset_parameters(init_weights)
        nn.init.ones_(self.lora_v)
        if hasattr(self.act, "beta"):
            nn.init.ones_(self.act.beta)

    # Adapter.forward gives B·(s·D(σ(A·x))), σ recomputed in backward.
    def sigma_params(self):
        return {"v": self.lora_v, **super().sigma_params()}
