"""The multi-adapter linear: one base `nn.Linear`, many resident adapters, one batched step.

Each adapter is packed once at load (`Adapter.pack`) into the split that serving systems use
(vLLM/Punica):

    Δ(x) = expand(σ(shrink(x))),   shrink: Aᵀ (k, r),   σ: the method's latent map,
                                   expand: Bᵀ (r, d) with the scale folded in

The scale goes into B, never into A: SiLU(s·Ax) ≠ s·SiLU(Ax). Dense methods (LoRAN, whose
non-linearity acts on the weight update) pack ΔWᵀ (k, d) once at load instead.

This module knows no method by name: σ is `METHODS[kind[0]].sigma(kind, z, p)`, the same
function the adapter trains with, and stacking is `METHODS[kind[0]].stack`; the math itself
is the step's backend's (`serving.backend`: each op documented by its reference loop). Adapters of one
*kind* (same σ code and static settings) run together: their A, B and σ-tensors are stacked
into (n, k, R), (n, R, d), … with ranks zero-padded to R (zero columns of A and rows of B add
exactly nothing), and the step's tokens, gathered into a padded (n, L, k) layout, go through
two `bmm`s. A kind with one adapter that covers the whole batch is two plain matmuls. Each
layer keeps the stack of the last composition of each kind (`STACKS_PER_KIND`), so decode
steps with an unchanged batch reuse it, and memory holds one stack per kind whatever the
traffic. Dropout is the identity at inference.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch
import torch.nn.functional as F
from torch import nn

from nora.adapters import METHODS, Packed, Stack
from nora.serving.backend import BACKENDS, select_backend
from nora.serving.plan import BatchPlan, Segments


class UnsupportedAdapterError(ValueError):
    """An adapter uses a method serving does not know: refused, never guessed."""


def method_of(kind: Hashable):
    """The adapter class that owns a kind (its σ and how it stacks)."""
    cls = METHODS.get(kind[0])
    if cls is None:
        raise UnsupportedAdapterError(f"serving does not know the method {kind[0]!r}")
    return cls


class ServingContext:
    """What the engine hands every MultiAdapterLinear for the current step."""

    def __init__(self, backend=None) -> None:
        self.plan: BatchPlan | None = None
        self.backend = backend or select_backend()  # serving.backend: the step's LoRA math


class MultiAdapterLinear(nn.Linear):
    """A targeted nn.Linear serving many adapters: h = W0·x + b + Δ_{adapter(token)}(x).

    It *is* the base layer for every other purpose: `weight` and `bias` are the original
    Parameter objects (shared, never copied), so state_dict keys and shapes are unchanged.
    """

    STACKS_PER_KIND = 1  # a server's batch has one composition per kind at a time

    def __init__(self, base: nn.Linear, ctx: ServingContext):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.__dict__["original"] = base  # not a submodule: restored by `unwrap`
        self.__dict__["ctx"] = ctx
        self.adapters: dict[int, Packed] = {}  # uid -> packed weights
        self._stacks: dict[Hashable, OrderedDict[tuple[int, ...], Stack]] = {}  # kind -> LRU

    def drop(self, uid: int) -> None:
        self.adapters.pop(uid, None)
        self._stacks.clear()

    def _stack(self, kind: Hashable, uids: tuple[int, ...]) -> Stack:
        lru = self._stacks.setdefault(kind, OrderedDict())
        st = lru.get(uids)
        if st is None:
            st = lru[uids] = method_of(kind).stack([self.adapters[u] for u in uids])
            while len(lru) > self.STACKS_PER_KIND:
                lru.popitem(last=False)
        lru.move_to_end(uids)
        return st

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., k) -> (..., d)
        out = F.linear(x, self.weight, self.bias)
        plan = self.ctx.plan
        if plan is None or not self.adapters:
            return out
        xf = x.reshape(-1, self.in_features)  # (N, k)
        of = out.view(-1, self.out_features)  # (N, d), written in place
        if xf.shape[0] != plan.n_tokens:
            raise RuntimeError(
                f"a multi-adapter layer got {xf.shape[0]} tokens but the step has "
                f"{plan.n_tokens}: this model reshapes the batch before a targeted Linear"
            )
        for kind, seg in plan.groups.items():
            sub = seg.subset(tuple(u in self.adapters for u in seg.uids))
            if sub is not None:
                self._add_delta(kind, sub, xf, of)
        return out

    def _add_delta(self, kind: Hashable, seg: Segments, xf: torch.Tensor, of: torch.Tensor):
        method_of(kind)  # an unknown method is refused, never guessed
        backend = self.ctx.backend
        if not backend.supports(kind):
            backend = BACKENDS["torch"]  # a kind the backend lacks falls back to Torch
        backend.add_delta(kind, seg, xf, of, self.adapters, lambda: self._stack(kind, seg.uids))
