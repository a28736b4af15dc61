"""The multi-adapter linear: one base `nn.Linear`, many resident adapters, one batched step.

Each method is packed once at load into the split that serving systems use (vLLM/Punica):

    Δ(x) = expand(σ(shrink(x))),   shrink: Aᵀ (k, r),   σ: the method's latent non-linearity,
                                   expand: Bᵀ (r, d) with the scale (and NoLoRA's v) folded in

The scale goes into B, never into A: SiLU(s·Ax) ≠ s·SiLU(Ax). Per method:

    lora    σ = identity                         B' = s·B
    nora    σ = its activation (SiLU, …)         B' = s·B
    nolora  σ = f (learnable SiLU, …)            B' = s·B·diag(v)     (v ⊙ f(z) folded into B)
    aurora  σ(z) = tanh(tanh(z)·Hᵀ) + Σ_j C'_ij·B_j(z_i),  C' = w_s ⊙ C,   B' = s·B
    loran   dense: ΔWᵀ = (s·Sinter(B·A))ᵀ (k, d), precomputed once at load (a weight-space
            non-linearity has no low-rank split)

Adapters of one *kind* (same σ) run together: their A, B and σ-parameters are stacked into
(n, k, R), (n, R, d), … with ranks zero-padded to R (zero columns of A and rows of B add
exactly nothing), and the step's tokens, gathered into a padded (n, L, k) layout, go through
two `bmm`s. A kind with one adapter that covers the whole batch is two plain matmuls. Each
layer keeps the stack of the last composition of each kind (`STACKS_PER_KIND`), so decode
steps with an unchanged batch reuse it, and memory holds one stack per kind whatever the
traffic. Dropout is the identity at inference.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nora.activations import LearnableSiLU, Sinter
from nora.adapters import Adapter
from nora.adapters.aurora import eval_interval_polynomials, interval_polynomials
from nora.serving.plan import BatchPlan, Segments

DENSE: tuple = ("dense",)
_ACT_FNS = {
    "identity": lambda z: z,
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "tanh": torch.tanh,
}
_PLAIN_ACTS = {nn.Identity: "identity", nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh"}


class UnsupportedAdapterError(ValueError):
    """An adapter uses a method or activation serving does not know: refused, never guessed."""


@dataclass
class LayerWeights:
    """One adapter at one Linear, in serving form (see the module docstring)."""

    r: int
    A: torch.Tensor | None  # (k, r)
    B: torch.Tensor | None  # (r, d), scale folded in
    W: torch.Tensor | None = None  # (k, d), dense kinds only
    p: dict[str, torch.Tensor] = field(default_factory=dict)  # σ's parameters

    @property
    def nbytes(self) -> int:
        ts = [self.A, self.B, self.W, *self.p.values()]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _act_kind(act: nn.Module) -> tuple[tuple, dict[str, torch.Tensor]]:
    t = type(act)
    if t in _PLAIN_ACTS:
        return ("act", _PLAIN_ACTS[t]), {}
    if t is nn.GELU:
        return ("act", "gelu" if act.approximate == "none" else "gelu_tanh"), {}
    if t is Sinter:
        return ("sinter",), {
            "a": torch.tensor(float(act.a)),
            "omega": torch.tensor(float(act.omega)),
        }
    if t is LearnableSiLU:
        return ("learnable",), {"beta": act.beta.detach().clone()}
    raise UnsupportedAdapterError(f"serving does not support the latent activation {t.__name__}")


@torch.no_grad()
def pack(adapter: Adapter) -> tuple[Hashable, LayerWeights]:
    """(kind, LayerWeights) of one loaded nora adapter module."""
    name, s = adapter.name, adapter.scale
    dtype = adapter.lora_A.weight.dtype
    if name == "loran":
        W = adapter.delta_weight().to(dtype).t().contiguous()  # (k, d), Sinter in float32
        return DENSE, LayerWeights(adapter.r, None, None, W=W)
    A = adapter.lora_A.weight.detach().t().contiguous()  # (k, r)
    B = adapter.lora_B.weight.detach() * s  # (d, r)
    p: dict[str, torch.Tensor] = {}
    if name == "lora":
        kind: tuple = ("act", "identity")
    elif name in ("nora", "nolora"):
        kind, p = _act_kind(adapter.act)
        if name == "nolora":
            B = B * adapter.lora_v.detach()  # B·diag(v): v ⊙ f(z) folded into the expand
    elif name == "aurora":
        # one knot grid and spline shape per kind: (lo, h, basis functions, order)
        kind = ("aurora", adapter.spline_lo, adapter.spline_h, *adapter.spline_weight.shape[1:])
        kind = (*kind, adapter.order)
        C = adapter.spline_scale.detach()[:, None] * adapter.spline_weight.detach()  # w_s ⊙ c
        p = {
            "Ht": adapter.self_proj.weight.detach().t().contiguous(),  # (r, r)
            "P": interval_polynomials(C, adapter.local_basis),  # (r, n_int, K+1), once
            "channel": torch.arange(adapter.r, device=A.device),  # row of P per latent
        }
    else:
        raise UnsupportedAdapterError(f"serving does not know the method {name!r}")
    p = {k: v.to(dtype) if v.is_floating_point() else v for k, v in p.items()}
    return kind, LayerWeights(adapter.r, A, B.t().contiguous(), p=p)


def activate(kind: Hashable, z: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """σ on the latent: z (M, r) with one adapter's p, or (n, L, R) with stacked p."""
    tag = kind[0]
    if tag == "act":
        return _ACT_FNS[kind[1]](z)
    if tag == "sinter":
        return z + p["a"] * z * torch.sin(p["omega"] * z)
    if tag == "learnable":
        return z * torch.sigmoid(p["beta"] * z)
    if tag == "aurora":
        mix = torch.tanh(torch.matmul(torch.tanh(z), p["Ht"]))
        spline = eval_interval_polynomials(z, p["P"], kind[1], kind[2], p["channel"])
        return mix + spline
    raise AssertionError(kind)


@dataclass
class Stack:
    """n adapters of one kind stacked for `bmm`, ranks zero-padded to R."""

    A: torch.Tensor  # (n, k, R)
    B: torch.Tensor  # (n, R, d)
    p: dict[str, torch.Tensor]


def stack(ws: list[LayerWeights]) -> Stack:
    n, R = len(ws), max(w.r for w in ws)
    A0, B0 = ws[0].A, ws[0].B
    A = A0.new_zeros(n, A0.shape[0], R)
    B = B0.new_zeros(n, R, B0.shape[1])
    for i, w in enumerate(ws):
        A[i, :, : w.r] = w.A
        B[i, : w.r] = w.B
    p: dict[str, torch.Tensor] = {}
    for key, v0 in ws[0].p.items():
        if key in ("a", "omega"):  # () -> (n, 1, 1)
            p[key] = torch.stack([w.p[key] for w in ws]).view(n, 1, 1)
        elif key == "beta":  # (r,) -> (n, 1, R); the pad value is irrelevant (z = 0 there)
            p[key] = v0.new_ones(n, 1, R)
            for i, w in enumerate(ws):
                p[key][i, 0, : w.r] = w.p[key]
        elif key == "Ht":  # (r, r) -> (n, R, R)
            p[key] = v0.new_zeros(n, R, R)
            for i, w in enumerate(ws):
                p[key][i, : w.r, : w.r] = w.p[key]
        elif key == "P":  # (r, n_int, K+1) -> (n·R, n_int, K+1); zero rows for the padding
            P = v0.new_zeros(n, R, *v0.shape[1:])
            for i, w in enumerate(ws):
                P[i, : w.r] = w.p[key]
            p[key] = P.flatten(0, 1)
        elif key == "channel":  # z (n, L, R): adapter i's latent j reads row i·R + j of P
            p[key] = torch.arange(n * R, device=v0.device).view(n, 1, R)
        else:
            raise AssertionError(key)
    return Stack(A, B, p)


class ServingContext:
    """What the engine hands every MultiAdapterLinear for the current step."""

    def __init__(self) -> None:
        self.plan: BatchPlan | None = None


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
        self.adapters: dict[int, LayerWeights] = {}  # uid -> packed weights
        self._stacks: dict[Hashable, OrderedDict[tuple[int, ...], Stack]] = {}  # kind -> LRU

    def drop(self, uid: int) -> None:
        self.adapters.pop(uid, None)
        self._stacks.clear()

    def _stack(self, kind: Hashable, uids: tuple[int, ...]) -> Stack:
        lru = self._stacks.setdefault(kind, OrderedDict())
        st = lru.get(uids)
        if st is None:
            st = lru[uids] = stack([self.adapters[u] for u in uids])
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
        if seg.all_rows:  # one adapter for the whole batch: two matmuls, no gather/scatter
            w = self.adapters[seg.uids[0]]
            if kind == DENSE:
                of.addmm_(xf, w.W)
            else:
                of.addmm_(activate(kind, xf @ w.A, w.p), w.B)  # (N, r) -> (N, d)
            return
        if kind == DENSE or seg.loop or len(seg.uids) == 1:
            for u, s, c in zip(seg.uids, seg.starts, seg.counts, strict=True):
                w, rows = self.adapters[u], seg.rows[s : s + c]
                xs = xf[rows]  # (c, k)
                y = xs @ w.W if kind == DENSE else activate(kind, xs @ w.A, w.p) @ w.B
                of.index_add_(0, rows, y)  # (c, d)
            return
        st = self._stack(kind, seg.uids)
        n, L = len(seg.uids), seg.L
        idx = seg.gather if seg.gather is not None else seg.rows
        xg = xf[idx].view(n, L, -1)  # (n, L, k)
        h = activate(kind, torch.bmm(xg, st.A), st.p)  # (n, L, R)
        y = torch.bmm(h, st.B).view(n * L, -1)  # (n·L, d)
        if seg.valid is not None:
            y = y[seg.valid]  # (M, d)
        of.index_add_(0, seg.rows, y)
