"""Fast paths for the low-rank bottleneck: a fused training node and a shared-input shrink.

Every latent method (lora, nora, nolora, aurora) computes

    Δ(x) = B · (s · D_p(φ(z))),   z = A · x          (..., k) -> (..., r) -> (..., d)

1. `expand(z, ...)`, the part after the shrink, is one autograd node in training
   (`_Expand`): it saves z (r-wide) and a bool dropout mask, and *recomputes* φ(z) in
   backward instead of keeping φ(z), the float mask and s·D(φ(z)) alive. For NoRA that is
   three r-wide float tensors down to one plus a byte mask; for AuroRA it drops every
   intermediate of σ (tanh, self-projection, spline interval lookup and Horner steps). The
   dropout mask is drawn exactly as `F.dropout` draws it on CPU (`_draw_keep`), so the
   fused node's forward equals the plain path's bit for bit for the same seed.
   The plain path is used where the fused node cannot help or would get in the way: no
   grad, eval mode, under torch.compile (dynamo traces the plain ops without graph breaks),
   under autocast, with hooks on lora_B (analysis uses them), or `set_fused(False)`.

2. `dropped_linear(x, W, p)`: input dropout then a linear map (LoRA's and AuroRA's shrink,
   LoRAN's ΔW·D(x)) as one node that keeps x — which the base layer saves anyway — and a
   bool mask, and recomputes D(x) in backward: 1 byte per input element instead of 8.

3. `SharedInputGroup`: layers that read the same input (q/k/v in attention, gate/up in an
   MLP) get one shrink GEMM x·[A_q; A_k; A_v]ᵀ instead of three, reading x once. The group
   computes it when the first member is called with x and hands each member its slice;
   a member called with a different tensor gets a fresh computation, so the result is
   always A_member · x_member. `inject.fuse_shared_inputs(model)` sets it up after `inject`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from nora import activations as act

_ENABLED = True


def set_fused(enabled: bool) -> None:
    """Turn the fused training node on (default) or off for every adapter."""
    global _ENABLED
    _ENABLED = bool(enabled)


@contextlib.contextmanager
def fused(enabled: bool) -> Iterator[None]:
    """`with nora.fused.fused(False): ...` runs the plain autograd path (for comparisons)."""
    before = _ENABLED
    set_fused(enabled)
    try:
        yield
    finally:
        set_fused(before)


def _use_fused(z: torch.Tensor, weight: torch.Tensor, module: nn.Module | None = None) -> bool:
    return (
        _ENABLED
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and z.device.type != "meta"  # shapes only (parameter budgets); autocast has no meta
        and not torch.is_autocast_enabled(z.device.type)
        and z.dtype == weight.dtype
        and (z.requires_grad or weight.requires_grad)
        and not (module is not None and (module._forward_pre_hooks or module._forward_hooks))
    )


def _draw_keep(like: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A bool keep-mask and the kept values' factor v = 1/(1−p), drawn as `F.dropout` draws
    them on CPU: bernoulli_(1−p) on a bool tensor consumes the generator exactly as on a float
    one, and v is float32(1)/float32(1−p), so x·v·keep equals F.dropout(x, p) bit for bit."""
    keep = torch.empty_like(like, dtype=torch.bool).bernoulli_(1 - p)
    return keep, float(np.float32(1) / np.float32(1 - p))


class _DroppedLinear(torch.autograd.Function):
    """out = D_p(x) · Wᵀ, saving x (the base layer keeps it anyway) and a bool mask instead of
    D_p(x) and the float mask: 1 byte per input element instead of 8. The factor 1/(1−p) is
    applied on the small r×k side in backward."""

    @staticmethod
    def forward(ctx, x, W, p):  # x: (..., k), W: (r, k)
        keep, v = _draw_keep(x, p)
        out = F.linear(x.mul(v).mul_(keep), W)  # (..., r); = F.linear(F.dropout(x, p), W)
        ctx.save_for_backward(x, W, keep)
        ctx.v = v
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # g: (..., r)
        x, W, keep = ctx.saved_tensors
        gx = gW = None
        if ctx.needs_input_grad[1]:
            xk = x.mul(keep).reshape(-1, x.shape[-1])  # D_p(x)/v, (N, k)
            gW = g.reshape(-1, g.shape[-1]).t().mm(xk).mul_(ctx.v)  # (r, k)
        if ctx.needs_input_grad[0]:
            gx = g.matmul(W * ctx.v).mul_(keep)  # (..., k)
        return gx, gW, None


def dropped_linear(x: torch.Tensor, linear: nn.Module | torch.Tensor, p: float) -> torch.Tensor:
    """F.linear(F.dropout(x, p), W) in training, keeping x and a bool mask (not D(x)) for backward."""
    W = linear if isinstance(linear, torch.Tensor) else linear.weight
    module = None if isinstance(linear, torch.Tensor) else linear
    if p > 0 and _use_fused(x, W, module):
        return _DroppedLinear.apply(x, W, p)
    xd = F.dropout(x, p, training=True) if p > 0 else x
    return F.linear(xd, W) if module is None else module(xd)


aten = torch.ops.aten

# φ'(z)·g for the built-in activations, straight from ATen's backward kernels (no graph to
# build in backward); anything else (learnable, NoLoRA's v ⊙ f, AuroRA's σ) goes through
# autograd on the recomputed φ(z).
_DIRECT_GRAD: dict[type, Callable] = {
    act.SiLU: lambda g, z, h: aten.silu_backward(g, z),
    act.ReLU: lambda g, z, h: aten.threshold_backward(g, h, 0),
    act.Tanh: lambda g, z, h: aten.tanh_backward(g, h),
    act.GELU: lambda g, z, h: aten.gelu_backward(g, z),
}


class _Expand(torch.autograd.Function):
    """out = (s · D_p(φ(z))) · Bᵀ, saving z and a bool mask; φ(z) is recomputed in backward."""

    @staticmethod
    def forward(ctx, z, B, scale, p, phi, *params):  # z: (..., r), B: (d, r)
        h = z if phi is None else phi(z)  # (..., r)
        keep, v = None, 1.0
        if p > 0:
            keep, v = _draw_keep(h, p)
            h = h.mul(v).mul_(keep)  # = F.dropout(h, p)
        out = F.linear(h * scale if scale != 1 else h, B)  # (..., d); h·1 is h, skip it
        ctx.save_for_backward(z, B, keep, *params)
        ctx.scale, ctx.v, ctx.phi = scale, v, phi
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # g: (..., d)
        z, B, keep, *params = ctx.saved_tensors
        need_z, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want = [i for i, p in enumerate(params) if ctx.needs_input_grad[5 + i]]
        r, d = z.shape[-1], g.shape[-1]
        g2, z2 = g.reshape(-1, d), z.reshape(-1, r)  # (N, d), (N, r)
        direct = _DIRECT_GRAD.get(type(ctx.phi))
        if ctx.phi is None:
            h = z2
        elif direct is not None:
            h = ctx.phi(z2)  # recomputed, (N, r)
        else:  # recompute φ(z) with a graph, to differentiate it below
            with torch.enable_grad():
                zz = z2.detach().requires_grad_(need_z)
                h = ctx.phi(zz)  # (N, r)
        # s·v is applied to the small d×r side; the mask is one r-wide pass per gradient
        sv = ctx.scale * ctx.v
        keep = None if keep is None else keep.reshape(-1, r)
        gB = None
        if need_B:
            hs = h.detach() if keep is None else h.detach().mul(keep)
            gB = g2.t().mm(hs)  # (d, r)
            gB = gB.mul_(sv) if sv != 1 else gB
        gz, gparams = None, [None] * len(params)
        if need_z or want:
            gh = g2.mm(B * sv if sv != 1 else B)  # (N, r)
            if keep is not None:
                gh = gh.mul_(keep)
            if ctx.phi is None:
                gz = gh
            elif direct is not None:
                gz = direct(gh, z2, h) if need_z else None
            else:
                inputs = ([zz] if need_z else []) + [params[i] for i in want]
                grads = list(torch.autograd.grad(h, inputs, gh))
                gz = grads.pop(0) if need_z else None
                for i, gp in zip(want, grads, strict=True):
                    gparams[i] = gp
            if gz is not None:
                gz = gz.reshape(z.shape)
        return (gz, gB, None, None, None, *gparams)


def expand(
    z: torch.Tensor,
    lora_B: nn.Linear,
    scale: float,
    p: float = 0.0,
    phi: Callable[[torch.Tensor], torch.Tensor] | None = None,
    params: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """B · (s · D_p(φ(z))): (..., r) -> (..., d). p is the latent dropout (0 outside training)."""
    if _use_fused(z, lora_B.weight, lora_B):
        return _Expand.apply(z, lora_B.weight, scale, p, phi, *params)
    h = z if phi is None else phi(z)
    if p > 0:
        h = F.dropout(h, p, training=True)
    return lora_B(h * scale)


class SharedInputGroup:
    """Adapters of sibling layers that read one input: one shrink GEMM for all of them."""

    def __init__(self, adapters: Sequence[nn.Module]):
        self.adapters = list(adapters)
        self.index = {id(a): i for i, a in enumerate(self.adapters)}
        ends = torch.tensor([a.r for a in self.adapters]).cumsum(0).tolist()
        self.spans = list(zip([0, *ends[:-1]], ends, strict=True))
        self._x: weakref.ref | None = None  # the input the cached latents belong to
        self._key: tuple = ()
        self._z: torch.Tensor | None = None  # (..., Σr)
        self._left: set[int] = set()
        self._weight: tuple[tuple, torch.Tensor] | None = None  # (versions, [A_1; A_2; …])

    def _stacked_A(self) -> torch.Tensor:  # (Σr, k)
        ws = [a.lora_A.weight for a in self.adapters]
        if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
            return torch.cat(ws)  # autograd routes each slice's gradient back to its A
        key = tuple((w._version, w.data_ptr()) for w in ws)
        if self._weight is None or self._weight[0] != key:  # inference: concatenate once
            self._weight = (key, torch.cat([w.detach() for w in ws]))
        return self._weight[1]

    def shrink(self, adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A_adapter · x, (..., k) -> (..., r), from the group's one GEMM where possible."""
        i = self.index[id(adapter)]
        key = (x._version, torch.is_grad_enabled())
        fresh = self._x is None or self._x() is not x or self._key != key or i not in self._left
        if fresh:
            self._z = F.linear(x, self._stacked_A())
            self._x, self._key, self._left = weakref.ref(x), key, set(range(len(self.adapters)))
        z = self._z
        self._left.discard(i)
        if not self._left:  # every member served: drop the reference
            self._x, self._z = None, None
        lo, hi = self.spans[i]
        return z[..., lo:hi]
