"""Segmented multi-adapter kernel: y[t] += B_a · act(A_a · x[t]) for the adapter a of token t.

The serving hot path (Punica / S-LoRA's shrink → expand split) with what none of those systems
has: an activation between the two projections. Per tile of tokens that share an adapter:

    latent = x_tile · A_aᵀ          the whole k-reduction, in one program (never split-K:
                                    act(partial sum) ≠ partial act)
    latent = act(latent)            on the complete (BLOCK_T, R) rank tile
    y_tile += latent · B_aᵀ         B carries the scale (s·B), so act never sees s

Mixed ranks are zero-padded to one R (a power of two ≥ 16, as `tl.dot` wants); padded
columns of B are zero, so whatever the activation gives there is multiplied away.
`segmented_delta` runs the Triton kernel (on GPU, or on CPU under `TRITON_INTERPRET=1`) and
`segmented_delta_reference` is the plain PyTorch loop it must equal.

Precision: `tl.dot` on float32 defaults to TF32 on NVIDIA GPUs (inputs rounded to a 10-bit
mantissa, ~5e-4 relative), which float32 callers do not expect. So it is pinned: "ieee"
(true float32 products) whenever x, A or B is float32; "tf32" when all three are 16-bit,
which is exact for their products (bf16 and fp16 mantissas fit in TF32's); the float32
accumulator is then rounded to the 16-bit output (for bf16 far more coarsely than TF32's
rounding; for fp16 about as coarsely). `precision=` overrides.
(The CPU interpreter always computes in float32; only a GPU run tells the two apart.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = {"identity": 0, "silu": 1, "relu": 2, "tanh": 3, "gelu": 4}
PRECISIONS = ("ieee", "tf32", "tf32x3")  # tl.dot's input_precision on NVIDIA GPUs

try:  # Triton is optional: the reference path covers every machine
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


def padded_rank(r: int) -> int:
    return max(16, 1 << math.ceil(math.log2(max(r, 1))))


def stack_adapters(
    adapters: list[tuple[torch.Tensor, torch.Tensor, float]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """[(A (r_i, k), B (d, r_i), scale_i)] -> A_stack (n, R, k), B_stack (n, d, R) with s folded into B."""
    R = padded_rank(max(a.shape[0] for a, _, _ in adapters))
    k, d = adapters[0][0].shape[1], adapters[0][1].shape[0]
    ref = adapters[0][0]
    A = ref.new_zeros(len(adapters), R, k)
    B = ref.new_zeros(len(adapters), d, R)
    for i, (a, b, s) in enumerate(adapters):
        A[i, : a.shape[0]] = a
        B[i, :, : b.shape[1]] = s * b
    return A, B


def _act(z: torch.Tensor, activation: str) -> torch.Tensor:
    return {
        "identity": lambda t: t,
        "silu": F.silu,
        "relu": F.relu,
        "tanh": torch.tanh,
        "gelu": F.gelu,
    }[activation](z)


def segmented_delta_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    adapter_idx: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """y[t] += B[a]·act(A[a]·x[t]) per token (a = adapter_idx[t], -1 = none); returns y."""
    for a in adapter_idx.unique().tolist():
        if a < 0:
            continue
        rows = (adapter_idx == a).nonzero(as_tuple=True)[0]
        y[rows] += _act(x[rows] @ A[a].T, activation) @ B[a].T  # (n, R) -> (n, d)
    return y


def tiles(
    adapter_idx: torch.Tensor, block_t: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Metadata, built once per step: the token order (stable sort by adapter) and tiles of at
    most `block_t` tokens that share one adapter: (order, tile_adapter, tile_start, tile_end)."""
    order = torch.argsort(adapter_idx, stable=True)
    ids, counts = torch.unique_consecutive(adapter_idx[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    t_adapter, t_start, t_end = [], [], []
    for a, s, c in zip(ids.tolist(), starts.tolist(), counts.tolist(), strict=True):
        if a < 0:
            continue  # base-only tokens: nothing to add
        for off in range(0, c, block_t):
            t_adapter.append(a)
            t_start.append(s + off)
            t_end.append(s + min(off + block_t, c))
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=adapter_idx.device)  # noqa: E731
    return order, as_t(t_adapter), as_t(t_start), as_t(t_end)


if triton is not None:

    @triton.jit
    def _segmented_kernel(
        x_ptr,
        a_ptr,
        b_ptr,
        y_ptr,
        tile_adapter_ptr,
        tile_start_ptr,
        tile_end_ptr,
        K,
        D,
        R: tl.constexpr,
        ACT: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        tile = tl.program_id(0)
        adapter = tl.load(tile_adapter_ptr + tile)
        t0 = tl.load(tile_start_ptr + tile)
        t1 = tl.load(tile_end_ptr + tile)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t1
        offs_r = tl.arange(0, R)
        # shrink: the full k-reduction for this tile, before any activation
        latent = tl.zeros((BLOCK_T, R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xt = tl.load(
                x_ptr + offs_t[:, None] * K + offs_k[None, :],
                mask=mask_t[:, None] & mask_k[None, :],
                other=0.0,
            )  # (BLOCK_T, BLOCK_K)
            at = tl.load(
                a_ptr + adapter * R * K + offs_r[None, :] * K + offs_k[:, None],
                mask=mask_k[:, None],
                other=0.0,
            )  # Aᵀ tile (BLOCK_K, R)
            latent += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision=PRECISION)
        if ACT == 1:
            latent = latent * tl.sigmoid(latent)
        elif ACT == 2:
            latent = tl.maximum(latent, 0.0)
        elif ACT == 3:
            latent = 2.0 * tl.sigmoid(2.0 * latent) - 1.0  # tanh
        elif ACT == 4:
            latent = 0.5 * latent * (1.0 + tl.erf(latent * 0.7071067811865476))
        # expand, added into the base output
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            bt = tl.load(
                b_ptr + adapter * D * R + offs_d[None, :] * R + offs_r[:, None],
                mask=mask_d[None, :],
                other=0.0,
            )  # (s·B)ᵀ tile (R, BLOCK_D)
            out = tl.dot(latent, bt.to(tl.float32), input_precision=PRECISION)
            ptrs = y_ptr + offs_t[:, None] * D + offs_d[None, :]
            mask = mask_t[:, None] & mask_d[None, :]
            prev = tl.load(ptrs, mask=mask, other=0.0)
            tl.store(ptrs, (prev.to(tl.float32) + out).to(prev.dtype), mask=mask)


def segmented_delta(
    x: torch.Tensor,
    y: torch.Tensor,
    adapter_idx: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    activation: str,
    block_t: int = 16,
    meta=None,
    precision: str | None = None,
) -> torch.Tensor:
    """The Triton path of `segmented_delta_reference` (same arguments); returns y.

    `meta` = `tiles(adapter_idx, block_t)` may be passed in when several layers share a step.
    `precision` of the dots: "ieee", "tf32" or "tf32x3"; by default "ieee", or "tf32" when x, A
    and B are all 16-bit (see the module docstring).
    """
    if triton is None:
        raise RuntimeError("Triton is not installed: use segmented_delta_reference")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} has no kernel; use one of {list(ACTIVATIONS)}")
    if precision is None:
        sixteen_bit = all(t.dtype in (torch.bfloat16, torch.float16) for t in (x, A, B))
        precision = "tf32" if sixteen_bit else "ieee"
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    order, t_adapter, t_start, t_end = meta if meta is not None else tiles(adapter_idx, block_t)
    if len(t_adapter) == 0:
        return y
    K, D, R = x.shape[1], y.shape[1], A.shape[1]
    xs = x[order].contiguous()  # (T, K) grouped by adapter
    ys = y[order].contiguous()  # (T, D)
    _segmented_kernel[(len(t_adapter),)](
        xs,
        A.contiguous(),
        B.contiguous(),
        ys,
        t_adapter,
        t_start,
        t_end,
        K,
        D,
        R=R,
        ACT=ACTIVATIONS[activation],
        BLOCK_T=block_t,
        BLOCK_K=64,
        BLOCK_D=64,
        PRECISION=precision,
    )
    y[order] = ys
    return y
