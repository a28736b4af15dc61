"""The LoRA math of one serving step behind a backend object (sglang's `BaseLoraBackend`,
vLLM's punica selector): a `MultiAdapterLinear` hands each kind's `Segments` to its backend.

One op, defined by its reference loop (`ReferenceBackend`, one token at a time):

    add_delta(kind, seg, x, out, adapters, stack):
        for u, s, c in zip(seg.uids, seg.starts, seg.counts):
            for t in seg.rows[s : s + c]:            # the tokens of adapter u
                w = adapters[u]
                out[t] += x[t] @ w.W                                  # a dense kind (LoRAN)
                out[t] += σ_kind(x[t] @ w.A, w.p) @ w.B               # any other kind

    x (N, k), out (N, d) written in place; tokens of other kinds or of no adapter untouched.

`TorchBackend` computes the same with two matmuls (one adapter for the whole batch), a loop
per adapter, or two `bmm`s over the kind's stack; `tests/test_serving_stacked.py` checks every
backend against the reference on every kind with σ tensors. `select_backend` picks one per
device; a backend that does not support a kind (`supports`) falls back to Torch for it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from nora.adapters import METHODS, Packed, Stack
from nora.serving.plan import Segments

StackFn = Callable[[], Stack]  # the kind's stack for seg.uids, built (or reused) on demand


def _sigma(kind: Hashable, z: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    return METHODS[kind[0]].sigma(kind, z, p)  # z (M, r) one adapter, or (n, L, R) stacked


class Backend:
    """What a backend implements: `add_delta` (the module docstring's loop) for the kinds it
    `supports`."""

    name: str

    def supports(self, kind: Hashable) -> bool:
        return True

    def add_delta(
        self,
        kind: Hashable,
        seg: Segments,
        x: torch.Tensor,
        out: torch.Tensor,
        adapters: dict[int, Packed],
        stack: StackFn,
    ) -> None:
        raise NotImplementedError


class ReferenceBackend(Backend):
    """The definition, a token at a time: slow, for tests only."""

    name = "reference"

    def add_delta(
        self,
        kind: Hashable,
        seg: Segments,
        x: torch.Tensor,
        out: torch.Tensor,
        adapters: dict[int, Packed],
        stack: StackFn,
    ) -> None:
        dense = not METHODS[kind[0]].shrinks
        for u, s, c in zip(seg.uids, seg.starts, seg.counts, strict=True):
            w = adapters[u]
            for t in seg.rows[s : s + c].tolist():
                xt = x[t : t + 1]  # (1, k)
                y = xt @ w.W if dense else _sigma(kind, xt @ w.A, w.p) @ w.B  # (1, d)
                out[t] += y[0]


class TorchBackend(Backend):
    """PyTorch ops: what every device runs (and the fallback of any other backend)."""

    name = "torch"

    def add_delta(
        self,
        kind: Hashable,
        seg: Segments,
        x: torch.Tensor,
        out: torch.Tensor,
        adapters: dict[int, Packed],
        stack: StackFn,
    ) -> None:
        dense = not METHODS[kind[0]].shrinks
        if seg.all_rows:  # one adapter for the whole batch: two matmuls, no gather/scatter
            w = adapters[seg.uids[0]]
            if dense:
                out.addmm_(x, w.W)  # (N, d)
            else:
                out.addmm_(_sigma(kind, x @ w.A, w.p), w.B)  # (N, r) -> (N, d)
            return
        if dense or seg.loop or len(seg.uids) == 1:
            for u, s, c in zip(seg.uids, seg.starts, seg.counts, strict=True):
                w, rows = adapters[u], seg.rows[s : s + c]
                xs = x[rows]  # (c, k)
                y = xs @ w.W if dense else _sigma(kind, xs @ w.A, w.p) @ w.B  # (c, d)
                out.index_add_(0, rows, y)
            return
        st = stack()
        n, L = len(seg.uids), seg.L
        idx = seg.gather if seg.gather is not None else seg.rows
        xg = x[idx].view(n, L, -1)  # (n, L, k)
        h = _sigma(kind, torch.bmm(xg, st.A), st.p)  # (n, L, R)
        y = torch.bmm(h, st.B).view(n * L, -1)  # (n·L, d)
        if seg.valid is not None:
            y = y[seg.valid]  # (M, d): padding rows dropped
        out.index_add_(0, seg.rows, y)


BACKENDS = {b.name: b for b in (TorchBackend(), ReferenceBackend())}


def select_backend(name: str = "torch"):
    """A backend by name. Torch is the default on every device today: the Triton kernel
    (`nora.kernels`) is not yet a backend, so CUDA runs these PyTorch ops too."""
    if name not in BACKENDS:
        raise ValueError(f"unknown serving backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]
