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
per adapter, or two `bmm`s over the kind's stack. `TritonBackend` runs `nora.kernels` (shrink
into a float32 latent, σ in the expand's prologue) on the kind's stack, for the kinds whose σ
is element-wise. `tests/test_serving_stacked.py` checks every backend against the reference
on every kind with σ tensors, `tests/test_kernels.py` the Triton one case by case.
`select_backend` picks one per device; a backend that does not support a kind (`supports`)
falls back to Torch for it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch

from nora import kernels
from nora.adapters import METHODS, ActivationAdapter, Packed, Stack
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


def kernel_sigma(kind: Hashable) -> kernels.Sigma | None:
    """σ of a kind as the Triton kernels compute it, or None where they cannot (asked of the
    class, never of a name): the identity (LoRA, or any method keeping `Adapter.sigma`), or
    an `ActivationAdapter`'s own σ, gain ⊙ act(z), with act one of `kernels.ACTIVATIONS`.

    AuroRA stays on Torch: its σ is not element-wise (tanh(tanh(z)·Hᵀ) mixes the channels
    through a per-adapter (R, R) matmul, and its spline reads a per-channel polynomial
    table), so it needs its own prologue; its kind runs the Torch backend's two `bmm`s.
    Dense kinds (LoRAN: x·W, no latent) have nothing to shrink.
    """
    cls = METHODS.get(kind[0])
    if cls is None or not cls.shrinks:
        return None
    if cls.identity_sigma():
        return kernels.Sigma("identity")
    own = (  # σ and kind as ActivationAdapter defines them: kind[1] names the activation
        issubclass(cls, ActivationAdapter)
        and cls.sigma.__func__ is ActivationAdapter.sigma.__func__
        and cls.kind is ActivationAdapter.kind
    )
    if own and kind[1] in kernels.ACTIVATIONS:
        return kernels.Sigma(kind[1], cls.sigma_gain)
    return None


class TritonBackend(Backend):
    """`nora.kernels` on the kind's stack: one shrink and one expand launch per kind.

    The loop it computes (the module docstring's, with the stack's slot a of adapter u):

        for a, (u, s, c) in enumerate(zip(seg.uids, seg.starts, seg.counts)):
            for t in seg.rows[s : s + c]:
                z = x[t] @ stack.A[a]                     # float32, k possibly split
                out[t] += σ(z, stack.p[a]) @ stack.B[a]   # σ in the expand's prologue

    Segment bounds go to the device once per `Segments` (the plan is built once per step and
    every layer reads it), so a layer's step is two launches and no host sync. On CPU tensors
    it runs the kernels only under the interpreter (TRITON_INTERPRET=1, for tests), else Torch.
    """

    name = "triton"

    def __init__(self, split_k: int | None = None) -> None:
        self.split_k = split_k  # the shrink's k slices; None: enough to fill the GPU
        self._starts: dict[int, tuple[weakref.ref, torch.Tensor]] = {}  # id(seg) -> bounds

    def supports(self, kind: Hashable) -> bool:
        return kernel_sigma(kind) is not None

    def starts(self, seg: Segments, device: torch.device) -> torch.Tensor:
        """(n + 1,) int32 segment bounds within seg.rows, on `device`, built once per seg."""
        key = id(seg)
        hit = self._starts.get(key)
        if hit is not None and hit[0]() is seg and hit[1].device == device:
            return hit[1]
        host = torch.tensor((*seg.starts, seg.rows.numel()), dtype=torch.int32)
        if device.type == "cuda":  # pinned: an async copy, the host does not wait for it
            host = host.pin_memory()
        bounds = host.to(device, non_blocking=True)
        forget = lambda _, k=key: self._starts.pop(k, None)  # noqa: E731
        self._starts[key] = (weakref.ref(seg, forget), bounds)
        return bounds

    def add_delta(
        self,
        kind: Hashable,
        seg: Segments,
        x: torch.Tensor,
        out: torch.Tensor,
        adapters: dict[int, Packed],
        stack: StackFn,
    ) -> None:
        if not kernels.available(x.device):
            return BACKENDS["torch"].add_delta(kind, seg, x, out, adapters, stack)
        st = stack()
        kernels.add_delta(
            x,
            out,
            seg.rows,
            self.starts(seg, x.device),
            seg.L,
            st.A,
            st.B,
            kernel_sigma(kind),
            st.p,
            split_k=self.split_k,
            identity_rows=seg.all_rows,
        )


BACKENDS: dict[str, Backend] = {b.name: b for b in (TorchBackend(), ReferenceBackend())}
if kernels.triton is not None:
    BACKENDS["triton"] = TritonBackend()


def select_backend(name: str | None = None) -> Backend:
    """A backend by name; None: Triton where CUDA is available and Triton imports, else
    Torch (on CUDA the Triton backend still hands CPU tensors and the kinds it lacks to
    Torch)."""
    if name is None:
        name = "triton" if "triton" in BACKENDS and torch.cuda.is_available() else "torch"
    if name == "triton" and name not in BACKENDS:
        raise ValueError("serving backend 'triton' needs Triton, which is not installed")
    if name not in BACKENDS:
        raise ValueError(f"unknown serving backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]
